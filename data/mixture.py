"""The data mixture (DINOv3 section 3.1): several datasets ("parts") drawn by ratio, with homogeneous steps.

Each step is homogeneous with probability `homogeneous_p`: every sample of the step, on every rank, comes from
`homogeneous_part` (the paper: ImageNet-1k, 10 % of the iterations). Otherwise the step is heterogeneous: each
sample's part is drawn by `ratios` (normalized). Both draws are pure functions of (seed, step), so every rank
knows the whole global batch's parts and all ranks agree on what a step is.

Within a part, samples follow that part's own stream: epoch-wise permutations of the part drawn from
(seed, part, epoch), consumed in order. A part's position (its counter) after step s is the number of its samples
in steps [0, s): the training loop adds up `MixtureSchedule.step_counts(step)` (`stats.part_counts` in a
checkpoint) and a resumed sampler starts from those counters, so a resumed run draws exactly the images and crops
of an uninterrupted one. The parts are concatenated into one `MixtureImages` dataset; the sampler yields
(concatenated index, global position) pairs like data/sampler.py's InfiniteSampler, dealt to the ranks in blocks of
the per-rank batch, so MultiCropDataset and the masking collate work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data.datasets import ImageDataset

MIXTURE_STREAM = 3  # generator streams, apart from data/sampler.py's (0) and data/shards.py's (1, 2)


class MixtureImages(ImageDataset):
    """The parts' images one after the other; `part_of(index)` says where an index comes from."""

    def __init__(self, parts: list[ImageDataset], names: list[str]) -> None:
        self.parts, self.names = parts, names
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def part_of(self, index: int | np.ndarray) -> int | np.ndarray:
        return np.searchsorted(self.offsets, index, side="right") - 1

    def load(self, index: int, min_side: int | None = None) -> tuple[Image.Image, int]:
        part = int(self.part_of(index))
        return self.parts[part].load(index - int(self.offsets[part]), min_side)

    def describe(self, index: int) -> str:
        part = int(self.part_of(index))
        return self.parts[part].describe(index - int(self.offsets[part]))


@dataclass(frozen=True)
class MixtureSchedule:
    sizes: tuple[int, ...]  # images per part
    ratios: tuple[float, ...]  # heterogeneous steps: each sample's part drawn with these weights
    homogeneous_part: int | None = None
    homogeneous_p: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = mixture_problems(len(self.sizes), self.ratios, self.homogeneous_part, self.homogeneous_p)
        if problems:
            raise ValueError("; ".join(problems))

    def homogeneous(self, step: int) -> bool:
        if self.homogeneous_part is None or self.homogeneous_p == 0:
            return False
        return bool(np.random.default_rng([self.seed, MIXTURE_STREAM, 0, step]).random() < self.homogeneous_p)

    def step_parts(self, step: int, global_batch: int) -> np.ndarray:
        """The part of every sample of the step's global batch, in batch order."""
        if self.homogeneous(step):
            return np.full(global_batch, self.homogeneous_part, dtype=np.int64)
        weights = np.asarray(self.ratios, dtype=np.float64)
        rng = np.random.default_rng([self.seed, MIXTURE_STREAM, 1, step])
        return rng.choice(len(self.sizes), size=global_batch, p=weights / weights.sum()).astype(np.int64)

    def step_counts(self, step: int, global_batch: int) -> np.ndarray:
        return np.bincount(self.step_parts(step, global_batch), minlength=len(self.sizes))

    def part_index(self, part: int, counter: int) -> int:
        """The image (index within the part) at position `counter` of the part's stream."""
        epoch, offset = divmod(counter, self.sizes[part])
        order = np.random.default_rng([self.seed, MIXTURE_STREAM, 2, part, epoch]).permutation(self.sizes[part])
        return int(order[offset])


def mixture_problems(n_parts: int, ratios: tuple[float, ...], homogeneous_part: int | None,
                     homogeneous_p: float) -> list[str]:
    problems = []
    if len(ratios) != n_parts:
        problems.append(f"data.ratios has {len(ratios)} values for {n_parts} data.parts: give one ratio per part")
    elif min(ratios, default=0) < 0 or sum(ratios) <= 0:
        problems.append(f"data.ratios={tuple(ratios)} must be >= 0 with a positive sum")
    if homogeneous_part is not None and not 0 <= homogeneous_part < n_parts:
        problems.append(f"data.homogeneous_part={homogeneous_part} is not the index of one of the {n_parts} parts")
    if not 0 <= homogeneous_p <= 1:
        problems.append(f"data.homogeneous_p={homogeneous_p} must be in [0, 1]")
    return problems


class MixtureSampler(torch.utils.data.Sampler):
    """Yields (index into MixtureImages, global position) for this rank from step `start_step` on, the parts'
    counters starting at `start_counts` (what steps [0, start_step) consumed of each part)."""

    def __init__(self, images: MixtureImages, schedule: MixtureSchedule, batch_size: int, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, start_counts: list[int] | None = None) -> None:
        self.images, self.schedule = images, schedule
        self.batch_size, self.rank, self.world_size, self.start_step = batch_size, rank, world_size, start_step
        self.start_counts = np.zeros(len(images.parts), np.int64) if start_counts is None else np.asarray(
            start_counts, np.int64)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        counts = self.start_counts.copy()
        global_batch = self.batch_size * self.world_size
        step = self.start_step
        while True:
            parts = self.schedule.step_parts(step, global_batch)
            for slot in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size):
                part = int(parts[slot])
                counter = counts[part] + int((parts[:slot] == part).sum())
                index = int(self.images.offsets[part]) + self.schedule.part_index(part, int(counter))
                yield index, step * global_batch + slot
            counts += np.bincount(parts, minlength=len(counts))
            step += 1
