"""Looking at features: PCA maps of patch features (the paper's Figure-style visualizations).

`pca_rgb` maps the first three principal components of an image's patch features to RGB; `pca_figure`
puts the image and its feature map side by side. train.py logs these to TensorBoard and writes a PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.augment import IMAGENET_MEAN, IMAGENET_STD


def pca_rgb(patch_features: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """[h*w, C] features of one image -> [h, w, 3] uint8: first 3 principal components, each min-max scaled."""
    x = patch_features.detach().double().cpu()
    x = x - x.mean(dim=0, keepdim=True)
    # torch.pca_lowrank would be randomized; an exact SVD of a few hundred patches is cheap and repeatable.
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    components = x @ v[:3].T
    # Fix each component's sign so the same features always give the same colors.
    signs = torch.sign(components[components.abs().argmax(dim=0), torch.arange(3)])
    components = components * signs
    lo, hi = components.min(dim=0).values, components.max(dim=0).values
    scaled = (components - lo) / (hi - lo).clamp_min(1e-12)
    return (scaled.reshape(*grid, 3).numpy() * 255).round().astype(np.uint8)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalized [3, H, W] tensor -> [H, W, 3] uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def pca_figure(backbone: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """Rows of (image | PCA of its patch features upsampled to the image size), stacked: [rows*H, 2W, 3] uint8."""
    was_training = backbone.training
    backbone.eval()
    try:
        out = backbone(images)
    finally:
        backbone.train(was_training)
    patch = backbone.patch_size
    h, w = images.shape[-2] // patch, images.shape[-1] // patch
    rows = []
    for image, features in zip(images, out["x_norm_patchtokens"]):
        pixels = denormalize(image[:, : h * patch, : w * patch])
        feature_map = pca_rgb(features, (h, w)).repeat(patch, axis=0).repeat(patch, axis=1)
        rows.append(np.concatenate([pixels, feature_map], axis=1))
    return np.concatenate(rows, axis=0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def knn_predict(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
    k: int = 20, temperature: float = 0.07, n_classes: int | None = None,
) -> torch.Tensor:
    """Cosine k-NN with temperature-weighted voting (as in DINO's evaluation): class scores [N_test, n_classes]."""
    n_classes = n_classes or int(train_labels.max()) + 1
    train_features = torch.nn.functional.normalize(train_features.float(), dim=-1)
    test_features = torch.nn.functional.normalize(test_features.float(), dim=-1)
    similarity = test_features @ train_features.T
    k = min(k, train_features.shape[0])
    top_sim, top_idx = similarity.topk(k, dim=1)
    votes = torch.zeros(test_features.shape[0], n_classes)
    votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
    return votes


@torch.no_grad()
def class_token_features(backbone: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    was_training = backbone.training
    backbone.eval()
    try:
        return torch.cat([backbone(chunk)["x_norm_clstoken"] for chunk in images.split(batch_size)])
    finally:
        backbone.train(was_training)


def knn_accuracy(backbone: torch.nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 k-NN accuracy of the class token (images already normalized tensors)."""
    train_features = class_token_features(backbone, train_images)
    test_features = class_token_features(backbone, test_images)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = knn_predict(train_features, train_labels, test_features, k, temperature, n_classes)
    return (votes.argmax(dim=1) == test_labels).float().mean().item()


def load_eval_images(dataset, indices, size: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of `dataset` (PIL, label) resized (shorter side) and center-cropped to size x size, normalized.

    Unusable images are skipped (logged by the dataset); `limit` stops after that many usable ones.
    """
    import torchvision.transforms.v2.functional as TF

    from data.augment import pil_to_uint8_chw
    from data.datasets import UNREADABLE_IMAGE_ERRORS

    images, labels = [], []
    for index in indices:
        if limit is not None and len(images) == limit:
            break
        try:
            image, label = dataset[index]
        except UNREADABLE_IMAGE_ERRORS:
            continue
        pixels = TF.center_crop(TF.resize(pil_to_uint8_chw(image), size, antialias=True), [size, size])
        images.append(TF.normalize(pixels.float() / 255, list(IMAGENET_MEAN), list(IMAGENET_STD)))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
