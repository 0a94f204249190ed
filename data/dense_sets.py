"""Data for dense evaluation: generated scenes and videos with per-pixel masks, and the usual folder formats.

    GeneratedScenes(n, size, seed)    2-4 objects over a textured background. Mask: a class per pixel, 0 for the
                                      background and 1 + f for an object of pattern family f (the 10 families of
                                      data/datasets.py: SCENE_CLASSES), 255 (ignore) on each object's antialiased
                                      rim. Every object gets random colors, so only the pattern tells the class.
    SegmentationFolder(root, split)   root/<split>/images/<name>.<ext> with root/<split>/masks/<name>.png holding
                                      class indices (255 = ignore), as Pascal VOC and ADE20k are distributed
    GeneratedVideos(n, n_frames, ...) 2-3 textured shapes that move across a textured background, rotate, change
                                      size and pass in front of each other. Mask: object id per pixel (0 background)
    DavisFolder(root, resolution)     the DAVIS-2017 layout: JPEGImages/480p/<video>/*.jpg with
                                      Annotations/480p/<video>/*.png (object ids); the first frame must be annotated

Everything generated is deterministic per (seed, index). Masks are single-channel PNGs (palette or 8-bit
grayscale) of indices. Bad folders raise at construction, before any image is decoded: a missing folder, images
without masks, masks that are not index PNGs, masks of another size than their image, no videos. A file that
cannot be decoded is skipped and counted (`segmentation_arrays`, `Video.n_skipped`), as the training datasets do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from data.augment import pil_to_uint8_chw
from data.datasets import (
    PATTERN_FAMILIES,
    UNREADABLE_IMAGE_ERRORS,
    is_image_file,
    open_image,
    pattern_mask,
    separated_colors,
    soft_inside,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255  # the "void" label of Pascal VOC and ADE20k masks: not scored, not trained on
SCENE_CLASSES = ("background", *PATTERN_FAMILIES)
# Families that fill the whole plane: as objects they are drawn inside a soft ellipse.
TEXTURE_FAMILIES = ("stripes", "checkerboard", "rings", "dot_lattice")
# Closed shapes: the moving objects of the generated videos (filled with a texture so they have an inside).
SHAPE_FAMILIES = ("disk", "square", "triangle", "cross", "annulus")
MASK_MODES = ("P", "L")  # palette or 8-bit grayscale PNGs: their values are the indices


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def _image_coordinates(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel centers of a size x size image, spanning [-1, 1]."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(coords, coords, indexing="ij")


def _object_coordinates(x: np.ndarray, y: np.ndarray, center, angle: float, scale: float):
    """Image coordinates -> an object's rotated and scaled frame, in which the pattern families are drawn."""
    dx, dy = x - np.float32(center[0]), y - np.float32(center[1])
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return (cos * dx + sin * dy) / np.float32(scale), (-sin * dx + cos * dy) / np.float32(scale)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """[size, size] float32 in [0, 1]: a random (cells + 1)^2 grid interpolated bilinearly, blotches ~size/cells."""
    grid = rng.uniform(0.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR))


