"""Multi-crop augmentation: shapes, recipe ops against torchvision, determinism, Gram-teacher alignment."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from config import OFFICIAL_HRFT_PROBABILITIES, OFFICIAL_HRFT_SIZES
from data.augment import (
    AugmentConfig,
    CropParams,
    CropSizes,
    CropSizeSchedule,
    MultiCropAugmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    draw_box,
    gaussian_blur,
    grayscale,
    pil_to_uint8_chw,
    render_crop,
    sample_rng,
    shift_hue,
    solarize,
)
from data.datasets import bundled_photo_paths, open_image

# Run like a DataLoader worker (one thread): tiny ops stall on OpenMP barriers when the cores are busy.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    astronaut = [p for p in bundled_photo_paths() if p.name == "astronaut.png"]
    assert astronaut, "scikit-image's astronaut.png is missing"
    return open_image(astronaut[0])


@pytest.fixture
def colors() -> torch.Tensor:
    x = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0))
    x[:, :4] = x[:1, :4]  # gray pixels: zero chroma
    x[:, 4:8] = torch.tensor([0.6, 0.6, 0.2]).view(3, 1, 1)  # ties between the max channels
    x[:, 8:10] = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1)
    return x


def test_default_recipe_shapes_and_dtypes(photo):
    out = MultiCropAugmentation()(photo, sample_rng(0, 0), CropSizes(256, 112))
    assert set(out) == {"global_crops", "local_crops"}
    assert out["global_crops"].shape == (2, 3, 256, 256) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape == (8, 3, 112, 112) and out["local_crops"].dtype == torch.float32
    # ImageNet-normalized [0, 1] values lie within [-mean/std, (1-mean)/std] ~ [-2.2, 2.7].
    for crops in out.values():
        assert crops.min() >= -2.2 and crops.max() <= 2.7 and crops.std() > 0.3


def test_gram_teacher_crops_and_custom_counts(photo):
    augment = MultiCropAugmentation(AugmentConfig(n_local_crops=3))
    out = augment(photo, sample_rng(0, 1), CropSizes(64, 32, 128))
    assert out["global_crops"].shape == (2, 3, 64, 64)
    assert out["local_crops"].shape == (3, 3, 32, 32)
    assert out["gram_teacher_crops"].shape == (2, 3, 128, 128)


@pytest.mark.parametrize("sizes", [CropSizes(250, 112), CropSizes(256, 8), CropSizes(256, 112, 500)])
def test_crop_sizes_must_be_patch_multiples(photo, sizes):
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        MultiCropAugmentation()(photo, sample_rng(0, 0), sizes)


def test_local_crops_need_not_be_patch_multiples(photo):
    """The paper's 168 px local crops (high-resolution adaptation): the ViT uses their 10 x 10 whole patches."""
    out = MultiCropAugmentation(AugmentConfig(n_local_crops=2))(photo, sample_rng(0, 0), CropSizes(64, 168))
    assert out["local_crops"].shape == (2, 3, 168, 168)


def test_same_seed_and_position_give_identical_crops(photo):
    augment = MultiCropAugmentation()
    sizes = CropSizes(64, 32, 128)
    a = augment(photo, sample_rng(7, 123), sizes)
    b = augment(photo, sample_rng(7, 123), sizes)
    c = augment(photo, sample_rng(7, 124), sizes)
    d = augment(photo, sample_rng(8, 123), sizes)
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["global_crops"], c["global_crops"])
    assert not torch.equal(a["global_crops"], d["global_crops"])


def test_draw_box_follows_random_resized_crop():
    rng = np.random.default_rng(0)
    for scale in [(0.32, 1.0), (0.05, 0.32)]:
        for _ in range(300):
            top, left, h, w = draw_box(rng, 300, 400, scale)
            assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
            assert scale[0] - 0.02 <= h * w / (300 * 400) <= scale[1] + 0.02
            assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # A very elongated image cannot hold such boxes: the fallback is the central box of extreme aspect.
    top, left, h, w = draw_box(np.random.default_rng(0), 10, 1000, (0.9, 1.0))
    assert (h, w) == (10, 13) and left == (1000 - 13) // 2


def test_photometric_ops_match_torchvision(colors):
    for factor in (0.6, 1.4):
        for ours, theirs in [
            (adjust_brightness, TF.adjust_brightness),
            (adjust_contrast, TF.adjust_contrast),
            (adjust_saturation, TF.adjust_saturation),
        ]:
            assert torch.allclose(ours(colors.clone(), factor), theirs(colors, factor), atol=1e-6)
    for shift in (-0.5, -0.1, -0.03, 0.07, 0.1, 0.45):
        assert torch.allclose(shift_hue(colors, shift), TF.adjust_hue(colors, shift), atol=1e-5)
    assert torch.allclose(grayscale(colors), TF.rgb_to_grayscale(colors)[0], atol=1e-6)
    assert torch.equal(solarize(colors.clone()), TF.solarize(colors, 128 / 255))


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.8, 1.5, 2.0])
def test_blur_matches_torchvision_9_tap_kernel(colors, sigma):
    # Dropping the taps beyond 4 sigma changes nothing visible (far below one uint8 level).
    assert torch.allclose(gaussian_blur(colors, sigma), TF.gaussian_blur(colors, [9, 9], [sigma, sigma]), atol=1e-4)


