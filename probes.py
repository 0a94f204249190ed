"""What a frozen backbone's features are worth: backbones from any checkpoint, labeled image splits (procedural or a
class folder), features extracted once and cached, k-NN (as in DINO: cosine similarity to every train feature, the k
most similar vote with weight exp(similarity / T)) and linear probes (a (learning rate, weight decay) grid trained at
once as one [G, C, n_classes] weight tensor by SGD with momentum on standardized features; the grid point with the
best top-1 on a held-out part of train is reported on val). eval.py's `knn` and `linear` commands and train.py's
k-NN log are built from these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn

import runtime
from data.augment import pil_to_uint8_chw
from data.datasets import (
    UNREADABLE_IMAGE_ERRORS,
    ImageDataset,
    ImageFolderDataset,
    PathListDataset,
    ProceduralDataset,
    open_image,
)
from dense import forward_tokens, normalize_pixels
from models.checkpoint import checkpoint_path_or_error, load_any_backbone
from schedules import cosine_between

logger = logging.getLogger("dinov3")


# k-NN votes weigh neighbours by exp(cosine similarity / temperature) (DINO's protocol).
KNN_TEMPERATURE = 0.07


FeatureKind = Literal["cls", "cls+avgpool"]


def load_eval_backbone(checkpoint: str | Path | dict | None, device: str | torch.device = "cpu") -> nn.Module:
    """A backbone in eval mode on `device` from a checkpoint file (or an in-memory state dict).

    Which checkpoints turn into which backbone is models.checkpoint.load_any_backbone's business (released ViT and
    ConvNeXt files, Hugging Face weights, train.py and distill.py checkpoints). Everything downstream needs only
    `backbone(images)` -> {"x_norm_clstoken": [B, C], "x_norm_patchtokens": [B, P, C]} and `backbone.patch_size`.
    """
    return load_any_backbone(checkpoint).to(device).eval()


def checkpoint_fingerprint(source: str | Path | dict) -> str:
    """What identifies a checkpoint in the feature cache.

    A file (a sharded checkpoint folder: its meta.json): its resolved path, size and modification time (hashing gigabytes of weights would cost about as
    much as the features it saves). A state dict: a hash of its contents.
    """
    digest = hashlib.sha256()
    if isinstance(source, dict):
        _hash_contents(digest, "", source)
    else:
        path = checkpoint_path_or_error(source).resolve()
        stat = (path / "meta.json" if path.is_dir() else path).stat()  # a sharded folder: its marker, written last
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _hash_contents(digest, name: str, value) -> None:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            _hash_contents(digest, f"{name}/{key}", value[key])
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    else:
        digest.update(f"{name}|{value!r}".encode())


def eval_pixels(image: Image.Image, size: int, crop_fraction: float = 1.0) -> torch.Tensor:
    """Shorter side resized to size / crop_fraction (bicubic), center crop size x size, normalized: [3, size, size]."""
    pixels = pil_to_uint8_chw(image)
    resized = TF.resize(pixels, round(size / crop_fraction), interpolation=TF.InterpolationMode.BICUBIC,
                        antialias=True)
    return normalize_pixels(TF.center_crop(resized, [size, size]))


def load_eval_images(
    dataset, indices, size: int, limit: int | None = None, crop_fraction: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of `dataset` (PIL, label) through `eval_pixels`, stacked: ([N, 3, size, size], labels [N]).

    Unreadable images are skipped; `limit` stops after that many readable ones.
    """
    images, labels = [], []
    for index in indices:
        if limit is not None and len(images) == limit:
            break
        try:
            image, label = dataset[index]
        except UNREADABLE_IMAGE_ERRORS:
            continue
        images.append(eval_pixels(image, size, crop_fraction))
        labels.append(label)
    if not images:
        raise ValueError(f"none of the requested images of {type(dataset).__name__} could be read")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def load_procedural_sets(
    n_train: int = 1000, n_val: int = 500, size: int = 128, n_classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, val images, val labels) of the procedural labeled set, for `knn_eval`.

    Train is items [0, n_train) and val items [n_train, n_train + n_val) of one ProceduralDataset: disjoint images.
    """
    train_split, val_split = procedural_splits(n_train, n_val, size, n_classes, seed)
    train_x, train_y = load_eval_images(train_split.images, train_split.indices, size)
    val_x, val_y = load_eval_images(val_split.images, val_split.indices, size)
    return train_x, train_y, val_x, val_y


def image_tensor(path: str | Path, size: int | None, patch_size: int) -> torch.Tensor:
    """An image file as a normalized [3, H, W] tensor for feature maps, its sides multiples of the patch size.

    The shorter side is resized to `size` (None: native resolution), then the image is center-cropped to the
    next smaller multiple of the patch size on each side (what the model would drop anyway, taken evenly from
    both edges). An image smaller than one patch is an error.
    """
    path = Path(path)
    if size is not None and size < patch_size:
        raise ValueError(f"size {size} is smaller than one {patch_size} px patch: pass at least {patch_size}")
    try:
        image = open_image(path)
    except UNREADABLE_IMAGE_ERRORS as err:
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    if min(image.size) < patch_size:
        raise ValueError(
            f"image {path} is {image.width}x{image.height} px, smaller than one {patch_size}x{patch_size} patch: "
            f"use an image of at least {patch_size} px on each side"
        )
    pixels = pil_to_uint8_chw(image)
    if size is not None:
        pixels = TF.resize(pixels, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    height, width = pixels.shape[-2:]
    crop = [height - height % patch_size, width - width % patch_size]
    if crop != [height, width]:
        logger.info(f"{path.name}: {width}x{height} px center-cropped to {crop[1]}x{crop[0]} "
                    f"(multiples of the {patch_size} px patch)")
        pixels = TF.center_crop(pixels, crop)
    return normalize_pixels(pixels)


@dataclass(frozen=True)
class Split:
    """Labeled images to extract features from: items `indices` of `images`, labels in [0, n_classes)."""

    images: ImageDataset
    indices: Sequence[int]
    n_classes: int
    description: str  # identifies exactly these images (and labels) in the feature cache


def procedural_splits(n_train: int, n_val: int, size: int, n_classes: int, seed: int) -> tuple[Split, Split]:
    """Train = items [0, n_train), val = items [n_train, n_train + n_val) of one ProceduralDataset."""
    if n_train < 1 or n_val < 1:
        raise ValueError(f"the procedural splits need at least one image each, got train={n_train}, val={n_val}")
    images = ProceduralDataset(n=n_train + n_val, size=size, n_classes=n_classes, seed=seed)

    def describe(start: int, stop: int) -> str:
        return f"procedural(size={size}, n_classes={n_classes}, seed={seed}, items={start}:{stop})"

    return (Split(images, range(0, n_train), n_classes, describe(0, n_train)),
            Split(images, range(n_train, n_train + n_val), n_classes, describe(n_train, n_train + n_val)))


def labeled_folder(root: Path) -> ImageFolderDataset:
    dataset = ImageFolderDataset(root)  # raises for a missing folder or one without images
    if not dataset.classes:
        raise ValueError(
            f"{root} has images outside class sub-folders, so they have no labels: put every image of the split "
            f"in a sub-folder named after its class ({root}/<class>/<image>)"
        )
    return dataset


def _folder_description(root: Path, samples: list[tuple[Path, int]]) -> str:
    digest = hashlib.sha256("\n".join(f"{path.relative_to(root)}|{label}" for path, label in samples).encode())
    return f"folder({root.resolve()}, {len(samples)} images, {digest.hexdigest()[:16]})"


def folder_splits(root: str | Path) -> tuple[Split, Split]:
    """The train/ and val/ splits of a folder, each an ImageFolder (one sub-folder per class)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist or is not a folder: pass a folder with train/ and val/ splits "
            "(one sub-folder per class in each), or --data procedural"
        )
    for name in ("train", "val"):
        if not (root / name).is_dir():
            raise FileNotFoundError(
                f"data folder {root} has no {name}/ split: expected {root}/train/<class>/<image> and "
                f"{root}/val/<class>/<image>"
            )
    train, val = labeled_folder(root / "train"), labeled_folder(root / "val")
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        raise ValueError(
            f"classes {unknown[:5]} of {root / 'val'} have no images in {root / 'train'}: k-NN and the linear "
            "probe can only predict classes that train has"
        )
    # Labels are indices into each folder's own sorted class list; val is relabeled by class name to train's.
    train_index = {name: i for i, name in enumerate(train.classes)}
    val_samples = [(path, train_index[val.classes[label]]) for path, label in val.samples]
    n_classes = len(train.classes)
    return (
        Split(train, range(len(train)), n_classes, _folder_description(root / "train", train.samples)),
        Split(PathListDataset(val_samples, val.source), range(len(val_samples)), n_classes,
              _folder_description(root / "val", val_samples)),
    )


