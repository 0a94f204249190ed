"""Per-rank peak memory and time of saving and resuming a checkpoint: the single file gathered on rank 0 against
the sharded (torch.distributed.checkpoint) folder, for an FSDP run of several gloo processes on the CPU.

    python -m bench.bench_checkpoint_memory                      # vit_base, full-size heads, 4 processes
    python -m bench.bench_checkpoint_memory --arch vit_small --nproc 2

For each format, one launch trains one step and saves (checkpoint_every 1), a second launch resumes from that
checkpoint and trains one more step. In every rank `train.Checkpointer.save` and `train.restore_or_initialize` are
wrapped to record the phase's peak resident set size (Linux's VmHWM, reset before the phase), the resident size
it started from and its wall time. The table shows per format the worst rank's peak during the save and during the
resume, the largest increase over where the phase started, and the slowest rank's time.

vit_base with 65536-prototype heads is the default: with vit_large, the single-file resume of 4 processes needs
about 28 GB (every rank reads the whole 5.6 GB file next to its shards), more than a 24 GB machine has -- the very
failure the sharded format removes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADS = ["--model.dino-prototypes", "65536", "--model.ibot-prototypes", "65536", "--model.dino-hidden", "2048",
         "--model.ibot-hidden", "2048", "--model.dino-bottleneck", "256", "--model.ibot-bottleneck", "256"]
SMALL_STEP = ["--data.batch-size", "2", "--data.global-size", "32", "--data.local-size", "16",
              "--augment.n-local-crops", "2", "--data.num-workers", "0", "--data.path", "procedural",
              "--model.kernel-impl", "reference", "--model.attn-impl", "sdpa", "--run.device", "cpu",
              "--run.parallel", "fsdp", "--run.knn-every", "0", "--run.dense-every", "0", "--run.checkpoint-every", "1",
              "--run.log-every", "1", "--optim.lr.warmup-iterations", "0", "--optim.freeze-last-layer-iterations", "0"]


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(record_prefix: str, argv: list[str]) -> None:
    """Inside torchrun: train.py's main with its save and resume phases measured; each rank writes a JSON file.
    Before a phase the kernel's peak-RSS counter is reset (/proc/self/clear_refs), so the peak after it is the
    phase's own: what the process held at the phase's worst moment."""
    import runtime
    import train

    events: list[dict] = []

    def measured(name: str, fn):
        def run(*args, **kwargs):
            Path("/proc/self/clear_refs").write_text("5")
            before, t0 = _status_mib("VmRSS"), time.perf_counter()
            out = fn(*args, **kwargs)
            events.append({"phase": name, "seconds": time.perf_counter() - t0, "rss_before_mib": before,
                           "peak_mib": _status_mib("VmHWM")})
            return out
        return run

    train.restore_or_initialize = measured("resume", train.restore_or_initialize)
    train.Checkpointer.save = measured("save", train.Checkpointer.save)
    try:
        train.main(argv)
    finally:
        Path(f"{record_prefix}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(events))
    runtime.leave_torchrun_worker()  # as train.py's run_cli ends a worker


def launch(nproc: int, argv: list[str], record_prefix: Path, timeout_s: float) -> list[list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "bench.bench_checkpoint_memory", "--worker", str(record_prefix), "--", *argv]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(Path(f"{record_prefix}.rank{rank}.json").read_text()) for rank in range(nproc)]


def phase(ranks: list[list[dict]], name: str) -> dict:
    rows = [next(e for e in events if e["phase"] == name) for events in ranks]
    return {"peak_mib": max(r["peak_mib"] for r in rows),
            "increase_mib": max(r["peak_mib"] - r["rss_before_mib"] for r in rows),
            "seconds": max(r["seconds"] for r in rows)}


def measure(arch: str, nproc: int, folder: Path, timeout_s: float, heads: list[str] = HEADS) -> dict[str, dict]:
    results = {}
    for fmt in ("file", "sharded"):
        out = folder / fmt
        common = ["demo", "--model.arch", arch, *heads, *SMALL_STEP, "--run.checkpoint-format", fmt,
                  "--run.output-dir", str(out)]
        saved = launch(nproc, [*common, "--optim.iterations", "1"], folder / f"{fmt}-save", timeout_s)
        resumed = launch(nproc, [*common, "--optim.iterations", "2"], folder / f"{fmt}-resume", timeout_s)
        checkpoint = out / ("checkpoint_00000001.pth" if fmt == "file" else "checkpoint_00000001")
        size = checkpoint.stat().st_size if checkpoint.is_file() else sum(
            p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        results[fmt] = {"save": phase(saved, "save"), "resume": phase(resumed, "resume"), "bytes": size}
    return results


def report(results: dict[str, dict], arch: str, nproc: int) -> str:
    lines = [f"{arch} with 65536-prototype heads, FSDP over {nproc} gloo processes on the CPU (float32); per-rank "
             "figures are the worst rank's",
             "| format | checkpoint size | save: peak RSS (+ over its start) | save time | "
             "resume: peak RSS (+ over its start) | resume time |", "|---|---|---|---|---|---|"]
    for fmt, r in results.items():
        s, m = r["save"], r["resume"]
        lines.append(f"| {fmt} | {r['bytes'] / 2**30:.2f} GiB | {s['peak_mib'] / 1024:.2f} GiB "
                     f"(+{s['increase_mib'] / 1024:.2f}) | {s['seconds']:.1f} s | {m['peak_mib'] / 1024:.2f} GiB "
                     f"(+{m['increase_mib'] / 1024:.2f}) | {m['seconds']:.1f} s |")
    file, sharded = results["file"], results["sharded"]
    lines.append(f"sharded / file: resume peak {sharded['resume']['peak_mib'] / file['resume']['peak_mib']:.2f}x, "
                 f"save time {sharded['save']['seconds'] / file['save']['seconds']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        separator = argv.index("--")
        worker(argv[1], argv[separator + 1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_base")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per launch")
    parser.add_argument("--keep", help="folder for the runs (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ckpt-memory-"))
    try:
        print(report(measure(args.arch, args.nproc, folder, args.timeout_s), args.arch, args.nproc))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
