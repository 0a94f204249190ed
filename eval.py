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
whose EMA teacher backbone is used, or a distill.py checkpoint, whose student backbone is used (timm/torchvision
students too: their backbone.pth records the spec that rebuilds them).

Features (`extract_features`): per image, the normed class token and the mean of the normed patch tokens of a
center crop (shorter side resized to size / crop_fraction, then size x size). k-NN and the linear probe read them
from a cache file keyed by the checkpoint (file path, size and mtime), the images and the resolution, so trying
other k or another probe grid extracts nothing again. A BatchNorm backbone (a timm/torchvision student) normalizes
with its saved statistics, those of its training images; `--batchnorm-stats train-split` recomputes them on the
probe's train images first (no labels), for a probe domain unlike the training one.

k-NN (as in DINO): cosine similarity to every train feature; the k most similar vote for their class with weight
exp(similarity / T); several k share one similarity pass. Linear probe: a grid of (learning rate, weight decay)
points trained at once as one [G, C, n_classes] weight tensor by hand-written SGD with momentum on standardized
features; the grid point with the best top-1 on a held-out part of train is reported on val.

PCA maps: the first three principal components of an image's patch features as RGB, optionally over foreground
patches only (first component above a threshold; background black), as in DINOv2's figures. Cosine maps: the
cosine similarity of one patch to all patches, colored with a viridis-like colormap. Both are upsampled to the
image (one block per patch) and put next to it. The k-NN, linear-probe and feature-extraction pieces live in
probes.py, the pictures in figures.py; this file is the command line over them.

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

import contextlib
import copy
import functools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
import tyro
from torch import nn

import runtime
from data.datasets import UNREADABLE_IMAGE_ERRORS
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
from figures import cosine_map_figure, pca_figure, save_png, segmentation_figure, stack_rows, track_strip
from models.checkpoint import checkpoint_path_or_error
from models.convnext import Block as ConvNeXtBlock
from models.vit import LayerScale
from probes import (
    KNN_TEMPERATURE,
    FeatureKind,
    Split,
    cached_features,
    checkpoint_fingerprint,
    extract_features,
    feature_cache_file,
    folder_splits,
    holdout_split,
    image_tensor,
    knn_eval,
    knn_topk_accuracy,
    linear_probe,
    load_eval_backbone,
    load_procedural_sets,
    procedural_splits,
    reestimate_batchnorm,
    select_features,
    train_linear_probes,
)

logger = logging.getLogger("dinov3")


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
    # BatchNorm backbones (timm/torchvision students): "running" uses the statistics saved from training; "train-split"
    # first recomputes them on the train split's images, labels unused (probes.reestimate_batchnorm; AdaBN)
    batchnorm_stats: Literal["running", "train-split"] = "running"
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
    if args.batchnorm_stats == "train-split":  # other features than the saved network's: another cache entry
        checkpoint_key += "|batchnorm statistics of the train split"

    @functools.cache
    def backbone() -> nn.Module:
        net = load_eval_backbone(checkpoint, dist_info.device)
        if args.batchnorm_stats == "train-split":
            n_norms = reestimate_batchnorm(net, train, size, crop_fraction, args.batch_size, args.num_workers)
            logger.info(f"BatchNorm statistics of {n_norms} layers recomputed on the train split ({train.description})"
                        if n_norms else "the backbone has no BatchNorm: --batchnorm-stats train-split changes nothing")
        return net

    def extract(split: Split) -> dict:
        return extract_features(backbone(), split, size, crop_fraction, args.batch_size, args.num_workers, dist_info)

    results = []
    for split in (train, val):
        cache_file = None
        if args.cache:
            cache_file = feature_cache_file(args.cache_dir, checkpoint_key, split, size, crop_fraction)
        results.append(cached_features(cache_file, functools.partial(extract, split), dist_info))
    return results[0], results[1], train.n_classes


@contextlib.contextmanager
def split_features_session(args: KnnArgs | LinearArgs) -> Iterator[tuple[dict, dict, int, torch.device] | None]:
    """Processes and logging for a features command: rank 0 gets (train features, val features, n_classes, device),
    the other ranks None once they have helped extract; the process group is torn down on the way out."""
    dist_info = runtime.setup_distributed(args.device)
    runtime.setup_logging(None, dist_info.is_main)
    try:
        train, val, n_classes = load_split_features(args, dist_info)
        yield (train, val, n_classes, dist_info.device) if dist_info.is_main else None
    finally:
        runtime.teardown_distributed()


def _describe_data(args: DataArgs, train: dict, val: dict, n_classes: int) -> str:
    return f"{args.data}: {len(train['labels'])} train / {len(val['labels'])} val images, {n_classes} classes"


def run_knn(args: KnnArgs) -> dict[str, float]:
    """k-NN accuracies {"top1_k20": ..., ...} (printed by rank 0; other ranks return {})."""
    if not args.ks or min(args.ks) < 1 or args.temperature <= 0:
        raise ValueError(f"need every k >= 1 and temperature > 0, got ks={args.ks}, temperature={args.temperature}")
    with split_features_session(args) as features:
        if features is None:
            return {}
        train, val, n_classes, device = features
        results = knn_topk_accuracy(
            select_features(train, args.features).to(device), train["labels"],
            select_features(val, args.features), val["labels"], args.ks, args.temperature, n_classes,
        )
        print(f"k-NN, {args.features} features, T={args.temperature} ({_describe_data(args, train, val, n_classes)})")
        for k in args.ks:
            print(f"  k={k:<4d} top-1 {100 * results[f'top1_k{k}']:6.2f}%   top-5 {100 * results[f'top5_k{k}']:6.2f}%")
        return results


def run_linear(args: LinearArgs) -> dict:
    """The linear probe's result (see `linear_probe`), printed by rank 0; other ranks return {}."""
    if args.epochs < 1 or args.probe_batch_size < 1:
        raise ValueError(f"need epochs >= 1 and probe batch size >= 1, got {args.epochs} and {args.probe_batch_size}")
    with split_features_session(args) as features:
        if features is None:
            return {}
        train, val, n_classes, device = features
        result = linear_probe(
            select_features(train, "cls+avgpool").to(device), train["labels"],
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
    runtime.leave_torchrun_worker()
