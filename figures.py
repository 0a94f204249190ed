"""Pictures of features: PCA maps (the first three principal components of an image's patch features as RGB,
optionally over foreground patches only, as in DINOv2's figures), cosine-similarity maps (one patch against all,
viridis-like colors), segmentation overlays and tracking strips, each upsampled to the image and put next to it.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from data.augment import IMAGENET_MEAN, IMAGENET_STD
from data.dense_sets import IGNORE_INDEX
from dense import boundary_map, forward_tokens


def denormalize(image: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalized [3, H, W] tensor -> [H, W, 3] uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


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
