"""Helpers shared by the micro-benchmarks: machine peaks, GPU gating and peak-memory measurement."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine: GPU timings need one"
)


@functools.cache
def matmul_peak_gflops(device: str = "cpu", n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Best measured n x n matmul rate on this device (GFLOP/s): the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def report(name: str, **figures: float | str) -> None:
    """Print one benchmark's figures on one line (pytest -s shows them; `pytest bench/` keeps them in the log)."""
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()]
    print(f"\n[bench] {name}: " + " ".join(parts))


def peak_rss_of(code: str, timeout: float = 600) -> dict:
    """Run `code` in a fresh Python and return the JSON dict it prints last, with the peak-RSS increase.

    The snippet runs after a baseline (imports done) is recorded; `peak_mib` is the extra resident memory its
    work needed. The peak is the kernel's high-water mark (VmHWM), reset before the snippet through
    /proc/self/clear_refs: getrusage's maxrss is not usable here, since a child of a large process (pytest)
    can report the parent's peak.
    """
    prelude = (
        "import json, re, sys, time, torch\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "def _hwm_kib():\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "def _rss_kib():\n"
        "    return int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "_base = _rss_kib()\n"
        "_result = {}\n"
    )
    epilogue = (
        "\n_result['peak_mib'] = (_hwm_kib() - _base) / 1024\n"
        "print(json.dumps(_result))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", prelude + code + epilogue],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_call(fn: Callable[[], object], repeats: int = 3, device: str = "cpu") -> float:
    """Best wall time of fn() over `repeats` runs, after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best
