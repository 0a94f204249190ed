"""Which fp32 attention tile faults on a GPU: every 32-bit config of the three attention kernels, one at a time.

The first GPU run of the fp32 Triton tiles ended in an illegal memory access inside the forward's autotuning
(docs/gpu_results.md, run 2), and a CUDA fault poisons the process: every later launch fails. So each config runs
in a child process that reports one JSON line per config; when a child dies, the config it was running is marked
`fault` (with the end of its stderr) and a new child goes on from the next one. A backward config is probed with
the forward (and, for dq, the dk/dv kernel) pinned to the first config that passed, so that an earlier kernel's
faulty tile cannot be blamed on it. Every autotune candidate (num_stages 2 and 3) is also probed unpipelined
(num_stages 1), the usual way around a software-pipeliner fault. With `--sanitizer` the first faulting config of
each kernel runs once more alone under `compute-sanitizer --tool memcheck`, whose report names the kernel, the
thread and the address. Each result is printed and saved as it comes, so a run cut short keeps what it measured.

    python bench/fp32_attention_probe.py --out gpu_results            # on the GPU; FP32_TRITON_ON_GPU is ignored
    python bench/fp32_attention_probe.py --dry-run                     # CPU, Triton's interpreter, tiny sizes

On the CPU the interpreter runs each config's tile sizes (not its warps or stages), which checks the numerics of
the tile shapes and the probe itself; `--simulate-fault NAME` aborts the child at that config (the recovery test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
TOLERANCE = 1e-4  # tf32x3 dots: ~1e-6 relative error; a wrong tile is off by far more
KERNELS = ("fwd", "dkdv", "dq")


@dataclass(frozen=True)
class Case:
    kernel: str  # "fwd", "dkdv" or "dq"
    head_dim: int
    outer: int  # the block a program owns (queries for fwd and dq, keys for dk/dv)
    inner: int  # the block its loop walks
    warps: int
    stages: int

    @property
    def name(self) -> str:
        return f"{self.kernel} D={self.head_dim} {self.outer}x{self.inner} w{self.warps} s{self.stages}"


def all_cases(dry_run: bool = False) -> list[Case]:
    """The 32-bit configs the autotune of each kernel may pick (num_stages 2 and 3), forward kernels first, each
    also unpipelined (num_stages 1: a pipeliner fault would pass there, a workaround to offer); on the
    interpreter, where warps and stages do not exist, one per tile shape."""
    from dino_kernels import rope_attention as ra

    shapes = {"fwd": ra._FWD_SHAPES, "dkdv": ra._DKDV_SHAPES, "dq": ra._DQ_SHAPES}
    return [Case(kernel, d, outer, inner, warps, stages)
            for kernel in KERNELS for d in ra.TRITON_HEAD_DIMS
            for outer, inner, warps in shapes[kernel][("32-bit", d)] for stages in ((2,) if dry_run else (2, 3, 1))]


def pin(case: Case) -> None:
    """Make `case` the only config its kernel's autotune can pick (on the GPU), or the interpreter's tile sizes."""
    import triton

    from dino_kernels import rope_attention as ra
    from dino_kernels.common import interpreting

    if interpreting():
        ra._INTERPRETER_BLOCK_OUTER, ra._INTERPRETER_BLOCK_INNER = case.outer, case.inner
        return
    tuned = {"fwd": ra._attn_fwd_tuned, "dkdv": ra._attn_bwd_dkdv_tuned, "dq": ra._attn_bwd_dq_tuned}[case.kernel]
    outer_name, inner_name = ("BLOCK_N", "BLOCK_M") if case.kernel == "dkdv" else ("BLOCK_M", "BLOCK_N")
    tuned.configs = [triton.Config({outer_name: case.outer, inner_name: case.inner}, num_warps=case.warps,
                                   num_stages=case.stages)]
    tuned.cache.clear()


def run_case(case: Case, device: str, n_tokens: int, rope_mode: str) -> dict:
    """Forward + backward of one config on fp32 inputs against float64: relative errors of out, dq, dk, dv."""
    import torch

    from dino_kernels import rope_attention as ra
    from models.rope import augment_coords, patch_coords, rope_periods

    ra.FP32_TRITON_ON_GPU = True  # the probe is what decides whether it may be switched back on
    n_prefix = 5
    side = max(1, int((n_tokens - n_prefix) ** 0.5))
    gen = torch.Generator().manual_seed(case.head_dim)
    coords = augment_coords(patch_coords(side, side + 1), shift=0.2, jitter=1.5, rescale=2.0, generator=gen)
    n = n_prefix + coords.shape[0]
    periods = rope_periods(case.head_dim).float()
    qkv = torch.randn(2, n, 3, 3, case.head_dim, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, n, 3, case.head_dim, generator=gen, dtype=torch.float64)

    qkv32 = qkv.float().to(device).requires_grad_()
    q, k, v = qkv32.unbind(2)
    for kernel in ("fwd", "dkdv", "dq"):
        if os.environ.get(f"PROBE_PIN_{kernel.upper()}"):
            pin(Case(**json.loads(os.environ[f"PROBE_PIN_{kernel.upper()}"])))
    pin(case)
    out = ra.rope_attention(q, k, v, coords.to(device), periods.to(device), n_prefix, impl="triton",
                            rope_mode=rope_mode)
    out.backward(grad_out.float().to(device))

    qkv64 = qkv.clone().requires_grad_()
    ref = ra.rope_attention_reference(*qkv64.unbind(2), coords.double(), periods.double(), n_prefix)
    ref.backward(grad_out)
    errors = {"out": out.double().cpu() - ref}
    errors.update({name: qkv32.grad[:, :, i].double().cpu() - qkv64.grad[:, :, i] for i, name in
                   enumerate(("dq", "dk", "dv"))})
    refs = {"out": ref, **{name: qkv64.grad[:, :, i] for i, name in enumerate(("dq", "dk", "dv"))}}
    rel = {name: (errors[name].norm() / refs[name].norm()).item() for name in errors}
    ok = all(value == value and value < TOLERANCE for value in rel.values())  # value == value: not NaN
    return dict(status="ok" if ok else "wrong", n_tokens=n, **rel)


def child(args: argparse.Namespace) -> None:
    """Run the cases from args.start on, one JSON line each; pin each kernel to its first passing config."""
    device = "cpu" if args.dry_run else "cuda"
    for index, case in enumerate(all_cases(args.dry_run)[args.start:], start=args.start):
        if args.only is not None and case.name != args.only:
            continue
        if case.name == args.simulate_fault:
            os.abort()
        result = dict(index=index, **asdict(case), name=case.name, **run_case(case, device, args.tokens,
                                                                              args.rope_mode))
        print(json.dumps(result), flush=True)
        key = f"PROBE_PIN_{case.kernel.upper()}"
        if result["status"] == "ok" and key not in os.environ:
            os.environ[key] = json.dumps(asdict(case))


def save(results: list[dict], out: Path | None) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "fp32_probe.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "fp32_probe.md").write_text(table(results) + "\n")


def probe(args: argparse.Namespace) -> list[dict]:
    """Children until every case has a line; a child that dies leaves its running case as `fault`. Each result is
    printed and saved as it comes: a run cut short by its time limit keeps what it measured."""
    cases, results, start, pins = all_cases(args.dry_run), [], 0, {}
    base = [sys.executable, str(Path(__file__).resolve()), "--child", "--tokens", str(args.tokens),
            "--rope-mode", args.rope_mode] + (["--dry-run"] if args.dry_run else [])
    if args.simulate_fault:
        base += ["--simulate-fault", args.simulate_fault]
    while start < len(cases):
        env = dict(os.environ, PYTHONPATH=str(REPO), **pins)
        if args.dry_run:
            env["TRITON_INTERPRET"] = "1"
        try:
            done = subprocess.run(base + ["--start", str(start)], env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired as expired:  # a hung config: what finished before it still counts
            stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            done = subprocess.CompletedProcess(expired.cmd, -9, stdout, f"child ran past {args.timeout} s")
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        results += lines
        for line in lines:
            print(f"{line['name']}: {line['status']}", flush=True)
        for line in lines:
            key = f"PROBE_PIN_{line['kernel'].upper()}"
            if line["status"] == "ok" and key not in pins:
                pins[key] = json.dumps({f: line[f] for f in Case.__dataclass_fields__})
        start = (lines[-1]["index"] + 1) if lines else start
        if done.returncode != 0 and start < len(cases):
            case = cases[start]
            results.append(dict(index=start, **asdict(case), name=case.name, status="fault",
                                stderr=done.stderr[-1500:]))
            print(f"{case.name}: fault", flush=True)
            start += 1
        save(results, args.out)
    if args.sanitizer:
        add_sanitizer_reports(args, results)
    return results


def add_sanitizer_reports(args: argparse.Namespace, results: list[dict]) -> None:
    sanitizer = shutil.which("compute-sanitizer") or next(
        (str(p) for p in Path("/usr/local").glob("cuda*/bin/compute-sanitizer")), None)
    reported = set()
    for result in results:
        # The first fault of each kernel: memcheck runs slowly, and one report per kernel names the cause.
        if result["status"] != "fault" or result["kernel"] in reported:
            continue
        reported.add(result["kernel"])
        if sanitizer is None:
            result["sanitizer"] = "compute-sanitizer not found"
            continue
        try:
            done = subprocess.run([sanitizer, "--tool", "memcheck", sys.executable, str(Path(__file__).resolve()),
                                   "--child", "--only", result["name"], "--tokens", str(args.tokens), "--rope-mode",
                                   args.rope_mode], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                                  text=True, timeout=args.timeout)
            result["sanitizer"] = "\n".join((done.stdout + done.stderr).splitlines()[:60])
        except subprocess.TimeoutExpired:
            result["sanitizer"] = f"compute-sanitizer ran past {args.timeout} s"
        print(f"{result['name']}: sanitizer report saved", flush=True)
        save(results, args.out)


def table(results: list[dict]) -> str:
    lines = ["| config | status | out | dq | dk | dv |", "|---|---|---|---|---|---|"]
    for r in results:
        errors = [f"{r[k]:.2e}" if k in r else "-" for k in ("out", "dq", "dk", "dv")]
        lines.append(f"| {r['name']} | {r['status']} | " + " | ".join(errors) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=261, help="sequence length (not a multiple of any block)")
    parser.add_argument("--rope-mode", default="inline", choices=("inline", "prerotate"))
    parser.add_argument("--dry-run", action="store_true", help="CPU: Triton's interpreter, tiny sizes")
    parser.add_argument("--sanitizer", action="store_true", help="rerun each faulting config under compute-sanitizer")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per child process")
    parser.add_argument("--out", type=Path, default=None, help="folder for fp32_probe.json and fp32_probe.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--simulate-fault", default=None, help="abort the child at this config name (tests)")
    args = parser.parse_args()
    if args.dry_run and args.tokens == 261:
        args.tokens = 47  # the interpreter runs every tile through numpy
    if args.child:
        child(args)
        return
    results = probe(args)
    print(table(results))
    faults = [r["name"] for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(faults)} of {len(results)} configs ok" + (f"; not ok: {faults}" if faults else ""))
    save(results, args.out)


if __name__ == "__main__":
    main()
