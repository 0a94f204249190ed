"""Evaluate and look at backbone features: k-NN, linear probe, PCA and cosine-similarity maps, a linear
segmentation probe and video label propagation.

    python eval.py knn --checkpoint runs/demo/teacher_backbone.pth --data procedural
    python eval.py knn --checkpoint CKPT --data /data/imagenet --ks 10 20 100 200   # train/ and val/ class folders
    torchrun --nproc_per_node=8 eval.py knn --checkpoint CKPT --data /data/imagenet  # feature extraction sharded
    python eval.py linear --checkpoint CKPT --data procedural
    python eval.py pca --checkpoint CKPT photo.jpg other.png --size 1024 [--foreground-threshold 0.5]
    python eval.py cosine-map --checkpoint CKPT photo.jpg --patch 10 12
    python eval.py segment --checkpoint CKPT [--data DATA]   # generated scenes, or DATA/{train,val}/{images,masks}
    python eval.py track --checkpoint CKPT [--data DAVIS]    # generated videos, or a DAVIS-2017-style folder

Checkpoints (`load_eval_backbone`, through models.checkpoint.load_any_backbone): a released-format ViT or ConvNeXt
backbone (train.py writes one: teacher_backbone.pth), Hugging Face DINOv3ViTModel weights, a full train.py checkpoint,
whose EMA teacher backbone is used, or a distill.py checkpoint, whose student backbone is used.

Features (`extract_features`): per image, the normed class token and the mean of the normed patch tokens of a
center crop (shorter side resized to size / crop_fraction, then size x size). k-NN and the linear probe read them
from a cache file keyed by the checkpoint (file path, size and mtime), the images and the resolution, so trying
other k or another probe grid extracts nothing again.

k-NN (as in DINO): cosine similarity to every train feature; the k most similar vote for their class with weight
exp(similarity / T); several k share one similarity pass. Linear probe: a grid of (learning rate, weight decay)
points trained at once as one [G, C, n_classes] weight tensor by hand-written SGD with momentum on standardized
features; the grid point with the best top-1 on a held-out part of train is reported on val.

PCA maps: the first three principal components of an image's patch features as RGB, optionally over foreground
patches only (first component above a threshold; background black), as in DINOv2's figures. Cosine maps: the
cosine similarity of one patch to all patches, colored with a viridis-like colormap. Both are upsampled to the
image (one block per patch) and put next to it; train.py logs them to TensorBoard (`pca_figure`,
`cosine_map_figure`, `knn_eval`).

Dense evaluation (the metrics, the ridge probe and label propagation live in dense.py, the data in
data/dense_sets.py). `segment`: a 1x1 linear layer on frozen patch features (the last `--layers` blocks
concatenated), its logits upsampled bilinearly to the masks; a (learning rate, weight decay) grid trained at once
by `train_linear_probes` on features sampled at random labeled pixels, the point with the best mIoU on held-out
train images reported on val (mIoU, pixel accuracy; 255 = ignore), with the closed-form ridge probe that
train.py logs beside it. `track`: the first frame's masks propagated through each video (context: first frame
and last 7, top-5 neighbors within 12 patches, softmax at each `--temperatures`), scored with J, F and J&F as
DAVIS does, and a strip of frames with the masks overlaid. Both print, beside the checkpoint, the same
architecture at initialization, raw pixels (each patch's pixels as its feature) and the class-token k-NN of the
checkpoint and of the initialization on the procedural labeled set.
"""

from __future__ import annotations

import colorsys
import copy
import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
import tyro
from PIL import Image
from torch import nn

import runtime
from data.augment import IMAGENET_MEAN, IMAGENET_STD, pil_to_uint8_chw
from data.datasets import (
    UNREADABLE_IMAGE_ERRORS,
    ImageDataset,
    ImageFolderDataset,
    PathListDataset,
    ProceduralDataset,
    open_image,
)
from data.dense_sets import (
    IGNORE_INDEX,
    DavisFolder,
    GeneratedScenes,
    GeneratedVideos,
    SegmentationFolder,
    Video,
    resize_pair,
    segmentation_arrays,
)
from dense import (
    boundary_map,
    forward_tokens,
    normalize_pixels,
    patch_class_fractions,
    patch_feature_maps,
    pixel_feature_maps,
    predict_masks,
    probe_confusion,
    propagate_labels,
    ridge_probe,
    segmentation_scores,
    track_scores,
    upsample_labels,
)
from models.checkpoint import checkpoint_path_or_error, load_any_backbone
from models.convnext import Block as ConvNeXtBlock
from models.vit import LayerScale

logger = logging.getLogger("dinov3")

# k-NN votes weigh neighbours by exp(cosine similarity / temperature) (DINO's protocol).
KNN_TEMPERATURE = 0.07

FeatureKind = Literal["cls", "cls+avgpool"]

# ====================================================================================================
# Backbones
# ====================================================================================================


def load_eval_backbone(checkpoint: str | Path | dict | None, device: str | torch.device = "cpu") -> nn.Module:
    """A backbone in eval mode on `device` from a checkpoint file (or an in-memory state dict).

    Which checkpoints turn into which backbone is models.checkpoint.load_any_backbone's business (released ViT and
    ConvNeXt files, Hugging Face weights, train.py and distill.py checkpoints). Everything downstream needs only
    `backbone(images)` -> {"x_norm_clstoken": [B, C], "x_norm_patchtokens": [B, P, C]} and `backbone.patch_size`.
    """
    return load_any_backbone(checkpoint).to(device).eval()


def checkpoint_fingerprint(source: str | Path | dict) -> str:
    """What identifies a checkpoint in the feature cache.

    A file: its resolved path, size and modification time (hashing gigabytes of weights would cost about as
    much as the features it saves). A state dict: a hash of its contents.
    """
    digest = hashlib.sha256()
    if isinstance(source, dict):
        _hash_contents(digest, "", source)
    else:
        path = checkpoint_path_or_error(source).resolve()
        stat = path.stat()
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


# ====================================================================================================
# Images
# ====================================================================================================