def textured_background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[H, W, 3] float32: two random colors blended by smooth noise, plus a brightness gradient. Not one of the
    pattern families, so no object class looks like the background."""
    first, second = separated_colors(rng, min_distance=0.3)
    blend = smooth_noise(rng, x.shape[0], int(rng.integers(2, 7)))[..., None]
    direction = rng.uniform(0.0, 2 * np.pi)
    gradient = np.float32(0.15) * (np.cos(direction) * x + np.sin(direction) * y)[..., None]
    return first * (1 - blend) + second * blend + gradient


def _scene_object(family: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(coverage [H, W] in [0, 1], colors [H, W, 3]) of one object of `family` at a random place, angle and size."""
    size = x.shape[0]
    scale = rng.uniform(0.55, 0.95)
    u, v = _object_coordinates(x, y, rng.uniform(-0.65, 0.65, size=2), rng.uniform(0.0, 2 * np.pi), scale)
    edge = 3.0 / size / scale  # a 1.5-pixel antialiased edge, in the object's frame
    pattern = pattern_mask(family, u, v, rng, edge)
    first, second = separated_colors(rng)
    if family in TEXTURE_FAMILIES:
        radii = rng.uniform(0.6, 0.95, size=2)
        coverage = soft_inside(np.hypot(u / radii[0], v / radii[1]) - 1.0, edge / radii.min())
        return coverage, first * (1 - pattern[..., None]) + second * pattern[..., None]
    return pattern, np.broadcast_to(second, (*pattern.shape, 3))


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def generated_scene(index: int, size: int = 128, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """Scene `index`: (RGB image, mask [size, size] uint8 of SCENE_CLASSES indices, IGNORE_INDEX on object rims).

    Objects are drawn in order, so later ones hide earlier ones; the mask says what is visible.
    """
    rng = np.random.default_rng([seed, index])
    y, x = _image_coordinates(size)
    pixels = textured_background(rng, x, y)
    mask = np.zeros((size, size), dtype=np.uint8)
    for family_index in rng.integers(0, len(PATTERN_FAMILIES), size=int(rng.integers(3, 6))):
        coverage, colors = _scene_object(PATTERN_FAMILIES[family_index], x, y, rng)
        pixels = pixels * (1 - coverage[..., None]) + colors * coverage[..., None]
        mask[coverage >= 0.75] = 1 + family_index
        mask[(coverage > 0.25) & (coverage < 0.75)] = IGNORE_INDEX
    pixels += 0.03 * rng.standard_normal(pixels.shape, dtype=np.float32)
    return _to_image(pixels), mask


@dataclass(frozen=True)
class _MovingObject:
    shape: str
    shape_seed: int  # pattern_mask draws the shape's proportions from a generator: the same one every frame
    fill: str
    fill_seed: int
    colors: tuple[np.ndarray, np.ndarray]
    start: np.ndarray
    end: np.ndarray
    angle: float
    spin: float  # radians over the whole video
    scales: tuple[float, float]  # at the first and the last frame


def _moving_object(rng: np.random.Generator) -> _MovingObject:
    # Paths run from one side of the frame through the middle to the other: objects meet and occlude each other.
    heading = rng.uniform(0.0, 2 * np.pi)
    start = rng.uniform(0.35, 0.6) * np.array([np.cos(heading), np.sin(heading)])
    turn = heading + np.pi + rng.uniform(-0.6, 0.6)
    end = rng.uniform(0.35, 0.6) * np.array([np.cos(turn), np.sin(turn)])
    scale = rng.uniform(0.6, 0.9)
    return _MovingObject(
        shape=str(rng.choice(SHAPE_FAMILIES)), shape_seed=int(rng.integers(2**31)),
        fill=str(rng.choice(("stripes", "checkerboard"))), fill_seed=int(rng.integers(2**31)),
        colors=separated_colors(rng), start=start, end=end, angle=rng.uniform(0.0, 2 * np.pi),
        spin=rng.uniform(-1.5, 1.5), scales=(scale, scale * rng.uniform(0.8, 1.25)),
    )


def generated_video(
    index: int, n_frames: int = 12, size: int = 160, seed: int = 0
) -> tuple[list[Image.Image], list[np.ndarray]]:
    """Video `index`: frames and masks (object id per pixel, 0 background, ids in drawing order)."""
    rng = np.random.default_rng([seed, index, 1])  # the trailing 1: not the stream of scene `index`
    y, x = _image_coordinates(size)
    background = textured_background(rng, x, y)
    objects = [_moving_object(rng) for _ in range(int(rng.integers(2, 4)))]
    frames, masks = [], []
    for t in range(n_frames):
        progress = t / max(n_frames - 1, 1)
        pixels = background.copy()
        mask = np.zeros((size, size), dtype=np.uint8)
        for object_id, obj in enumerate(objects, start=1):
            scale = obj.scales[0] + (obj.scales[1] - obj.scales[0]) * progress
            center = obj.start + (obj.end - obj.start) * progress
            u, v = _object_coordinates(x, y, center, obj.angle + obj.spin * progress, scale)
            edge = 3.0 / size / scale
            coverage = pattern_mask(obj.shape, u, v, np.random.default_rng(obj.shape_seed), edge)
            fill = pattern_mask(obj.fill, u, v, np.random.default_rng(obj.fill_seed), edge)[..., None]
            colors = obj.colors[0] * (1 - fill) + obj.colors[1] * fill
            pixels = pixels * (1 - coverage[..., None]) + colors * coverage[..., None]
            mask[coverage > 0.5] = object_id
        pixels += 0.02 * rng.standard_normal(pixels.shape, dtype=np.float32)
        frames.append(_to_image(pixels))
        masks.append(mask)
    return frames, masks


# ---------------------------------------------------------------------------------------------------------------
# Segmentation datasets: item -> (RGB image, mask [H, W] uint8)


class GeneratedScenes:
    """Generated scenes `first` .. `first + n - 1` (`generated_scene`), `size` x `size`, classes SCENE_CLASSES."""

    n_classes = len(SCENE_CLASSES)

    def __init__(self, n: int, size: int = 128, seed: int = 0, first: int = 0) -> None:
        if n < 1 or size < 1 or first < 0:
            raise ValueError(f"GeneratedScenes needs n >= 1, size >= 1 and first >= 0, got {n}, {size}, {first}")
        self.n, self.size, self.seed, self.first = n, size, seed, first
        self.source = f"generated scenes {first}-{first + n - 1} (seed {seed}, {size} px)"

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} generated scenes")
        return generated_scene(self.first + index, self.size, self.seed)

    def describe(self, index: int) -> str:
        return f"generated scene {self.first + index} (seed {self.seed})"


