"""iBOT block masking and the collate function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.masking import MaskingCollate, block_mask


def boundary_length(mask: np.ndarray) -> int:
    """Number of adjacent (4-neighbour) patch pairs with one masked and one visible patch."""
    return int((mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum())


@pytest.mark.parametrize("n_masked", [0, 1, 3, 26, 77, 128, 256])
def test_block_mask_has_exact_count(n_masked):
    mask = block_mask(np.random.default_rng(n_masked), 16, 16, n_masked, max_block=128)
    assert mask.shape == (16, 16) and mask.dtype == bool and mask.sum() == n_masked


def test_block_masks_are_made_of_blocks():
    rng = np.random.default_rng(0)
    block_boundaries, random_boundaries = [], []
    for _ in range(20):
        n = int(rng.integers(26, 128))
        block_boundaries.append(boundary_length(block_mask(rng, 16, 16, n, max_block=128)))
        random = np.zeros(256, dtype=bool)
        random[rng.choice(256, n, replace=False)] = True
        random_boundaries.append(boundary_length(random.reshape(16, 16)))
    # Compact blocks have a far shorter boundary than the same number of scattered patches.
    assert np.mean(block_boundaries) < 0.5 * np.mean(random_boundaries)


def fake_samples(batch: int, n_local: int = 3, gram: bool = False, first_position: int = 0) -> list[dict]:
    """Samples whose crop pixels encode (image, crop): value 100 * image + crop."""
    samples = []
    for i in range(batch):
        sample = {
            "global_crops": torch.stack([torch.full((3, 64, 64), 100.0 * i + c) for c in range(2)]),
            "local_crops": torch.stack([torch.full((3, 32, 32), 100.0 * i + c) for c in range(n_local)])
            if n_local
            else torch.empty(0, 3, 32, 32),
            "label": i % 3,
            "index": 10 + i,
            "position": first_position + i,
            "n_skipped": i % 2,
        }
        if gram:
            sample["gram_teacher_crops"] = torch.stack([torch.full((3, 128, 128), 100.0 * i + c) for c in range(2)])
        samples.append(sample)
    return samples


def test_collate_shapes_and_crop_major_order():
    batch_size, n_local = 5, 3
    batch = MaskingCollate()(fake_samples(batch_size, n_local, gram=True))
    assert batch["global_crops"].shape == (2 * batch_size, 3, 64, 64)
    assert batch["local_crops"].shape == (n_local * batch_size, 3, 32, 32)
    assert batch["gram_teacher_crops"].shape == (2 * batch_size, 3, 128, 128)
    for key, n_crops in [("global_crops", 2), ("local_crops", n_local), ("gram_teacher_crops", 2)]:
        for crop in range(n_crops):
            for image in range(batch_size):
                assert batch[key][crop * batch_size + image].eq(100.0 * image + crop).all()
    assert batch["masks"].shape == (2 * batch_size, 16) and batch["masks"].dtype == torch.bool
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1]
    assert batch["indices"].tolist() == [10, 11, 12, 13, 14]
    assert batch["positions"].tolist() == [0, 1, 2, 3, 4]
    assert batch["n_skipped"].item() == 2
    assert "gram_teacher_crops" not in MaskingCollate()(fake_samples(2))


def test_collate_mask_statistics():
    batch_size = 32
    collate = MaskingCollate(mask_probability=0.5, mask_ratio=(0.1, 0.5))
    samples = fake_samples(batch_size, n_local=0)
    for sample in samples:
        sample["global_crops"] = torch.zeros(2, 3, 256, 256)
    batch = collate(samples)
    masks = batch["masks"]
    n_patches = masks.shape[1]
    assert n_patches == 256
    per_crop = masks.sum(1)
    masked_crops = per_crop > 0
    assert masked_crops.sum() == int(2 * batch_size * 0.5)
    # Stratified ratios: the k-th smallest ratio lies in the k-th of 32 equal strata of [0.1, 0.5].
    ratios = np.sort(per_crop[masked_crops].numpy() / n_patches)
    bounds = np.linspace(0.1, 0.5, 33)
    assert np.all(ratios >= bounds[:-1] - 1 / n_patches) and np.all(ratios <= bounds[1:])
    # The masked crops are shuffled among the 2B crops, not all first.
    assert not masked_crops[: masked_crops.sum()].all()
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    image_of_token = batch["mask_indices"] // n_patches
    weight_per_image = torch.zeros(2 * batch_size).index_add_(0, image_of_token, batch["mask_weights"])
    assert torch.allclose(weight_per_image[masked_crops], torch.ones(int(masked_crops.sum())))
    assert weight_per_image[~masked_crops].eq(0).all()


def test_masks_are_deterministic_in_the_batch_position():
    collate = MaskingCollate(seed=1)
    a = collate(fake_samples(8, first_position=64))["masks"]
    b = collate(fake_samples(8, first_position=64))["masks"]
    c = collate(fake_samples(8, first_position=72))["masks"]
    d = MaskingCollate(seed=2)(fake_samples(8, first_position=64))["masks"]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_collate_rejects_sizes_that_are_not_patch_multiples():
    samples = fake_samples(2)
    for sample in samples:
        sample["global_crops"] = torch.zeros(2, 3, 72, 72)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        MaskingCollate()(samples)
    mixed = fake_samples(2)
    mixed[1]["global_crops"] = torch.zeros(2, 3, 48, 48)
    with pytest.raises(ValueError, match="different crop shapes"):
        MaskingCollate()(mixed)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskingCollate(mask_ratio=(0.5, 0.1))


def test_masks_do_not_depend_on_how_the_step_is_sharded():
    """One process with 8 images masks each image exactly like 2 ranks with 4 images each."""
    collate = MaskingCollate(seed=4, global_batch_size=8)
    step = 3
    whole = collate(fake_samples(8, first_position=8 * step))["masks"].view(2, 8, -1)
    rank0 = collate(fake_samples(4, first_position=8 * step))["masks"].view(2, 4, -1)
    rank1 = collate(fake_samples(4, first_position=8 * step + 4))["masks"].view(2, 4, -1)
    assert torch.equal(torch.cat([rank0, rank1], dim=1), whole)
    assert whole.any() and not whole.all()