def test_blur_of_gram_teacher_crops_scales_sigma_and_radius(colors):
    # A crop rendered at 2x gets sigma and radius doubled: torchvision's kernel_size 17 for that sigma.
    expected = TF.gaussian_blur(colors, [17, 17], [3.0, 3.0])
    assert torch.allclose(gaussian_blur(colors, 3.0, max_radius=8), expected, atol=1e-4)


def test_render_crop_is_crop_then_bicubic_resize(photo):
    pixels = pil_to_uint8_chw(photo)
    params = CropParams(top=40, left=100, height=300, width=240, flip=True)
    ours = render_crop(pixels, params, 96, photometric=False)
    box = pixels[:, 40:340, 100:340].contiguous().float()[None]
    expected = F.interpolate(box, size=(96, 96), mode="bicubic", antialias=True).clamp(0, 255).round()[0].flip(-1) / 255
    # torch's uint8 kernel rounds its fixed-point weights differently from the float one: a few levels at most.
    assert (ours - expected).abs().max() <= 4 / 255 and (ours - expected).abs().mean() < 1 / 255


def test_decode_min_side_and_reduced_jpeg_decode():
    augment = MultiCropAugmentation()
    # The smallest global box (scale 0.32, aspect 3/4) must still hold 256 pixels across, local ones 112.
    assert augment.decode_min_side(CropSizes(256, 112)) == math.ceil(112 / math.sqrt(0.05 * 0.75))
    assert augment.decode_min_side(CropSizes(256, 112, 1024)) == math.ceil(1024 / math.sqrt(0.32 * 0.75))
    retina = [p for p in bundled_photo_paths() if p.name == "retina.jpg"][0]
    full = open_image(retina)
    reduced = open_image(retina, min_side=600)
    assert full.size == (1411, 1411)
    assert 600 <= min(reduced.size) < min(full.size) and reduced.mode == "RGB"


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def test_gram_teacher_crops_align_with_global_crops(photo):
    sizes = CropSizes(96, 32, 192)
    for config, tolerance in [(AugmentConfig(photometric=False), 0.05), (AugmentConfig(), 0.12)]:
        for position in range(6):
            out = MultiCropAugmentation(config)(photo, sample_rng(0, position), sizes)
            gram = F.interpolate(out["gram_teacher_crops"], size=(96, 96), mode="bicubic", antialias=True)
            for i in range(2):
                # Same box and flip (and photometric parameters): the 2x crop downsampled is the global crop up
                # to resampling error; the other global crop is a different region.
                assert _mean_abs(gram[i], out["global_crops"][i]) < tolerance
                assert _mean_abs(gram[i], out["global_crops"][1 - i]) > 2 * tolerance


def test_gram_teacher_crops_can_skip_photometric_ops(photo):
    sizes = CropSizes(64, 32, 128)
    config = AugmentConfig(gram_teacher_photometric=False)
    distorted = MultiCropAugmentation(config)(photo, sample_rng(0, 3), sizes)
    plain = MultiCropAugmentation(replace(config, photometric=False))(photo, sample_rng(0, 3), sizes)
    assert torch.equal(distorted["gram_teacher_crops"], plain["gram_teacher_crops"])
    assert not torch.equal(distorted["global_crops"], plain["global_crops"])


def test_crop_size_schedule_is_per_step_deterministic():
    assert CropSizeSchedule()(12345) == CropSizes(256, 112, None)
    # The official high-resolution triples, from their one definition.
    weighted = tuple((CropSizes(*sizes), p) for sizes, p in zip(OFFICIAL_HRFT_SIZES, OFFICIAL_HRFT_PROBABILITIES))
    schedule = CropSizeSchedule.weighted(weighted, seed=3)
    draws = [schedule(step) for step in range(2000)]
    assert draws == [CropSizeSchedule.weighted(weighted, seed=3)(step) for step in range(2000)]
    counts = Counter(draws)
    for sizes, probability in weighted:
        assert abs(counts[sizes] / len(draws) - probability) < 0.04
    with pytest.raises(ValueError, match="sum to 1"):
        CropSizeSchedule((CropSizes(), CropSizes(512, 112)), (0.5, 0.6))
