"""The GPU timings of bench/gpu_check.sh: the three kernels against their baselines, and a training step.

    python bench/gpu_timings.py --out DIR [--sections attention,sinkhorn,gram,train,distill,loader,curate] [--dry-run]

Writes DIR/timings.json (every figure) and DIR/timings.md (the tables), rewritten after each section so that a
run cut short keeps what it measured. GPU times are triton.testing.do_bench medians (CUDA events, L2 flushed
between runs). --dry-run runs every section on the CPU at tiny sizes through the PyTorch paths (wall-clock
medians): it exercises this script in CI; its figures mean nothing.

Sections (the issue "Kernels proven for real GPUs"):
- attention: forward and forward+backward, bf16, D = 64, N = 54 / 261 / 1029 / 2309 / 4101 (112 / 256 / 512 / 768 /
  1024 px crops), B x 16 heads with B·H·N ≈ 2^19 token-heads; providers: the Triton kernel with RoPE in the loop
  ("triton-inline") and with a rotation prologue ("triton-prerotate"), RoPE in torch + SDPA's flash backend (the
  official code's approach), xformers when installed, and SDPA flash without RoPE ("fa2-no-rope", the
  FlashAttention-2 yardstick). TFLOP/s count 4·B·H·N²·D forward and 3.5× that for forward+backward. Also D = 128
  (the 7B) and fp32 at one size each.
- sinkhorn: [4096, 65536], [64, 65536], [256, 262144] and [16, 262144] bf16 logits, T = 0.07, 3 iterations, against
  the official eager formula; GB/s of the bytes each must move, against the measured copy bandwidth.
- gram: forward+backward at B = 4, P = 1024 / 4096, d = 384 / 1024 / 4096, against the materializing formulation
  (time and allocator peak); the tiled algorithm also timed alone (Triton and PyTorch slabs), and remove_neg; with
  remove_neg also PyTorch slabs of 2^23 and 2^25 floats (the default 2^21: fewer, larger products).
- train: 30 steps of vit_large at 2 x 256 + 8 x 112 px, batch 32, bf16 autocast, 65536 prototypes: the project's
  kernels against attn_impl=sdpa + the PyTorch reference kernels, and (not in --quick) the project's kernels with
  torch's fused AdamW; images/s and MFU of the measured bf16 peak.
- distill: 20 distill.py steps into a torchvision ResNet-50 from a ViT-L/16 teacher (features objective), bf16, batch
  64 of 2 x 224 + 8 x 96 px: images/s and allocator peak (the issue "Distill into the model you deploy").
- loader: train.py's data loader alone at the vitl16-im1k recipe on the bundled photos, with 4, 8 and all cores as
  workers: the images/s the CPUs can feed.
- curate: curate.py's GPU steps, a ViT-L/16 forward at 224 px in bf16 (embed) and one Lloyd iteration over 1M x 384
  points with 16384 centroids (cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import matmul_peak_gflops  # noqa: E402

SECTIONS = ("attention", "sinkhorn", "gram", "train", "distill", "loader", "curate")
# fp32 rows: what fp32 costs in the kernel (tf32x3 dots), against RoPE in torch + SDPA's own fp32 choice (its
# flash backend takes 16-bit inputs only).
FP32_PROVIDERS = ("triton-inline", "triton-prerotate", "torch-rope-sdpa")


class Timer:
    """Median milliseconds of fn(): do_bench on a GPU, a short wall-clock loop on the CPU (dry runs)."""

    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn: Callable[[], object], rep_ms: int = 100) -> float:
        if self.device == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def peak_mib(self, fn: Callable[[], object]) -> float | None:
        """Allocator peak above what was allocated before one call (GPU only)."""
        if self.device != "cuda":
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def bf16_matmul_tflops(device: str) -> float:
    """Measured dense bf16 peak: an 8192³ product on the GPU (the MFU denominator), fp32 512³ on the CPU."""
    if device == "cuda":
        return matmul_peak_gflops(device, n=8192, dtype=torch.bfloat16) / 1e3
    return matmul_peak_gflops(device, n=512) / 1e3


def copy_bandwidth_gbps(device: str) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB."""
    n = (1 << 28) if device == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = Timer(device)(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


# ------------------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------------------


def attention_section(timer: Timer, dry_run: bool, quick: bool = False) -> list[dict]:
    from bench.bench_rope_attention import N_PREFIX, forward_flops, make_problem
    from dino_kernels.rope_attention import rope_attention
    from models.vit import attention

    device = timer.device
    heads = 16 if not dry_run else 2
    sides = (3, 5) if dry_run else (7, 16, 32, 64) if quick else (7, 16, 32, 48, 64)
    cases = [(side, 64, torch.bfloat16) for side in sides]
    if quick:
        cases += [(16, 128, torch.bfloat16), (16, 64, torch.float32)]
    elif not dry_run:
        cases += [(16, 128, torch.bfloat16), (32, 128, torch.bfloat16), (16, 64, torch.float32),
                  (32, 128, torch.float32)]
    else:
        cases = [(side, 64, torch.float32) for side in sides]
    providers = ["triton-inline", "triton-prerotate", "torch-rope-sdpa-flash", "fa2-no-rope", "xformers"]
    if dry_run:
        providers = ["reference", "torch-rope-sdpa"]
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        providers = [p for p in providers if p != "xformers"]

    def attend(provider: str, q, k, v, rope):
        if provider.startswith("triton"):
            return rope_attention(q, k, v, rope.coords, rope.periods, N_PREFIX, impl="triton",
                                  rope_mode=provider.removeprefix("triton-"))
        if provider == "reference":
            return rope_attention(q, k, v, rope.coords, rope.periods, N_PREFIX, impl="reference")
        if provider == "xformers":
            return attention(q, k, v, rope, N_PREFIX, "xformers")
        if provider == "fa2-no-rope":
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2))
            return out.transpose(1, 2)
        return attention(q, k, v, rope, N_PREFIX, "sdpa")

    def backends(provider: str):
        """SDPA restricted to its flash backend for the providers that name it (a GPU-only backend)."""
        if device != "cuda" or provider not in ("torch-rope-sdpa-flash", "fa2-no-rope"):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    rows = []
    for side, head_dim, dtype in cases:
        n_tokens = N_PREFIX + side * side
        h = heads if head_dim == 64 else max(1, heads * 2)
        batch = max(1, round(2**19 / (h * n_tokens))) if not dry_run else 1
        qkv, rope = make_problem(batch, h, n_tokens, head_dim, dtype, device)
        grad = torch.randn(batch, n_tokens, h, head_dim, device=device, dtype=dtype)
        for provider in providers if dtype != torch.float32 or dry_run else FP32_PROVIDERS:
            for mode in ("fwd", "fwd_bwd"):
                q, k, v = qkv.unbind(2)

                def run():
                    with backends(provider):
                        if mode == "fwd":
                            with torch.no_grad():
                                attend(provider, q, k, v, rope)
                        else:
                            torch.autograd.grad(attend(provider, q, k, v, rope), qkv, grad)

                try:
                    ms = timer(run)
                except Exception as error:  # a provider that cannot run this case is a row, not a crash
                    rows.append(dict(N=n_tokens, D=head_dim, dtype=str(dtype)[6:], provider=provider, mode=mode,
                                     error=f"{type(error).__name__}: {str(error)[:200]}"))
                    continue
                flops = forward_flops(batch, h, n_tokens, head_dim) * (1.0 if mode == "fwd" else 3.5)
                rows.append(dict(N=n_tokens, D=head_dim, dtype=str(dtype)[6:], B=batch, H=h, provider=provider,
                                 mode=mode, ms=ms, tflops=flops / ms / 1e9, peak_mib=timer.peak_mib(run)))
        del qkv, grad
    _add_ratios(rows, ("N", "D", "dtype", "mode"), "provider",
                "torch-rope-sdpa-flash" if not dry_run else "torch-rope-sdpa", "ms", "speedup_vs_torch_sdpa")
    if not dry_run:
        _add_ratios(rows, ("N", "D", "dtype", "mode"), "provider", "fa2-no-rope", "ms", "speed_of_fa2")
        _add_ratios(rows, ("N", "D", "dtype", "mode"), "provider", "torch-rope-sdpa", "ms", "speedup_vs_torch_sdpa")
    return rows


