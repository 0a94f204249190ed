"""KoLeo against a brute-force float64 reference, and its distributed form against the single-process loss."""

from __future__ import annotations

import datetime
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses.dino import DINOLoss
from losses.koleo import DistributedKoLeoLoss, KoLeoLoss
from tests.helpers import free_port


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def koleo_brute_force(tokens: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Float64, differentiable: per group, every distance to every other member, the smallest one."""
    points = tokens.double() / tokens.double().norm(dim=-1, keepdim=True)
    group_size = len(points) if group_size is None else group_size
    group_losses = []
    for start in range(0, len(points), group_size):
        group = points[start:start + group_size]
        if len(group) < 2:
            continue
        terms = []
        for i in range(len(group)):
            nearest = min((group[i] - group[j]).norm() for j in range(len(group)) if j != i)
            terms.append(-torch.log(nearest + 1e-8))
        group_losses.append(sum(terms) / len(terms))
    return sum(group_losses) / len(group_losses)


@pytest.mark.parametrize("n_points,group_size", [(37, 16), (33, 16), (16, 16), (9, None), (10, 4)])
def test_koleo_matches_brute_force(n_points, group_size):
    generator = torch.Generator().manual_seed(n_points)
    tokens = (torch.randn(n_points, 6, generator=generator) * 2).requires_grad_()
    loss = KoLeoLoss(group_size)(tokens)
    reference_tokens = tokens.detach().double().requires_grad_()
    reference = koleo_brute_force(reference_tokens, group_size)
    assert rel_err(loss, reference) < 1e-5
    loss.backward()
    reference.backward()
    assert rel_err(tokens.grad, reference_tokens.grad) < 1e-4


def test_koleo_lone_last_sample_contributes_nothing():
    tokens = torch.randn(17, 5, requires_grad=True)
    loss = KoLeoLoss(16)(tokens)
    torch.testing.assert_close(loss, KoLeoLoss(16)(tokens[:16]))
    loss.backward()
    assert torch.count_nonzero(tokens.grad[16]) == 0


def test_koleo_identical_points_stay_finite():
    tokens = torch.randn(1, 8).repeat(6, 1)
    tokens[3] *= 4.0  # same direction (a power of two keeps it exact): identical after normalization
    tokens.requires_grad_()
    loss = KoLeoLoss(16)(tokens)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-math.log(1e-8), rel=1e-3)
    loss.backward()
    assert torch.isfinite(tokens.grad).all()
    single = torch.randn(1, 8, requires_grad=True)
    lonely = KoLeoLoss(16)(single)
    lonely.backward()
    assert lonely.item() == 0.0 and torch.count_nonzero(single.grad) == 0


def test_koleo_low_precision_input_and_bad_input():
    tokens = torch.randn(20, 8)
    # bf16 tokens: a float32 loss, as exact as the float64 reference on the same (bf16-rounded) values.
    low = KoLeoLoss()(tokens.bfloat16())
    assert low.dtype == torch.float32
    assert rel_err(low, koleo_brute_force(tokens.bfloat16(), group_size=16)) < 1e-5
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        KoLeoLoss()(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="group_size"):
        KoLeoLoss(1)
    # Point 0's neighbours at angles 0.0101 (index 1) and 0.0100 (index 2): their dot products with it differ by
    # ~1e-6, far below bf16 resolution near 1, so a bf16 search would pick index 1.
    near_ties = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0101, 0.0], [1.0, 0.0, 0.0100]])
    expected = KoLeoLoss()(near_ties)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert rel_err(KoLeoLoss()(near_ties), expected) < 1e-6
    # Without a process group the distributed form is the local loss.
    assert rel_err(DistributedKoLeoLoss(4)(tokens), koleo_brute_force(tokens, group_size=4)) < 1e-5


# ------------------------------------------------------------------------------------------------------------
# Two processes (gloo on 127.0.0.1)
# ------------------------------------------------------------------------------------------------------------

WORLD_SIZE = 2
# (points per rank, group size): a group spanning both ranks, several groups per rank, one group over all.
KOLEO_CASES = [(5, 4), (8, 4), (6, 16)]


def koleo_case_tokens(n_per_rank: int) -> torch.Tensor:
    return torch.randn(WORLD_SIZE * n_per_rank, 7, generator=torch.Generator().manual_seed(n_per_rank))


def center_case_logits() -> torch.Tensor:
    return torch.randn(WORLD_SIZE * 5, 9, generator=torch.Generator().manual_seed(11))


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        for n_per_rank, group_size in KOLEO_CASES:
            tokens = koleo_case_tokens(n_per_rank)[rank * n_per_rank:(rank + 1) * n_per_rank].requires_grad_()
            loss = DistributedKoLeoLoss(group_size)(tokens)
            loss.backward()
            results[(n_per_rank, group_size)] = (loss.detach(), tokens.grad)
        # Softmax centering: the EMA center sees the valid rows of all ranks (rank 1 holds 2 padding rows).
        logits = center_case_logits()[rank * 5:(rank + 1) * 5]
        dino_loss = DINOLoss(9, centering="softmax")
        dino_loss.update_center(logits, n_valid=5 if rank == 0 else 3)
        results["center"] = dino_loss.center.clone()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_koleo_and_center_match_single_process(tmp_path):
    context = mp.spawn(_distributed_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process run did not finish in 180 s")
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    for n_per_rank, group_size in KOLEO_CASES:
        tokens = koleo_case_tokens(n_per_rank).requires_grad_()
        single = KoLeoLoss(group_size)(tokens)
        single.backward()
        values = torch.stack([results[(n_per_rank, group_size)][0] for results in per_rank])
        assert abs(values.mean().item() - single.item()) < 1e-6 * max(1.0, abs(single.item()))
        for rank, results in enumerate(per_rank):
            rows = slice(rank * n_per_rank, (rank + 1) * n_per_rank)
            # Documented scaling: each rank's tokens receive world_size x the single-process gradient.
            assert rel_err(results[(n_per_rank, group_size)][1], WORLD_SIZE * tokens.grad[rows]) < 1e-5

    logits = center_case_logits().double()
    expected_center = 0.1 * torch.cat([logits[:5], logits[5:8]]).mean(dim=0)
    for results in per_rank:
        assert rel_err(results["center"], expected_center) < 1e-6
