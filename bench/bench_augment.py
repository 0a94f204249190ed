"""Multi-crop augmentation throughput on one CPU core: data/augment.py against a straightforward pipeline.

Both decode each bundled photo once from its file and produce 2 global crops of 256 px and 8 local crops of
112 px with the DINOv2/v3 recipe (random resized crop, flip, color jitter p 0.8, grayscale p 0.2, Gaussian
blur p 1.0 / 0.1 / 0.5, solarize p 0.2 on the second global crop, ImageNet normalization). The straightforward
one is the textbook Compose of torchvision transforms on PIL images, as the official DINOv2 code writes it.
Target: ours >= 2x its images/s. Run: `pytest bench/bench_augment.py -s`.
"""

from __future__ import annotations

import time

import torch
import torchvision.transforms as T
from PIL import Image

from bench.common import report
from data.augment import IMAGENET_MEAN, IMAGENET_STD, CropSizes, MultiCropAugmentation, sample_rng
from data.datasets import bundled_photo_paths, open_image

GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL = 256, 112, 8


def straightforward_pipeline():
    """path -> 10 normalized crop tensors, with one Compose per crop kind (PIL + torchvision.transforms)."""
    bicubic = T.InterpolationMode.BICUBIC
    color = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    blur = T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))
    finish = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    global_geometry = [
        T.RandomResizedCrop(GLOBAL_SIZE, scale=(0.32, 1.0), interpolation=bicubic),
        T.RandomHorizontalFlip(),
    ]
    first_global = T.Compose(global_geometry + color + [blur] + finish)
    second_global = T.Compose(
        global_geometry + color + [T.RandomApply([blur], p=0.1), T.RandomSolarize(128, p=0.2)] + finish
    )
    local_geometry = [
        T.RandomResizedCrop(LOCAL_SIZE, scale=(0.05, 0.32), interpolation=bicubic),
        T.RandomHorizontalFlip(),
    ]
    local = T.Compose(local_geometry + color + [T.RandomApply([blur], p=0.5)] + finish)

    def run(path) -> list[torch.Tensor]:
        image = Image.open(path).convert("RGB")
        return [first_global(image), second_global(image)] + [local(image) for _ in range(N_LOCAL)]

    return run


def our_pipeline():
    """path -> {"global_crops", "local_crops"} as MultiCropDataset produces them (reduced JPEG decode included)."""
    augment = MultiCropAugmentation()
    sizes = CropSizes(GLOBAL_SIZE, LOCAL_SIZE)
    min_side = augment.decode_min_side(sizes)
    calls = iter(range(10**9))

    def run(path) -> dict[str, torch.Tensor]:
        return augment(open_image(path, min_side), sample_rng(0, next(calls)), sizes)

    return run


def test_multicrop_throughput_one_core(benchmark):
    paths = bundled_photo_paths()
    assert len(paths) > 10, "the bundled photos of scikit-image / scikit-learn are missing"
    ours, theirs = our_pipeline(), straightforward_pipeline()

    out = ours(paths[0])
    reference = theirs(paths[0])
    assert out["global_crops"].shape == (2, 3, GLOBAL_SIZE, GLOBAL_SIZE) == (2, *reference[0].shape)
    assert out["local_crops"].shape == (N_LOCAL, 3, LOCAL_SIZE, LOCAL_SIZE) == (N_LOCAL, *reference[2].shape)

    def one_pass(pipeline) -> float:
        start = time.perf_counter()
        for path in paths:
            pipeline(path)
        return time.perf_counter() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Interleaved passes, best of each: both see the same machine load.
        ours_best = theirs_best = float("inf")
        for _ in range(4):
            ours_best = min(ours_best, one_pass(ours))
            theirs_best = min(theirs_best, one_pass(theirs))
        benchmark.pedantic(one_pass, args=(ours,), rounds=3, iterations=1)
    finally:
        torch.set_num_threads(threads)

    ours_rate, theirs_rate = len(paths) / ours_best, len(paths) / theirs_best
    report(
        "multicrop augmentation, 1 core, 2x256 + 8x112 crops, bundled photos",
        ours_images_per_s=ours_rate,
        straightforward_images_per_s=theirs_rate,
        speedup=ours_rate / theirs_rate,
        images=len(paths),
    )