def _add_ratios(rows: list[dict], group: tuple, who: str, baseline: str, field: str, name: str) -> None:
    """rows[name] = baseline's time / this row's time, within each group of rows that share `group` values."""
    base = {tuple(r[g] for g in group): r[field] for r in rows if r.get(who) == baseline and field in r}
    for r in rows:
        key = tuple(r[g] for g in group)
        if key in base and field in r:
            r[name] = base[key] / r[field]


# ------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ------------------------------------------------------------------------------------------------------------


def sinkhorn_section(timer: Timer, dry_run: bool, bandwidth_gbps: float, quick: bool = False) -> list[dict]:
    from bench.bench_sinkhorn import N_ITER, TEMPERATURE, bench_logits, official_bytes, official_sinkhorn, triton_bytes
    from dino_kernels.sinkhorn import sinkhorn_knopp

    device = timer.device
    shapes = [(4096, 65536), (64, 65536), (256, 262144), (16, 262144)] if not dry_run else [(16, 300), (5, 1000)]
    if quick:
        shapes = [(4096, 65536), (16, 262144)]
    impl = "triton" if device == "cuda" else "reference"
    rows = []
    for n_samples, n_protos in shapes:
        logits = bench_logits(n_samples, n_protos, torch.bfloat16, device)
        ours_ms = timer(lambda: sinkhorn_knopp(logits, TEMPERATURE, N_ITER, impl=impl))
        official_ms = timer(lambda: official_sinkhorn(logits, TEMPERATURE))
        ours_bytes = triton_bytes(n_samples, n_protos, 2)
        minimum_bytes = (2 + 4) * n_samples * n_protos  # read the logits once, write Q once
        rows.append(dict(
            B=n_samples, K=n_protos, ours_ms=ours_ms, official_ms=official_ms, speedup=official_ms / ours_ms,
            ours_gbps=ours_bytes / ours_ms / 1e6, ours_of_bandwidth=ours_bytes / ours_ms / 1e6 / bandwidth_gbps,
            minimum_traffic_of_bandwidth=minimum_bytes / ours_ms / 1e6 / bandwidth_gbps,
            official_gbps=official_bytes(n_samples, n_protos, 2) / official_ms / 1e6,
            ours_peak_mib=timer.peak_mib(lambda: sinkhorn_knopp(logits, TEMPERATURE, N_ITER, impl=impl)),
            official_peak_mib=timer.peak_mib(lambda: official_sinkhorn(logits, TEMPERATURE)),
        ))
        del logits
    return rows


