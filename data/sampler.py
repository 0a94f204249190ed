"""An infinite, sharded, seeded sampler whose position can be checkpointed.

The global stream is the concatenation of epoch-wise permutations of range(size), permutation e drawn from
(seed, e) alone. The stream is dealt to the ranks in blocks of `block` consecutive positions: rank r of
world_size takes blocks r, r + world_size, ... (block=1: positions r, r + world_size, ...). The training
loader uses block = per-rank batch size, so each step's global batch is the contiguous positions
[step * B_global, (step + 1) * B_global) and rank r holds its r-th slice: sharding then never changes which
images form a step nor their order in the global batch (what cross-rank KoLeo groups rely on). It
yields `(dataset_index, global_position)` pairs; `MultiCropDataset` (data/datasets.py) seeds each sample's
augmentation from that position, so a sample's crops depend on where it sits in the stream, not on which
worker or process produced it.

Exact resume. A DataLoader runs ahead of the training loop (prefetching), so what the sampler has produced
is not what training has consumed. The sampler therefore starts at `start`, a number of global stream positions
*consumed*, which the training loop knows: with a fixed batch size it is step * batch_size * world_size, which is
what `build_loader(..., start_step=step)` (data/datasets.py) sets, so a checkpoint needs only its step.

Iteration always starts at that position, and positions are global, so a resumed run sees exactly the images
(and the crops) it would have seen, whatever the number of DataLoader workers; with a different world size
it still continues the same global stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

PERMUTATION_STREAM = 0


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch` of the global stream: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, PERMUTATION_STREAM, epoch]).permutation(size)


class InfiniteSampler(torch.utils.data.Sampler):
    """Yields (dataset index, global stream position) forever, from global position `start` on."""

    def __init__(
        self,
        size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
        block: int = 1,
    ) -> None:
        if size <= 0:
            raise ValueError(f"InfiniteSampler needs a non-empty dataset, got size={size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if seed < 0 or start < 0:
            raise ValueError(f"seed and start must be >= 0, got seed={seed}, start={start}")
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = start
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.block = block

    def position_of(self, k: int) -> int:
        """Global stream position of this rank's k-th sample from `self.position` on."""
        block_index, within = divmod(k, self.block)
        return self.position + (block_index * self.world_size + self.rank) * self.block + within

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, order = -1, None
        k = 0
        while True:
            position = self.position_of(k)
            k += 1
            current_epoch, offset = divmod(position, self.size)
            if not self.shuffle:
                yield offset, position
            else:
                if current_epoch != epoch:
                    epoch, order = current_epoch, epoch_permutation(self.size, self.seed, current_epoch)
                yield int(order[offset]), position
