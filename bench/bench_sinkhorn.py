"""Sinkhorn-Knopp teacher centering: ours against the official formulation (in-place normalizations of B x K).

Cases: B in {64, 256} samples x K in {65536, 262144} prototypes, a 16-sample batch of 262144 prototypes, and on a
GPU a 4096 x 65536 batch (iBOT-like: masked patches of a large batch); n_iter = 3.

Roofline, per element of the B x K logits (e bytes each: 4 for fp32, 2 for bf16), n_iter = 3:
- official: exp(logits.float() / T) divides (read 4, write 4) then exponentiates (read 4, write 4) -- plus an
  upcast (read e, write 4) for bf16 input -- and sums the mass (4); every iteration reads Q for the column sums
  (4), rewrites it twice (/ sums, / K: 16), reads it for the row sums (4) and rewrites it twice (/ sums, / B: 16);
  a last rewrite multiplies by B (8). In all 8 + 8 + 4 + 3 * 40 + 8 = 148 bytes (fp32 input), 154 (bf16), with
  two fp32 B x K buffers alive at once. ~20 FLOPs per element: memory-bound on any machine.
- ours, CPU (`sinkhorn_knopp_reference`): column max (e), F = logits - M (e + 4), row max (4), scale and
  exp in place (8 + 8), 3 iterations of two matrix-vector products over F (3 * 8), Q = F * c * u in place (16):
  2e + 64 = 72 bytes (fp32), one fp32 B x K buffer (the output itself). About 2x less traffic and half the
  memory of the official code.
- ours, Triton: the logits are read once per pass, 2 * n_iter + 1 = 7 passes, and Q is written once:
  7e + 4 = 18 bytes (bf16) per element, plus the partial sums of split reductions (a few K- or B-vectors per
  pass, well under 1 % here) and the K- and B-vectors the passes exchange (cache hits). FLOPs per element and
  pass ~ 6 (two subtractions, a multiply, exp2, a multiply-add), 42 in all: 42 / 18 ~ 2.3 FLOP/byte, far below
  an H100 SXM's ridge point (~67 TFLOP/s fp32 over 3.35 TB/s ~ 20 FLOP/byte; its exp2 units handle ~4e12/s
  against 1.7e12 bf16 elements/s of bandwidth), so the kernels are memory-bound: time ~ bytes / bandwidth,
  e.g. B = 256, K = 262144 in bf16: 1.2 GB, ~0.36 ms at 3.35 TB/s, against ~10 GB (~3 ms) for the official code.

Each case prints time, ratio, peak memory (measured in a fresh subprocess) and, on a GPU, bytes moved and GB/s
against the device's nominal bandwidth, and the host time of one call (launches and allocations: what bounds the
small cases). CPU timings are noisy on a shared machine: the figures are best-of-N.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.common import peak_rss_of, report, requires_cuda, time_call
from dino_kernels.sinkhorn import sinkhorn_knopp

CASES = [(16, 262144), (64, 65536), (64, 262144), (256, 65536), (256, 262144)]
CASE_IDS = [f"B{b}-K{k}" for b, k in CASES]
GPU_CASES = CASES + [(4096, 65536)]  # 512 MiB of bf16 logits; the CPU run of the official code would take minutes
GPU_CASE_IDS = [f"B{b}-K{k}" for b, k in GPU_CASES]
TEMPERATURE = 0.07
N_ITER = 3
LOGIT_SCALE = 0.3  # |logits| / T stays below ~30: the official code's exp neither overflows nor goes subnormal


def official_sinkhorn(
    teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = N_ITER,
    dtype: torch.dtype = torch.float32, subtract_max: bool = False,
) -> torch.Tensor:
    """The official teacher centering on one process: exp, then in-place normalizations (B_global = every row).

    As released it runs in float32 without max subtraction (what this bench times); tests/test_sinkhorn.py uses
    it in float64 with the global max subtracted first, which the mass normalization cancels exactly.
    """
    logits = teacher_output.to(dtype)
    if subtract_max:
        logits = logits - logits.max()
    q = torch.exp(logits / teacher_temp).t()
    n_protos, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


def bench_logits(n_samples: int, n_protos: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randn(n_samples, n_protos, generator=gen, device=device).mul_(LOGIT_SCALE).to(dtype)


def peak_memory_of(call: str, n_samples: int, n_protos: int, dtype: str, device: str) -> dict:
    """Peak extra memory of one call in a fresh process, beyond the logits (host RSS, and GPU allocator peak).

    The host figure is the rise of VmHWM (Linux's resident high-water mark of this process) over the call, after
    clear_refs restarts it: getrusage's ru_maxrss (what peak_rss_of's own peak_mib reads) also carries the
    high-water mark of the process that spawned the subprocess -- pytest, holding gigabytes after the bigger
    cases -- and then hides the call's peak.
    """
    code = f"""
from bench.bench_sinkhorn import bench_logits, official_sinkhorn, TEMPERATURE
from dino_kernels.sinkhorn import sinkhorn_knopp
def _resident_high_water_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
logits = bench_logits({n_samples}, {n_protos}, torch.{dtype}, {device!r})
with open("/proc/self/clear_refs", "w") as _clear:
    _clear.write("5")
if {device!r} == "cuda":
    torch.cuda.synchronize()
    _gpu_before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
_before = _resident_high_water_kib()
q = {call}
if {device!r} == "cuda":
    torch.cuda.synchronize()
    _result["gpu_peak_mib"] = (torch.cuda.max_memory_allocated() - _gpu_before) / 2**20