# ------------------------------------------------------------------------------------------------------------
# Gram loss
# ------------------------------------------------------------------------------------------------------------


def gram_section(timer: Timer, dry_run: bool, quick: bool = False) -> list[dict]:
    from dino_kernels import gram
    from dino_kernels.gram import gram_loss

    def with_slab_entries(entries: int):  # the PyTorch slabs with bigger slabs (issue 29 §2: remove_neg's speed)
        def run(s, t, rn):
            default, gram._SLAB_ENTRIES = gram._SLAB_ENTRIES, entries
            try:
                return gram_loss(s, t, remove_neg=rn, algorithm="tiled")
            finally:
                gram._SLAB_ENTRIES = default
        return run

    device = timer.device
    batch = 4 if not dry_run else 2
    sizes = [(P, d) for P in (1024, 4096) for d in (384, 1024, 4096)] if not dry_run else [(70, 24), (40, 48)]
    if quick:
        sizes = [(4096, 384), (4096, 1024)]
    triton_impl = "triton" if device == "cuda" else "auto"  # the dry run: PyTorch slabs in the Triton row
    variants = [  # (name, function of (student, teacher, remove_neg))
        ("ours-auto", lambda s, t, rn: gram_loss(s, t, remove_neg=rn)),
        ("tiled-triton", lambda s, t, rn: gram_loss(s, t, remove_neg=rn, impl=triton_impl, algorithm="tiled")),
        ("tiled-torch", lambda s, t, rn: gram_loss(s, t, remove_neg=rn, algorithm="tiled")),
        ("tiled-torch-slab2^23", with_slab_entries(1 << 23)),
        ("tiled-torch-slab2^25", with_slab_entries(1 << 25)),
        ("materializing", lambda s, t, rn: gram_loss(s, t, remove_neg=rn, impl="reference")),
    ]
    rows = []
    for P, d in sizes:
        gen = torch.Generator(device=device).manual_seed(P + d)
        student = torch.randn(batch, P, d, generator=gen, device=device).requires_grad_(True)
        teacher = torch.randn(batch, P, d, generator=gen, device=device)
        for remove_neg in (False, True):
            for name, fn in variants:
                if name == "tiled-triton" and (d > 1024 or not remove_neg and P > d and d > 384):
                    continue  # minutes per call at d = 4096; the d >= 1024 rows with remove_neg show the trend
                if name.startswith("tiled-torch-slab") and not remove_neg:
                    continue  # without remove_neg "auto" takes the d-space identity where it counts

                def step():
                    student.grad = None
                    fn(student, teacher, remove_neg).backward()

                try:
                    ms = timer(step, rep_ms=50)
                    peak = timer.peak_mib(step)
                except torch.OutOfMemoryError:
                    rows.append(dict(P=P, d=d, remove_neg=remove_neg, variant=name, error="out of memory"))
                    continue
                rows.append(dict(P=P, d=d, remove_neg=remove_neg, variant=name, ms=ms, peak_mib=peak))
        del student, teacher
    _add_ratios(rows, ("P", "d", "remove_neg"), "variant", "materializing", "ms", "speedup_vs_materializing")
    base = {(r["P"], r["d"], r["remove_neg"]): r.get("peak_mib") for r in rows if r["variant"] == "materializing"}
    for r in rows:
        if r.get("peak_mib") and base.get((r["P"], r["d"], r["remove_neg"])):
            r["memory_ratio"] = base[(r["P"], r["d"], r["remove_neg"])] / r["peak_mib"]
    return rows


