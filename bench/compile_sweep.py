"""Compile every Triton kernel of the project for sm_90 and sm_80 without a GPU and report what each variant needs.

    python bench/compile_sweep.py                   # the configs the dispatch can pick (after the autotune prunes)
    python bench/compile_sweep.py --all-configs     # every autotune config, pruned or not (the full sweep)
    python bench/compile_sweep.py --json out.json   # also write every variant as JSON

For each kernel x config x architecture x dtype (bf16, fp16, fp32) x head dim (64, 128; attention only) it prints
shared memory against the architecture's limit, registers and spill bytes per thread (ptxas -v), or the compile
error. The variants come from calling the public ops (forward and backward) on small CPU tensors inside
dino_kernels.aot.compile_only, so they are exactly what the dispatch launches. tests/test_compile.py checks the
dispatchable set on every commit; this script is the same sweep with the table printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("TRITON_INTERPRET", None)

ARCHS = (90, 80)
DTYPES = ("bfloat16", "float16", "float32")
HEAD_DIMS = (64, 128)
SINKHORN_SHAPES = ((40, 700), (300, 4099))  # small and larger problems, in case they take different kernels


KERNEL_GROUPS = ("attention", "sinkhorn", "gram")


def compile_cases(arch: int, all_configs: bool, group: str, dtype_name: str, variant: str = "") -> list[dict]:
    """Compile what one op dispatches for `arch` and one input dtype (every autotune config with all_configs).

    variant: for attention "D=<head dim> <rope mode>". One dict per compiled variant (dino_kernels.aot.Variant fields
    plus `fits`; meta["case"] names the case). The inputs mirror real calls (contiguous gradients, qkv views), so
    the compiled binaries are the ones Triton's cache serves to training at any batch, head count and length.
    """
    import torch

    from dino_kernels.aot import compile_only

    dtype = getattr(torch, dtype_name)
    with compile_only(arch, all_configs=all_configs) as variants:
        if group == "attention":
            from dino_kernels.rope_attention import rope_attention

            head_dim, rope_mode = int(variant.split()[0].removeprefix("D=")), variant.split()[1]
            n_tokens, n_prefix, heads = 70, 5, 2
            qkv = torch.randn(1, n_tokens, 3, heads, head_dim, dtype=dtype, requires_grad=True)
            coords, periods = torch.rand(n_tokens - n_prefix, 2), torch.rand(head_dim // 4) + 1
            out = rope_attention(*qkv.unbind(2), coords, periods, n_prefix, rope_mode=rope_mode)
            out.backward(torch.randn_like(out))
        elif group == "sinkhorn":
            from dino_kernels.sinkhorn import sinkhorn_knopp

            for shape in SINKHORN_SHAPES:
                sinkhorn_knopp(torch.randn(*shape, dtype=dtype), 0.07)
        elif group == "gram":
            from dino_kernels.gram import gram_loss

            remove_neg = variant == "remove_neg"
            student = torch.randn(2, 70, 48, dtype=dtype, requires_grad=True)
            teacher = torch.randn(2, 70, 48, dtype=dtype)
            gram_loss(student, teacher, remove_neg=remove_neg, impl="triton", algorithm="tiled").backward()
            with torch.no_grad():
                gram_loss(student, teacher, remove_neg=remove_neg, impl="triton", algorithm="tiled")
        for v in variants:
            v.meta["case"] = f"{group} {variant}".strip()
            v.meta["dtype"] = dtype_name
        return [dataclasses.asdict(v) | {"fits": v.fits} for v in variants]


def _compile_item(item: tuple) -> list[dict]:
    return compile_cases(*item)


def work_items(all_configs: bool, groups: tuple[str, ...], archs: tuple[int, ...]) -> list[tuple]:
    """(arch, all_configs, group, dtype, variant) for every case; the Gram tiles always take float32 U and V."""
    items = []
    for arch in archs:
        for group in groups:
            for dtype in DTYPES if group != "gram" else ("float32",):
                variants = {"attention": [f"D={d} {m}" for d in HEAD_DIMS for m in ("inline", "prerotate")],
                            "gram": ["", "remove_neg"]}.get(group, [""])
                items += [(arch, all_configs, group, dtype, variant) for variant in variants]
    return items


def sweep(
    all_configs: bool, groups: tuple[str, ...] = KERNEL_GROUPS, archs: tuple[int, ...] = ARCHS,
    processes: int | None = None,
) -> list[dict]:
    """Every case compiled in a pool of fresh processes (compiling is CPU-bound, and each process keeps its own
    Triton state); the variants come back in a fixed order."""
    items = work_items(all_configs, groups, archs)
    processes = processes or min(len(items), os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked CUDA or Triton state
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        parts = list(pool.map(_compile_item, items))
    return [record for part in parts for record in part]


_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_B", "BLOCK_K", "BLOCK_P", "BLOCK_DO")


def format_row(r: dict) -> str:
    from dino_kernels.common import SHARED_MEMORY_LIMITS

    tiles = ",".join(f"{k[6:]}={r['meta'][k]}" for k in _TILE_KEYS if k in r["meta"])
    what = f"sm_{r['arch']} {r['meta'].get('case', ''):<30} {r['meta'].get('dtype', ''):<8} {r['kernel']:<24}"
    shape = f"{tiles:<22} w{r['num_warps']} s{r['num_stages']}"
    if r["error"]:
        return f"{what} {shape} ERROR {r['error']}"
    status = "ok" if r["fits"] else "TOO MUCH SHARED MEMORY"
    return (f"{what} {shape} smem {r['shared']:>6}/{SHARED_MEMORY_LIMITS[r['arch']]} regs {r['registers']} "
            f"spills {r['spill_bytes']} {status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not only those kept")
    parser.add_argument("--kernels", default=",".join(KERNEL_GROUPS), help="comma-separated subset")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 90,80")
    parser.add_argument("--processes", type=int, default=None, help="parallel compile processes (default: CPUs)")
    parser.add_argument("--json", type=Path, help="write the variants to this file")
    parser.add_argument("--quiet", action="store_true", help="print only the summary (e.g. to warm Triton's cache)")
    args = parser.parse_args()
    records = sweep(args.all_configs, tuple(args.kernels.split(",")), tuple(int(a) for a in args.arch.split(",")),
                    args.processes)
    if not args.quiet:
        for record in records:
            print(format_row(record))
    bad = [r for r in records if r["error"] or not r["fits"]]
    spilled = [r for r in records if r["spill_bytes"]]
    print(f"{len(records)} variants: {len(bad)} fail to compile or exceed shared memory, {len(spilled)} spill")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
