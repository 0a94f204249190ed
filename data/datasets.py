"""Image datasets, the multi-crop training dataset and the loader builder.

Image datasets return `(PIL RGB image, label)` (label -1 when there is none) and share one more method,
`load(index, min_side)`, which lets large JPEGs be decoded reduced (PIL `draft`, a DCT-domain 1/2, 1/4 or 1/8
scale) as long as the shorter side stays >= min_side:

    ImageFolderDataset(root)     every image under root (recursive; .jpg .jpeg .png .bmp .webp .tif .tiff, any
                                 case), sorted; labels from first-level class sub-folders when all images sit in one
    FileListDataset(list_file)   one path per line, optionally followed by an integer label; relative paths are
                                 relative to the list file; blank lines and lines starting with # are ignored; a
                                 path '<shard>.tar#<key>' is the image of sample <key> of a tar shard
    SampleImagesDataset()        the real photos bundled inside scikit-image and scikit-learn (nothing downloaded):
                                 the default dataset, so a run needs no data at all
    ProceduralDataset(n, ...)    generated images of 10 visually distinct pattern families (class = family), random
                                 colors, positions, scales and orientations; deterministic per index; for tests
    concept_image(i, concept)    one of 50 concepts (a family in one of 5 palettes), for curate.py's generated pool

A missing path or an empty dataset raises at construction, naming the path and the fix.

`MultiCropDataset(images, augmentation, seed, sizes, global_batch_size)` is what the DataLoader indexes with the
`(index, position)` pairs of `InfiniteSampler` (data/sampler.py): it derives the sample's generator from
(seed, position) and the step's crop sizes from position // global_batch_size, so crops are reproducible and
independent of workers. An image that cannot be used (unreadable, truncated, not an image, smaller than a patch,
a decompression bomb) is logged once per process, counted in the sample's `n_skipped`, and replaced by another
index drawn from the same generator, so the replacement is deterministic too. `build_loader` wires dataset,
augmentation, sampler and `MaskingCollate` (data/masking.py) together:

    images = build_dataset(path)                     # None -> the bundled sample photos, "procedural" -> generated
    loader = build_loader(images, AugmentConfig(), CropSizes(256, 112), batch_size=64, seed=seed, rank=rank,
                          world_size=world_size, start_step=step, num_workers=8)
    for batch in loader:                             # batch keys: see data/masking.py
        ...
"""

from __future__ import annotations

import abc
import importlib.util
import io
import logging
import math
import re
import signal
import struct
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from data.augment import AugmentConfig, CropSizes, CropSizeSchedule, MultiCropAugmentation, sample_rng
from data.masking import MaskingCollate
from data.sampler import InfiniteSampler

if TYPE_CHECKING:
    from data.shards import ShardImages

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# A list line '<shard>.tar#<key>' names sample <key> of a tar shard (curate.py writes such lists for shard pools).
SHARD_SAMPLE = re.compile(r"\.tar(?:\.(?:gz|bz2|xz))?#")


class UnusableImageError(ValueError):
    """An image that decodes but cannot be trained on (e.g. smaller than a patch)."""


# What a broken, truncated or hostile image file can raise while PIL opens or decodes it.
UNREADABLE_IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def open_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode an image file to RGB, reduced at decode time (JPEG only) while its shorter side stays >= min_side.

    Raises one of UNREADABLE_IMAGE_ERRORS for files that cannot be decoded, including images above PIL's
    decompression-bomb limit `PIL.Image.MAX_IMAGE_PIXELS` (about 89M pixels; its warning is turned into an
    error here; raise the limit to train on larger images)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if min_side is not None and image.format == "JPEG":
                scale = min_side / min(image.size)
                if scale <= 0.5:
                    image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            return image.convert("RGB")