# ------------------------------------------------------------------------------------------------------------
# Training step
# ------------------------------------------------------------------------------------------------------------


def train_section(timer: Timer, dry_run: bool, peak_tflops: float, quick: bool = False) -> list[dict]:
    from bench.bench_train import measure_train_step, timed_steps

    device = timer.device
    arch, batch, global_size, local_size, protos, steps = (
        ("vit_large", 32, 256, 112, 65536, 10 if quick else 30) if not dry_run else ("vit_tiny", 2, 64, 32, 256, 2))
    rows = []
    runs = [("project kernels", "auto", "auto", False), ("sdpa + reference kernels", "sdpa", "reference", False)]
    if not quick:
        runs.append(("project kernels + fused AdamW", "auto", "auto", True))  # issue 29 §3's optimizer lever
    for name, attn_impl, kernel_impl, fused_adamw in runs:
        figures = measure_train_step(device, arch, batch, global_size, local_size, protos, timed_steps(steps),
                                     attn_impl=attn_impl, kernel_impl=kernel_impl, peak_gflops=peak_tflops * 1e3,
                                     fused_adamw=fused_adamw)
        rows.append(dict(run=name, arch=arch, batch=batch, steps=steps, **figures))
        if device == "cuda":
            torch.cuda.empty_cache()
    baseline = rows[1]["images_per_s"]  # the SDPA + reference-kernels step
    for row in rows:
        if row is not rows[1]:
            row["speedup"] = row["images_per_s"] / baseline
    return rows