def tensor_features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{"cls": [N, C], "patch_mean": [N, C]} (on the CPU) of normalized images [N, 3, H, W]."""
    cls_parts, mean_parts = [], []
    for chunk in images.split(batch_size):
        cls, patches = forward_tokens(backbone, chunk)
        cls_parts.append(cls.cpu())
        mean_parts.append(patches.mean(dim=1).cpu())
    return {"cls": torch.cat(cls_parts), "patch_mean": torch.cat(mean_parts)}


def select_features(features: dict[str, torch.Tensor], kind: FeatureKind) -> torch.Tensor:
    """The class token, or the class token concatenated with the average patch token."""
    if kind == "cls":
        return features["cls"]
    if kind == "cls+avgpool":
        return torch.cat([features["cls"], features["patch_mean"]], dim=1)
    raise ValueError(f"unknown feature kind {kind!r}; use 'cls' or 'cls+avgpool'")


class _SplitPixels(torch.utils.data.Dataset):
    """Items (pixels, label, position in the split) of some positions of a split; None for unreadable images."""

    def __init__(self, split: Split, positions: Sequence[int], size: int, crop_fraction: float) -> None:
        self.split, self.positions, self.size, self.crop_fraction = split, positions, size, crop_fraction

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        position = self.positions[i]
        index = self.split.indices[position]
        try:
            image, label = self.split.images[index]
        except UNREADABLE_IMAGE_ERRORS as err:
            name = self.split.images.describe(index)
            logger.warning(f"skipping unreadable image {name}: {type(err).__name__}: {err}")
            return None
        return eval_pixels(image, self.size, self.crop_fraction), label, position


def _collate_readable(batch: list):
    readable = [item for item in batch if item is not None]
    if not readable:
        return None
    pixels, labels, positions = zip(*readable)
    return torch.stack(pixels), torch.tensor(labels, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64)


@torch.no_grad()
def reestimate_batchnorm(backbone: nn.Module, split: Split, size: int, crop_fraction: float = 1.0,
                         batch_size: int = 64, num_workers: int = 0) -> int:
    """Recomputes every BatchNorm's running statistics on the images of `split` (labels unused; AdaBN), in place;
    returns how many BatchNorm layers there were (0: nothing changed, e.g. a ViT).

    A BatchNorm network normalizes with the statistics of the images it was trained on; evaluated on another
    domain (a distilled student trained on photos, probed on generated patterns) those statistics are wrong for
    every layer and the features collapse, while a LayerNorm teacher is unaffected. Every rank reads the whole split,
    so the statistics are the same on all ranks."""
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m, m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches, not an exponential one
        m.train()
    device = next(backbone.parameters()).device
    loader = torch.utils.data.DataLoader(_SplitPixels(split, range(len(split.indices)), size, crop_fraction),
                                         batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_readable)
    try:
        for batch in loader:
            if batch is not None:
                backbone(batch[0].to(device))
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return len(norms)


def all_gather_rows(tensor: torch.Tensor, dist_info: runtime.Dist) -> torch.Tensor:
    """The rows of every rank concatenated in rank order (ranks may hold different numbers of rows), on the CPU."""
    device = dist_info.device
    local = tensor.to(device)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist_info.world_size)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    counts = [int(c.item()) for c in counts]
    # all_gather needs equal shapes: pad every rank's rows to the longest, trim after.
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:count] for rows, count in zip(gathered, counts)]).cpu()


def extract_features(
    backbone: nn.Module,
    split: Split,
    size: int,
    crop_fraction: float = 1.0,
    batch_size: int = 64,
    num_workers: int = 0,
    dist_info: runtime.Dist | None = None,
) -> dict[str, torch.Tensor]:
    """{"cls", "patch_mean": [N, C], "labels": [N], "positions": [N]} for the readable images of a split, in
    split order. Under torchrun each rank extracts every world_size-th image; the results are all-gathered."""
    patch_size = backbone.patch_size
    if size < patch_size or size % patch_size:
        raise ValueError(f"image size {size} is not a positive multiple of the backbone's {patch_size} px patch")
    rank, world_size = (dist_info.rank, dist_info.world_size) if dist_info is not None else (0, 1)
    positions = range(rank, len(split.indices), world_size)
    loader = torch.utils.data.DataLoader(
        _SplitPixels(split, positions, size, crop_fraction), batch_size=batch_size, num_workers=num_workers,
        collate_fn=_collate_readable,
    )
    chunks = []
    for batch in loader:
        if batch is not None:
            pixels, labels, batch_positions = batch
            cls, patches = forward_tokens(backbone, pixels)
            chunks.append({"cls": cls.cpu(), "patch_mean": patches.mean(dim=1).cpu(), "labels": labels,
                           "positions": batch_positions})
    if not chunks:  # no readable image in this rank's share: empty rows, so the all-gather still matches up
        dim = backbone.embed_dim
        chunks.append({"cls": torch.zeros(0, dim), "patch_mean": torch.zeros(0, dim),
                       "labels": torch.zeros(0, dtype=torch.int64), "positions": torch.zeros(0, dtype=torch.int64)})
    features = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
    if world_size > 1:
        features = {name: all_gather_rows(value, dist_info) for name, value in features.items()}
    order = features["positions"].argsort()
    features = {name: value[order] for name, value in features.items()}
    n_read = len(order)
    if n_read == 0:
        raise ValueError(f"none of the {len(split.indices)} images of {split.description} could be read")
    if n_read < len(split.indices):
        logger.warning(f"{len(split.indices) - n_read} of {len(split.indices)} images of {split.description} "
                       "could not be read and are left out")
    return features


FEATURES_VERSION = 1  # bump when what a cache file holds changes: older files are then ignored


def feature_cache_file(cache_dir: str | Path, checkpoint_key: str, split: Split, size: int,
                       crop_fraction: float) -> Path:
    """Where the features of (checkpoint, images, resolution) are cached; every cache file holds both kinds."""
    key = json.dumps([FEATURES_VERSION, "cls,patch_mean", checkpoint_key, split.description, size, crop_fraction])
    return Path(cache_dir).expanduser() / f"features_{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def cached_features(
    cache_file: Path | None, compute: Callable[[], dict[str, torch.Tensor]], dist_info: runtime.Dist
) -> dict[str, torch.Tensor]:
    """The features in `cache_file` when it exists (on every rank), else `compute()`, saved by rank 0."""
    present = cache_file is not None and cache_file.is_file()
    # Every rank takes the same branch (extraction all-gathers), even when the cache folder is not shared.
    if runtime.all_reduce_max(0.0 if present else 1.0, dist_info) == 0.0:
        logger.info(f"features from the cache: {cache_file}")
        return torch.load(cache_file, map_location="cpu", weights_only=True)
    features = compute()
    if cache_file is not None and dist_info.is_main:
        runtime.atomic_save(features, cache_file)
        logger.info(f"features cached in {cache_file}")
    return features


def _weighted_votes(neighbor_similarity: torch.Tensor, neighbor_labels: torch.Tensor, temperature: float,
                    n_classes: int) -> torch.Tensor:
    """Class scores [B, n_classes]: each neighbor adds exp(similarity / T) to its class.

    Computed as exp((similarity - row max) / T), which rescales a row's scores by one constant (same ranking) and
    cannot overflow at small T.
    """
    shifted = neighbor_similarity - neighbor_similarity[:, :1]  # top-k is sorted: column 0 is the row max
    votes = torch.zeros(neighbor_similarity.shape[0], n_classes, device=neighbor_similarity.device)
    return votes.scatter_add_(1, neighbor_labels, (shifted / temperature).exp())


def knn_topk_accuracy(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor,
    ks: Sequence[int] = (20,), temperature: float = KNN_TEMPERATURE, n_classes: int | None = None,
    chunk_size: int = 512,
) -> dict[str, float]:
    """{"top1_k{k}", "top5_k{k}"} for every k of `ks`; one similarity pass for all k, test images in chunks.

    k above the number of train images uses them all. With 5 classes or fewer top-5 is trivially 1.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be at least 1, got ks={tuple(ks)}")
    if temperature <= 0:
        raise ValueError(f"the k-NN temperature must be > 0, got {temperature}")
    n_classes = n_classes or int(max(train_labels.max(), test_labels.max())) + 1
    device = train_features.device
    train_features = F.normalize(train_features.float(), dim=-1)
    train_labels = train_labels.to(device)
    largest_k = min(max(ks), train_features.shape[0])
    top1_hits, top5_hits = dict.fromkeys(ks, 0), dict.fromkeys(ks, 0)
    for test_chunk, label_chunk in zip(test_features.split(chunk_size), test_labels.split(chunk_size)):
        test_chunk = F.normalize(test_chunk.to(device).float(), dim=-1)
        label_chunk = label_chunk.to(device)
        top_similarity, top_index = (test_chunk @ train_features.T).topk(largest_k, dim=1)
        neighbor_labels = train_labels[top_index]
        for k in ks:
            kk = min(k, largest_k)
            votes = _weighted_votes(top_similarity[:, :kk], neighbor_labels[:, :kk], temperature, n_classes)
            ranked = votes.topk(min(5, n_classes), dim=1).indices
            top1_hits[k] += (ranked[:, 0] == label_chunk).sum().item()
            top5_hits[k] += (ranked == label_chunk[:, None]).any(dim=1).sum().item()
    n_test = test_features.shape[0]
    results = {}
    for k in ks:
        results[f"top1_k{k}"], results[f"top5_k{k}"] = top1_hits[k] / n_test, top5_hits[k] / n_test
    return results


def knn_eval(
    backbone: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
    val_labels: torch.Tensor, ks: Sequence[int] = (10, 20), temperature: float = KNN_TEMPERATURE,
    features: FeatureKind = "cls",
    batch_size: int = 64,
) -> dict[str, float]:
    """k-NN top-1/top-5 of a backbone on normalized image tensors (e.g. `load_procedural_sets`), for train.py:
    {"top1_k10": ..., "top5_k10": ..., "top1_k20": ...}. Runs on the backbone's device, in eval mode."""
    train_x = select_features(tensor_features(backbone, train_images, batch_size), features)
    val_x = select_features(tensor_features(backbone, val_images, batch_size), features)
    n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    return knn_topk_accuracy(train_x, train_labels, val_x, val_labels, ks, temperature, n_classes)


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): a random `fraction` of range(n) held out for choosing hyperparameters."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    n_holdout = max(1, round(n * fraction))
    if n - n_holdout < 1:
        raise ValueError(f"{n} train images are too few to hold out {fraction:.0%} and train on the rest")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_holdout:], order[:n_holdout]


def train_linear_probes(
    features: torch.Tensor, labels: torch.Tensor, n_classes: int, grid: Sequence[tuple[float, float]],
    epochs: int = 20, batch_size: int = 128, momentum: float = 0.9, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax classifiers for every (lr, weight decay) of `grid` at once: weights [G, C, K], biases [G, K].

    One batched weight tensor, the same mini-batches for every grid point; SGD with momentum, cosine learning
    rate decay to 0, weight decay on the weights (not the biases). The cross-entropy gradient is written out:
    d loss / d logits = softmax(logits) - onehot(label).
    """
    features, labels = features.float(), labels.to(features.device)
    n, dim = features.shape
    lr = torch.tensor([point[0] for point in grid], device=features.device)
    weight_decay = torch.tensor([point[1] for point in grid], device=features.device)
    weight = torch.zeros(len(grid), dim, n_classes, device=features.device)
    bias = torch.zeros(len(grid), n_classes, device=features.device)
    velocity_w, velocity_b = torch.zeros_like(weight), torch.zeros_like(bias)
    generator = torch.Generator().manual_seed(seed)
    total_steps = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=generator).to(features.device).split(batch_size):
            x, y = features[batch], labels[batch]
            logits = torch.einsum("bc,gck->gbk", x, weight) + bias[:, None, :]
            grad_logits = logits.softmax(dim=-1)
            grad_logits[:, torch.arange(len(y), device=y.device), y] -= 1
            grad_logits /= len(y)
            grad_w = torch.einsum("bc,gbk->gck", x, grad_logits) + weight_decay[:, None, None] * weight
            grad_b = grad_logits.sum(dim=1)
            velocity_w.mul_(momentum).add_(grad_w)
            velocity_b.mul_(momentum).add_(grad_b)
            step_lr = cosine_between(lr, 0.0, step / total_steps)
            weight -= step_lr[:, None, None] * velocity_w
            bias -= step_lr[:, None] * velocity_b
            step += 1
    return weight, bias


def probe_topk_hits(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int = 4096) -> torch.Tensor:
    """[G, 2]: the fraction of `features` each classifier gets right at top-1 and top-5."""
    hits = torch.zeros(weight.shape[0], 2, device=weight.device)
    top = min(5, weight.shape[-1])
    for x, y in zip(features.split(chunk_size), labels.split(chunk_size)):
        x, y = x.to(weight.device).float(), y.to(weight.device)
        ranked = (torch.einsum("bc,gck->gbk", x, weight) + bias[:, None, :]).topk(top, dim=-1).indices
        hits[:, 0] += (ranked[..., 0] == y).sum(dim=1)
        hits[:, 1] += (ranked == y[:, None]).any(dim=-1).sum(dim=1)
    return hits / features.shape[0]


def linear_probe(
    train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor, val_labels: torch.Tensor,
    *, n_classes: int | None = None, lrs: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3), epochs: int = 20, batch_size: int = 128,
    holdout_fraction: float = 0.1, seed: int = 0,
) -> dict:
    """Linear probes over the (lr x weight decay) grid on frozen features; the best on held-out train, on val.

    Features are standardized with the fit part's mean and std, so one learning-rate grid suits every backbone
    whatever the scale of its features. Returns the chosen lr and weight decay, its held-out top-1, its val
    top-1/top-5, and every grid point's held-out top-1.
    """
    if not lrs or not weight_decays or min(lrs) <= 0 or min(weight_decays) < 0:
        raise ValueError(f"need learning rates > 0 and weight decays >= 0, got {tuple(lrs)} and {tuple(weight_decays)}")
    n_classes = n_classes or int(max(train_labels.max(), val_labels.max())) + 1
    device = train_features.device
    train_labels, val_features, val_labels = train_labels.to(device), val_features.to(device), val_labels.to(device)
    fit, holdout = (indices.to(device) for indices in holdout_split(train_features.shape[0], holdout_fraction, seed))
    fit_features = train_features[fit].float()
    mean, std = fit_features.mean(dim=0), fit_features.std(dim=0).clamp_min(1e-6)

    def standardize(x: torch.Tensor) -> torch.Tensor:
        return (x.float() - mean) / std

    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    weight, bias = train_linear_probes(standardize(fit_features), train_labels[fit], n_classes, grid, epochs,
                                       batch_size, seed=seed)
    holdout_top1 = probe_topk_hits(weight, bias, standardize(train_features[holdout]), train_labels[holdout])[:, 0]
    best = int(holdout_top1.argmax())  # the first of equally good points: the smallest lr, then weight decay
    val_top1, val_top5 = probe_topk_hits(weight[best : best + 1], bias[best : best + 1], standardize(val_features),
                                         val_labels)[0].tolist()
    return {
        "lr": grid[best][0], "weight_decay": grid[best][1], "holdout_top1": holdout_top1[best].item(),
        "val_top1": val_top1, "val_top5": val_top5,
        "grid": [{"lr": lr, "weight_decay": wd, "holdout_top1": top1}
                 for (lr, wd), top1 in zip(grid, holdout_top1.tolist())],
    }