_result["call_peak_mib"] = (_resident_high_water_kib() - _before) / 1024
"""
    return peak_rss_of(code)


def official_bytes(n_samples: int, n_protos: int, elem_bytes: int) -> int:
    upcast = 0 if elem_bytes == 4 else elem_bytes + 4
    per_element = upcast + 8 + 8 + 4 + N_ITER * (4 + 8 + 8 + 4 + 8 + 8) + 8
    return per_element * n_samples * n_protos


def triton_bytes(n_samples: int, n_protos: int, elem_bytes: int) -> int:
    """Compulsory traffic of the Triton path: 2 * n_iter + 1 reads of the logits, one fp32 write of Q."""
    return ((2 * N_ITER + 1) * elem_bytes + 4) * n_samples * n_protos


def device_bandwidth_gbps() -> float:
    """Nominal DRAM bandwidth of the current GPU: 2 transfers per memory clock over the bus width."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9


def rounds_for(n_samples: int, n_protos: int) -> int:
    """Best-of-N: more rounds for the small cases, whose ~50 ms runs a busy shared CPU easily disturbs."""
    return max(5, min(20, 200_000_000 // (n_samples * n_protos)))


def host_time(fn, rounds: int) -> float:
    """Best host-side duration of one call started on an idle GPU (no synchronization inside the timing)."""
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    torch.cuda.synchronize()
    return best


def best_time(benchmark, fn, device: str, rounds: int) -> float:
    """Time `fn` through pytest-benchmark (best of `rounds`), or by hand when benchmarking is disabled."""
    def call():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    return stats.stats.min if stats is not None else time_call(fn, repeats=rounds, device=device)


@pytest.mark.parametrize("n_samples, n_protos", CASES, ids=CASE_IDS)
def test_sinkhorn_cpu(benchmark, n_samples, n_protos):
    logits = bench_logits(n_samples, n_protos, torch.float32, "cpu")
    ours = sinkhorn_knopp(logits, TEMPERATURE, N_ITER)
    official = official_sinkhorn(logits, TEMPERATURE)
    # same numbers (a correctness guard for the figures, not a timing assertion)
    assert ((ours - official).norm() / official.norm()).item() < 1e-5
    del ours, official

    rounds = rounds_for(n_samples, n_protos)
    t_ours = best_time(benchmark, lambda: sinkhorn_knopp(logits, TEMPERATURE, N_ITER), "cpu", rounds)
    t_official = time_call(lambda: official_sinkhorn(logits, TEMPERATURE), repeats=rounds)
    mem_ours = peak_memory_of("sinkhorn_knopp(logits, TEMPERATURE)", n_samples, n_protos, "float32", "cpu")
    mem_official = peak_memory_of("official_sinkhorn(logits, TEMPERATURE)", n_samples, n_protos, "float32", "cpu")
    figures = dict(
        ours_ms=t_ours * 1e3, official_ms=t_official * 1e3, speedup=t_official / t_ours,
        ours_peak_mib=mem_ours["call_peak_mib"], official_peak_mib=mem_official["call_peak_mib"],
        output_mib=n_samples * n_protos * 4 / 2**20,
    )
    benchmark.extra_info.update(figures)
    report(f"sinkhorn cpu B={n_samples} K={n_protos} fp32", **figures)


@requires_cuda
@pytest.mark.parametrize("n_samples, n_protos", GPU_CASES, ids=GPU_CASE_IDS)
def test_sinkhorn_gpu(benchmark, n_samples, n_protos):
    logits = bench_logits(n_samples, n_protos, torch.bfloat16, "cuda")
    ours = sinkhorn_knopp(logits, TEMPERATURE, N_ITER)
    official = official_sinkhorn(logits, TEMPERATURE)
    assert ((ours - official).norm() / official.norm()).item() < 1e-5
    del ours, official

    rounds = 20
    t_ours = best_time(benchmark, lambda: sinkhorn_knopp(logits, TEMPERATURE, N_ITER), "cuda", rounds)
    t_official = time_call(lambda: official_sinkhorn(logits, TEMPERATURE), repeats=rounds, device="cuda")
    t_torch = time_call(lambda: sinkhorn_knopp(logits, TEMPERATURE, impl="reference"), repeats=rounds, device="cuda")
    t_host = host_time(lambda: sinkhorn_knopp(logits, TEMPERATURE, N_ITER), rounds)
    ours_bytes = triton_bytes(n_samples, n_protos, 2)
    peak = device_bandwidth_gbps()
    mem_ours = peak_memory_of("sinkhorn_knopp(logits, TEMPERATURE)", n_samples, n_protos, "bfloat16", "cuda")
    mem_official = peak_memory_of("official_sinkhorn(logits, TEMPERATURE)", n_samples, n_protos, "bfloat16", "cuda")
    figures = dict(
        ours_ms=t_ours * 1e3, official_ms=t_official * 1e3, torch_scaling_ms=t_torch * 1e3,
        speedup=t_official / t_ours, ours_host_ms=t_host * 1e3,
        ours_gb=ours_bytes / 1e9, ours_gbps=ours_bytes / t_ours / 1e9, device_gbps=peak,
        ours_of_peak=ours_bytes / t_ours / 1e9 / peak,
        official_gbps=official_bytes(n_samples, n_protos, 2) / t_official / 1e9,
        ours_gpu_peak_mib=mem_ours["gpu_peak_mib"], official_gpu_peak_mib=mem_official["gpu_peak_mib"],
        output_mib=n_samples * n_protos * 4 / 2**20,
    )
    benchmark.extra_info.update(figures)
    report(f"sinkhorn gpu B={n_samples} K={n_protos} bf16", **figures)