def distill_section(timer: Timer, dry_run: bool, quick: bool = False) -> list[dict]:
    """distill.py's step (teacher forward + one student's forward, loss, backward, AdamW) into a torchvision
    ResNet-50 from a ViT-L/16 teacher: the features objective, linear adapters, bf16, batch 64 of 2 x 224 + 8 x 96
    crops. Random weights: the speed does not depend on them. One augmented batch, reused, so the data loader is
    not in the figure."""
    import distill
    import runtime
    from bench.bench_train import timed_steps
    from data.augment import CropSizes
    from data.datasets import ProceduralDataset, build_loader
    from models.vit import build_vit

    device = timer.device
    teacher_arch, student, batch_size, global_size, local_size, n_local, steps = (
        ("vit_large", "torchvision:resnet50", 64, 224, 96, 8, 5 if quick else 20) if not dry_run
        else ("vit_tiny", "torchvision:resnet18", 2, 64, 32, 2, 2))
    cfg = distill.parse_config([
        "demo", "--students", student, "--teacher.objective", "features", "--features.adapter", "linear",
        "--data.batch-size", str(batch_size), "--data.global-size", str(global_size),
        "--data.local-size", str(local_size), "--augment.n-local-crops", str(n_local), "--run.device", device])
    dist_info = runtime.setup_distributed(device)
    torch.manual_seed(0)
    teacher = distill.Teacher(build_vit(teacher_arch).to(device), "features", None)
    spec, = distill.parse_students(cfg.students, world_size=1, global_batch=batch_size)
    run = distill.setup_student(spec, None, teacher, cfg, dist_info)
    loader = build_loader(ProceduralDataset(batch_size, size=128), cfg.augment, CropSizes(global_size, local_size),
                          batch_size=batch_size)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(iter(loader)).items()}
    sched = distill.schedules_at(cfg.optim.lr.warmup_iterations, cfg)  # past warmup and the last-layer freeze

    def step() -> None:
        distill.distill_step([run], teacher, batch, sched, 0, 1, cfg, dist_info)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed_steps(steps, warmup=3)(step)  # warmup: cuDNN's algorithm search, the allocator
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return [dict(teacher=teacher_arch, student=student, batch=batch_size,
                 crops=f"2x{global_size} + {n_local}x{local_size}", steps=steps, step_ms=seconds * 1e3,
                 images_per_s=batch_size / seconds, peak_mib=peak_mib)]


def loader_section(timer: Timer, dry_run: bool, quick: bool = False) -> list[dict]:
    """train.py's data loader alone (build_train_loader) at the vitl16-im1k recipe: its augmentation, crops, iBOT
    masks and batch per GPU, on the bundled photos, decoded every time. The images/s the CPUs feed one GPU with 4, 8
    and all cores as workers, to set against the training step's (issue 29 §3, the loader lever)."""
    import os

    import runtime
    import train
    from data.datasets import SampleImagesDataset

    cores = len(os.sched_getaffinity(0))
    worker_counts = [1] if dry_run else sorted({min(4, cores), min(8, cores), cores})
    one_rank = runtime.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    rows = []
    for workers in worker_counts:
        cfg = train.parse_config(["vitl16-im1k", "--data.num-workers", str(workers)])
        iterator = iter(train.build_train_loader(SampleImagesDataset(), cfg, 0, cfg.model.patch_size or 16, one_rank))
        # Past start-up and the batches the workers prefetch (2 each), then long enough for every worker to make
        # several batches while being timed: the rate the workers produce, not the prefetch buffer's.
        for _ in range(3 * workers):
            next(iterator)
        batches = 3 if dry_run else max(10 if quick else 30, 4 * workers)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
        del iterator
        rows.append(dict(workers=workers, cores=cores, batch=cfg.data.batch_size, batches=batches,
                         crops=f"2x{cfg.data.global_size} + {cfg.augment.n_local_crops}x{cfg.data.local_size}",
                         images_per_s=batches * cfg.data.batch_size / seconds))
    return rows


