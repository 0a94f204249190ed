"""InfiniteSampler: epoch permutations, sharding across ranks, exact resume from the saved position."""

from __future__ import annotations

from itertools import islice

import pytest

from data.sampler import InfiniteSampler


def take(sampler: InfiniteSampler, n: int) -> list[tuple[int, int]]:
    return list(islice(iter(sampler), n))


def test_stream_is_a_new_permutation_every_epoch():
    items = take(InfiniteSampler(10, seed=1), 30)
    assert [position for _, position in items] == list(range(30))
    epochs = [[index for index, _ in items[e * 10 : (e + 1) * 10]] for e in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert [i for i, _ in take(InfiniteSampler(10, seed=1), 30)] == [i for i, _ in items]
    assert [i for i, _ in take(InfiniteSampler(10, seed=2), 30)] != [i for i, _ in items]
    assert [i for i, _ in take(InfiniteSampler(10, shuffle=False), 25)] == list(range(10)) * 2 + list(range(5))


def test_ranks_are_disjoint_shards_of_the_global_stream():
    world_size, per_rank = 3, 20
    global_stream = take(InfiniteSampler(17, seed=5), world_size * per_rank)
    shards = [take(InfiniteSampler(17, rank, world_size, seed=5), per_rank) for rank in range(world_size)]
    positions = [{p for _, p in shard} for shard in shards]
    assert all(not (positions[a] & positions[b]) for a in range(3) for b in range(a + 1, 3))
    assert sorted(p for shard in shards for _, p in shard) == list(range(world_size * per_rank))
    for rank, shard in enumerate(shards):
        assert shard == global_stream[rank::world_size]


def test_resume_continues_exactly_from_the_consumed_position():
    batch, world_size = 4, 2
    reference = [take(InfiniteSampler(11, rank, world_size, seed=3), 10 * batch) for rank in range(world_size)]
    for rank in range(world_size):
        sampler = InfiniteSampler(11, rank, world_size, seed=3)
        produced = take(sampler, 7 * batch)  # a DataLoader prefetches ahead of training...
        assert produced == reference[rank][: 7 * batch]
        consumed = 3 * batch * world_size  # ...but training consumed only 3 batches on every rank
        resumed = InfiniteSampler(11, rank, world_size, seed=3, start=consumed)
        assert take(resumed, 5 * batch) == reference[rank][3 * batch : 8 * batch]


def test_resume_with_another_world_size_continues_the_global_stream():
    global_stream = take(InfiniteSampler(13, seed=0), 60)
    consumed = 2 * 10  # 10 samples on each of 2 ranks: global positions [0, 20) consumed
    shards = []
    for rank in range(4):
        shards += take(InfiniteSampler(13, rank, 4, seed=0, start=consumed), 10)
    assert sorted(shards, key=lambda item: item[1]) == global_stream[20:60]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\), got rank=2, world_size=2"):
        InfiniteSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-empty dataset, got size=0"):
        InfiniteSampler(0)
    with pytest.raises(ValueError, match="seed and start must be >= 0"):
        InfiniteSampler(10, start=-1)
    with pytest.raises(ValueError, match="block must be >= 1, got 0"):
        InfiniteSampler(10, block=0)


def test_block_sharding_gives_each_rank_a_contiguous_slice_of_every_global_batch():
    batch, world_size = 4, 2
    global_stream = take(InfiniteSampler(23, seed=7), 3 * batch * world_size)
    shards = [take(InfiniteSampler(23, rank, world_size, seed=7, block=batch), 3 * batch) for rank in range(world_size)]
    for step in range(3):
        step_global = global_stream[step * batch * world_size : (step + 1) * batch * world_size]
        step_ranks = [s for shard in shards for s in shard[step * batch : (step + 1) * batch]]
        assert step_ranks == step_global
    resumed = InfiniteSampler(23, 1, world_size, seed=7, block=batch, start=batch * world_size)
    assert take(resumed, 2 * batch) == shards[1][batch:]
