"""iBOT block masking and the collate function that turns samples into the tensors the losses need.

`block_mask` is a BEiT-style generator: on an h x w patch grid it adds random rectangles (at least
`min_block` patches, aspect ratio in [0.3, 1/0.3]) one by one until the target count is reached, then tops
up with random single patches if blocks no longer fit (as the official DINOv3 code does), so the count is
exact.

`MaskingCollate` collates B samples of `MultiCropAugmentation` (data/augment.py) into, crop-major (all images'
first crop, then all images' second crop, ...):

    global_crops        float32 [2B, 3, G, G]
    local_crops         float32 [n_local*B, 3, L, L]
    gram_teacher_crops  float32 [2B, 3, T, T]        only when the samples have them
    masks               bool    [2B, N]             N = (G / patch)^2 patches per global crop
    mask_indices        int64   [M]                 flat indices of the masked tokens in masks.flatten()
    mask_weights        float32 [M]                 1 / (masked tokens of that token's image): each masked
                                                    image weighs 1 in the iBOT loss, whatever its mask size
    labels, indices, positions  int64 [B]           dataset labels (-1 if none), dataset indices, stream positions
    n_skipped           int64   []                  unreadable images skipped while building this batch

Of the 2B global crops, int(2B * mask_probability) are masked, with ratios spread over `mask_ratio` by
stratified sampling (DINOv2's collate: the range split into equal strata, one uniform draw in each), and
the masked crops shuffled among the 2B; with several ranks the 2B are those of the global batch
(`global_batch_size`), so the masks do not depend on the sharding. The randomness comes from (seed, step,
crop index within the step), so it is reproducible on resume and independent of the DataLoader worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MASK_STREAM = 3


def _add_block(
    mask: np.ndarray, rng: np.random.Generator, budget: int, min_block: int, log_aspect: tuple[float, float]
) -> int:
    """Try (10 times) to mask one random rectangle adding between 1 and `budget` new patches; return how many."""
    height, width = mask.shape
    for _ in range(10):
        area = rng.uniform(min_block, max(min_block, budget))
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area / aspect)))
        w = int(round(math.sqrt(area * aspect)))
        if 0 < h < height and 0 < w < width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block[...] = True
                return new
    return 0


def block_mask(
    rng: np.random.Generator,
    height: int,
    width: int,
    n_masked: int,
    min_block: int = 4,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """Bool [height, width] with exactly `n_masked` True patches, laid out in rectangular blocks."""
    if not 0 <= n_masked <= height * width:
        raise ValueError(f"cannot mask {n_masked} patches of a {height}x{width} grid")
    max_block = max_block or n_masked
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < n_masked:
        added = _add_block(mask, rng, min(n_masked - count, max_block), min_block, log_aspect)
        if added == 0:
            break
        count += added
    if count < n_masked:
        free = np.flatnonzero(~mask)
        mask.flat[rng.choice(free, size=n_masked - count, replace=False)] = True
    return mask


def _crop_major(per_sample: list[torch.Tensor]) -> torch.Tensor:
    """[B] x [n, 3, S, S] -> [n*B, 3, S, S] with all images' crop 0 first, then all images' crop 1, ..."""
    stacked = torch.stack(per_sample, dim=1)
    return stacked.reshape(-1, *stacked.shape[2:])


@dataclass(frozen=True)
class MaskingCollate:
    """list of sample dicts -> batch dict (see the module docstring for the keys)."""

    patch_size: int = 16
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    seed: int = 0
    min_block: int = 4
    # A single block covers at most this fraction of the grid (DINOv2: half of the patches).
    max_block_fraction: float = 0.5
    # Images per step over all ranks (masks are assigned over the global batch); None: this batch is the step.
    global_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {self.mask_probability}")
        lo, hi = self.mask_ratio
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"mask_ratio must be an increasing range within [0, 1], got {self.mask_ratio}")

    def masks(self, positions: list[int], n_crops_per_image: int, grid: int) -> torch.Tensor:
        """Bool [n_crops_per_image * b, grid*grid], crop-major, for the b images at these stream positions.

        Which crops are masked, and with which stratum of `mask_ratio`, is decided over the whole global batch
        of the step (all ranks' images) by one permutation drawn from (seed, step); each rank then renders only
        its own crops, each from a generator of (seed, step, crop). So the masks of an image do not depend on
        how the step is sharded over ranks, and one process with batch 2b masks exactly like two with b each.
        """
        b = len(positions)
        global_batch = self.global_batch_size or b
        step = positions[0] // global_batch
        n_all = n_crops_per_image * global_batch
        n_masked_all = int(n_all * self.mask_probability)
        stratum_of = np.random.default_rng([self.seed, MASK_STREAM, step]).permutation(n_all)
        bounds = np.linspace(self.mask_ratio[0], self.mask_ratio[1], n_masked_all + 1)
        n_patches = grid * grid
        max_block = max(self.min_block, int(self.max_block_fraction * n_patches))
        masks = np.zeros((n_crops_per_image, b, grid, grid), dtype=bool)
        for crop in range(n_crops_per_image):
            for k, position in enumerate(positions):
                index = crop * global_batch + position % global_batch  # this crop's index in the step
                stratum = stratum_of[index]
                if stratum < n_masked_all:
                    rng = np.random.default_rng([self.seed, MASK_STREAM, step, index])
                    ratio = rng.uniform(bounds[stratum], bounds[stratum + 1])
                    masks[crop, k] = block_mask(rng, grid, grid, int(n_patches * ratio), self.min_block, max_block)
        return torch.from_numpy(masks.reshape(n_crops_per_image * b, n_patches))

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        shapes = {(s["global_crops"].shape, s["local_crops"].shape) for s in samples}
        if len(shapes) > 1:
            raise ValueError(
                f"samples of one batch have different crop shapes {sorted(shapes)}: per-step crop sizes need "
                f"batches aligned with steps (start the sampler at step * batch_size * world_size)"
            )
        global_size = samples[0]["global_crops"].shape[-1]
        if global_size % self.patch_size != 0:
            raise ValueError(
                f"global crop size {global_size} is not a multiple of the patch size {self.patch_size}: "
                f"configure crop sizes that are multiples of {self.patch_size}"
            )
        positions = torch.tensor([s["position"] for s in samples], dtype=torch.int64)
        batch = {
            "global_crops": _crop_major([s["global_crops"] for s in samples]),
            "local_crops": _crop_major([s["local_crops"] for s in samples]),
        }
        if "gram_teacher_crops" in samples[0]:
            batch["gram_teacher_crops"] = _crop_major([s["gram_teacher_crops"] for s in samples])
        n_global_crops = samples[0]["global_crops"].shape[0]
        masks = self.masks(positions.tolist(), n_global_crops, global_size // self.patch_size)
        batch["masks"] = masks
        batch["mask_indices"] = masks.flatten().nonzero().flatten()
        batch["mask_weights"] = ibot_mask_weights(masks)
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
        batch["indices"] = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
        batch["positions"] = positions
        batch["n_skipped"] = torch.tensor(sum(s["n_skipped"] for s in samples), dtype=torch.int64)
        return batch


def ibot_mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per masked token, 1 / (masked tokens in its image): [M] float32, tokens in row-major order of masks.

    masks: [n_images, n_patches] bool, True where the student's patch is masked. The order matches
    `masks.flatten().nonzero()` (the order in which masked tokens are gathered).
    """
    if not isinstance(masks, torch.Tensor) or masks.dim() != 2 or masks.dtype != torch.bool:
        what = f"{tuple(masks.shape)} {masks.dtype}" if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"ibot_mask_weights: masks must be a bool [n_images, n_patches] tensor, got {what}")
    per_image = 1.0 / masks.sum(dim=1, dtype=torch.float32).clamp(min=1.0)
    return per_image[:, None].expand(masks.shape)[masks]
