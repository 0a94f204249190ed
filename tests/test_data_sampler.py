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
        for _ in range(3):  # ...but training consumed only 3 batches
            sampler.advance(batch)
        state = sampler.state_dict()
        assert state["position"] == 3 * batch * world_size
        resumed = InfiniteSampler(11, rank, world_size, seed=3)
        resumed.load_state_dict(state)
        assert take(resumed, 5 * batch) == reference[rank][3 * batch : 8 * batch]
        assert take(InfiniteSampler(11, rank, world_size, seed=3, start=state["position"]), batch) == reference[rank][
            3 * batch : 4 * batch
        ]


def test_resume_with_another_world_size_continues_the_global_stream():
    global_stream = take(InfiniteSampler(13, seed=0), 60)
    old = InfiniteSampler(13, 0, 2, seed=0)
    old.advance(10)  # 10 samples on each of 2 ranks: global positions [0, 20) consumed
    shards = []
    for rank in range(4):
        sampler = InfiniteSampler(13, rank, 4, seed=0)
        sampler.load_state_dict(old.state_dict())
        shards += take(sampler, 10)
    assert sorted(shards, key=lambda item: item[1]) == global_stream[20:60]


def test_state_of_another_stream_is_refused():
    state = InfiniteSampler(10, seed=1).state_dict()
    with pytest.raises(ValueError, match="same dataset and seed"):
        InfiniteSampler(12, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-empty"):
        InfiniteSampler(0)


def test_index_at_agrees_with_iteration():
    sampler = InfiniteSampler(9, seed=4)
    for index, position in take(sampler, 30):
        assert sampler.index_at(position) == index


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