class ImageDataset(torch.utils.data.Dataset, abc.ABC):
    """Base of the image datasets: `load` decodes, `describe` names an item for messages."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, index: int, min_side: int | None = None) -> tuple[Image.Image, int]: ...

    def describe(self, index: int) -> str:
        return f"{type(self).__name__}[{index}]"

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index)


class PathListDataset(ImageDataset):
    """Images given as (path, label) pairs."""

    def __init__(self, samples: list[tuple[Path, int]], source: str) -> None:
        if not samples:
            raise ValueError(
                f"no images found in {source}: expected files with one of the extensions "
                f"{' '.join(IMAGE_EXTENSIONS)} (any case); point the dataset path at a folder or list that has some"
            )
        self.samples = samples
        self.source = source

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, min_side: int | None = None) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        if SHARD_SAMPLE.search(str(path)):
            from data.shards import read_sample  # it builds on this module

            return open_image(io.BytesIO(read_sample(str(path))[0]), min_side), label
        return open_image(path, min_side), label

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


class ImageFolderDataset(PathListDataset):
    """All images under `root`, recursively, in sorted order; class labels from first-level sub-folders
    (sorted names -> 0, 1, ...) when every image lies inside one, else -1."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"dataset folder {str(root)!r} does not exist or is not a folder: pass an existing image folder, "
                f"a .txt file list, or no path to train on the bundled sample images"
            )
        paths = sorted(p for p in root.rglob("*") if is_image_file(p))
        top_folders = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in paths]
        if paths and all(top_folders):
            self.classes = sorted(set(top_folders))
            class_of = {name: i for i, name in enumerate(self.classes)}
            samples = [(p, class_of[folder]) for p, folder in zip(paths, top_folders)]
        else:
            self.classes = []
            samples = [(p, -1) for p in paths]
        super().__init__(samples, f"folder {str(root)!r}")


class FileListDataset(PathListDataset):
    """Images listed in a text file: `path [label]` per line (see the module docstring)."""

    def __init__(self, list_file: str | Path) -> None:
        list_file = Path(list_file)
        if not list_file.is_file():
            raise FileNotFoundError(
                f"image list {str(list_file)!r} does not exist: pass an existing .txt file with one image path "
                f"per line, an image folder, or no path to train on the bundled sample images"
            )
        samples = []
        for line in list_file.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, label = line, -1
            parts = line.rsplit(maxsplit=1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                path, label = parts[0], int(parts[1])
            path = Path(path)
            samples.append((path if path.is_absolute() else list_file.parent / path, label))
        super().__init__(samples, f"image list {str(list_file)!r}")


# The photographs among scikit-image's bundled data; synthetic images, drawings, scans, artificially blurred and
# tiny images are left out.
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
    "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png",
    "retina.jpg", "rocket.jpg",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_photo_paths() -> list[Path]:
    """The real photos shipped inside the installed scikit-image and scikit-learn packages."""
    candidates = []
    skimage_dir = _package_dir("skimage")
    if skimage_dir is not None:
        candidates += [skimage_dir / "data" / name for name in SKIMAGE_PHOTOS]
    sklearn_dir = _package_dir("sklearn")
    if sklearn_dir is not None:
        candidates += [sklearn_dir / "datasets" / "images" / name for name in SKLEARN_PHOTOS]
    return [p for p in candidates if p.is_file()]


class SampleImagesDataset(PathListDataset):
    """The bundled photos of scikit-image and scikit-learn (grayscale ones converted to RGB); labels are -1."""

    def __init__(self) -> None:
        paths = bundled_photo_paths()
        if not paths:
            raise FileNotFoundError(
                "no bundled sample photos found: install scikit-image and/or scikit-learn "
                "(pip install scikit-image scikit-learn), or pass a dataset path"
            )
        super().__init__([(p, -1) for p in paths], "the scikit-image / scikit-learn sample photos")


# ---------------------------------------------------------------------------------------------------------------
# Procedural images: a pattern family per class, drawn as a soft mask between two random colors.

PATTERN_FAMILIES = (
    "stripes", "checkerboard", "rings", "dot_lattice", "disk", "square", "triangle", "cross", "annulus", "spots",
)


def soft_inside(signed_distance: np.ndarray, edge: float) -> np.ndarray:
    """Antialiased inside-mask from a signed distance (negative inside)."""
    return np.clip(0.5 - signed_distance / edge, 0.0, 1.0)


def pattern_mask(family: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator, edge: float) -> np.ndarray:
    """Foreground coverage in [0, 1] of one pattern on rotated, centered coordinates u, v (image spans [-1, 1])."""
    radius = np.hypot(u, v)
    frequency = rng.uniform(2.5, 5.0)
    size = rng.uniform(0.35, 0.65)
    if family == "stripes":
        return np.clip(0.5 + 3.0 * np.sin(np.pi * frequency * u), 0.0, 1.0)
    if family == "checkerboard":
        return np.clip(0.5 + 3.0 * np.sin(np.pi * frequency * u) * np.sin(np.pi * frequency * v), 0.0, 1.0)
    if family == "rings":
        return np.clip(0.5 + 3.0 * np.sin(np.pi * frequency * radius), 0.0, 1.0)
    if family == "dot_lattice":
        return np.clip(0.5 + 4.0 * (np.cos(np.pi * frequency * u) * np.cos(np.pi * frequency * v) - 0.5), 0.0, 1.0)
    if family == "disk":
        return soft_inside(radius - size, edge)
    if family == "square":
        return soft_inside(np.maximum(np.abs(u), np.abs(v)) - 0.8 * size, edge)
    if family == "triangle":
        edges = [np.cos(a) * u + np.sin(a) * v for a in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6)]
        return soft_inside(np.maximum.reduce(edges) - 0.5 * size, edge)
    if family == "cross":
        arm, half_width = size, 0.3 * size
        bar_u = np.maximum(np.abs(u) - arm, np.abs(v) - half_width)
        bar_v = np.maximum(np.abs(v) - arm, np.abs(u) - half_width)
        return soft_inside(np.minimum(bar_u, bar_v), edge)
    if family == "annulus":
        return soft_inside(np.abs(radius - size) - 0.25 * size, edge)
    # spots: small disks scattered at random
    distance = np.full(u.shape, np.inf)
    for _ in range(int(rng.integers(5, 11))):
        cu, cv = rng.uniform(-0.9, 0.9, size=2)
        distance = np.minimum(distance, np.hypot(u - cu, v - cv) - rng.uniform(0.08, 0.18))
    return soft_inside(distance, edge)