def curate_section(timer: Timer, dry_run: bool, quick: bool = False) -> list[dict]:
    """curate.py's two GPU-bound steps: embed (a ViT-L/16 backbone's forward at 224 px, bf16, batch 256; decoding
    is the loader's, timed in the loader section) and one Lloyd iteration of the cluster step (1M x 384 points,
    16384 centroids, cosine: assignment in blocks, float64 sums) (the issue "Data at web scale")."""
    from data.curation import lloyd_step, prepare
    from dense import forward_tokens
    from models.vit import build_vit

    device = timer.device
    arch, size, batch = ("vit_large", 224, 256) if not dry_run else ("vit_tiny", 64, 4)
    n, dim, k = (1_000_000, 384, 16384) if not dry_run else (2000, 32, 64)
    gen = torch.Generator(device=device).manual_seed(0)
    backbone = build_vit(arch).to(device).eval()
    images = torch.randn(batch, 3, size, size, generator=gen, device=device)
    with torch.no_grad():
        ms = timer(lambda: forward_tokens(backbone, images), rep_ms=200)
    rows = [dict(step="embed", what=f"{arch} forward, {size} px, batch {batch}, bf16", ms=ms,
                 per_s=batch / ms * 1e3, unit="images")]
    del backbone, images
    points = prepare(torch.randn(n, dim, generator=gen, device=device), "cosine")
    centroids = points[torch.randperm(n, generator=gen, device=device)[:k]].clone()
    ms = timer(lambda: lloyd_step(points, centroids, "cosine"), rep_ms=200)
    rows.append(dict(step="cluster", what=f"one Lloyd iteration, {n} x {dim}, k = {k}, cosine", ms=ms,
                     per_s=n / ms * 1e3, unit="points"))
    return rows


# ------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------


def _format(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown(results: dict) -> str:
    lines = ["# GPU timings", ""]
    for key, value in results["environment"].items():
        lines.append(f"- {key}: {value}")
    for section in SECTIONS:
        rows = results.get(section)
        if not rows:
            continue
        columns = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["", f"## {section}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_format(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_results"))
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, PyTorch paths: exercise the code")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and steps (about 2 minutes on a GPU)")
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_timings: no CUDA device; use --dry-run to exercise the script on the CPU")
    device = "cuda" if not args.dry_run else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    timer = Timer(device)
    peak = bf16_matmul_tflops(device)
    bandwidth = copy_bandwidth_gbps(device)
    results: dict = {"environment": {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__, "triton": _triton_version(), "measured_matmul_tflops": round(peak, 1),
        "measured_copy_gbps": round(bandwidth, 1), "dry_run": args.dry_run, "quick": args.quick,
    }}

    def save() -> None:
        (args.out / "timings.json").write_text(json.dumps(results, indent=1))
        (args.out / "timings.md").write_text(markdown(results))

    save()
    for section in sections:
        start = time.perf_counter()
        print(f"[gpu_timings] {section} ...", flush=True)
        if section == "attention":
            results[section] = attention_section(timer, args.dry_run, args.quick)
        elif section == "sinkhorn":
            results[section] = sinkhorn_section(timer, args.dry_run, bandwidth, args.quick)
        elif section == "gram":
            results[section] = gram_section(timer, args.dry_run, args.quick)
        elif section == "train":
            results[section] = train_section(timer, args.dry_run, peak, args.quick)
        elif section == "distill":
            results[section] = distill_section(timer, args.dry_run, args.quick)
        elif section == "loader":
            results[section] = loader_section(timer, args.dry_run, args.quick)
        else:
            results[section] = curate_section(timer, args.dry_run, args.quick)
        results["environment"][f"{section}_seconds"] = round(time.perf_counter() - start, 1)
        save()
        print(f"[gpu_timings] {section} done in {time.perf_counter() - start:.0f} s", flush=True)
    print(markdown(results))


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
