"""One SSL training step: images/s and MFU against the measured matmul peak.

The issue's CPU case: vit_small, batch 8, 2 x 224 px global + 8 x 96 px local crops, the recipe's heads at
reduced width (65536 prototypes would dominate a CPU step; 4096 keeps the backbone the main cost). A step is
teacher forward (global crops) + student forward/backward (all crops) + Sinkhorn + losses + AdamW + EMA.

FLOPs: bench.bench_vit.vit_forward_flops for each crop set (forward x3 for the student's forward+backward,
x1 for the teacher), plus 2 x tokens x (matmul parameters) for each head (x3 for the student). Data loading is
not timed (a batch is prepared once): that is bench_augment's subject.
"""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch

import train
from bench.bench_vit import vit_forward_flops
from bench.common import matmul_peak_gflops, report, requires_cuda
from data.augment import AugmentConfig, CropSizes
from data.datasets import SampleImagesDataset, build_loader

CASES = [
    pytest.param("cpu", "vit_small", 8, 224, 96, 4096, id="cpu-vits16-b8-224+96"),
    pytest.param("cuda", "vit_large", 32, 256, 112, 65536, id="cuda-vitl16-b32-256+112", marks=requires_cuda),
]


def head_matmul_params(head: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in head.modules() if isinstance(m, torch.nn.Linear))


def timed_steps(steps: int, warmup: int = 2) -> Callable[[Callable[[], None]], float]:
    """A timer for `measure_train_step`: mean seconds per step over `steps` consecutive steps after `warmup`."""

    def measure(step: Callable[[], None]) -> float:
        for _ in range(warmup):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    return measure


def measure_train_step(
    device: str, arch: str, batch: int, global_size: int, local_size: int, prototypes: int,
    measure: Callable[[Callable[[], None]], float], attn_impl: str = "auto", kernel_impl: str = "auto",
    peak_gflops: float | None = None, fused_adamw: bool = False,
) -> dict:
    """The demo preset at this architecture, batch, crop sizes and head width (8 local crops): its step's figures."""
    config_args = [
        "demo", "--model.arch", arch, "--model.dino-prototypes", str(prototypes), "--model.ibot-prototypes",
        str(prototypes), "--model.dino-hidden", "2048", "--model.ibot-hidden", "2048", "--model.dino-bottleneck",
        "256", "--model.ibot-bottleneck", "256", "--data.global-size", str(global_size), "--data.local-size",
        str(local_size), "--augment.n-local-crops", "8", "--data.batch-size", str(batch),
    ]
    return measure_config_step(device, config_args, measure, attn_impl, kernel_impl, peak_gflops, fused_adamw)


def measure_config_step(
    device: str, config_args: list[str], measure: Callable[[Callable[[], None]], float], attn_impl: str = "auto",
    kernel_impl: str = "auto", peak_gflops: float | None = None, fused_adamw: bool = False,
) -> dict:
    """Build the model, losses and one batch of train.py's config `config_args` (a preset and overrides), time
    `measure(step)` and return the step's figures (peak_mib: the step's peak allocated memory on CUDA).
    fused_adamw: torch's fused AdamW (one kernel per parameter group, as the official code's multi_tensor_optim)
    instead of train.py's default (foreach on CUDA)."""
    cfg = train.parse_config([*config_args, "--run.device", device, "--model.attn-impl", attn_impl,
                              "--model.kernel-impl", kernel_impl])
    batch, global_size, local_size = cfg.data.batch_size, cfg.data.global_size, cfg.data.local_size
    n_local = cfg.augment.n_local_crops
    torch.manual_seed(0)
    student, teacher = train.build_student_teacher(cfg.model)
    student.to(device)
    teacher.to(device)
    losses = train.SSLLosses(cfg.model, cfg.loss).to(device)
    optimizer = torch.optim.AdamW(train.param_groups(student, cfg.optim), lr=1e-4, fused=fused_adamw or None)
    state = train.TrainState(student, teacher, None, student, optimizer, losses)
    loader = build_loader(SampleImagesDataset(), AugmentConfig(n_local_crops=n_local),
                          CropSizes(global_size, local_size), batch_size=batch, num_workers=0)
    batch_data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(iter(loader)).items()}
    sched = train.schedules_at(10**6, cfg.optim, cfg.teacher)
    autocast = device == "cuda"

    def step():
        terms = train.forward_losses(state, batch_data, sched, autocast)
        train.backward_and_update(state, terms["total"], sched, cfg.optim.clip_grad)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = measure(step)
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    flops = train_step_flops(student, batch, global_size, local_size, n_local, len(batch_data["mask_indices"]))
    achieved = flops / seconds / 1e9
    if peak_gflops is None:
        peak_gflops = matmul_peak_gflops(device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    return dict(seconds=seconds, images_per_s=batch / seconds, gflop=flops / 1e9, gflops=achieved,
                peak_gflops=peak_gflops, mfu=achieved / peak_gflops, peak_mib=peak_mib)


def train_step_flops(student: torch.nn.Module, batch: int, global_size: int, local_size: int, n_local: int,
                     n_masked: int) -> float:
    """Matmul FLOPs of one step: the student's forward and backward over every crop, the teacher's forward over
    the global crops, and the heads on their tokens."""
    vit = student.backbone.cfg
    student_fwd = vit_forward_flops(vit, 2 * batch, global_size, global_size) + vit_forward_flops(
        vit, n_local * batch, local_size, local_size)
    teacher_fwd = vit_forward_flops(vit, 2 * batch, global_size, global_size)
    dino, ibot = head_matmul_params(student.dino_head), head_matmul_params(student.ibot_head)
    heads = 2 * ((2 + n_local) * batch * dino + n_masked * ibot)
    teacher_heads = 2 * (2 * batch * dino + n_masked * ibot)
    return 3 * (student_fwd + heads) + teacher_fwd + teacher_heads


@pytest.mark.parametrize("device, arch, batch, global_size, local_size, prototypes", CASES)
def test_train_step_throughput(benchmark, device, arch, batch, global_size, local_size, prototypes):
    def measure(step):
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
        return benchmark.stats.stats.min

    figures = measure_train_step(device, arch, batch, global_size, local_size, prototypes, measure)
    report(f"train step {arch} {device} b{batch} 2x{global_size}+8x{local_size}", **figures,
           threads=torch.get_num_threads())
