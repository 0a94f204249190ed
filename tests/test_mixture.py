"""The data mixture (data/mixture.py): realized ratios, homogeneous steps on every rank (2 processes), exact
resume of the parts' positions, and train.py on a two-part mixture resuming bit for bit."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from data.datasets import ProceduralDataset
from data.mixture import MixtureImages, MixtureSampler, MixtureSchedule

pytestmark = pytest.mark.usefixtures("single_thread")


def mixture(sizes=(30, 20, 10)) -> MixtureImages:
    return MixtureImages([ProceduralDataset(n, size=32, seed=i) for i, n in enumerate(sizes)],
                         [f"p{i}" for i in range(len(sizes))])


def test_realized_ratios_are_within_three_standard_errors_over_10k_steps():
    ratios, p, steps, batch = (0.5, 0.3, 0.2), 0.1, 10_000, 8
    schedule = MixtureSchedule((30, 20, 10), ratios, homogeneous_part=2, homogeneous_p=p, seed=5)
    homogeneous = np.array([schedule.homogeneous(s) for s in range(steps)])
    assert abs(homogeneous.mean() - p) <= 3 * np.sqrt(p * (1 - p) / steps)
    parts = np.concatenate([schedule.step_parts(s, batch) for s in np.flatnonzero(~homogeneous)])
    for part, ratio in enumerate(ratios):
        share = (parts == part).mean()
        assert abs(share - ratio) <= 3 * np.sqrt(ratio * (1 - ratio) / len(parts)), (part, share)
    for s in np.flatnonzero(homogeneous)[:50]:
        assert (schedule.step_parts(int(s), batch) == 2).all()


def test_each_part_is_read_as_its_own_permutation_stream():
    images = mixture()
    schedule = MixtureSchedule((30, 20, 10), (1, 1, 1), seed=0)
    sampler = iter(MixtureSampler(images, schedule, batch_size=6))
    keys = [next(sampler) for _ in range(6 * 40)]
    assert [position for _, position in keys] == list(range(len(keys)))
    for part in range(3):
        local = [index - images.offsets[part] for index, _ in keys if images.part_of(index) == part]
        size = len(images.parts[part])
        assert sorted(local[:size]) == list(range(size))  # the first epoch: every image once


def test_resumed_sampler_continues_exactly():
    images = mixture()
    schedule = MixtureSchedule((30, 20, 10), (0.6, 0.3, 0.1), homogeneous_part=1, homogeneous_p=0.2, seed=1)
    for rank in range(2):
        straight = iter(MixtureSampler(images, schedule, 3, rank, 2))
        reference = [next(straight) for _ in range(3 * 20)]
        counts = sum(schedule.step_counts(s, 6) for s in range(12))
        resumed = iter(MixtureSampler(images, schedule, 3, rank, 2, start_step=12, start_counts=counts.tolist()))
        assert [next(resumed) for _ in range(3 * 8)] == reference[3 * 12:]


def _rank_parts(rank: int, out: dict) -> None:
    images = mixture()
    schedule = MixtureSchedule((30, 20, 10), (0.5, 0.5, 0.0), homogeneous_part=2, homogeneous_p=0.3, seed=2)
    sampler = iter(MixtureSampler(images, schedule, batch_size=4, rank=rank, world_size=2))
    out[rank] = [int(images.part_of(next(sampler)[0])) for _ in range(4 * 100)]


def test_homogeneous_steps_are_single_part_on_every_rank():
    """Two processes build their rank's sampler alone: on the steps the schedule makes homogeneous, every sample
    of both ranks comes from the homogeneous part (ratio 0 elsewhere, so it appears nowhere else)."""
    out = mp.Manager().dict()
    mp.spawn(_rank_parts, args=(out,), nprocs=2)
    schedule = MixtureSchedule((30, 20, 10), (0.5, 0.5, 0.0), homogeneous_part=2, homogeneous_p=0.3, seed=2)
    homogeneous = [schedule.homogeneous(s) for s in range(100)]
    assert 10 < sum(homogeneous) < 50
    for rank in range(2):
        per_step = np.array(out[rank]).reshape(100, 4)
        for step in range(100):
            assert ((per_step[step] == 2).all() if homogeneous[step] else (per_step[step] != 2).all()), (rank, step)


def test_bad_mixture_configs_fail_with_one_line():
    with pytest.raises(ValueError, match="2 values for 3 data.parts"):
        MixtureSchedule((1, 2, 3), (0.5, 0.5))
    with pytest.raises(ValueError, match="homogeneous_part=3 is not the index"):
        MixtureSchedule((1, 2, 3), (1, 1, 1), homogeneous_part=3)


@pytest.mark.slow
def test_train_on_a_two_part_mixture_resumes_bitwise_and_logs_part_counts(tmp_path):
    import train
    from tests.helpers import tiny_config

    lists = []
    for part, n in enumerate((12, 8)):
        folder = tmp_path / f"part{part}"
        folder.mkdir()
        data = ProceduralDataset(n, size=32, seed=10 + part)
        for i in range(n):
            data[i][0].save(folder / f"{i:02d}.png")
        lists.append(str(folder))
    flags = ["--data.batch-size", "4", "--run.checkpoint-every", "3", "--optim.lr.peak", "1e-3",
             "--data.parts", *lists, "--data.ratios", "0.7", "0.3", "--data.homogeneous-part", "1",
             "--data.homogeneous-p", "0.3", "--data.path", "None"]
    straight = train.train(tiny_config(tmp_path / "straight", "--optim.iterations", "6", *flags))
    train.train(tiny_config(tmp_path / "resumed", "--optim.iterations", "3", *flags))
    assert train.train(tiny_config(tmp_path / "resumed", "--optim.iterations", "6", *flags))["step"] == 6
    a = torch.load(tmp_path / "straight" / "checkpoint_00000006.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_00000006.pth", weights_only=True)
    assert a["stats"]["part_counts"] == b["stats"]["part_counts"] == straight["stats"]["part_counts"]
    assert sum(a["stats"]["part_counts"]) == 6 * 4
    for part in ("student", "teacher"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