def eval_pixels(image: Image.Image, size: int, crop_fraction: float = 1.0) -> torch.Tensor:
    """Shorter side resized to size / crop_fraction (bicubic), center crop size x size, normalized: [3, size, size]."""
    pixels = pil_to_uint8_chw(image)
    resized = TF.resize(pixels, round(size / crop_fraction), interpolation=TF.InterpolationMode.BICUBIC,
                        antialias=True)
    return normalize_pixels(TF.center_crop(resized, [size, size]))


def denormalize(image: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalized [3, H, W] tensor -> [H, W, 3] uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


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


# ====================================================================================================
# Labeled splits
# ====================================================================================================


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


# ====================================================================================================
# Features
# ====================================================================================================


def tensor_features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{"cls": [N, C], "patch_mean": [N, C]} (on the CPU) of normalized images [N, 3, H, W]."""
    cls_parts, mean_parts = [], []
    for chunk in images.split(batch_size):
        cls, patches = forward_tokens(backbone, chunk)
        cls_parts.append(cls.cpu())
        mean_parts.append(patches.mean(dim=1).cpu())
    return {"cls": torch.cat(cls_parts), "patch_mean": torch.cat(mean_parts)}


def class_token_features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return tensor_features(backbone, images, batch_size)["cls"]


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


# ====================================================================================================
# k-NN
# ====================================================================================================


def _weighted_votes(neighbor_similarity: torch.Tensor, neighbor_labels: torch.Tensor, temperature: float,
                    n_classes: int) -> torch.Tensor:
    """Class scores [B, n_classes]: each neighbor adds exp(similarity / T) to its class.

    Computed as exp((similarity - row max) / T), which rescales a row's scores by one constant (same ranking) and
    cannot overflow at small T.
    """
    shifted = neighbor_similarity - neighbor_similarity[:, :1]  # top-k is sorted: column 0 is the row max
    votes = torch.zeros(neighbor_similarity.shape[0], n_classes, device=neighbor_similarity.device)
    return votes.scatter_add_(1, neighbor_labels, (shifted / temperature).exp())


def knn_predict(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
    k: int = 20, temperature: float = KNN_TEMPERATURE, n_classes: int | None = None,
) -> torch.Tensor:
    """Cosine k-NN with temperature-weighted voting (as in DINO's evaluation): class scores [N_test, n_classes]."""
    n_classes = n_classes or int(train_labels.max()) + 1
    train_features = F.normalize(train_features.float(), dim=-1)
    test_features = F.normalize(test_features.float(), dim=-1)
    top_similarity, top_index = (test_features @ train_features.T).topk(min(k, train_features.shape[0]), dim=1)
    return _weighted_votes(top_similarity, train_labels[top_index], temperature, n_classes)


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


def knn_accuracy(backbone: torch.nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, k: int = 20,
                 temperature: float = KNN_TEMPERATURE) -> float:
    """Top-1 k-NN accuracy of the class token (images already normalized tensors)."""
    return knn_eval(backbone, train_images, train_labels, test_images, test_labels, (k,), temperature)[f"top1_k{k}"]


# ====================================================================================================
# Linear probe
# ====================================================================================================


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
            step_lr = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
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


# ====================================================================================================
# Feature maps: PCA and cosine similarity
# ====================================================================================================

# Viridis sampled at 0, 0.1, ..., 1 (the published colormap's values), linearly interpolated in between.
VIRIDIS = np.array([
    (68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142), (33, 145, 140),
    (34, 168, 132), (68, 191, 112), (122, 209, 81), (189, 223, 38), (253, 231, 37),
], dtype=np.float64)
MARKER_COLOR = (255, 0, 0)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> viridis-like colors [..., 3] uint8 (dark purple = 0, yellow = 1)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(VIRIDIS))
    channels = [np.interp(values, stops, VIRIDIS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _principal_components(features: torch.Tensor, n: int) -> torch.Tensor:
    """[P, C] -> [P, n] projections on the first n principal components, each sign-fixed."""
    x = features.detach().double().cpu()
    x = x - x.mean(dim=0, keepdim=True)
    # torch.pca_lowrank would be randomized; an exact SVD of a few thousand patches is cheap and repeatable.
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    components = x @ v[:n].T
    # Fix each component's sign so the same features always give the same colors.
    signs = torch.sign(components[components.abs().argmax(dim=0), torch.arange(n)])
    return components * signs


def _min_max(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def _border_patches(grid: tuple[int, int]) -> torch.Tensor:
    h, w = grid
    border = torch.zeros(h, w, dtype=torch.bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    return border.flatten()


def foreground_mask(patch_features: torch.Tensor, grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """[h*w] bool: patches whose first principal component, min-max scaled to [0, 1], exceeds `threshold`.

    The component's sign says nothing about which side is the object, so it is oriented to score the image
    border (mostly background in photos of an object) below the rest.
    """
    first = _principal_components(patch_features, 1)[:, 0]
    border = _border_patches(grid)
    if (~border).any() and first[border].mean() > first[~border].mean():
        first = -first
    return _min_max(first) > threshold


def pca_rgb(
    patch_features: torch.Tensor, grid: tuple[int, int], foreground_threshold: float | None = None
) -> np.ndarray:
    """[h*w, C] features of one image -> [h, w, 3] uint8: first 3 principal components, each min-max scaled.

    With `foreground_threshold`, background patches (`foreground_mask`) are black and the components are those
    of the foreground patches alone (white if fewer than 3 patches are foreground: too few for 3 components).
    """
    if foreground_threshold is None:
        colors = _min_max(_principal_components(patch_features, 3))
    else:
        foreground = foreground_mask(patch_features, grid, foreground_threshold)
        colors = torch.zeros(patch_features.shape[0], 3, dtype=torch.float64)
        if foreground.sum() >= 3:
            colors[foreground] = _min_max(_principal_components(patch_features[foreground], 3))
        else:
            colors[foreground] = 1.0
    return (colors.reshape(*grid, 3).numpy() * 255).round().astype(np.uint8)


def cosine_similarity_map(patch_features: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """[h, w]: cosine similarity of patch (row, col) to every patch of the image."""
    row, col = patch
    h, w = grid
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"patch ({row}, {col}) is outside the {h}x{w} patch grid of the image: "
                         f"pick a row in [0, {h - 1}] and a column in [0, {w - 1}]")
    features = F.normalize(patch_features.float(), dim=-1)
    return (features @ features[row * w + col]).reshape(h, w).cpu()


def _upsample(patch_colors: np.ndarray, patch_size: int) -> np.ndarray:
    """[h, w, 3] -> [h*p, w*p, 3]: one flat block per patch, so the map shows what the model resolves."""
    return patch_colors.repeat(patch_size, axis=0).repeat(patch_size, axis=1)


def outline_patch(pixels: np.ndarray, patch: tuple[int, int], patch_size: int, width: int = 2) -> np.ndarray:
    """A copy of `pixels` [H, W, 3] with a square drawn on the border of patch (row, col)."""
    out = pixels.copy()
    top, left = patch[0] * patch_size, patch[1] * patch_size
    bottom, right = top + patch_size, left + patch_size
    out[top : top + width, left:right] = MARKER_COLOR
    out[bottom - width : bottom, left:right] = MARKER_COLOR
    out[top:bottom, left : left + width] = MARKER_COLOR
    out[top:bottom, right - width : right] = MARKER_COLOR
    return out


def _grid_and_pixels(backbone: nn.Module, images: torch.Tensor) -> tuple[tuple[int, int], list[np.ndarray]]:
    """The patch grid of the batch and each image as uint8 pixels, cropped to whole patches as the model does."""
    patch = backbone.patch_size
    h, w = images.shape[-2] // patch, images.shape[-1] // patch
    return (h, w), [denormalize(image[:, : h * patch, : w * patch]) for image in images]


def pca_figure(
    backbone: torch.nn.Module, images: torch.Tensor, foreground_threshold: float | None = None
) -> np.ndarray:
    """Rows of (image | PCA of its patch features upsampled to the image size), stacked: [rows*H, 2W, 3] uint8."""
    _, patch_tokens = forward_tokens(backbone, images)
    grid, pixels = _grid_and_pixels(backbone, images)
    rows = []
    for image_pixels, features in zip(pixels, patch_tokens):
        feature_map = _upsample(pca_rgb(features, grid, foreground_threshold), backbone.patch_size)
        rows.append(np.concatenate([image_pixels, feature_map], axis=1))
    return np.concatenate(rows, axis=0)


def cosine_map_figure(
    backbone: torch.nn.Module, images: torch.Tensor, patch: tuple[int, int] | None = None
) -> np.ndarray:
    """Rows of (image | cosine similarity of one patch to all patches), stacked: [rows*H, 2W, 3] uint8.

    `patch` is (row, col) in the patch grid, the center patch by default; it is outlined in red on both halves.
    Colors span each image's own range of similarities (dark: least similar, yellow: the patch itself).
    """
    _, patch_tokens = forward_tokens(backbone, images)
    grid, pixels = _grid_and_pixels(backbone, images)
    patch = patch if patch is not None else (grid[0] // 2, grid[1] // 2)
    rows = []
    for image_pixels, features in zip(pixels, patch_tokens):
        similarity = cosine_similarity_map(features, grid, patch)
        scaled = (similarity - similarity.min()) / (similarity.max() - similarity.min()).clamp_min(1e-12)
        heat = _upsample(colormap(scaled.numpy()), backbone.patch_size)
        marked = [outline_patch(part, patch, backbone.patch_size) for part in (image_pixels, heat)]
        rows.append(np.concatenate(marked, axis=1))
    return np.concatenate(rows, axis=0)


def stack_rows(figures: Sequence[np.ndarray], background: int = 255) -> np.ndarray:
    """Figures of different widths stacked vertically, each padded on the right to the widest."""
    width = max(figure.shape[1] for figure in figures)
    padded = [np.pad(f, ((0, 0), (0, width - f.shape[1]), (0, 0)), constant_values=background) for f in figures]
    return np.concatenate(padded, axis=0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=True)
    return path


# ====================================================================================================
# Dense evaluation: segmentation probe, label propagation, their baselines and pictures
# ====================================================================================================


def run_layerscale_init(checkpoint: Path) -> float | None:
    """LayerScale's starting value in the train.py run that wrote `checkpoint` (its folder's config.json), or None
    when the folder holds no train.py config (a released or downloaded backbone)."""
    config_file = checkpoint.parent / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())["model"]["layerscale_init"]
    except (ValueError, KeyError, TypeError):
        return None


def initialized_copy(backbone: nn.Module, layerscale_init: float | None = None, seed: int = 0) -> nn.Module:
    """The same architecture with fresh weights (its own `init_weights`, seeded): the "initialization" baseline.

    `layerscale_init` replaces the LayerScale starting value a loaded backbone only knows as the architecture's
    default (the demo runs start at 1.0, the recipe at 1e-5).
    """
    fresh = copy.deepcopy(backbone)
    if layerscale_init is not None:
        for module in fresh.modules():
            if isinstance(module, LayerScale):
                module.init_value = layerscale_init
            elif isinstance(module, ConvNeXtBlock):
                module.layerscale_init = layerscale_init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh.init_weights()
    return fresh.eval()


def init_baseline(backbone: nn.Module, checkpoint: Path, layerscale_init: float | None = None) -> nn.Module:
    """`backbone`'s architecture at initialization, LayerScale starting where the checkpoint's run started it
    (`layerscale_init`, else the run folder's config.json, else the architecture's default)."""
    if layerscale_init is None:
        layerscale_init = run_layerscale_init(checkpoint)
    return initialized_copy(backbone, layerscale_init)


def dense_feature_sources(backbone: nn.Module, init: nn.Module, n_layers: int,
                          batch_size: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Name -> (normalized images -> patch feature maps [N, C, h, w]): the checkpoint and its two baselines."""
    return {
        "checkpoint": functools.partial(patch_feature_maps, backbone, n_layers=n_layers, batch_size=batch_size),
        "same net at init": functools.partial(patch_feature_maps, init, n_layers=n_layers, batch_size=batch_size),
        "raw pixels": functools.partial(pixel_feature_maps, patch_size=backbone.patch_size),
    }


def class_token_knn(backbones: dict[str, nn.Module], n_train: int, size: int = 128) -> dict[str, float]:
    """Name -> class-token k-NN top-1 (k=20) on the procedural labeled set (n_train / n_train // 2 images); {} for
    n_train = 0."""
    if n_train == 0:
        return {}
    sets = load_procedural_sets(n_train, max(1, n_train // 2), size=size, n_classes=10)
    return {name: knn_eval(backbone, *sets, ks=(20,))["top1_k20"] for name, backbone in backbones.items()}


def sample_pixels(maps: torch.Tensor, masks: torch.Tensor, per_image: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [M, C], labels [M]) at `per_image` random labeled pixels (with replacement) of each image that has
    any: the patch features interpolated bilinearly at the pixel, exactly as F.interpolate upsamples a map. A 1x1
    linear layer commutes with that interpolation, so fitting it on these features fits the upsampled logits."""
    labeled = (masks != IGNORE_INDEX).flatten(1).float()
    keep = labeled.sum(dim=1) > 0
    maps, masks, labeled = maps[keep], masks[keep], labeled[keep]
    height, width = masks.shape[-2:]
    pixel = torch.multinomial(labeled, per_image, replacement=True, generator=generator)  # [N, per_image]
    rows, cols = pixel // width, pixel % width
    # grid_sample's (x, y) in [-1, 1] with align_corners=False, border padding: F.interpolate's bilinear sampling.
    grid = torch.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], dim=-1).float()[:, None]
    features = F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = masks.flatten(1).gather(1, pixel).long()
    return features[:, :, 0].permute(0, 2, 1).reshape(-1, maps.shape[1]), labels.reshape(-1)


def segmentation_probe(
    train_maps: torch.Tensor, train_masks: torch.Tensor, val_maps: torch.Tensor, val_masks: torch.Tensor,
    n_classes: int, *, lrs: Sequence[float] = (1e-3, 1e-2, 1e-1), weight_decays: Sequence[float] = (0.0, 1e-4),
    epochs: int = 10, pixels_per_image: int = 256, batch_size: int = 1024, holdout_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """A 1x1 linear layer on patch feature maps, logits upsampled bilinearly to the masks, for each (lr, weight
    decay) of the grid (`train_linear_probes`, on standardized features at sampled pixels); the grid point with
    the best mIoU on the held-out train images is reported on val: {"miou", "pixel_accuracy", "lr",
    "weight_decay", "holdout_miou", "weight", "bias"} (weight [C, K] and bias [K] act on the raw maps)."""
    if not lrs or not weight_decays or min(lrs) <= 0 or min(weight_decays) < 0:
        raise ValueError(f"need learning rates > 0 and weight decays >= 0, got {tuple(lrs)} and {tuple(weight_decays)}")
    fit, holdout = holdout_split(len(train_maps), holdout_fraction, seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = sample_pixels(train_maps[fit], train_masks[fit], pixels_per_image, generator)
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    weight, bias = train_linear_probes((x - mean) / std, y, n_classes, grid, epochs, batch_size, seed=seed)
    # Fold the standardization into the layer: it then applies to raw feature maps.
    weight = weight / std[None, :, None]
    bias = bias - torch.einsum("c,gck->gk", mean, weight)
    holdout_miou = [segmentation_scores(probe_confusion(train_maps[holdout], train_masks[holdout], w, b))["miou"]
                    for w, b in zip(weight, bias)]
    best = max(range(len(grid)), key=lambda g: (np.nan_to_num(holdout_miou[g], nan=-1.0), -g))
    scores = segmentation_scores(probe_confusion(val_maps, val_masks, weight[best], bias[best]))
    return {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"], "lr": grid[best][0],
            "weight_decay": grid[best][1], "holdout_miou": holdout_miou[best], "weight": weight[best],
            "bias": bias[best]}


def label_colors(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Label indices [H, W] -> [H, W, 3] uint8: 0 black, IGNORE_INDEX white, other labels well spread hues."""
    # Golden-ratio hue steps put consecutive labels far apart in hue; alternate brightness separates them more.
    palette = np.array([colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.8, 0.95 if i % 2 == 0 else 0.7)
                        for i in range(256)])
    palette = (palette * 255).round().astype(np.uint8)
    palette[0], palette[IGNORE_INDEX] = 0, 255
    return palette[np.asarray(labels, dtype=np.int64)]


def overlay(pixels: np.ndarray, labels: torch.Tensor | np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """[H, W, 3] uint8: the image in dimmed gray with every nonzero label painted in its `label_colors` color and
    outlined in it (gray, so the masks' colors are not confused with the objects')."""
    labels = torch.as_tensor(np.asarray(labels)).long()
    colors = label_colors(labels).astype(np.float32)
    gray = 0.7 * pixels.astype(np.float32).mean(axis=-1, keepdims=True)
    painted = np.where((labels > 0).numpy()[..., None], (1 - opacity) * gray + opacity * colors, gray)
    outline = boundary_map(labels).numpy() & (labels > 0).numpy()
    painted[outline] = colors[outline]
    return painted.round().astype(np.uint8)


def segmentation_figure(images: torch.Tensor, masks: torch.Tensor, predictions: dict[str, torch.Tensor]) -> np.ndarray:
    """Rows of (image | ground truth | each prediction), label colors as in `label_colors`: [rows*H, cols*W, 3]."""
    rows = []
    for i in range(len(images)):
        columns = [denormalize(images[i]), label_colors(masks[i])]
        columns += [label_colors(predicted[i]) for predicted in predictions.values()]
        rows.append(np.concatenate(columns, axis=1))
    return np.concatenate(rows, axis=0)


def prepared_video(video: Video, size: int | None, patch_size: int) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(normalized frames [T, 3, H, W], annotations [H, W] uint8 or None): shorter side resized to `size`, then
    center-cropped to multiples of the patch size; the masks follow (nearest-neighbor). Scores are computed here."""
    frames, annotations = [], []
    for frame, mask in zip(video.frames, video.masks):
        pixels, labels = resize_pair(frame, mask, size)
        crop = [pixels.shape[-2] // patch_size * patch_size, pixels.shape[-1] // patch_size * patch_size]
        if min(crop) == 0:
            raise ValueError(f"video {video.name}: frames of {pixels.shape[-1]}x{pixels.shape[-2]} px are smaller "
                             f"than one {patch_size} px patch; pass a larger --size")
        frames.append(normalize_pixels(TF.center_crop(pixels, crop)))
        annotations.append(None if labels is None else TF.center_crop(labels[None], crop)[0])
    return torch.stack(frames), annotations


def first_frame_labels(annotation: torch.Tensor, object_ids: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """[1 + n_objects, h, w]: the fraction of each patch of frame 0 covered by the background and each object."""
    channel = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
    channel[0] = 0
    for c, object_id in enumerate(object_ids, start=1):
        channel[object_id] = c
    fractions = patch_class_fractions(channel[annotation.long()][None], grid, 1 + len(object_ids))
    return fractions[0].permute(2, 0, 1).float()


def track_strip(frames: torch.Tensor, annotations: list, predicted: torch.Tensor, n_columns: int) -> np.ndarray:
    """Two rows of evenly spaced frames: the annotation overlaid (first frame: the given mask), then the
    propagated masks overlaid."""
    columns = np.unique(np.linspace(0, len(frames) - 1, num=min(n_columns, len(frames))).round().astype(int))
    truth, guess = [], []
    for t in columns:
        pixels = denormalize(frames[t])
        given = annotations[t] if annotations[t] is not None else torch.zeros(pixels.shape[:2], dtype=torch.uint8)
        truth.append(overlay(pixels, given))
        guess.append(overlay(pixels, predicted[t] if t else given))
    return np.concatenate([np.concatenate(truth, axis=1), np.concatenate(guess, axis=1)], axis=0)


# ====================================================================================================
# Command line
# ====================================================================================================


@dataclass
class BackboneArgs:
    checkpoint: str | None = None  # released DINOv3 backbone, HF DINOv3ViTModel weights, train.py/distill.py checkpoint
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class DataArgs:
    data: str | None = None  # folder with train/ and val/ splits (one sub-folder per class in each), or "procedural"
    size: int | None = None  # side of the square center crop; None: 224 for folders, 128 for procedural
    crop_fraction: float = 0.875  # folders: resize the shorter side to size / crop_fraction first (256 for 224)
    batch_size: int = 64  # images per forward pass
    num_workers: int = 4  # DataLoader processes decoding images
    procedural_train: int = 1000  # --data procedural: train = items [0, n), val = the next procedural_val items
    procedural_val: int = 500
    procedural_classes: int = 10
    procedural_seed: int = 0
    cache: bool = True  # reuse / save features in cache_dir
    cache_dir: str = "~/.cache/dinov3-lite"


@dataclass
class KnnArgs(DataArgs, BackboneArgs):
    """k-NN classification with class-token (or class + average patch token) features of train and val."""

    ks: tuple[int, ...] = (10, 20, 100, 200)  # numbers of neighbors, evaluated in one pass
    temperature: float = KNN_TEMPERATURE  # neighbors vote with weight exp(cosine similarity / temperature)
    features: FeatureKind = "cls"


@dataclass
class LinearArgs(DataArgs, BackboneArgs):
    """Linear probes on frozen class + average patch token features; the grid point best on held-out train."""

    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3)
    epochs: int = 20
    probe_batch_size: int = 128
    holdout_fraction: float = 0.1  # of train, for choosing the grid point
    seed: int = 0


@dataclass
class FeatureMapArgs(BackboneArgs):
    images: tyro.conf.Positional[tuple[str, ...]] = ()  # image files
    size: int | None = 448  # shorter side in pixels before cropping to multiples of 16 (None: native size)
    output_dir: str | None = None  # default: next to each input image
    sheet: str | None = None  # also write all figures stacked into this one PNG


@dataclass
class PcaArgs(FeatureMapArgs):
    """First 3 principal components of the patch features as RGB, next to each image (<stem>_pca.png)."""

    foreground_threshold: float | None = None  # e.g. 0.5: black background, PCA of the foreground patches


@dataclass
class CosineMapArgs(FeatureMapArgs):
    """Cosine similarity of one patch to all patches, next to each image (<stem>_cosine.png)."""

    patch: tuple[int, int] | None = None  # ROW COL in the patch grid; default the center patch


@dataclass
class DenseArgs(BackboneArgs):
    layers: int = 1  # patch tokens of the last N blocks, concatenated
    batch_size: int = 32  # images per forward pass
    # LayerScale start of the "same net at init" baseline; None: the checkpoint's run (its folder's config.json),
    # else the architecture's default
    init_layerscale: float | None = None
    knn_images: int = 500  # class-token k-NN baseline on this many procedural images (half as many held out); 0: off


@dataclass
class SegmentArgs(DenseArgs):
    """Linear segmentation probe on frozen patch features (1x1 linear layer, logits upsampled bilinearly to the
    masks), beside the same network at initialization and raw pixels: mIoU and pixel accuracy on val."""

    # "generated" (scenes made on the fly) or a folder DATA with DATA/{train,val}/{images,masks}/ (masks: PNGs of
    # class indices, 255 = ignore)
    data: str = "generated"
    size: int | None = None  # images resized (shorter side) and center-cropped to size x size; None: 128 / 448
    n_train: int = 300  # generated scenes for train ...
    n_val: int = 100  # ... and for val (other scenes)
    seed: int = 0
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    weight_decays: tuple[float, ...] = (0.0, 1e-4)
    epochs: int = 10
    pixels_per_image: int = 256  # labeled pixels of each train image the probe is fit on
    probe_batch_size: int = 1024  # pixels per SGD step
    holdout_fraction: float = 0.1  # of the train images, for choosing the grid point
    figure: str = "runs/eval/segment.png"  # rows of image | ground truth | checkpoint | init | pixels
    figure_images: int = 4


@dataclass
class TrackArgs(DenseArgs):
    """Video label propagation: the first frame's masks carried through each video by patch-feature similarity,
    beside the same network at initialization and raw pixels: J (region IoU), F (boundary F-measure), J&F."""

    data: str = "generated"  # "generated" (videos made on the fly) or a DAVIS-2017-style folder
    resolution: str = "480p"  # DAVIS: the JPEGImages/ and Annotations/ sub-folder
    videos: tuple[str, ...] = ()  # DAVIS: only these videos (none given: every video)
    size: int | None = None  # shorter side in pixels, then cropped to multiples of 16; None: 224 / 480
    n_videos: int = 6  # generated videos ...
    n_frames: int = 16  # ... of this many frames
    seed: int = 0
    temperatures: tuple[float, ...] = (0.1, 0.2)  # softmax temperatures, each evaluated
    topk: int = 5  # context patches each patch takes its label from
    n_last: int = 7  # previous frames in the context (besides the first)
    radius: int = 12  # in patches: only context patches this close (rows and columns) are candidates
    strip: str = "runs/eval/track.png"  # frames with the annotation and the propagated masks overlaid
    strip_videos: int = 2
    strip_frames: int = 8


DEFAULT_FOLDER_SIZE = 224  # the usual ImageNet evaluation crop
DEFAULT_PROCEDURAL_SIZE = 128  # ProceduralDataset's own default image size


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _check_data_args(args: DataArgs) -> None:
    if args.data is None:
        raise ValueError("no data given: pass --data FOLDER (with train/ and val/ class sub-folders) "
                         "or --data procedural (generated labeled images, nothing to download)")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {args.size}")
    if not 0 < args.crop_fraction <= 1:
        raise ValueError(f"--crop-fraction must be in (0, 1], got {args.crop_fraction}")


def build_splits(args: DataArgs) -> tuple[Split, Split, int, float]:
    """(train, val, image size, crop fraction) for --data: a folder, or the procedural set at its own size."""
    if args.data == "procedural":
        size = args.size or DEFAULT_PROCEDURAL_SIZE
        train, val = procedural_splits(args.procedural_train, args.procedural_val, size, args.procedural_classes,
                                       args.procedural_seed)
        return train, val, size, 1.0  # generated at the evaluation size: nothing to crop away
    train, val = folder_splits(args.data)
    return train, val, args.size or DEFAULT_FOLDER_SIZE, args.crop_fraction


def load_split_features(args: KnnArgs | LinearArgs, dist_info: runtime.Dist) -> tuple[dict, dict, int]:
    """(train features, val features, n_classes) from the cache or extracted; the backbone is read only if needed."""
    _check_data_args(args)
    checkpoint = checkpoint_path_or_error(args.checkpoint)
    train, val, size, crop_fraction = build_splits(args)
    checkpoint_key = checkpoint_fingerprint(checkpoint)

    @functools.cache
    def backbone() -> nn.Module:
        return load_eval_backbone(checkpoint, dist_info.device)

    def extract(split: Split) -> dict:
        return extract_features(backbone(), split, size, crop_fraction, args.batch_size, args.num_workers, dist_info)

    results = []
    for split in (train, val):
        cache_file = None
        if args.cache:
            cache_file = feature_cache_file(args.cache_dir, checkpoint_key, split, size, crop_fraction)
        results.append(cached_features(cache_file, functools.partial(extract, split), dist_info))
    return results[0], results[1], train.n_classes


def _describe_data(args: DataArgs, train: dict, val: dict, n_classes: int) -> str:
    return f"{args.data}: {len(train['labels'])} train / {len(val['labels'])} val images, {n_classes} classes"


def run_knn(args: KnnArgs) -> dict[str, float]:
    """k-NN accuracies {"top1_k20": ..., ...} (printed by rank 0; other ranks return {})."""
    if not args.ks or min(args.ks) < 1 or args.temperature <= 0:
        raise ValueError(f"need every k >= 1 and temperature > 0, got ks={args.ks}, temperature={args.temperature}")
    dist_info = runtime.setup_distributed(args.device)
    runtime.setup_logging(None, dist_info.is_main)
    try:
        train, val, n_classes = load_split_features(args, dist_info)
        if not dist_info.is_main:
            return {}
        results = knn_topk_accuracy(
            select_features(train, args.features).to(dist_info.device), train["labels"],
            select_features(val, args.features), val["labels"], args.ks, args.temperature, n_classes,
        )
        print(f"k-NN, {args.features} features, T={args.temperature} ({_describe_data(args, train, val, n_classes)})")
        for k in args.ks:
            print(f"  k={k:<4d} top-1 {100 * results[f'top1_k{k}']:6.2f}%   top-5 {100 * results[f'top5_k{k}']:6.2f}%")
        return results
    finally:
        runtime.teardown_distributed()


def run_linear(args: LinearArgs) -> dict:
    """The linear probe's result (see `linear_probe`), printed by rank 0; other ranks return {}."""
    if args.epochs < 1 or args.probe_batch_size < 1:
        raise ValueError(f"need epochs >= 1 and probe batch size >= 1, got {args.epochs} and {args.probe_batch_size}")
    dist_info = runtime.setup_distributed(args.device)
    runtime.setup_logging(None, dist_info.is_main)
    try:
        train, val, n_classes = load_split_features(args, dist_info)
        if not dist_info.is_main:
            return {}
        result = linear_probe(
            select_features(train, "cls+avgpool").to(dist_info.device), train["labels"],
            select_features(val, "cls+avgpool"), val["labels"], n_classes=n_classes, lrs=args.lrs,
            weight_decays=args.weight_decays, epochs=args.epochs, batch_size=args.probe_batch_size,
            holdout_fraction=args.holdout_fraction, seed=args.seed,
        )
        print(f"linear probe, class + average patch token ({_describe_data(args, train, val, n_classes)})")
        print(f"  held-out top-1 ({args.holdout_fraction:.0%} of train) per grid point:")
        for point in result["grid"]:
            lr, wd, top1 = point["lr"], point["weight_decay"], point["holdout_top1"]
            print(f"    lr {lr:<8g} weight decay {wd:<8g} {100 * top1:6.2f}%")
        print(f"  best: lr {result['lr']:g}, weight decay {result['weight_decay']:g} -> val top-1 "
              f"{100 * result['val_top1']:.2f}%, top-5 {100 * result['val_top5']:.2f}%")
        return result
    finally:
        runtime.teardown_distributed()


def figure_path(image_path: Path, suffix: str, output_dir: str | None) -> Path:
    folder = Path(output_dir) if output_dir is not None else image_path.parent
    return folder / f"{image_path.stem}{suffix}.png"


def run_feature_maps(args: FeatureMapArgs) -> list[Path]:
    """Write one PNG per image (and the optional sheet); returns the paths written."""
    if not args.images:
        raise ValueError("no images given: list one or more image files after the options")
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size must be a positive number of pixels (or None for the native size), got {args.size}")
    runtime.setup_logging(None, is_main=True)
    backbone = load_eval_backbone(args.checkpoint, _device(args.device))
    # Every image is read and checked before the first forward pass.
    images = [image_tensor(path, args.size, backbone.patch_size) for path in paths]
    written, figures = [], []
    for path, image in zip(paths, images):
        if isinstance(args, PcaArgs):
            figure, suffix = pca_figure(backbone, image[None], args.foreground_threshold), "_pca"
        else:
            figure, suffix = cosine_map_figure(backbone, image[None], args.patch), "_cosine"
        figures.append(figure)
        written.append(save_png(figure, figure_path(path, suffix, args.output_dir)))
        print(f"wrote {written[-1]}")
    if args.sheet is not None:
        written.append(save_png(stack_rows(figures), args.sheet))
        print(f"wrote {written[-1]}")
    return written


DEFAULT_SEGMENT_SIZE = {"generated": 128, "folder": 448}
DEFAULT_TRACK_SIZE = {"generated": 224, "folder": 480}  # DAVIS 480p frames at their own size


def _check_dense_args(args: DenseArgs) -> None:
    if args.layers < 1 or args.batch_size < 1 or args.knn_images < 0:
        raise ValueError(f"need --layers >= 1, --batch-size >= 1 and --knn-images >= 0, got {args.layers}, "
                         f"{args.batch_size} and {args.knn_images}")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {args.size}")


def segmentation_datasets(args: SegmentArgs, size: int):
    """(train, val) segmentation datasets of --data; folders are checked here, before any image is decoded."""
    if args.data == "generated":
        if args.n_train < 2 or args.n_val < 1:
            raise ValueError(f"need --n-train >= 2 and --n-val >= 1, got {args.n_train} and {args.n_val}")
        return (GeneratedScenes(args.n_train, size, args.seed),
                GeneratedScenes(args.n_val, size, args.seed, first=args.n_train))
    return SegmentationFolder(args.data, "train"), SegmentationFolder(args.data, "val")


def _percent(value: float) -> str:
    return f"{100 * value:6.1f} %"


def print_knn_baseline(knn: dict[str, float], n_images: int) -> None:
    results = ", ".join(f"{name} {100 * top1:.1f} %" for name, top1 in knn.items())
    print(f"  class-token k-NN top-1 (k=20) on {n_images} / {max(1, n_images // 2)} procedural images "
          f"(10 classes, chance 10 %): {results}")


def run_segment(args: SegmentArgs) -> dict:
    """Segmentation probes of the checkpoint, its initialization and raw pixels; returns
    {name: {"miou", "pixel_accuracy", "ridge_miou", "ridge_pixel_accuracy", "lr", "weight_decay"}, "knn": {...},
    "figure": path, "images_skipped": n}."""
    _check_dense_args(args)
    if args.epochs < 1 or args.pixels_per_image < 1 or args.probe_batch_size < 1 or args.figure_images < 0:
        raise ValueError("need --epochs, --pixels-per-image and --probe-batch-size >= 1 and --figure-images >= 0")
    runtime.setup_logging(None, is_main=True)
    checkpoint = checkpoint_path_or_error(args.checkpoint)
    size = args.size or DEFAULT_SEGMENT_SIZE["generated" if args.data == "generated" else "folder"]
    train_set, val_set = segmentation_datasets(args, size)
    backbone = load_eval_backbone(checkpoint, _device(args.device))
    if size % backbone.patch_size:
        raise ValueError(f"--size {size} is not a multiple of the backbone's {backbone.patch_size} px patch")
    train_images, train_masks, train_skipped = segmentation_arrays(train_set, size)
    val_images, val_masks, val_skipped = segmentation_arrays(val_set, size)
    if len(train_images) < 2:
        raise ValueError(f"{train_set.source}: {len(train_images)} readable train image(s); the probes need 2 or more")
    labeled = torch.cat([train_masks.flatten(), val_masks.flatten()])
    labeled = labeled[labeled != IGNORE_INDEX]
    n_classes = GeneratedScenes.n_classes if args.data == "generated" else int(labeled.max()) + 1
    train_x, val_x = normalize_pixels(train_images), normalize_pixels(val_images)
    init = init_baseline(backbone, checkpoint, args.init_layerscale)

    results, predictions = {}, {}
    shown = slice(0, args.figure_images)
    for name, features in dense_feature_sources(backbone, init, args.layers, args.batch_size).items():
        train_maps, val_maps = features(train_x), features(val_x)
        probe = segmentation_probe(
            train_maps, train_masks, val_maps, val_masks, n_classes, lrs=args.lrs, weight_decays=args.weight_decays,
            epochs=args.epochs, pixels_per_image=args.pixels_per_image, batch_size=args.probe_batch_size,
            holdout_fraction=args.holdout_fraction, seed=args.seed)
        ridge = ridge_probe(train_maps, train_masks, val_maps, val_masks, n_classes)
        results[name] = {"miou": probe["miou"], "pixel_accuracy": probe["pixel_accuracy"], "lr": probe["lr"],
                         "weight_decay": probe["weight_decay"], "ridge_miou": ridge["miou"],
                         "ridge_pixel_accuracy": ridge["pixel_accuracy"]}
        predictions[name] = predict_masks(val_maps[shown], probe["weight"], probe["bias"], (size, size))
    knn = class_token_knn({"checkpoint": backbone, "same net at init": init}, args.knn_images)

    print(f"segmentation probes on {train_set.source} (train) and {val_set.source} (val): {len(train_images)} / "
          f"{len(val_images)} images at {size} px, {n_classes} classes, patch tokens of the last {args.layers} "
          "layer(s)")
    if train_skipped + val_skipped:
        print(f"  {train_skipped + val_skipped} unreadable images skipped")
    print(f"  {'':18s}  {'linear probe':^20s}   {'ridge probe':^20s}")
    print(f"  {'features':18s}  {'mIoU':>9s} {'pixel acc':>10s}   {'mIoU':>9s} {'pixel acc':>10s}   lr, weight decay")
    for name, r in results.items():
        print(f"  {name:18s}  {_percent(r['miou'])} {_percent(r['pixel_accuracy']):>10s}   "
              f"{_percent(r['ridge_miou'])} {_percent(r['ridge_pixel_accuracy']):>10s}   "
              f"{r['lr']:g}, {r['weight_decay']:g}")
    if knn:
        print_knn_baseline(knn, args.knn_images)
    figure = None
    if args.figure_images:
        figure = save_png(segmentation_figure(val_x[shown], val_masks[shown], predictions), args.figure)
        print(f"  wrote {figure} (rows: image | ground truth | {' | '.join(predictions)})")
    return {**results, "knn": knn, "figure": str(figure) if figure else None,
            "images_skipped": train_skipped + val_skipped, "n_classes": n_classes}


def video_dataset(args: TrackArgs, size: int):
    """The videos of --data; a DAVIS folder is checked here, before any frame is decoded."""
    if args.data == "generated":
        return GeneratedVideos(args.n_videos, args.n_frames, size, args.seed)
    return DavisFolder(args.data, args.resolution, args.videos)


def run_track(args: TrackArgs) -> dict:
    """Label propagation with the checkpoint, its initialization and raw pixels; returns {name: {temperature:
    {"J", "F", "J&F"}}, "knn": {...}, "strip": path, "videos": n, "objects": n, "frames_skipped": n}."""
    _check_dense_args(args)
    if not args.temperatures or min(args.temperatures) <= 0:
        raise ValueError(f"--temperatures must all be > 0, got {args.temperatures}")
    if args.topk < 1 or args.n_last < 0 or args.radius < 0 or args.strip_videos < 0 or args.strip_frames < 1:
        raise ValueError("need --topk >= 1, --n-last >= 0, --radius >= 0, --strip-videos >= 0, --strip-frames >= 1")
    runtime.setup_logging(None, is_main=True)
    checkpoint = checkpoint_path_or_error(args.checkpoint)
    size = args.size or DEFAULT_TRACK_SIZE["generated" if args.data == "generated" else "folder"]
    videos = video_dataset(args, size)
    backbone = load_eval_backbone(checkpoint, _device(args.device))
    init = init_baseline(backbone, checkpoint, args.init_layerscale)
    sources = dense_feature_sources(backbone, init, args.layers, args.batch_size)
    per_object = {(name, t): [] for name in sources for t in args.temperatures}  # (J, F) of every scored object
    strips, n_scored, videos_skipped, frames_skipped = [], 0, 0, 0
    for index in range(len(videos)):
        try:
            video = videos.load(index)
        except UNREADABLE_IMAGE_ERRORS as err:
            logger.warning(f"skipping video {videos.describe(index)}: its first frame or mask cannot be read: "
                           f"{type(err).__name__}: {err}")
            videos_skipped += 1
            continue
        frames_skipped += video.n_skipped
        frames, annotations = prepared_video(video, size, backbone.patch_size)
        object_ids = sorted(set(annotations[0].unique().tolist()) - {0, IGNORE_INDEX})
        if not object_ids:
            logger.warning(f"skipping video {video.name}: its first frame's mask holds no object")
            videos_skipped += 1
            continue
        height, width = frames.shape[-2:]
        first = first_frame_labels(annotations[0], object_ids, (height // backbone.patch_size,
                                                                 width // backbone.patch_size))
        ids = torch.tensor([0, *object_ids])
        for name, features in sources.items():
            maps = features(frames)
            for temperature in args.temperatures:
                soft = propagate_labels(maps, first, args.n_last, args.topk, args.radius, temperature)
                predicted = ids[upsample_labels(soft, (height, width))]
                per_object[name, temperature] += track_scores(predicted, annotations, object_ids).values()
                if name == "checkpoint" and temperature == args.temperatures[0] and len(strips) < args.strip_videos:
                    strips.append(track_strip(frames, annotations, predicted, args.strip_frames))
        n_scored += 1
    if not per_object["checkpoint", args.temperatures[0]]:
        raise ValueError(f"no video of {videos.source} could be scored: each needs a readable first frame with at "
                         "least one object in its mask, and annotated frames after it")

    results = {name: {} for name in sources}
    for (name, temperature), scores in per_object.items():
        j, f = (float(np.mean([score[i] for score in scores])) for i in (0, 1))
        results[name][temperature] = {"J": j, "F": f, "J&F": (j + f) / 2}
    knn = class_token_knn({"checkpoint": backbone, "same net at init": init}, args.knn_images)
    n_objects = len(per_object["checkpoint", args.temperatures[0]])
    print(f"label propagation on {videos.source}: {n_scored} videos, {n_objects} objects, frames at {size} px "
          f"(shorter side); context = first frame + last {args.n_last}, top-{args.topk}, radius {args.radius} patches")
    if videos_skipped or frames_skipped:
        print(f"  skipped: {videos_skipped} videos, {frames_skipped} unreadable frames")
    print(f"  {'features':18s}  {'T':>4s}  {'J':>8s} {'F':>8s} {'J&F':>8s}")
    for name, by_temperature in results.items():
        for temperature, r in by_temperature.items():
            print(f"  {name:18s}  {temperature:4g}  {_percent(r['J'])} {_percent(r['F'])} {_percent(r['J&F'])}")
    if knn:
        print_knn_baseline(knn, args.knn_images)
    strip = None
    if strips:
        strip = save_png(stack_rows(strips), args.strip)
        print(f"  wrote {strip} (per video: the annotation, then the masks propagated with the checkpoint at "
              f"T={args.temperatures[0]:g})")
    return {**results, "knn": knn, "strip": str(strip) if strip else None, "videos": n_scored, "objects": n_objects,
            "frames_skipped": frames_skipped, "videos_skipped": videos_skipped}


SUBCOMMANDS = {"knn": KnnArgs, "linear": LinearArgs, "pca": PcaArgs, "cosine-map": CosineMapArgs,
               "segment": SegmentArgs, "track": TrackArgs}


def main(argv: list[str] | None = None):
    usage = "\n\n".join(__doc__.split("\n\n")[:2])
    args = tyro.extras.subcommand_cli_from_dict(SUBCOMMANDS, args=argv, description=usage)
    if isinstance(args, KnnArgs):
        return run_knn(args)
    if isinstance(args, LinearArgs):
        return run_linear(args)
    if isinstance(args, SegmentArgs):
        return run_segment(args)
    if isinstance(args, TrackArgs):
        return run_track(args)
    return run_feature_maps(args)


if __name__ == "__main__":
    main()
