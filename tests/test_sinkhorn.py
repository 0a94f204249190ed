"""Sinkhorn-Knopp teacher centering: both paths against a float64 transcription of the official algorithm.

The Triton path runs through Triton's interpreter here (tests/conftest.py sets TRITON_INTERPRET=1), with tiles of
16 rows x 64 columns, row/column splits of two tiles and merges of two splits per step, so the shapes below (not
multiples of anything) cover ragged tiles, multi-tile loops, passes with one split (small batches, short rows)
and in-kernel merges of several splits in several steps.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from bench.bench_sinkhorn import official_sinkhorn
from dino_kernels import sinkhorn
from dino_kernels.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_reference
from tests.helpers import free_port

IMPLS = ["reference", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["reference", "triton", "triton-separate-passes"])
def impl(request, monkeypatch):
    """The implementation under test. Without a process group, batches of at most _SMALL_BATCH_ROWS rows (all of
    those below) take the fused small-batch kernel; "triton-separate-passes" sends them through the column and
    row pass kernels that larger batches and distributed runs take."""
    if request.param == "triton-separate-passes":
        monkeypatch.setattr(sinkhorn, "_SMALL_BATCH_ROWS", 0)
        return "triton"
    return request.param


def official_sinkhorn_float64(logits: torch.Tensor, temperature: float, n_iter: int = 3) -> torch.Tensor:
    """The official teacher centering, step by step, in float64 with the global max subtracted first."""
    return official_sinkhorn(logits, temperature, n_iter, dtype=torch.float64, subtract_max=True)


def official_sinkhorn_log_float64(logits: torch.Tensor, temperature: float, n_iter: int = 3) -> torch.Tensor:
    """The same official steps applied to log Q: exact even where exp(logits / T) underflows in float64."""
    log_q = (logits.double() / temperature).t()
    n_protos, n_samples = log_q.shape
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)
    for _ in range(n_iter):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n_protos)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(n_samples)
    return torch.exp(log_q + math.log(n_samples)).t()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def teacher_logits(n_samples: int, n_protos: int, dtype: torch.dtype, seed: int, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n_samples, n_protos, generator=gen) * scale).to(dtype)


def assert_distributions(q: torch.Tensor, tol: float = 1e-5) -> None:
    assert q.dtype == torch.float32
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(q.shape[0]), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
# (rows, prototypes) -> splits of the column pass (over rows) and of the row pass (over columns):
# 37x300: 2 and 3 (a ragged merge step); 6x517: 1 and 5; 70x120: 3 and 1; 5x60: 1 and 1; the small-batch kernel
# merges 5, 9, 2 and 1 column tiles. 150x70: more rows than the small-batch kernel takes, 5 splits and 1.
@pytest.mark.parametrize("shape", [(37, 300), (6, 517), (70, 120), (5, 60), (150, 70)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_official_algorithm(impl, dtype, shape):
    logits = teacher_logits(*shape, dtype, seed=shape[1])
    ref = official_sinkhorn_float64(logits, 0.1)
    out = sinkhorn_knopp(logits, 0.1, impl=impl)
    assert rel_err(out, ref) < 1e-6
    assert_distributions(out)


@pytest.mark.parametrize("n_iter", [1, 5])
def test_iteration_count(impl, n_iter):
    logits = teacher_logits(19, 150, torch.float32, seed=n_iter, scale=4.0)
    ref = official_sinkhorn_float64(logits, 0.07, n_iter=n_iter)
    out = sinkhorn_knopp(logits, 0.07, n_iter=n_iter, impl=impl)
    assert rel_err(out, ref) < 1e-6
    assert_distributions(out)


def test_repeated_calls_give_the_same_bits(impl):
    # the in-kernel merges add the splits' partial sums in a fixed order: no run-to-run variation
    logits = teacher_logits(70, 517, torch.bfloat16, seed=7)
    first = sinkhorn_knopp(logits, 0.07, impl=impl)
    assert torch.equal(sinkhorn_knopp(logits, 0.07, impl=impl), first)


class _FailOnHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), int(tensor), bool(tensor), ...
            raise AssertionError(f"host sync through {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_without_a_process_group(impl):
    # without a group B_global is n_valid, known on the host: nothing waits for the GPU
    logits = teacher_logits(21, 150, torch.float32, seed=8)
    with _FailOnHostSync():
        out = sinkhorn_knopp(logits, 0.1, n_valid=17, impl=impl)
    assert rel_err(out[:17], official_sinkhorn_float64(logits[:17], 0.1)) < 1e-6


@pytest.mark.parametrize("n_rows, n_cols", [(16, 262144), (64, 65536), (256, 262144), (4096, 65536), (200, 3000),
                                            (100000, 300), (1, 1), (0, 65536)])
def test_gpu_split_sizes(n_rows, n_cols):
    n_sms = 132
    rows_per_split, cols_per_split = sinkhorn._split_sizes(
        n_rows, n_cols, sinkhorn._PROGRAMS_PER_SM * n_sms, sinkhorn._ROW_SPLIT_UNIT, sinkhorn._COL_SPLIT_UNIT
    )
    # splits are whole tiles of every config, and at most _MAX_SPLITS of them
    for config in sinkhorn._COLUMN_CONFIGS:
        assert rows_per_split % config.kwargs["BLOCK_B"] == 0
    for config in sinkhorn._ROW_CONFIGS:
        assert cols_per_split % config.kwargs["BLOCK_K"] == 0
    n_row_splits, n_col_splits = sinkhorn._cdiv(n_rows, rows_per_split), sinkhorn._cdiv(n_cols, cols_per_split)
    assert n_row_splits <= sinkhorn._MAX_SPLITS and n_col_splits <= sinkhorn._MAX_SPLITS
    # no split is smaller than its minimum unless the whole axis is
    assert rows_per_split >= min(sinkhorn._ROW_SPLIT_UNIT, n_rows) and cols_per_split >= min(
        sinkhorn._COL_SPLIT_UNIT, n_cols)
    # each pass gets a program per SM whenever the problem allows that many splits of the minimum size
    column_programs = sinkhorn._cdiv(n_cols, sinkhorn._NOMINAL_BLOCK_K) * n_row_splits
    row_programs = sinkhorn._cdiv(n_rows, sinkhorn._NOMINAL_BLOCK_B) * n_col_splits
    assert column_programs >= min(n_sms, sinkhorn._cdiv(n_cols, sinkhorn._NOMINAL_BLOCK_K)
                                  * sinkhorn._cdiv(n_rows, sinkhorn._ROW_SPLIT_UNIT))
    assert row_programs >= min(n_sms, sinkhorn._cdiv(n_rows, sinkhorn._NOMINAL_BLOCK_B)
                               * min(sinkhorn._MAX_SPLITS, sinkhorn._cdiv(n_cols, sinkhorn._COL_SPLIT_UNIT)))


def test_long_rows_keep_fp32_accuracy():
    # sums over ~70k prototypes: a plain fp32 matrix-vector product would be off by ~1e-5 here
    logits = teacher_logits(6, 70001, torch.float32, seed=6, scale=0.3)
    ref = official_sinkhorn_float64(logits, 0.07)
    assert rel_err(sinkhorn_knopp_reference(logits, 0.07), ref) < 1e-6


def test_strided_logits(impl):
    # a transposed, column-sliced view: no unit stride along the prototypes
    storage = teacher_logits(2 * 261, 21, torch.bfloat16, seed=5)
    logits = storage.t()[:, ::2]
    assert logits.stride(1) != 1
    out = sinkhorn_knopp(logits, 0.1, impl=impl)
    assert rel_err(out, official_sinkhorn_float64(logits, 0.1)) < 1e-6
    assert out.is_contiguous()


def test_invariant_to_adding_a_constant(impl):
    # dyadic logits (multiples of 2^-10, |x| < 8): adding 4096 is exact in fp32, so any difference would be ours
    logits = torch.round(teacher_logits(37, 300, torch.float32, seed=1) * 1024) / 1024
    base = sinkhorn_knopp(logits, 0.05, impl=impl)
    for shift in (4096.0, -4096.0):
        shifted = sinkhorn_knopp(logits + shift, 0.05, impl=impl)
        assert (shifted - base).abs().max().item() <= 1e-6
    assert rel_err(base, official_sinkhorn_float64(logits, 0.05)) < 1e-6


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_n_valid_excludes_padding(impl, as_tensor):
    n_valid = 21
    logits = teacher_logits(37, 300, torch.float32, seed=2)
    # padding that would dominate the maximum, the mass and every column sum if it took part
    logits[n_valid:] = 1e4
    count = torch.tensor(n_valid) if as_tensor else n_valid
    out = sinkhorn_knopp(logits, 0.1, n_valid=count, impl=impl)
    assert (out[n_valid:] == 0).all()
    assert rel_err(out[:n_valid], official_sinkhorn_float64(logits[:n_valid], 0.1)) < 1e-6
    assert_distributions(out[:n_valid])


def test_no_valid_rows_gives_zeros(impl):
    logits = teacher_logits(9, 70, torch.float32, seed=3)
    out = sinkhorn_knopp(logits, 0.1, n_valid=0, impl=impl)
    assert out.shape == (9, 70) and (out == 0).all()


EXTREMES = {
    # |logits / T| up to ~1e4: exp underflows for almost every entry, in fp32 and in float64
    "one_hot": dict(row_scale=0.0, col_scale=0.0, noise=4.0, temperature=4e-4),
    "huge_logits": dict(row_scale=0.0, col_scale=0.0, noise=1e4, temperature=1.0),
    # samples hundreds of T apart: every entry of some rows underflows against the global maximum
    "dominated_rows": dict(row_scale=300.0, col_scale=300.0, noise=1.0, temperature=0.5),
    "dominated_cols": dict(row_scale=0.0, col_scale=3000.0, noise=1.0, temperature=1.0),
    # near-uniform targets
    "hot": dict(row_scale=0.0, col_scale=0.0, noise=1.0, temperature=1e4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(EXTREMES))
def test_extreme_temperatures(impl, dtype, case):
    spec = EXTREMES[case]
    gen = torch.Generator().manual_seed(len(case))
    shape = (37, 300)
    logits = (
        torch.randn(shape[0], 1, generator=gen) * spec["row_scale"]
        + torch.randn(1, shape[1], generator=gen) * spec["col_scale"]
        + torch.randn(*shape, generator=gen) * spec["noise"]
    ).to(dtype)
    temperature = spec["temperature"]
    out = sinkhorn_knopp(logits, temperature, impl=impl)
    assert_distributions(out)
    # fp32 rounds logits - max to ~6e-8 of its size; in units of T that bounds the exponent's error
    spread = (logits.float().max() - logits.float().min()).item() / temperature
    tolerance = 1e-6 + 6e-8 * spread
    assert rel_err(out, official_sinkhorn_log_float64(logits, temperature)) < tolerance


def test_log_domain_helper_is_the_official_algorithm():
    logits = teacher_logits(23, 91, torch.float32, seed=4)
    assert rel_err(official_sinkhorn_log_float64(logits, 0.1), official_sinkhorn_float64(logits, 0.1)) < 1e-12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(logits=torch.randn(2, 3, 4)), "2-D"),
        (dict(logits=torch.ones(4, 5, dtype=torch.int64)), "floating point"),
        (dict(logits=torch.randn(4, 0)), "prototypes"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(n_iter=0), "n_iter"),
        (dict(n_valid=5), r"\[0, 4\]"),
        (dict(n_valid=-1), r"\[0, 4\]"),
        (dict(n_valid=torch.tensor(2.0)), "integer"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_inputs_raise(kwargs, message):
    args = dict(logits=torch.randn(4, 5), temperature=0.1) | kwargs
    with pytest.raises(ValueError, match=message):
        sinkhorn_knopp(**args)


@pytest.mark.parametrize("entry", ["sinkhorn_knopp-reference", "sinkhorn_knopp-triton", "sinkhorn_knopp_reference"])
def test_arguments_are_checked_once(entry, monkeypatch):
    """One validation per call on every path (n_valid as a tensor costs a host sync each time it is read)."""
    calls = []
    original = sinkhorn._check_inputs

    def counted(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(sinkhorn, "_check_inputs", counted)
    logits, n_valid = teacher_logits(6, 40, torch.float32, seed=9), torch.tensor(4)
    if entry == "sinkhorn_knopp_reference":
        out = sinkhorn_knopp_reference(logits, 0.1, n_valid=n_valid)
    else:
        out = sinkhorn_knopp(logits, 0.1, n_valid=n_valid, impl=entry.removeprefix("sinkhorn_knopp-"))
    assert len(calls) == 1
    assert_distributions(out[:4])


def test_group_without_distributed_raises():
    with pytest.raises(ValueError, match="not initialized"):
        sinkhorn_knopp_reference(torch.randn(4, 5), 0.1, group=object())


def test_no_autograd_history():
    logits = torch.randn(5, 40, requires_grad=True)
    assert not sinkhorn_knopp(logits, 0.1).requires_grad


# ------------------------------------------------------------------------------------------------------------
# Two processes (gloo) against one process on the concatenated batch
# ------------------------------------------------------------------------------------------------------------

# (rows per rank, valid rows on rank 0, on rank 1): a DINO-like split and iBOT-like padded buffers
TWO_RANK_CASES = {"dino": (13, 13, 13), "ibot": (16, 11, 5), "ibot_empty_rank": (16, 7, 0)}
TWO_RANK_PROTOS = 300


def two_rank_inputs(case: str) -> tuple[list[torch.Tensor], list[int]]:
    rows, *n_valid = TWO_RANK_CASES[case]
    gen = torch.Generator().manual_seed(rows + sum(n_valid))
    buffers = [torch.randn(rows, TWO_RANK_PROTOS, generator=gen) * 2 for _ in range(2)]
    for buf, n in zip(buffers, n_valid):
        buf[n:] = 1e4  # padding that would dominate every sum if it took part
    return buffers, n_valid


def _two_rank_worker(rank: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for case in TWO_RANK_CASES:
            buffers, n_valid = two_rank_inputs(case)
            for impl in IMPLS:
                results[case, impl] = sinkhorn_knopp(buffers[rank], 0.1, n_valid=n_valid[rank], impl=impl)
        torch.save(results, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    out_path = str(tmp_path / "sinkhorn")
    mp.spawn(_two_rank_worker, args=(free_port(), out_path), nprocs=2, join=True)
    per_rank = [torch.load(f"{out_path}.{rank}") for rank in range(2)]
    for case in TWO_RANK_CASES:
        buffers, n_valid = two_rank_inputs(case)
        together = torch.cat([buf[:n] for buf, n in zip(buffers, n_valid)])
        official = official_sinkhorn_float64(together, 0.1)
        for impl in IMPLS:
            single = sinkhorn_knopp(together, 0.1, impl=impl)
            assert rel_err(single, official) < 1e-6
            start = 0
            for rank, n in enumerate(n_valid):
                out = per_rank[rank][case, impl]
                assert (out[n:] == 0).all(), (case, impl, rank)
                torch.testing.assert_close(out[:n], single[start:start + n], rtol=0, atol=1e-6)
                start += n