def open_mask(path: str | Path) -> np.ndarray:
    """A PNG of indices -> [H, W] uint8. Raises one of UNREADABLE_IMAGE_ERRORS when it cannot be decoded."""
    with Image.open(path) as mask:
        if mask.mode not in MASK_MODES:
            raise ValueError(f"mask {path} has PIL mode {mask.mode}, not a palette or 8-bit grayscale PNG of indices")
        return np.array(mask, dtype=np.uint8)


def save_mask(mask: np.ndarray, path: str | Path) -> Path:
    """Write indices [H, W] uint8 as a palette PNG (the format Pascal VOC and DAVIS masks come in)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    # Colors to look at, not to read: the values are the indices. Index i -> a gray level stepped by 37 (mod 256).
    image.putpalette([(37 * i) % 256 for i in range(256) for _ in range(3)])
    image.save(path)
    return path


def _header(path: Path) -> tuple[tuple[int, int], str] | None:
    """(size, mode) read from the file header without decoding; None when the header is unreadable (such files
    are skipped and counted when they are loaded)."""
    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except UNREADABLE_IMAGE_ERRORS:
        return None


def check_mask_headers(pairs: list[tuple[Path, Path]], fix: str) -> None:
    """Raise, naming the files and `fix`, when masks are not index PNGs or differ in size from their images."""
    wrong_mode, wrong_size = [], []
    for image_path, mask_path in pairs:
        image, mask = _header(image_path), _header(mask_path)
        if image is None or mask is None:
            continue
        if mask[1] not in MASK_MODES:
            wrong_mode.append(f"{mask_path} (mode {mask[1]})")
        elif mask[0] != image[0]:
            wrong_size.append(f"{mask_path} is {mask[0][0]}x{mask[0][1]}, {image_path.name} is "
                              f"{image[0][0]}x{image[0][1]}")
    if wrong_mode:
        raise ValueError(
            f"{len(wrong_mode)} mask(s) are not single-channel PNGs of indices: {'; '.join(wrong_mode[:3])}. Save "
            f"masks as palette ('P') or 8-bit grayscale ('L') PNGs whose values are the indices; {fix}")
    if wrong_size:
        raise ValueError(
            f"{len(wrong_size)} mask(s) do not have the size of their image: {'; '.join(wrong_size[:3])}. Each "
            f"mask must have exactly its image's width and height; {fix}")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


class SegmentationFolder:
    """root/<split>/images/* paired by file stem with root/<split>/masks/<stem>.png (see the module docstring)."""

    def __init__(self, root: str | Path, split: str) -> None:
        root = Path(root).expanduser()
        layout = (f"expected {root}/{split}/images/<name>.jpg|png with {root}/{split}/masks/<name>.png "
                  "(class indices, 255 = ignore)")
        if not root.is_dir():
            raise FileNotFoundError(f"segmentation data folder {root} does not exist or is not a folder: {layout}, "
                                    "or use --data generated")
        images_dir, masks_dir = root / split / "images", root / split / "masks"
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} does not exist: {layout}")
        images = _images_in(images_dir)
        if not images:
            raise ValueError(f"{images_dir} holds no images: {layout}")
        masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")}
        unpaired = [p.name for p in images if p.stem not in masks]
        if unpaired:
            raise FileNotFoundError(
                f"{len(unpaired)} of {len(images)} images in {images_dir} have no mask in {masks_dir} (e.g. "
                f"{', '.join(unpaired[:3])}): give every image <name>.<ext> a mask <name>.png, or move it out")
        self.samples = [(p, masks[p.stem]) for p in images]
        check_mask_headers(self.samples, f"fix or remove them in {masks_dir}")
        self.source = f"{root / split}"

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = self.samples[index]
        image, mask = open_image(image_path), open_mask(mask_path)
        if mask.shape != (image.height, image.width):  # a header that lied about the size
            raise ValueError(f"mask {mask_path} decodes to {mask.shape[1]}x{mask.shape[0]}, its image to "
                             f"{image.width}x{image.height}")
        return image, mask

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])


def resize_pair(image: Image.Image, mask: np.ndarray | None,
                size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 [3, H, W], uint8 [H, W] or None) with the shorter side resized to `size` (None: as they are): the
    image bicubic with antialiasing, the mask nearest-neighbor (indices must not be blended)."""
    pixels = pil_to_uint8_chw(image)
    labels = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask))[None]
    if size is not None and min(pixels.shape[-2:]) != size:
        pixels = TF.resize(pixels, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if labels is not None:
            labels = TF.resize(labels, list(pixels.shape[-2:]), interpolation=TF.InterpolationMode.NEAREST_EXACT)
    return pixels.contiguous(), None if labels is None else labels[0]


def segmentation_arrays(dataset, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images uint8 [N, 3, size, size], masks uint8 [N, size, size], number of items skipped) of a segmentation
    dataset: shorter side resized to `size`, center crop size x size; unreadable items are skipped and counted."""
    images, masks, skipped = [], [], 0
    for index in range(len(dataset)):
        try:
            image, mask = dataset.load(index)
        except UNREADABLE_IMAGE_ERRORS as err:
            logger.warning(f"skipping unreadable {dataset.describe(index)}: {type(err).__name__}: {err}")
            skipped += 1
            continue
        pixels, labels = resize_pair(image, mask, size)
        images.append(TF.center_crop(pixels, [size, size]))
        masks.append(TF.center_crop(labels[None], [size, size])[0])
    if not images:
        raise ValueError(f"none of the {len(dataset)} items of {dataset.source} could be read "
                         "(see the warnings above)")
    if skipped:
        logger.warning(f"{skipped} of {len(dataset)} items could not be read and are left out")
    return torch.stack(images), torch.stack(masks), skipped


# ---------------------------------------------------------------------------------------------------------------
# Videos


@dataclass
class Video:
    name: str
    frames: list[Image.Image]
    masks: list[np.ndarray | None]  # object ids; None for a frame without annotation (not scored)
    n_skipped: int = 0  # unreadable frames left out


class GeneratedVideos:
    """`n` generated videos (`generated_video`) of `n_frames` frames, `size` x `size`."""

    def __init__(self, n: int, n_frames: int = 12, size: int = 160, seed: int = 0) -> None:
        if n < 1 or n_frames < 2 or size < 1:
            raise ValueError(f"GeneratedVideos needs n >= 1, n_frames >= 2 and size >= 1, got {n}, {n_frames}, {size}")
        self.n, self.n_frames, self.size, self.seed = n, n_frames, size, seed
        self.names = [f"generated_{i:03d}" for i in range(n)]
        self.source = f"{n} generated videos (seed {seed}, {n_frames} frames of {size} px)"

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> Video:
        frames, masks = generated_video(index, self.n_frames, self.size, self.seed)
        return Video(self.names[index], frames, list(masks))


class DavisFolder:
    """DAVIS-2017 style videos: root/JPEGImages/<resolution>/<video>/<frame>.jpg with object-id masks in
    root/Annotations/<resolution>/<video>/<frame>.png; `videos` restricts to those names (default: every video
    with a folder in both). Frames without a mask are propagated through but not scored."""

    def __init__(self, root: str | Path, resolution: str = "480p", videos: tuple[str, ...] = ()) -> None:
        root = Path(root).expanduser()
        self.frames_root = root / "JPEGImages" / resolution
        self.masks_root = root / "Annotations" / resolution
        layout = (f"expected {self.frames_root}/<video>/<frame>.jpg and {self.masks_root}/<video>/<frame>.png "
                  "(the DAVIS-2017 layout)")
        if not root.is_dir():
            raise FileNotFoundError(f"video folder {root} does not exist: {layout}, or use --data generated")
        for folder in (self.frames_root, self.masks_root):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} does not exist: {layout}")
        names = sorted(p.name for p in self.frames_root.iterdir() if p.is_dir() and (self.masks_root / p.name).is_dir())
        if videos:
            unknown = sorted(set(videos) - set(names))
            if unknown:
                raise FileNotFoundError(f"video(s) {unknown[:5]} not found with frames and annotations: {layout}")
            names = [name for name in names if name in videos]
        self.frame_paths = {name: _images_in(self.frames_root / name) for name in names}
        self.names = [name for name in names if self.frame_paths[name]]
        if not self.names:
            raise FileNotFoundError(f"no videos found in {root}: {layout}")
        unannotated = [name for name in self.names if not self._mask_path(name, self.frame_paths[name][0]).is_file()]
        if unannotated:
            raise FileNotFoundError(
                f"{len(unannotated)} video(s) have no annotation of their first frame (e.g. {unannotated[0]}: "
                f"{self._mask_path(unannotated[0], self.frame_paths[unannotated[0]][0])}); the first frame's mask is "
                "what is propagated: add it, or leave the video out with --videos")
        first_pairs = [(self.frame_paths[n][0], self._mask_path(n, self.frame_paths[n][0])) for n in self.names]
        check_mask_headers(first_pairs, f"fix them in {self.masks_root}")
        self.source = str(root)

    def _mask_path(self, name: str, frame: Path) -> Path:
        return self.masks_root / name / f"{frame.stem}.png"

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> Video:
        """The readable frames of video `index` with their masks; raises one of UNREADABLE_IMAGE_ERRORS when the
        first frame or its mask cannot be read (nothing to propagate from)."""
        name = self.names[index]
        frames, masks, skipped = [], [], 0
        for position, path in enumerate(self.frame_paths[name]):
            mask_path = self._mask_path(name, path)
            try:
                frame = open_image(path)
                mask = open_mask(mask_path) if mask_path.is_file() else None
                if mask is not None and mask.shape != (frame.height, frame.width):
                    raise ValueError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, its frame "
                                     f"{frame.width}x{frame.height}")
            except UNREADABLE_IMAGE_ERRORS as err:
                if position == 0:
                    raise
                logger.warning(f"skipping unreadable frame {path}: {type(err).__name__}: {err}")
                skipped += 1
                continue
            frames.append(frame)
            masks.append(mask)
        return Video(name, frames, masks, skipped)

    def describe(self, index: int) -> str:
        return str(self.frames_root / self.names[index])
