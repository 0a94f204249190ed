"""Dense evaluation, shared by train.py, distill.py and eval.py: patch features, segmentation and tracking metrics,
a closed-form segmentation probe and video label propagation.

- Features: `forward_tokens` (class and patch tokens of any backbone), `patch_feature_maps` ([N, C, h, w], the last
  layer or the last n layers concatenated) and `pixel_feature_maps` (each patch's raw pixels: the baseline).
- Segmentation metrics: `confusion_matrix` over the pixels whose label is not IGNORE_INDEX (255), and from it
  `segmentation_scores`: mIoU (the mean over classes present in the labels or the predictions) and pixel accuracy.
- Tracking metrics, as DAVIS defines them: `region_iou` (J) and `boundary_f_measure` (F: boundary pixels count as
  matched within `boundary_tolerance` = 0.8 % of the image diagonal), averaged by `track_scores`.
- `ridge_probe`: least squares with an L2 penalty from standardized patch features to each patch's class fractions,
  solved in closed form for a grid of penalties at once (one eigendecomposition); the penalty is chosen on held-out
  train images. Logits are upsampled bilinearly to the mask resolution before the argmax. It is the dense metric
  train.py and distill.py log (`fast_dense_set`, `log_dense_metric`): seconds on a CPU, no SGD to tune.
- `propagate_labels`: video label propagation as in DINO and the DINOv3 segmentation-tracking notebook. Each frame's
  patches take the labels of their top-k most similar patches among a context of the first frame (ground truth)
  and the last n frames (their propagated labels), within a window of `radius` patches, weighted by a softmax of
  the cosine similarities at `temperature`; `upsample_labels` takes them to pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

from data.augment import IMAGENET_MEAN, IMAGENET_STD
from data.dense_sets import IGNORE_INDEX, GeneratedScenes, segmentation_arrays

logger = logging.getLogger("dinov3")


# ====================================================================================================
# Features
# ====================================================================================================


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> ImageNet-normalized float32."""
    return TF.normalize(pixels.float() / 255, list(IMAGENET_MEAN), list(IMAGENET_STD))


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no RoPE box jitter, no drop path), then the previous mode again."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def forward_tokens(backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class tokens [B, C], patch tokens [B, P, C]) as float32; bf16 autocast on CUDA."""
    images = images.to(_device_of(backbone))
    with eval_mode(backbone), torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
        out = backbone(images)
    return out["x_norm_clstoken"].float(), out["x_norm_patchtokens"].float()


@torch.no_grad()
def _last_layers_patch_tokens(backbone: nn.Module, images: torch.Tensor, n_layers: int) -> torch.Tensor:
    """[B, P, n_layers * C]: the normed patch tokens of the last n blocks (stages), concatenated."""
    images = images.to(_device_of(backbone))
    with eval_mode(backbone), torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
        layers = backbone.get_intermediate_layers(images, n=n_layers, norm=True)
    return torch.cat([layer.float() for layer in layers], dim=-1)


def patch_feature_maps(backbone: nn.Module, images: torch.Tensor, n_layers: int = 1,
                       batch_size: int = 32) -> torch.Tensor:
    """[N, n_layers * C, h, w] float32 on the CPU: patch features of normalized images [N, 3, H, W] as maps.

    One layer goes through the backbone's forward (which FSDP-sharded training backbones need); more layers
    through `get_intermediate_layers` (eval.py's unsharded backbones).
    """
    patch = backbone.patch_size
    h, w = images.shape[-2] // patch, images.shape[-1] // patch
    maps = []
    for chunk in images.split(batch_size):
        if n_layers == 1:
            tokens = forward_tokens(backbone, chunk)[1]
        else:
            tokens = _last_layers_patch_tokens(backbone, chunk, n_layers)
        maps.append(tokens.reshape(len(chunk), h, w, -1).permute(0, 3, 1, 2).cpu())
    return torch.cat(maps)


def pixel_feature_maps(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, 3 * p * p, h, w]: each patch's normalized pixels, flattened (the raw-pixel baseline of the probes)."""
    h, w = images.shape[-2] // patch_size, images.shape[-1] // patch_size
    cropped = images[..., : h * patch_size, : w * patch_size].float()
    return F.unfold(cropped, kernel_size=patch_size, stride=patch_size).reshape(len(images), -1, h, w)


# ====================================================================================================
# Segmentation metrics
# ====================================================================================================


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, n_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[n_classes, n_classes] int64: entry [t, p] counts the pixels labeled t and predicted p; pixels labeled
    `ignore_index` are not counted."""
    target, predicted = target.reshape(-1).long(), predicted.reshape(-1).long().to(target.device)
    counted = target != ignore_index
    target, predicted = target[counted], predicted[counted]
    if len(target) and int(target.max()) >= n_classes:
        raise ValueError(f"label {int(target.max())} found, but there are {n_classes} classes (0 to "
                         f"{n_classes - 1}, {ignore_index} = ignore): pass the right number of classes")
    return torch.bincount(target * n_classes + predicted, minlength=n_classes**2).reshape(n_classes, n_classes).cpu()


def segmentation_scores(confusion: torch.Tensor) -> dict:
    """{"miou", "pixel_accuracy", "iou": per-class IoU (NaN for classes neither labeled nor predicted)}.

    IoU of class c = TP / (TP + FP + FN); the mean skips the NaN classes, as mmsegmentation does.
    """
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp_min(1), torch.nan)
    total = confusion.sum()
    return {"miou": iou.nanmean().item() if (union > 0).any() else math.nan,
            "pixel_accuracy": (true_positive.sum() / total).item() if total > 0 else math.nan,
            "iou": iou.tolist()}


def region_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """J: intersection over union of boolean masks [..., H, W] -> [...]; 1 where both are empty (DAVIS)."""
    intersection = (predicted & target).flatten(-2).sum(-1).double()
    union = (predicted | target).flatten(-2).sum(-1).double()
    return torch.where(union > 0, intersection / union.clamp_min(1), 1.0)


def boundary_map(mask: torch.Tensor) -> torch.Tensor:
    """Boolean [..., H, W]: the pixels whose right or lower neighbor is on the other side of the mask's edge. A
    one-pixel-thick outline; the image border is not an edge."""
    boundary = torch.zeros_like(mask, dtype=torch.bool)
    boundary[..., :, :-1] |= mask[..., :, :-1] != mask[..., :, 1:]
    boundary[..., :-1, :] |= mask[..., :-1, :] != mask[..., 1:, :]
    return boundary


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Boolean [..., H, W]: the pixels within Euclidean distance `radius` of a True pixel of `mask`."""
    height, width = mask.shape[-2:]
    out = mask.clone()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius or (dy == 0 and dx == 0):
                continue
            # out[y + dy, x + dx] |= mask[y, x] wherever both positions are inside the image
            out[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] |= \
                mask[..., max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)]
    return out


def boundary_tolerance(height: int, width: int, fraction: float = 0.008) -> int:
    """The DAVIS boundary tolerance in pixels: `fraction` of the image diagonal, rounded up."""
    return math.ceil(fraction * math.hypot(height, width))


def boundary_f_measure(predicted: torch.Tensor, target: torch.Tensor, tolerance: int | None = None) -> torch.Tensor:
    """F: boundary F-measure of boolean masks [..., H, W] -> [...]. Precision is the fraction of predicted
    boundary pixels within `tolerance` pixels of a target boundary pixel, recall the converse; F = 2PR / (P + R).
    Both boundaries empty: 1; one empty: 0."""
    if tolerance is None:
        tolerance = boundary_tolerance(*predicted.shape[-2:])
    predicted_edge, target_edge = boundary_map(predicted), boundary_map(target)
    n_predicted = predicted_edge.flatten(-2).sum(-1).double()
    n_target = target_edge.flatten(-2).sum(-1).double()
    matched_predicted = (predicted_edge & dilate(target_edge, tolerance)).flatten(-2).sum(-1).double()
    matched_target = (target_edge & dilate(predicted_edge, tolerance)).flatten(-2).sum(-1).double()
    precision = matched_predicted / n_predicted.clamp_min(1)
    recall = matched_target / n_target.clamp_min(1)
    f = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    f = torch.where((n_predicted == 0) & (n_target == 0), 1.0, f)
    return torch.where((n_predicted == 0) != (n_target == 0), 0.0, f)


# ====================================================================================================
# Ridge-regression segmentation probe
# ====================================================================================================

RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # penalties per training row on standardized features


def patch_class_fractions(masks: torch.Tensor, grid: tuple[int, int], n_classes: int,
                          batch_size: int = 64) -> torch.Tensor:
    """[N, h, w, n_classes]: the fraction of each patch's labeled pixels (not IGNORE_INDEX) in each class; all zero
    for a patch with no labeled pixel. Masks [N, H, W] are split into an h x w grid of (nearly) equal cells."""
    height, width = masks.shape[-2:]
    h, w = grid
    cell = (torch.arange(height) * h // height)[:, None] * w + (torch.arange(width) * w // width)[None, :]
    parts = []
    for chunk in masks.split(batch_size):
        labels = chunk.long()
        labeled = labels != IGNORE_INDEX
        if labeled.any() and int(labels[labeled].max()) >= n_classes:
            raise ValueError(f"label {int(labels[labeled].max())} found, but there are {n_classes} classes")
        index = ((torch.arange(len(chunk))[:, None, None] * (h * w) + cell) * n_classes + labels)[labeled]
        counts = torch.bincount(index, minlength=len(chunk) * h * w * n_classes).double()
        parts.append(counts.reshape(len(chunk), h, w, n_classes))
    counts = torch.cat(parts)
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)


def _rows(maps: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N * h * w, C]."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


@dataclass
class RidgeStatistics:
    """What the ridge solution depends on, summed over training rows (x: features, y: targets), in float64. Sums
    add up, so statistics of parts of a set combine, and no float64 copy of all rows is ever needed."""

    n: int
    x_sum: torch.Tensor  # [C]
    gram: torch.Tensor  # [C, C]: sum of x x^T
    xy: torch.Tensor  # [C, K]: sum of x y^T
    y_sum: torch.Tensor  # [K]

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> RidgeStatistics:
        x, y = x.double(), y.double()
        return cls(len(x), x.sum(dim=0), x.T @ x, x.T @ y, y.sum(dim=0))

    def __add__(self, other: RidgeStatistics) -> RidgeStatistics:
        return RidgeStatistics(self.n + other.n, self.x_sum + other.x_sum, self.gram + other.gram,
                               self.xy + other.xy, self.y_sum + other.y_sum)


def solve_ridge(stats: RidgeStatistics, alphas: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight [C, K], bias [K]) minimizing |z W + b - y|^2 + alpha * n * |W|^2 over the n rows, for each alpha, with
    z the features standardized (so a penalty means the same for every backbone); weight and bias are returned for
    the raw features. One eigendecomposition of the C x C Gram matrix serves every alpha."""
    n = stats.n
    mean, y_mean = stats.x_sum / n, stats.y_sum / n
    centered_gram = stats.gram - n * torch.outer(mean, mean)
    std = (centered_gram.diagonal() / max(n - 1, 1)).clamp_min(1e-12).sqrt().clamp_min(1e-6)
    eigenvalues, eigenvectors = torch.linalg.eigh(centered_gram / torch.outer(std, std))
    projected = eigenvectors.T @ ((stats.xy - n * torch.outer(mean, y_mean)) / std[:, None])
    solutions = []
    for alpha in alphas:
        weight = eigenvectors @ (projected / (eigenvalues.clamp_min(0) + alpha * n)[:, None]) / std[:, None]
        solutions.append((weight.float(), (y_mean - mean @ weight).float()))
    return solutions


def fit_ridge(features: torch.Tensor, targets: torch.Tensor,
              alphas: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`solve_ridge` on rows features [M, C] -> targets [M, K]."""
    return solve_ridge(RidgeStatistics.of(features, targets), alphas)


def patch_ridge_statistics(maps: torch.Tensor, fractions: torch.Tensor, batch_size: int = 64) -> RidgeStatistics:
    """Statistics of the rows (patch feature -> class fractions) of the patches that have a labeled pixel."""
    stats = None
    for map_chunk, target_chunk in zip(maps.split(batch_size), fractions.split(batch_size)):
        targets = target_chunk.reshape(-1, target_chunk.shape[-1])
        labeled = targets.sum(dim=-1) > 0
        part = RidgeStatistics.of(_rows(map_chunk)[labeled], targets[labeled])
        stats = part if stats is None else stats + part
    return stats


