"""Multi-crop augmentation for DINOv3 pretraining (paper section 3 and appendix "Implementation Details").

One image gives 2 global crops, `n_local_crops` local crops and, when asked, 2 Gram-teacher crops:

    augment = MultiCropAugmentation(AugmentConfig())
    rng = sample_rng(seed, position)                      # all randomness of one sample
    out = augment(image, rng, CropSizes(256, 112, 512))   # image: PIL RGB
    out["global_crops"]        # [2, 3, 256, 256] float32, ImageNet-normalized
    out["local_crops"]         # [8, 3, 112, 112]
    out["gram_teacher_crops"]  # [2, 3, 512, 512]; only when CropSizes.gram_teacher_size is set

The recipe is `AugmentConfig` (its defaults are the ViT-7B pretraining config's): RandomResizedCrop boxes,
horizontal flips, color jitter (the four ops in a random order), grayscale, Gaussian blur, solarize on the
second global crop only, then ImageNet normalization. The blur probabilities are the ones the official code
applies: its GaussianBlur(p) hands 1 - p to a RandomApply, so the nominal 1.0 / 0.1 / 0.5 (first global,
second global, local) of the DINOv2/v3 texts run as 0.0 / 0.9 / 0.5.

How it is fast: every crop is first drawn as explicit parameters (`CropParams`: box, flip, photometric
choices), then rendered by resampling only the box of the decoded image straight to the output size (crop
before resize, on a uint8 tensor with torch's vectorized antialiased bicubic kernel). The photometric ops then
run on that small crop in float32: brightness/contrast/saturation as blends, hue as a direct HSV rotation
(same result as torchvision's HSV round trip, a fraction of the passes), the blur as a separable
reflect-padded Gaussian of 9 taps at most (torchvision's kernel_size 9), taps beyond 4 sigma dropped.

Gram-teacher crops reuse the box, flip and photometric parameters of their global crop, resampled at
`gram_teacher_size`; the blur sigma is scaled by gram_teacher_size / global_size so both show the same
image content (`AugmentConfig.gram_teacher_photometric=False` leaves them undistorted instead).

Sizes are an argument of each call, so the high-resolution phase may change them every step:
`CropSizeSchedule(step)` gives a step's sizes from (seed, step) alone, so every rank and every DataLoader
worker agrees. Randomness comes only from the numpy Generator passed in (never from global RNG state):
the same (seed, position) gives bit-identical crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# shift_hue: the hue (in sextants) where each of r, g, b is the minimum, and the hue of each max channel's sector.
_RAMP_CENTERS = torch.tensor([3.0, 5.0, 1.0]).view(3, 1, 1)
_HUE_OFFSETS = torch.tensor([0.0, 2.0, 4.0]).view(3, 1, 1)
# Turns (a - b) <= 0 into a 0/1 step: 0 differences give 1, any representable negative difference gives 0.
_STEP_GAIN = 1e30

# Seeds of the independent random streams derived from the global seed (see `sample_rng`).
AUGMENT_STREAM = 1
SIZE_SCHEDULE_STREAM = 2


def sample_rng(seed: int, position: int, stream: int = AUGMENT_STREAM) -> np.random.Generator:
    """The generator of one sample: a pure function of (global seed, position in the infinite stream)."""
    return np.random.default_rng([seed, stream, position])


@dataclass(frozen=True)
class CropSizes:
    """Output side lengths in pixels; gram_teacher_size=None produces no Gram-teacher crops."""

    global_size: int = 256
    local_size: int = 112
    gram_teacher_size: int | None = None

    def validate(self, patch_size: int) -> None:
        """Global and Gram-teacher crops must tile into whole patches (masks and the Gram teacher's grid are per
        patch); a local crop only needs one patch: the ViT drops the remainder, as a stride-16 patch embedding
        does (the paper's 168 px local crops use 10 x 10 patches)."""
        for name in ("global_size", "local_size", "gram_teacher_size"):
            size = getattr(self, name)
            if size is None:
                continue
            if name == "local_size" and size >= patch_size:
                continue
            if size <= 0 or size % patch_size != 0:
                raise ValueError(
                    f"crop size {name}={size} is not a positive multiple of the patch size {patch_size}: "
                    f"pick a multiple of {patch_size} (e.g. {max(patch_size, size // patch_size * patch_size)})"
                )


@dataclass(frozen=True)
class CropSizeSchedule:
    """The crop sizes of each training step: always `choices[0]`, or one weighted draw per step.

    The draw depends only on (seed, step), so every rank and every worker uses the same triple for a step.
    High-resolution adaptation: `CropSizeSchedule.weighted(((CropSizes(512, 112, 768), 0.3), ...), seed)`.
    """

    choices: tuple[CropSizes, ...] = (CropSizes(),)
    probabilities: tuple[float, ...] = (1.0,)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.choices or len(self.choices) != len(self.probabilities):
            raise ValueError(
                f"CropSizeSchedule needs one probability per size choice, got {len(self.choices)} choices "
                f"and {len(self.probabilities)} probabilities"
            )
        if min(self.probabilities) < 0 or not math.isclose(sum(self.probabilities), 1.0, abs_tol=1e-6):
            raise ValueError(f"CropSizeSchedule probabilities must be >= 0 and sum to 1, got {self.probabilities}")

    @classmethod
    def weighted(cls, weighted_choices: tuple[tuple[CropSizes, float], ...], seed: int = 0) -> CropSizeSchedule:
        return cls(tuple(c for c, _ in weighted_choices), tuple(p for _, p in weighted_choices), seed)

    def __call__(self, step: int) -> CropSizes:
        if len(self.choices) == 1:
            return self.choices[0]
        rng = sample_rng(self.seed, step, stream=SIZE_SCHEDULE_STREAM)
        return self.choices[int(rng.choice(len(self.choices), p=np.asarray(self.probabilities)))]


@dataclass(frozen=True)
class AugmentConfig:
    """The recipe: probabilities (`*_p`), ranges and strengths of each augmentation. Defaults: the official ViT-7B
    pretraining config as its code runs it."""

    n_local_crops: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.0  # horizontal_flips: false in the 7B configs (0.5 in DINOv2 and the ViT-L ImageNet config)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    # As the official code applies them (see the module docstring); the nominal values are 1.0, 0.1 and 0.5.
    first_global_blur_p: float = 0.0
    second_global_blur_p: float = 0.9
    local_blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    second_global_solarize_p: float = 0.2
    photometric: bool = True  # False: crops and flips only (jitter, grayscale, blur and solarize off), an ablation
    # The Gram teacher's crops get their global crop's color/blur ops (False: gram_teacher_no_distortions).
    gram_teacher_photometric: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_size: int = 16


@dataclass(frozen=True)
class JitterParams:
    """One ColorJitter draw: the order of the four ops (0 brightness, 1 contrast, 2 saturation, 3 hue) and factors."""

    order: tuple[int, ...]
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class CropParams:
    """Everything random about one crop, drawn once; rendering it is deterministic."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False
    jitter: JitterParams | None = None
    grayscale: bool = False
    blur_sigma: float | None = None
    solarize: bool = False


def draw_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
    aspect_range: tuple[float, float] = AugmentConfig.aspect_range,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): area fraction in `scale`, aspect in `aspect_range`, 10 tries,
    then the largest central box of an allowed aspect ratio."""
    area = height * width
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    image_aspect = width / height
    if image_aspect < aspect_range[0]:
        w, h = width, round(width / aspect_range[0])
    elif image_aspect > aspect_range[1]:
        w, h = round(height * aspect_range[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_crop_params(
    rng: np.random.Generator,
    image_hw: tuple[int, int],
    scale: tuple[float, float],
    config: AugmentConfig,
    blur_p: float,
    solarize_p: float = 0.0,
) -> CropParams:
    """Draw one crop. Every photometric number is drawn whether or not its op fires, so switching ops on or off
    (or changing their probabilities) never changes the boxes of the other crops."""
    top, left, h, w = draw_box(rng, image_hw[0], image_hw[1], scale, config.aspect_range)
    flip, apply_jitter, apply_gray, apply_blur, apply_solarize = rng.random(5) < (
        config.flip_p, config.jitter_p, config.grayscale_p, blur_p, solarize_p
    )
    order = tuple(int(i) for i in rng.permutation(4))
    brightness, contrast, saturation = (
        rng.uniform(max(0.0, 1.0 - amount), 1.0 + amount)
        for amount in (config.brightness, config.contrast, config.saturation)
    )
    hue = rng.uniform(-config.hue, config.hue)
    sigma = rng.uniform(*config.blur_sigma)
    jitter = JitterParams(order, float(brightness), float(contrast), float(saturation), float(hue))
    return CropParams(
        top, left, h, w,
        flip=bool(flip),
        jitter=jitter if apply_jitter else None,
        grayscale=bool(apply_gray),
        blur_sigma=float(sigma) if apply_blur else None,
        solarize=bool(apply_solarize),
    )


# ---------------------------------------------------------------------------------------------------------------
# Photometric ops on one crop: float32 [3, H, W] in [0, 1]. Each matches torchvision.transforms.v2.functional on
# float tensors (tests check it); most work in place because the crop is a private temporary.


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [H, W] of an RGB crop."""
    r, g, b = x.unbind(0)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x.mul_(factor).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    # The mean of the luma is the luma of the channel means: no full-size grayscale image needed.
    mean = float((x.mean(dim=(1, 2)) * x.new_tensor(GRAY_WEIGHTS)).sum())
    return x.mul_(factor).add_(mean * (1.0 - factor)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    gray = grayscale(x).mul_(1.0 - factor)
    return x.mul_(factor).add_(gray).clamp_(0.0, 1.0)


def shift_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns, keeping saturation and value (torchvision's adjust_hue).

    A hue rotation keeps the max and the chroma (max - min) of each pixel, so channel c of the result is
    max - chroma * ramp_c(hue + 6 shift), ramp_c being the HSV trapezoid centered on the hue where c is the
    minimum. Everything is arithmetic on whole planes: bool masks and torch.where are several times slower
    per element on the CPU, so "which channel is the max" is a 0/1 step computed with a huge gain.
    """
    r, g, b = x.unbind(0)
    max_c = torch.maximum(torch.maximum(r, g), b)
    chroma = max_c - torch.minimum(torch.minimum(r, g), b)
    inv_chroma = chroma.clamp_min(1e-12).reciprocal_()
    is_max = torch.sub(x, max_c).mul_(_STEP_GAIN).add_(1.0).clamp_(0.0, 1.0)
    # Ties go to the first channel (r, then g, then b), as in torchvision.
    not_r = 1.0 - is_max[0]
    is_max[1].mul_(not_r)
    is_max[2].mul_(not_r).mul_(1.0 - is_max[1])
    # Hue in sextants (60 degree units) for each possible max channel: (g-b)/C, (b-r)/C + 2, (r-g)/C + 4.
    hue = torch.stack((g - b, b - r, r - g)).mul_(inv_chroma).add_(_HUE_OFFSETS).mul_(is_max).sum(0)
    # Circular distance (period 6) between the rotated hue and each channel's ramp center.
    distance = hue.add_(6.0 * shift).sub(_RAMP_CENTERS)
    distance.sub_(distance.mul(1 / 6).add_(0.5).floor_().mul_(6.0)).abs_()
    ramp = distance.neg_().add_(2.0).clamp_(0.0, 1.0)
    return torch.sub(max_c, ramp.mul_(chroma))


def gaussian_kernel(sigma: float, max_radius: int = 4) -> list[float]:
    """Normalized 1-D Gaussian of radius min(max_radius, ceil(4 sigma)): torchvision's kernel_size 9 (radius 4)
    up to the taps beyond 4 sigma, which are dropped (each below 4e-4 of the center weight)."""
    radius = max(1, min(max_radius, math.ceil(4 * sigma)))
    taps = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(taps)
    return [t / total for t in taps]


def gaussian_blur(x: torch.Tensor, sigma: float, max_radius: int = 4) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, as shifted-slice sums (faster than conv2d on one core)."""
    height, width = x.shape[-2:]
    # Reflect padding needs the radius below the side length.
    kernel = gaussian_kernel(sigma, min(max_radius, height - 1, width - 1))
    radius = len(kernel) // 2
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    rows = padded[:, :, radius : radius + width] * kernel[radius]
    for k in range(1, radius + 1):
        rows.add_(padded[:, :, radius - k : radius - k + width], alpha=kernel[radius - k])
        rows.add_(padded[:, :, radius + k : radius + k + width], alpha=kernel[radius + k])
    out = rows[:, radius : radius + height] * kernel[radius]
    for k in range(1, radius + 1):
        out.add_(rows[:, radius - k : radius - k + height], alpha=kernel[radius - k])
        out.add_(rows[:, radius + k : radius + k + height], alpha=kernel[radius + k])
    return out


def solarize(x: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert values >= threshold (x -> 1 - x); the 0/1 step is arithmetic, as in shift_hue."""
    above = torch.sub(x, threshold).mul_(_STEP_GAIN).add_(1.0).clamp_(0.0, 1.0)
    return x.addcmul_(above, x.mul(-2.0).add_(1.0))


def color_jitter(x: torch.Tensor, params: JitterParams) -> torch.Tensor:
    for op in params.order:
        if op == 0:
            x = adjust_brightness(x, params.brightness)
        elif op == 1:
            x = adjust_contrast(x, params.contrast)
        elif op == 2:
            x = adjust_saturation(x, params.saturation)
        else:
            x = shift_hue(x, params.hue)
    return x


def resample_box(image: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
    """The box of a uint8 [3, H, W] image resized to size x size (antialiased bicubic), flipped if drawn:
    float32 [3, size, size] in [0, 1]."""
    box = image[None, :, params.top : params.top + params.height, params.left : params.left + params.width]
    crop = F.interpolate(box, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    if params.flip:
        crop = crop.flip(-1)
    return crop.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)


def render_crop(
    image: torch.Tensor, params: CropParams, size: int, photometric: bool = True, blur_scale: float = 1.0
) -> torch.Tensor:
    """One crop of a uint8 [3, H, W] image (channels-last strides are fastest): float32 [3, size, size] in [0, 1].

    blur_scale multiplies the blur sigma and the kernel radius: a crop rendered at k times another's size needs
    k times both to show the same blur."""
    x = resample_box(image, params, size)
    if not photometric:
        return x
    if params.jitter is not None:
        x = color_jitter(x, params.jitter)
    if params.grayscale:
        x[:] = grayscale(x)
    if params.blur_sigma is not None:
        x = gaussian_blur(x, params.blur_sigma * blur_scale, max_radius=math.ceil(4 * blur_scale))
    if params.solarize:
        x = solarize(x)
    return x


def pil_to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] view with channels-last strides of an RGB PIL image (torch's fast resampling layout)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@dataclass
class MultiCropAugmentation:
    """image (PIL RGB), rng, sizes -> {"global_crops", "local_crops"[, "gram_teacher_crops"]} (see module doc)."""

    config: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        c = self.config
        if c.n_local_crops < 0:
            raise ValueError(f"n_local_crops must be >= 0, got {c.n_local_crops}")
        for name in ("global_scale", "local_scale", "blur_sigma"):
            lo, hi = getattr(c, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be an increasing positive range, got {(lo, hi)}")
        self._mean = torch.tensor(c.mean, dtype=torch.float32).view(3, 1, 1)
        self._inv_std = 1.0 / torch.tensor(c.std, dtype=torch.float32).view(3, 1, 1)

    def decode_min_side(self, sizes: CropSizes) -> int:
        """Shorter image side needed so that even the smallest box of each crop kind still holds as many pixels
        as its output: decoding a JPEG reduced (PIL draft) down to this side loses nothing."""
        c = self.config
        smallest_aspect = c.aspect_range[0]
        global_out = max(sizes.global_size, sizes.gram_teacher_size or 0)
        need_global = global_out / math.sqrt(c.global_scale[0] * smallest_aspect)
        need_local = sizes.local_size / math.sqrt(c.local_scale[0] * smallest_aspect) if c.n_local_crops else 0
        return math.ceil(max(need_global, need_local))

    def draw(self, rng: np.random.Generator, image_hw: tuple[int, int]) -> tuple[list[CropParams], list[CropParams]]:
        """The parameters of the 2 global crops and of the local crops, in a fixed draw order."""
        c = self.config
        global_params = [
            draw_crop_params(rng, image_hw, c.global_scale, c, c.first_global_blur_p),
            draw_crop_params(rng, image_hw, c.global_scale, c, c.second_global_blur_p, c.second_global_solarize_p),
        ]
        local_params = [
            draw_crop_params(rng, image_hw, c.local_scale, c, c.local_blur_p) for _ in range(c.n_local_crops)
        ]
        return global_params, local_params

    def normalize_(self, crops: torch.Tensor) -> torch.Tensor:
        return crops.sub_(self._mean).mul_(self._inv_std)

    def __call__(self, image: Image.Image, rng: np.random.Generator, sizes: CropSizes) -> dict[str, torch.Tensor]:
        sizes.validate(self.config.patch_size)
        pixels = pil_to_uint8_chw(image)
        global_params, local_params = self.draw(rng, (pixels.shape[1], pixels.shape[2]))
        photometric = self.config.photometric
        global_crops = torch.stack([render_crop(pixels, p, sizes.global_size, photometric) for p in global_params])
        local_crops = (
            torch.stack([render_crop(pixels, p, sizes.local_size, photometric) for p in local_params])
            if local_params
            else torch.empty(0, 3, sizes.local_size, sizes.local_size)
        )
        out = {"global_crops": self.normalize_(global_crops), "local_crops": self.normalize_(local_crops)}
        if sizes.gram_teacher_size is not None:
            blur_scale = sizes.gram_teacher_size / sizes.global_size
            gram = [
                render_crop(pixels, p, sizes.gram_teacher_size, photometric and self.config.gram_teacher_photometric,
                            blur_scale)
                for p in global_params
            ]
            out["gram_teacher_crops"] = self.normalize_(torch.stack(gram))
        return out
