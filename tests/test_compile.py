"""Every Triton kernel config the dispatch can pick compiles for real GPUs (sm_90 and sm_80), with no GPU here.

The interpreter that runs the other kernel tests accepts programs a GPU rejects (too much shared memory, register
spills that make a kernel crawl). This module compiles, ahead of time with Triton's own ptxas, exactly what the
public ops launch (bench/compile_sweep.py: forward and backward on small CPU tensors under dino_kernels.aot), for
bf16 / fp16 / fp32 inputs and head dims 64 and 128, and checks each variant against the architecture's limits.
The sweep runs once per session in a subprocess (kernels cannot be compiled while TRITON_INTERPRET is set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from dino_kernels.common import SHARED_MEMORY_LIMITS

REPO_ROOT = Path(__file__).resolve().parent.parent
# fp32 attention runs tf32x3 dots (three MMAs per product, both operand halves in registers): its tiles are
# the least-spilling shapes found (dino_kernels/rope_attention.py), within this stack frame per thread. A larger frame
# means ptxas gave up on the registers (one shape fell to 32 registers and 7.5 KB of stack on sm_80).
FP32_ATTENTION_MAX_SPILL_BYTES = 4096


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile") / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "compile_sweep.py"), "--quiet", "--json", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, f"compile sweep failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(out.read_text())


def describe(v: dict) -> str:
    return f"sm_{v['arch']} {v['meta'].get('case')} {v['meta'].get('dtype')} {v['kernel']} {v['meta']}"


def test_every_variant_compiles(variants):
    errors = [f"{describe(v)}: {v['error']}" for v in variants if v["error"]]
    assert not errors, "\n".join(errors)


def test_every_variant_fits_shared_memory(variants):
    over = [f"{describe(v)}: {v['shared']} > {SHARED_MEMORY_LIMITS[v['arch']]} bytes"
            for v in variants if not v["error"] and v["shared"] > SHARED_MEMORY_LIMITS[v["arch"]]]
    assert not over, "\n".join(over)


def test_every_case_keeps_a_config_on_both_architectures(variants):
    """Attention: fwd, dk/dv and dq kernels for each (head dim, RoPE placement, dtype, arch); Sinkhorn and Gram:
    something for each dtype and arch. An empty case would mean the op raises on that GPU."""
    kernels_per_case = defaultdict(set)
    for v in variants:
        if not v["error"]:
            kernels_per_case[(v["arch"], v["meta"]["case"], v["meta"]["dtype"])].add(v["kernel"])
    expected = {
        f"attention D={d} {mode}": {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                                    "_bwd_delta_kernel"} | ({"_rope_prologue_kernel"} if mode == "prerotate" else set())
        for d in (64, 128) for mode in ("inline", "prerotate")
    }
    missing = []
    for arch in (90, 80):
        for dtype in ("bfloat16", "float16", "float32"):
            for case, needed in expected.items():
                absent = needed - kernels_per_case[(arch, case, dtype)]
                if absent:
                    missing.append(f"sm_{arch} {case} {dtype}: no variant of {sorted(absent)}")
            if not kernels_per_case[(arch, "sinkhorn", dtype)]:
                missing.append(f"sm_{arch} sinkhorn {dtype}: nothing compiled")
        for case in ("gram", "gram remove_neg"):
            if not kernels_per_case[(arch, case, "float32")]:
                missing.append(f"sm_{arch} {case}: nothing compiled")
    assert not missing, "\n".join(missing)


def test_16_bit_variants_do_not_spill_on_hopper(variants):
    spilled = [f"{describe(v)}: {v['spill_bytes']} bytes of stack, {v['registers']} registers"
               for v in variants if not v["error"] and v["arch"] == 90 and v["meta"]["dtype"] != "float32"
               and v["spill_bytes"]]
    assert not spilled, "\n".join(spilled)


def test_fp32_attention_spills_little(variants):
    heavy = [f"{describe(v)}: {v['spill_bytes']} bytes of stack"
             for v in variants if not v["error"] and v["meta"]["dtype"] == "float32"
             and v["meta"]["case"].startswith("attention") and v["spill_bytes"] > FP32_ATTENTION_MAX_SPILL_BYTES]
    assert not heavy, "\n".join(heavy)