def predict_masks(maps: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, H, W] class indices: per-patch logits of a 1x1 linear layer, upsampled bilinearly to `size`, argmax."""
    logits = torch.einsum("nchw,ck->nkhw", maps.float(), weight) + bias[:, None, None]
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)


def probe_confusion(maps: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    batch_size: int = 64) -> torch.Tensor:
    """The confusion matrix of a linear probe over a set of images, in batches."""
    n_classes = weight.shape[1]
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    for map_chunk, mask_chunk in zip(maps.split(batch_size), masks.split(batch_size)):
        predicted = predict_masks(map_chunk, weight, bias, tuple(mask_chunk.shape[-2:]))
        confusion += confusion_matrix(predicted, mask_chunk, n_classes)
    return confusion


def ridge_probe(train_maps: torch.Tensor, train_masks: torch.Tensor, val_maps: torch.Tensor, val_masks: torch.Tensor,
                n_classes: int, alphas: Sequence[float] = RIDGE_ALPHAS, holdout_fraction: float = 0.25) -> dict:
    """{"miou", "pixel_accuracy", "alpha"} of the ridge probe on val; alpha is the one best (mIoU) on the last
    `holdout_fraction` of the train images, then the probe is refit on all of them."""
    n = len(train_maps)
    n_holdout = max(1, round(n * holdout_fraction))
    if n - n_holdout < 1:
        raise ValueError(f"the ridge probe needs at least 2 train images (one to fit, one to choose the penalty), "
                         f"got {n}")
    fractions = patch_class_fractions(train_masks, tuple(train_maps.shape[-2:]), n_classes)
    fit = patch_ridge_statistics(train_maps[: n - n_holdout], fractions[: n - n_holdout])
    if fit.n == 0:
        raise ValueError("the train masks label no pixel (all are IGNORE_INDEX): nothing to fit the probe on")
    holdout = slice(n - n_holdout, n)
    scores = [segmentation_scores(probe_confusion(train_maps[holdout], train_masks[holdout], *solution))["miou"]
              for solution in solve_ridge(fit, alphas)]
    scores = [-1.0 if math.isnan(score) else score for score in scores]
    best = max(range(len(alphas)), key=lambda i: (scores[i], -i))  # ties: the smallest penalty
    every = fit + patch_ridge_statistics(train_maps[holdout], fractions[holdout])
    weight, bias = solve_ridge(every, [alphas[best]])[0]
    result = segmentation_scores(probe_confusion(val_maps, val_masks, weight, bias))
    return {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"], "alpha": alphas[best]}


# ====================================================================================================
# The dense metric during training
# ====================================================================================================

FAST_SET_TRAIN, FAST_SET_VAL = 96, 48  # generated scenes: ~2 seconds of vit_tiny on a CPU at 96 px
FAST_SET_SEED = 0


@dataclass(frozen=True)
class DenseSet:
    """Normalized images [N, 3, S, S] with masks [N, S, S] (uint8 class indices, IGNORE_INDEX = not scored)."""

    train_images: torch.Tensor
    train_masks: torch.Tensor
    val_images: torch.Tensor
    val_masks: torch.Tensor
    n_classes: int


def fast_dense_set(size: int, n_train: int = FAST_SET_TRAIN, n_val: int = FAST_SET_VAL) -> DenseSet:
    """The fixed generated scenes train.py and distill.py measure on: train and val are disjoint items."""
    train_images, train_masks, _ = segmentation_arrays(GeneratedScenes(n_train, size, FAST_SET_SEED), size)
    val_images, val_masks, _ = segmentation_arrays(GeneratedScenes(n_val, size, FAST_SET_SEED, first=n_train), size)
    return DenseSet(normalize_pixels(train_images), train_masks, normalize_pixels(val_images), val_masks,
                    GeneratedScenes.n_classes)


def dense_metric(backbone: nn.Module, dense_set: DenseSet) -> dict[str, float]:
    """{"miou", "pixel_accuracy"} of the ridge probe on `backbone`'s last-layer patch features of `dense_set`."""
    result = ridge_probe(patch_feature_maps(backbone, dense_set.train_images), dense_set.train_masks,
                         patch_feature_maps(backbone, dense_set.val_images), dense_set.val_masks, dense_set.n_classes)
    return {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"]}


def write_dense_metric(writer, result: dict[str, float], step: int, tag: str = "dense") -> dict[str, float]:
    """`result` of `dense_metric` to TensorBoard as <tag>/miou and <tag>/pixel_accuracy (when `writer` is not None)
    and to the progress log; returns it."""
    if writer is not None:
        for name, value in result.items():
            writer.add_scalar(f"{tag}/{name}", value, step)
    logger.info(f"step {step}: {tag}: ridge-probe mIoU {result['miou']:.3f}, pixel accuracy "
                f"{result['pixel_accuracy']:.3f} on generated scenes")
    return result


def log_dense_metric(writer, backbone: nn.Module, dense_set: DenseSet, step: int,
                     tag: str = "dense") -> dict[str, float]:
    """`dense_metric` of `backbone`, written by `write_dense_metric`."""
    return write_dense_metric(writer, dense_metric(backbone, dense_set), step, tag)


# ====================================================================================================
# Video label propagation
# ====================================================================================================


def patch_neighborhood(grid: tuple[int, int], radius: int) -> torch.Tensor:
    """[P, P] bool: patches at most `radius` rows and at most `radius` columns apart (a square window)."""
    h, w = grid
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    return ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)


def propagate_labels(features: torch.Tensor, first_labels: torch.Tensor, n_last: int = 7, topk: int = 5,
                     radius: int = 12, temperature: float = 0.1) -> torch.Tensor:
    """Soft labels [T, K, h, w] of every frame from patch features [T, C, h, w] and frame 0's labels [K, h, w].

    Frame t's context is frame 0 and frames max(1, t - n_last) .. t - 1; each of its patches takes the softmax-
    weighted (cosine similarity / temperature) labels of its `topk` most similar context patches within `radius`.
    """
    if topk < 1 or n_last < 0 or radius < 0 or temperature <= 0:
        raise ValueError(f"need topk >= 1, n_last >= 0, radius >= 0 and temperature > 0, got {topk}, {n_last}, "
                         f"{radius}, {temperature}")
    n_frames, _, h, w = features.shape
    if tuple(first_labels.shape[-2:]) != (h, w):
        raise ValueError(f"first-frame labels on a {tuple(first_labels.shape[-2:])} grid, features on {(h, w)}")
    tokens = F.normalize(features.flatten(2).transpose(1, 2).float(), dim=-1)  # [T, P, C]
    outside = ~patch_neighborhood((h, w), radius)
    labels = [first_labels.flatten(1).T.float()]  # per frame [P, K]
    for t in range(1, n_frames):
        context = [0, *range(max(1, t - n_last), t)]
        similarity = torch.einsum("pc,nqc->pnq", tokens[t], tokens[context])
        similarity = similarity.masked_fill(outside[:, None, :], -torch.inf).flatten(1)  # [P, n_context * P]
        top_similarity, top_index = similarity.topk(min(topk, similarity.shape[1]), dim=1)
        weights = (top_similarity / temperature).softmax(dim=1)
        context_labels = torch.cat([labels[c] for c in context])  # [n_context * P, K]
        labels.append(torch.einsum("pk,pkc->pc", weights, context_labels[top_index]))
    return torch.stack(labels).transpose(1, 2).reshape(n_frames, -1, h, w)


def upsample_labels(soft_labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[T, K, h, w] soft labels -> [T, H, W] label channel per pixel: bilinear upsampling, each channel of each frame
    min-max scaled to [0, 1] (as DINO's evaluation does: an object smaller than a patch, whose labels never
    outweigh the background's, still shows where its labels are highest), then argmax."""
    labels = F.interpolate(soft_labels.float(), size=size, mode="bilinear", align_corners=False)
    low = labels.amin(dim=(-2, -1), keepdim=True)
    high = labels.amax(dim=(-2, -1), keepdim=True)
    scaled = torch.where(high > 0, (labels - low) / (high - low).clamp_min(1e-12), labels)
    return scaled.argmax(dim=1)


def track_scores(predicted: torch.Tensor, annotations: Sequence[torch.Tensor | None], object_ids: Sequence[int],
                 tolerance: int | None = None) -> dict[int, tuple[float, float]]:
    """{object id: (J, F)} averaged over the scored frames of one video: the annotated ones other than the first
    (given) and, as in the DAVIS-2017 evaluation, the last. `predicted` [T, H, W] holds object ids."""
    frames = [t for t in range(1, len(annotations)) if annotations[t] is not None]
    if len(annotations) >= 3:
        frames = [t for t in frames if t != len(annotations) - 1]
    if not frames:
        return {}
    target = torch.stack([annotations[t] for t in frames]).long()
    guess = predicted[frames].long()
    scores = {}
    for object_id in object_ids:
        j = region_iou(guess == object_id, target == object_id).mean().item()
        f = boundary_f_measure(guess == object_id, target == object_id, tolerance).mean().item()
        scores[object_id] = (j, f)
    return scores