def separated_colors(rng: np.random.Generator, min_distance: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colors in [0, 1] (float32) at least `min_distance` apart, so a pattern drawn in one over the
    other is visible whatever the colors."""
    first = rng.uniform(0.0, 1.0, size=3)
    second = rng.uniform(0.0, 1.0, size=3)
    while np.linalg.norm(second - first) < min_distance:
        second = rng.uniform(0.0, 1.0, size=3)
    return first.astype(np.float32), second.astype(np.float32)


def draw_pattern(rng: np.random.Generator, family: str, size: int,
                 colors: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]) -> Image.Image:
    """A `size` x `size` image of one pattern family at a random pose, in the (background, foreground) colors that
    `colors(rng)` draws, over a faint gradient and noise."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    angle = np.float32(rng.uniform(0.0, 2 * np.pi))
    center = rng.uniform(-0.3, 0.3, size=2).astype(np.float32)
    u = np.cos(angle) * (x - center[0]) + np.sin(angle) * (y - center[1])
    v = -np.sin(angle) * (x - center[0]) + np.cos(angle) * (y - center[1])
    coverage = pattern_mask(family, u, v, rng, edge=3.0 / size)[..., None]
    background, foreground = colors(rng)
    gradient_direction = np.float32(rng.uniform(0.0, 2 * np.pi))
    gradient = np.float32(0.15) * (np.cos(gradient_direction) * x + np.sin(gradient_direction) * y)[..., None]
    pixels = (background + gradient) * (1.0 - coverage) + foreground * coverage
    pixels += 0.03 * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def procedural_image(index: int, size: int, n_classes: int, seed: int) -> tuple[Image.Image, int]:
    """Image `index` of the procedural dataset and its label (index % n_classes): deterministic."""
    rng = np.random.default_rng([seed, index])
    label = index % n_classes
    # Random, well separated colors: the class is in the shape, not in the mean color.
    return draw_pattern(rng, PATTERN_FAMILIES[label], size, separated_colors), label


# (background, foreground) RGB of the concept palettes: a concept is a pattern family in one palette, so there are
# len(PATTERN_FAMILIES) x len(CONCEPT_PALETTES) = 50 concepts, told apart by shape and color.
CONCEPT_PALETTES = (
    ((0.10, 0.15, 0.45), (0.95, 0.85, 0.20)),
    ((0.95, 0.95, 0.90), (0.80, 0.10, 0.10)),
    ((0.15, 0.45, 0.15), (0.90, 0.30, 0.85)),
    ((0.05, 0.05, 0.05), (0.20, 0.90, 0.90)),
    ((0.95, 0.55, 0.10), (0.35, 0.10, 0.50)),
)
N_CONCEPTS = len(PATTERN_FAMILIES) * len(CONCEPT_PALETTES)


def concept_image(index: int, concept: int, size: int, seed: int) -> Image.Image:
    """Image `index` of concept `concept` (family concept % 10 in palette concept // 10, colors jittered by
    +-0.08): deterministic."""
    if not 0 <= concept < N_CONCEPTS:
        raise ValueError(f"concept must be in [0, {N_CONCEPTS}), got {concept}")
    rng = np.random.default_rng([seed, index])
    palette = CONCEPT_PALETTES[concept // len(PATTERN_FAMILIES)]
    background, foreground = (np.asarray(c, dtype=np.float32) for c in palette)

    def jittered(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        jitter = rng.uniform(-0.08, 0.08, size=(2, 3)).astype(np.float32)
        return background + jitter[0], foreground + jitter[1]

    return draw_pattern(rng, PATTERN_FAMILIES[concept % len(PATTERN_FAMILIES)], size, jittered)


def zipf_counts(n: int, n_classes: int, exponent: float) -> np.ndarray:
    """Images per class for a pool of `n` with class k's frequency proportional to 1 / (k + 1)**exponent (largest
    first); every class gets at least one."""
    weights = 1.0 / np.arange(1, n_classes + 1, dtype=np.float64) ** exponent
    counts = np.maximum(np.floor(weights / weights.sum() * n), 1).astype(np.int64)
    counts[0] += n - counts.sum()
    return counts


class ProceduralDataset(ImageDataset):
    """`n` generated `size` x `size` images in `n_classes` (<= 10) pattern families; see `procedural_image`."""

    def __init__(self, n: int = 1000, size: int = 128, n_classes: int = 10, seed: int = 0) -> None:
        if not 1 <= n_classes <= len(PATTERN_FAMILIES):
            raise ValueError(
                f"n_classes must be in [1, {len(PATTERN_FAMILIES)}] (one pattern family each), got {n_classes}"
            )
        if n <= 0 or size <= 0:
            raise ValueError(f"ProceduralDataset needs n > 0 and size > 0, got n={n}, size={size}")
        self.n, self.size, self.n_classes, self.seed = n, size, n_classes, seed

    def __len__(self) -> int:
        return self.n

    def load(self, index: int, min_side: int | None = None) -> tuple[Image.Image, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for ProceduralDataset of {self.n} images")
        return procedural_image(index, self.size, self.n_classes, self.seed)


# `--data.path procedural`: unlabeled generated images for pretraining. Their seed differs from the labeled
# evaluation set's (eval.py, seed 0), so no evaluation image is ever trained on; they are made on demand, so the
# count costs nothing.
PROCEDURAL_PRETRAIN_SEED = 1
PROCEDURAL_PRETRAIN_IMAGES = 100_000
PROCEDURAL_PRETRAIN_SIZE = 128


def build_dataset(path: str | Path | None) -> ImageDataset | ShardImages:
    """None -> the bundled sample photos; "procedural" -> unlabeled generated images; a folder ->
    ImageFolderDataset; a .txt file -> FileListDataset; tar shards ('shards/{000000..000999}.tar') ->
    data.shards.ShardImages, a stream for data.shards.build_shard_loader."""
    if path is None:
        return SampleImagesDataset()
    if path == "procedural":
        return ProceduralDataset(PROCEDURAL_PRETRAIN_IMAGES, PROCEDURAL_PRETRAIN_SIZE, seed=PROCEDURAL_PRETRAIN_SEED)
    from data.shards import ShardImages, is_shard_pattern  # it builds on this module

    if is_shard_pattern(str(path)):
        return ShardImages(str(path))
    path = Path(path)
    if path.is_dir():
        return ImageFolderDataset(path)
    if path.suffix.lower() == ".txt":
        return FileListDataset(path)
    if not path.exists():
        raise FileNotFoundError(
            f"dataset path {str(path)!r} does not exist: pass an image folder, a .txt file list, "
            f"or no path to train on the bundled sample images"
        )
    raise ValueError(f"dataset path {str(path)!r} is neither a folder nor a .txt file list of images")


# ---------------------------------------------------------------------------------------------------------------
# The training dataset: sampler position -> augmented sample.

_reported_unusable: set[str] = set()


def _report_unusable(name: str, error: BaseException) -> None:
    """Log each unusable image once per process (each DataLoader worker keeps its own record)."""
    if name not in _reported_unusable:
        _reported_unusable.add(name)
        logger.warning("skipping unusable image %s: %s: %s", name, type(error).__name__, error)


class MultiCropDataset(torch.utils.data.Dataset):
    """dataset[(index, position)] -> {"global_crops", "local_crops"[, "gram_teacher_crops"], "label", "index",
    "position", "n_skipped"}, reproducible from (seed, position); see the module docstring."""

    def __init__(
        self,
        images: ImageDataset,
        augmentation: MultiCropAugmentation,
        seed: int = 0,
        sizes: CropSizes | CropSizeSchedule = CropSizes(),
        global_batch_size: int = 1,
        max_consecutive_skips: int = 100,
    ) -> None:
        if isinstance(sizes, CropSizes):
            sizes = CropSizeSchedule((sizes,), (1.0,))
        for choice in sizes.choices:
            choice.validate(augmentation.config.patch_size)
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
        self.images = images
        self.augmentation = augmentation
        self.seed = seed
        self.sizes = sizes
        self.global_batch_size = global_batch_size
        self.max_consecutive_skips = max_consecutive_skips

    def __len__(self) -> int:
        return len(self.images)

    def _load_usable(self, index: int, rng: np.random.Generator, min_side: int) -> tuple[Image.Image, int, int, int]:
        """(image, label, index actually used, number of images skipped to get it)."""
        patch_size = self.augmentation.config.patch_size
        for skipped in range(self.max_consecutive_skips + 1):
            try:
                image, label = self.images.load(index, min_side)
                if min(image.size) < patch_size:
                    raise UnusableImageError(
                        f"{image.width}x{image.height} pixels is smaller than one {patch_size}px patch"
                    )
                return image, label, index, skipped
            except UNREADABLE_IMAGE_ERRORS as error:
                _report_unusable(self.images.describe(index), error)
                index = int(rng.integers(len(self.images)))
        raise RuntimeError(
            f"{self.max_consecutive_skips + 1} images in a row could not be used (see the warnings above): "
            f"check that the dataset holds readable images"
        )

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        rng = sample_rng(self.seed, position)
        sizes = self.sizes(position // self.global_batch_size)
        image, label, index, skipped = self._load_usable(index, rng, self.augmentation.decode_min_side(sizes))
        crops = self.augmentation(image, rng, sizes)
        return {**crops, "label": label, "index": index, "position": position, "n_skipped": skipped}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT: only the main process decides when to stop.

    A scheduler that stops a job signals every process of it (SLURM, systemd, `kill -- -PGID`, Ctrl-C in a
    terminal): a worker that died of it would make the main process fail in the middle of the step (or of the
    checkpoint) it finishes before stopping. The main process shuts its workers down with the loader (the
    DataLoader's last-resort terminate() of a worker that does not stop in time then has no effect), and a worker
    whose main process is gone exits by itself (the DataLoader's watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(
    images: ImageDataset,
    augment: AugmentConfig,
    sizes: CropSizes | CropSizeSchedule,
    *,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    num_workers: int = 0,
    patch_size: int = 16,
    mask_probability: float = MaskingCollate.mask_probability,
    mask_ratio: tuple[float, float] = MaskingCollate.mask_ratio,
    pin_memory: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
) -> torch.utils.data.DataLoader:
    """An endless loader of collated batches of `batch_size` images per rank, starting at step `start_step`.

    `sizes` is fixed crop sizes or a per-step `CropSizeSchedule`. The loader's `sampler` is the
    `InfiniteSampler`; its stream position starts at start_step * batch_size * world_size, which is exactly what
    steps [0, start_step) consumed, so a resumed run needs only its step (see data/sampler.py to checkpoint the
    position itself instead).
    """
    if batch_size < 1 or start_step < 0:
        raise ValueError(f"need batch_size >= 1 and start_step >= 0, got {batch_size} and {start_step}")
    if augment.patch_size != patch_size:
        augment = replace(augment, patch_size=patch_size)
    global_batch_size = batch_size * world_size
    # Rank r takes the r-th slice of every global batch (block sharding, data/sampler.py) and masks are
    # assigned over the global batch (data/masking.py): the same step on 1 or N ranks sees the same crops.
    if sampler is None:  # otherwise a sampler of the same contract: data/mixture.py's MixtureSampler
        sampler = InfiniteSampler(
            len(images), rank, world_size, seed, start=start_step * global_batch_size, block=batch_size
        )
    dataset = MultiCropDataset(images, MultiCropAugmentation(augment), seed, sizes, global_batch_size)
    collate = MaskingCollate(
        patch_size=patch_size, mask_probability=mask_probability, mask_ratio=mask_ratio, seed=seed,
        global_batch_size=global_batch_size,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )
