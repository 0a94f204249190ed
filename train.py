"""DINOv3 self-supervised pretraining in one file: config, model, loss, loop, checkpoints, logging.

    python train.py                                   # the `demo` preset: vit_tiny on the bundled photos, CPU
    torchrun --nproc_per_node=8 train.py vitl16 --data.path /data/imagenet/train
    python train.py demo --optim.iterations 50 --run.output-dir runs/try

A step, in order: a multi-crop batch (2 global + n local crops per image, iBOT masks on some global crops)
-> the student (backbone + DINO head + iBOT head) sees every crop, masked -> the EMA teacher sees the global
crops, unmasked -> teacher outputs are centered with Sinkhorn-Knopp -> L = L_DINO + L_iBOT + 0.1 L_KoLeo
-> backward, gradient clipping, AdamW with layer-wise lr decay -> EMA update of the teacher -> log ->
checkpoint (atomic; resumable exactly).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from torch import nn

import runtime
from data.augment import AugmentConfig, CropSizes
from data.datasets import ImageDataset, build_dataset, build_loader
from eval import cosine_map_figure, knn_eval, load_eval_images, load_procedural_sets, pca_figure, save_png
from kernels.common import KernelImpl
from losses.dino import DINOLoss
from losses.ibot import IBOTLoss
from losses.koleo import DistributedKoLeoLoss
from models.heads import DINOHead, drop_last_layer_grads
from models.vit import VIT_ARCHS, AttnImpl, VisionTransformer, build_vit

logger = logging.getLogger("dinov3")


# ====================================================================================================
# Config
# ====================================================================================================


@dataclass
class ModelConfig:
    arch: Literal[tuple(VIT_ARCHS)] = "vit_small"  # type: ignore[valid-type]
    drop_path_rate: float = 0.0
    layerscale_init: float = 1e-5
    attn_impl: AttnImpl = "auto"
    rope_rescale: float | None = 2.0  # RoPE-box jittering: [-1,1] -> [-s,s], s log-uniform in [1/2, 2]
    dino_prototypes: int = 65536
    dino_hidden: int = 2048
    dino_bottleneck: int = 256
    ibot_prototypes: int = 65536
    ibot_hidden: int = 2048
    ibot_bottleneck: int = 256
    kernel_impl: KernelImpl = "auto"  # Sinkhorn (and Gram) kernels: Triton on CUDA, PyTorch reference on CPU


@dataclass
class DataConfig:
    path: str | None = None  # image folder or .txt file list; None = the photos bundled with scikit-image/learn
    batch_size: int = 64  # per rank; global batch = batch_size x world size
    num_workers: int = 8
    global_size: int = 256
    local_size: int = 112
    n_local_crops: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    mask_probability: float = 0.5  # fraction of global crops that get iBOT masks
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # fraction of patches masked in a masked crop


@dataclass
class OptimConfig:
    iterations: int = 1_000_000
    lr: float = 4e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    min_lr: float = 1e-6  # end of the cosine schedule
    warmup_iterations: int = 100_000
    weight_decay: float = 0.04
    weight_decay_end: float | None = None  # cosine from weight_decay to this; None = constant
    beta1: float = 0.9
    beta2: float = 0.99
    layerwise_decay: float = 0.98
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 30.0
    freeze_last_layer_iterations: int = 1250  # prototypes stay fixed for the first "epoch"
    momentum: float = 0.994  # teacher EMA
    momentum_end: float | None = None  # cosine from momentum to this; None = constant
    teacher_temp: float = 0.07
    teacher_temp_start: float = 0.04
    teacher_temp_warmup_iterations: int = 100_000


@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    koleo_group_size: int = 16
    student_temp: float = 0.1
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False
    activation_checkpointing: bool = False
    bf16: bool = True  # autocast on CUDA (ignored on the CPU, which trains in float32)
    deterministic: bool = False
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_last: int = 3
    resume: bool = True  # continue from the newest checkpoint in output_dir when there is one
    pca_every: int = 0  # log PCA and cosine feature maps every N steps (0: only at the end)
    knn_every: int = 0  # k-NN accuracy of the teacher on the procedural labeled set every N steps (0: off)
    knn_train_images: int = 500  # reference images of that set (and half as many held-out ones)
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/inf instead of stopping
    max_nonfinite_skips: int = 10
    dist_timeout_s: float = 600.0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _demo() -> TrainConfig:
    """vit_tiny on the bundled photos at small crops: a few minutes on a laptop CPU.

    Two departures from the recipe make a 120-step run learn at all: LayerScale starts at 1.0 (at 1e-5 the
    class token of a fresh 4-block net is the same for every image, so the teacher's targets carry no
    signal until the blocks grow, which takes thousands of steps) and the teacher temperature stays at 0.04.
    """
    return TrainConfig(
        model=ModelConfig(arch="vit_tiny", layerscale_init=1.0, dino_prototypes=1024, dino_hidden=512,
                          dino_bottleneck=128, ibot_prototypes=1024, ibot_hidden=512, ibot_bottleneck=128),
        data=DataConfig(batch_size=16, num_workers=2, global_size=96, local_size=48, n_local_crops=4),
        optim=OptimConfig(iterations=120, lr=1e-3, warmup_iterations=15, freeze_last_layer_iterations=10,
                          teacher_temp=0.04, teacher_temp_warmup_iterations=0, momentum=0.99),
        run=RunConfig(output_dir="runs/demo", log_every=10, checkpoint_every=40, knn_every=60,
                      knn_train_images=300),
    )


def _imagenet_style(arch: str, prototypes: int, batch_size: int, drop_path: float) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(arch=arch, drop_path_rate=drop_path, dino_prototypes=prototypes,
                          ibot_prototypes=prototypes),
        data=DataConfig(batch_size=batch_size),
        optim=OptimConfig(iterations=250_000, lr=1e-3, lr_schedule="cosine", warmup_iterations=25_000,
                          teacher_temp_warmup_iterations=25_000, momentum=0.992, momentum_end=1.0),
        run=RunConfig(output_dir=f"runs/{arch}"),
    )


def _vit7b() -> TrainConfig:
    """The paper's pretraining hyperparameters (section 3 and appendix "Implementation Details")."""
    return TrainConfig(
        model=ModelConfig(arch="vit_7b", drop_path_rate=0.4, dino_prototypes=262144, dino_hidden=8192,
                          dino_bottleneck=512, ibot_prototypes=98304, ibot_hidden=4096, ibot_bottleneck=384),
        data=DataConfig(batch_size=16),  # x 256 GPUs = 4096
        optim=OptimConfig(iterations=1_000_000, lr=4e-4, warmup_iterations=100_000, momentum=0.999),
        run=RunConfig(output_dir="runs/vit7b16", parallel="fsdp", activation_checkpointing=True),
    )


PRESETS: dict[str, tuple[str, TrainConfig]] = {
    "demo": ("vit_tiny on the bundled sample photos, CPU, a few minutes (the default)", _demo()),
    "vits16": ("ViT-S/16 on an image folder (--data.path)", _imagenet_style("vit_small", 65536, 64, 0.1)),
    "vitb16": ("ViT-B/16 on an image folder (--data.path)", _imagenet_style("vit_base", 65536, 64, 0.1)),
    "vitl16": ("ViT-L/16 on an image folder (--data.path)", _imagenet_style("vit_large", 65536, 32, 0.3)),
    "vit7b16": ("the paper's ViT-7B/16 pretraining recipe", _vit7b()),
}


def validate_config(cfg: TrainConfig, world_size: int) -> None:
    """Reject impossible combinations before any data is read or any weight is built."""
    patch = VIT_ARCHS[cfg.model.arch].patch_size
    problems = []
    for name in ("global_size", "local_size"):
        size = getattr(cfg.data, name)
        if size % patch or size < patch:
            problems.append(f"data.{name}={size} is not a positive multiple of the patch size {patch}")
    if cfg.data.batch_size < 1:
        problems.append(f"data.batch_size={cfg.data.batch_size} must be at least 1 (it is per rank)")
    for name in ("global_scale", "local_scale", "mask_ratio"):
        lo, hi = getattr(cfg.data, name)
        if not 0 <= lo <= hi <= 1:
            problems.append(f"data.{name}={(lo, hi)} must satisfy 0 <= low <= high <= 1")
    if not 0 <= cfg.data.mask_probability <= 1:
        problems.append(f"data.mask_probability={cfg.data.mask_probability} must be in [0, 1]")
    if cfg.optim.iterations < 1:
        problems.append("optim.iterations must be at least 1")
    if cfg.run.parallel == "fsdp" and world_size == 1:
        logger.info("parallel=fsdp with one process: sharding over a single rank (works, saves nothing)")
    if problems:
        raise ValueError("invalid training config:\n  - " + "\n  - ".join(problems))


def parse_config(argv: list[str] | None = None, presets: dict | None = None):
    """`train.py [preset] [--field value ...]`; without a preset name, `demo`. distill.py passes its presets."""
    presets = PRESETS if presets is None else presets
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]
    if argv[0] not in presets and not argv[0].startswith("-"):
        raise SystemExit(f"unknown preset {argv[0]!r}; choose one of: {', '.join(presets)}")
    return tyro.extras.overridable_config_cli(presets, args=argv)


# ====================================================================================================
# Model: backbone + heads, student and EMA teacher
# ====================================================================================================


class SSLNet(nn.Module):
    """A backbone with its DINO (class token) and iBOT (patch tokens) heads."""

    def __init__(self, cfg: ModelConfig, drop_path_rate: float):
        super().__init__()
        self.backbone: VisionTransformer = build_vit(
            cfg.arch, drop_path_rate=drop_path_rate, layerscale_init=cfg.layerscale_init,
            attn_impl=cfg.attn_impl, rope_rescale=cfg.rope_rescale,
        )
        dim = self.backbone.embed_dim
        self.dino_head = DINOHead(dim, cfg.dino_prototypes, cfg.dino_hidden, cfg.dino_bottleneck)
        self.ibot_head = DINOHead(dim, cfg.ibot_prototypes, cfg.ibot_hidden, cfg.ibot_bottleneck)

    def forward(self, global_crops, local_crops, masks, mask_indices):
        """Student pass over all crops; returns head logits and the class tokens KoLeo needs."""
        crops = [global_crops] + ([local_crops] if local_crops.numel() else [])
        outs = self.backbone(crops, [masks] + [None] * (len(crops) - 1))
        cls_tokens = torch.cat([o["x_norm_clstoken"] for o in outs])  # [2B + nB, C], crop-major
        masked_patches = outs[0]["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        return self.dino_head(cls_tokens), self.ibot_head(masked_patches), outs[0]["x_norm_clstoken"]

    @torch.no_grad()
    def teacher_forward(self, global_crops, mask_indices):
        out = self.backbone(global_crops)
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        return self.dino_head(out["x_norm_clstoken"]), self.ibot_head(patches)


def build_student_teacher(cfg: TrainConfig) -> tuple[SSLNet, SSLNet]:
    student = SSLNet(cfg.model, cfg.model.drop_path_rate)
    teacher = SSLNet(cfg.model, drop_path_rate=0.0)  # the EMA teacher never drops paths
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


@torch.no_grad()
def ema_update(teacher: SSLNet, student: SSLNet, momentum: float) -> None:
    _reshard(teacher)
    t_params = [_local(p) for p in teacher.parameters()]
    s_params = [_local(p.detach()) for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def _reshard(net: nn.Module) -> None:
    """FSDP2 keeps a root module's parameters gathered after its forward (expecting a backward); the teacher
    has no backward, so its modules are resharded explicitly before the EMA update touches the shards."""
    for module in net.modules():
        if hasattr(module, "reshard") and hasattr(module, "unshard"):
            module.reshard()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 parameter (a DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def wrap_for_parallel(student: SSLNet, teacher: SSLNet, cfg: RunConfig, dist_info: runtime.Dist) -> nn.Module:
    """DDP around the student, or FSDP2 `fully_shard` per block (student and teacher sharded alike)."""
    if cfg.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        for net in (student,):
            for block in net.backbone.blocks:
                block.forward = checkpointed(block.forward, checkpoint)
    if cfg.parallel == "fsdp" and dist_info.enabled:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if (
            dist_info.device.type == "cuda" and cfg.bf16) else MixedPrecisionPolicy()
        # Backbone and heads are sharded units of their own (not the SSLNet root), so the teacher's
        # teacher_forward, which calls them directly, triggers their all-gathers too.
        for net in (student, teacher):
            for block in net.backbone.blocks:
                fully_shard(block, mp_policy=mp)
            for part in (net.backbone, net.dino_head, net.ibot_head):
                fully_shard(part, mp_policy=mp)
        return student
    if dist_info.enabled:
        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
    return student


def checkpointed(fn, checkpoint):
    def run(*args, **kwargs):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


# ====================================================================================================
# Optimizer and schedules
# ====================================================================================================


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings/tokens, i+1 for block i, depth+1 for the final norms and the heads."""
    if name.startswith("backbone."):
        rest = name[len("backbone.") :]
        if rest.startswith(("cls_token", "storage_tokens", "mask_token", "patch_embed", "rope_embed")):
            return 0
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
    return depth + 1


def param_groups(student: SSLNet, cfg: OptimConfig) -> list[dict]:
    """AdamW groups by (lr multiplier, wd multiplier): layer-wise lr decay, no weight decay on norms/biases/tokens."""
    depth = len(student.backbone.blocks)
    groups: dict[tuple, dict] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = cfg.layerwise_decay ** (depth + 1 - layer_id(name, depth))
        if "patch_embed" in name:
            lr_mult *= cfg.patch_embed_lr_mult
        no_wd = param.ndim == 1 or name.endswith(("cls_token", "storage_tokens", "mask_token")) or "norm" in name
        key = (lr_mult, 0.0 if no_wd else 1.0)
        group = groups.setdefault(key, {"params": [], "lr_mult": key[0], "wd_mult": key[1]})
        group["params"].append(param)
    return list(groups.values())


def cosine_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@dataclass(frozen=True)
class Schedules:
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_frozen: bool


def schedules_at(step: int, cfg: OptimConfig) -> Schedules:
    """Every scheduled value at `step`: a pure function, so resuming needs only the step."""
    if step < cfg.warmup_iterations:
        lr = cfg.lr * step / cfg.warmup_iterations
    elif cfg.lr_schedule == "cosine":
        lr = cosine_between(cfg.lr, cfg.min_lr, (step - cfg.warmup_iterations) / max(cfg.iterations - cfg.warmup_iterations, 1))
    else:
        lr = cfg.lr
    progress = step / max(cfg.iterations, 1)
    wd = cfg.weight_decay if cfg.weight_decay_end is None else cosine_between(cfg.weight_decay, cfg.weight_decay_end, progress)
    momentum = cfg.momentum if cfg.momentum_end is None else cosine_between(cfg.momentum, cfg.momentum_end, progress)
    if step < cfg.teacher_temp_warmup_iterations:
        temp = cfg.teacher_temp_start + (cfg.teacher_temp - cfg.teacher_temp_start) * step / cfg.teacher_temp_warmup_iterations
    else:
        temp = cfg.teacher_temp
    return Schedules(lr, wd, momentum, temp, step < cfg.freeze_last_layer_iterations)


def apply_schedules(optimizer: torch.optim.Optimizer, sched: Schedules) -> None:
    for group in optimizer.param_groups:
        group["lr"] = sched.lr * group["lr_mult"]
        group["weight_decay"] = sched.weight_decay * group["wd_mult"]


# ====================================================================================================
# Losses of one step
# ====================================================================================================


class SSLLosses(nn.Module):
    """DINO + iBOT + KoLeo with their teacher centering; the only state is the optional softmax centers."""

    def __init__(self, cfg: TrainConfig, process_group=None):
        super().__init__()
        loss, model = cfg.loss, cfg.model
        self.cfg = loss
        # process_group: the ranks whose samples form the batch (None: all; distill.py: one student's ranks).
        self.dino = DINOLoss(model.dino_prototypes, student_temp=loss.student_temp, centering=loss.centering,
                             sinkhorn_impl=model.kernel_impl, process_group=process_group)
        self.ibot = IBOTLoss(model.ibot_prototypes, student_temp=loss.student_temp, centering=loss.centering,
                             sinkhorn_impl=model.kernel_impl, process_group=process_group)
        # Groups of 16 consecutive images of the global batch, even when a group spans ranks.
        self.koleo = DistributedKoLeoLoss(group_size=loss.koleo_group_size, process_group=process_group)

    def forward(self, student_out, teacher_out, batch: dict, teacher_temp: float, n_global: int) -> dict:
        dino_student, ibot_student, cls_first_global = student_out
        dino_teacher_logits, ibot_teacher_logits = teacher_out
        dino_targets = self.dino.teacher_probs(dino_teacher_logits, teacher_temp)
        ibot_targets = self.ibot.teacher_probs(ibot_teacher_logits, teacher_temp)
        dino = self.dino(dino_student, dino_targets, n_global_crops=n_global)
        ibot = self.ibot(ibot_student, ibot_targets, batch["mask_weights"], n_images=batch["global_crops"].shape[0])
        batch_size = batch["global_crops"].shape[0] // n_global
        koleo = self.koleo(cls_first_global[:batch_size])  # class tokens of the first global crop
        total = self.cfg.dino_weight * dino.loss + self.cfg.ibot_weight * ibot + self.cfg.koleo_weight * koleo
        if self.cfg.centering == "softmax":
            self.dino.update_center(dino_teacher_logits)
            self.ibot.update_center(ibot_teacher_logits)
        return {"total": total, "dino": dino.loss, "dino_global": dino.global_loss, "dino_local": dino.local_loss,
                "ibot": ibot, "koleo": koleo}


def forward_losses(model: nn.Module, teacher: SSLNet, losses: SSLLosses, batch: dict, teacher_temp: float,
                   autocast: bool) -> dict:
    """Teacher on the global crops, student (possibly DDP-wrapped: `model`) on all crops, and the loss terms."""
    device_type = batch["global_crops"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        teacher_out = teacher.teacher_forward(batch["global_crops"], batch["mask_indices"])
        student_out = model(batch["global_crops"], batch["local_crops"], batch["masks"], batch["mask_indices"])
        return losses(student_out, teacher_out, batch, teacher_temp, n_global=2)


def backward_and_update(total: torch.Tensor, student: SSLNet, teacher: SSLNet, optimizer: torch.optim.Optimizer,
                        sched: Schedules, clip_grad: float) -> torch.Tensor:
    """Backward, last-layer freeze, gradient clipping, AdamW step, EMA teacher update; returns the grad norm."""
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if sched.last_layer_frozen:  # the prototypes stay where they were initialized for a while
        drop_last_layer_grads(student.dino_head, student.ibot_head)
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), clip_grad)
    optimizer.step()
    ema_update(teacher, student, sched.momentum)
    return grad_norm


# ====================================================================================================
# Checkpoints
# ====================================================================================================


def _full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=options)
    if optimizer is None:
        return model_state
    return model_state, get_optimizer_state_dict(module, optimizer, options=options)


def save_checkpoint(step: int, cfg: TrainConfig, student: SSLNet, teacher: SSLNet, optimizer, losses: SSLLosses,
                    stats: dict, dist_info: runtime.Dist) -> Path | None:
    """Every rank takes part (FSDP gathers); rank 0 writes checkpoint + released-format teacher backbone."""
    student_state, optim_state = _full_state(student, optimizer)
    teacher_state = _full_state(teacher)
    out_dir = Path(cfg.run.output_dir)
    path = runtime.checkpoint_path(out_dir, step)
    if dist_info.is_main:
        payload = {
            "format": "dinov3-train-checkpoint",
            "step": step,  # number of completed steps: the next step to run
            "config": dataclasses.asdict(cfg),
            "student": student_state,
            "teacher": teacher_state,
            "optimizer": optim_state,
            "losses": losses.state_dict(),
            "data_position": step * cfg.data.batch_size * dist_info.world_size,
            "stats": stats,
            "rng": runtime.rng_states(),
        }
        runtime.atomic_save(payload, path)
        backbone = {k[len("backbone."):]: v for k, v in teacher_state.items() if k.startswith("backbone.")}
        runtime.atomic_save(backbone, out_dir / "teacher_backbone.pth")
        runtime.prune_checkpoints(out_dir, cfg.run.keep_last)
    runtime.barrier(dist_info)
    return path if dist_info.is_main else None


COMPATIBLE_FIELDS = ("model.arch", "model.dino_prototypes", "model.dino_hidden", "model.dino_bottleneck",
                     "model.ibot_prototypes", "model.ibot_hidden", "model.ibot_bottleneck")


def load_checkpoint(path: Path, cfg: TrainConfig, student: SSLNet, teacher: SSLNet, optimizer,
                    losses: SSLLosses) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from models.checkpoint import CheckpointError, read_checkpoint_file

    payload = read_checkpoint_file(path)
    if payload.get("format") != "dinov3-train-checkpoint":
        kind = "a released-format backbone (weights only)" if "cls_token" in payload else "not a training checkpoint"
        raise CheckpointError(
            f"{path} is {kind}; --run.resume expects a full training checkpoint written by train.py "
            "(to start from backbone weights, use them to initialize a new run instead)"
        )
    saved = payload["config"]
    for dotted in COMPATIBLE_FIELDS:
        section, name = dotted.split(".")
        old, new = saved[section][name], getattr(getattr(cfg, section), name)
        if old != new:
            raise CheckpointError(f"{path} was trained with {dotted}={old!r} but this run has {new!r}; "
                                  f"use the same value or another --run.output-dir")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(student, payload["student"], options=options)
    set_model_state_dict(teacher, payload["teacher"], options=options)
    set_optimizer_state_dict(student, optimizer, payload["optimizer"], options=options)
    losses.load_state_dict(payload["losses"])
    runtime.set_rng_states(payload["rng"])
    return payload


# ====================================================================================================
# The loop
# ====================================================================================================


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _seed_step(student: SSLNet, teacher: SSLNet, seed: int, step: int, rank: int) -> None:
    """Per-step seeds: the RoPE box is the same on every rank; drop path differs per rank. Resume-proof."""
    student.backbone.rope_embed.seed(runtime.derived_seed(seed, step, 1))
    teacher.backbone.rope_embed.seed(runtime.derived_seed(seed, step, 2))
    torch.manual_seed(runtime.derived_seed(seed, step, 3, rank))


def train(cfg: TrainConfig, images: ImageDataset | None = None) -> dict:
    """Run (or resume) a training run; returns a summary (final step, loss history, paths).

    `images` replaces the dataset named by cfg.data.path (tests pass a ProceduralDataset).
    """
    dist_info = runtime.setup_distributed(cfg.run.device, cfg.run.dist_timeout_s)
    out_dir = Path(cfg.run.output_dir)
    runtime.setup_logging(out_dir, dist_info.is_main)
    validate_config(cfg, dist_info.world_size)
    # A missing or empty dataset raises here, before any model is built.
    dataset = images if images is not None else build_dataset(cfg.data.path)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    runtime.seed_everything(cfg.run.seed)
    device = dist_info.device

    student, teacher = build_student_teacher(cfg)
    student.to(device)
    teacher.to(device)
    losses = SSLLosses(cfg).to(device)
    model = wrap_for_parallel(student, teacher, cfg.run, dist_info)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.optim), lr=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2))

    start_step, stats = 0, {"nonfinite_skips": 0, "images_skipped": 0}
    existing = runtime.list_checkpoints(out_dir) if cfg.run.resume else []
    if existing:
        payload = load_checkpoint(existing[-1][1], cfg, student, teacher, optimizer, losses)
        start_step, stats = payload["step"], payload["stats"]
        logger.info(f"resumed from {existing[-1][1]} at step {start_step}")
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if cfg.run.compile:
        student.backbone.compile()
        teacher.backbone.compile()

    writer = None
    if dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out_dir / "tensorboard", purge_step=start_step)

    sizes = CropSizes(cfg.data.global_size, cfg.data.local_size, None)
    augment = AugmentConfig(global_scale=cfg.data.global_scale, local_scale=cfg.data.local_scale,
                            n_local_crops=cfg.data.n_local_crops)
    loader = build_loader(
        dataset, augment, sizes, batch_size=cfg.data.batch_size, rank=dist_info.rank,
        world_size=dist_info.world_size, seed=cfg.run.seed, start_step=start_step,
        num_workers=cfg.data.num_workers, patch_size=student.backbone.patch_size,
        mask_probability=cfg.data.mask_probability, mask_ratio=cfg.data.mask_ratio,
    )
    # Every rank runs these evaluations (with FSDP the teacher's forward is collective); rank 0 logs them.
    pca_images = pca_batch(dataset, cfg, device)
    knn_sets = load_procedural_sets(cfg.run.knn_train_images, cfg.run.knn_train_images // 2,
                                    size=cfg.data.global_size, n_classes=10) if cfg.run.knn_every else None

    stop = runtime.StopFlag()
    stop.install()
    progress = runtime.Progress(cfg.optim.iterations, start_step)
    autocast = device.type == "cuda" and cfg.run.bf16
    last: dict = {}
    history: list[float] = []
    step = start_step
    data_iter = iter(loader)
    try:
        while step < cfg.optim.iterations:
            t0 = time.perf_counter()
            batch = to_device(next(data_iter), device)
            sched = schedules_at(step, cfg.optim)
            apply_schedules(optimizer, sched)
            _seed_step(student, teacher, cfg.run.seed, step, dist_info.rank)

            terms = forward_losses(model, teacher, losses, batch, sched.teacher_temp, autocast)

            finite = runtime.all_reduce_max(0.0 if torch.isfinite(terms["total"]).item() else 1.0, dist_info) == 0.0
            if not finite:
                if not cfg.run.skip_nonfinite or stats["nonfinite_skips"] >= cfg.run.max_nonfinite_skips:
                    raise FloatingPointError(
                        f"loss became {terms['total'].item()} at step {step} "
                        f"(dino {terms['dino'].item():.4g}, ibot {terms['ibot'].item():.4g}, koleo {terms['koleo'].item():.4g}); "
                        f"stopping. The last good checkpoint in {out_dir} is intact; lower optim.lr or use "
                        "--run.skip-nonfinite to skip such steps"
                    )
                stats["nonfinite_skips"] += 1
                logger.warning(f"step {step}: non-finite loss, step skipped ({stats['nonfinite_skips']} so far)")
                optimizer.zero_grad(set_to_none=True)
                step += 1
                continue

            grad_norm = backward_and_update(terms["total"], student, teacher, optimizer, sched, cfg.optim.clip_grad)
            step += 1
            stats["images_skipped"] += int(batch.get("n_skipped", 0))

            seconds = time.perf_counter() - t0
            last = {k: v.item() for k, v in terms.items()}
            history.append(last["total"])
            if writer is not None:
                _log_scalars(writer, step, last, sched, grad_norm, seconds, cfg, dist_info, device, stats)
            if dist_info.is_main and (step % cfg.run.log_every == 0 or step == cfg.optim.iterations or step == start_step + 1):
                eta = runtime.Progress.format_seconds(progress.eta_seconds(step - 1))
                logger.info(f"step {step}/{cfg.optim.iterations}  loss {last['total']:.4f} (dino {last['dino']:.4f} "
                            f"ibot {last['ibot']:.4f} koleo {last['koleo']:.4f})  lr {sched.lr:.2e}  "
                            f"{cfg.data.batch_size * dist_info.world_size / seconds:.1f} img/s  eta {eta}")
            if cfg.run.pca_every and step % cfg.run.pca_every == 0:
                log_feature_maps(writer, teacher.backbone, pca_images, step)
            if cfg.run.knn_every and (step % cfg.run.knn_every == 0 or step == cfg.optim.iterations):
                accuracy = knn_eval(teacher.backbone, *knn_sets)
                if writer is not None:
                    for name, value in accuracy.items():
                        writer.add_scalar(f"knn/{name}", value, step)
                logger.info(f"step {step}: k-NN on the procedural set " +
                            " ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))

            stop_now = runtime.all_reduce_max(1.0 if stop.is_set else 0.0, dist_info) > 0
            if step % cfg.run.checkpoint_every == 0 or step == cfg.optim.iterations or stop_now:
                save_checkpoint(step, cfg, student, teacher, optimizer, losses, stats, dist_info)
            if stop_now:
                logger.info(f"received {stop.signal_name or 'a stop signal'}: checkpoint saved at step {step}, exiting")
                break
    finally:
        stop.restore()
        del data_iter

    summary = {"step": step, "losses": last, "history": history, "output_dir": str(out_dir), "stats": stats}
    if step == cfg.optim.iterations:
        figure = log_feature_maps(writer, teacher.backbone, pca_images, step)
        if dist_info.is_main:
            summary["pca_png"] = str(save_png(figure, out_dir / "pca_features.png"))
            summary["checkpoint"] = str(runtime.list_checkpoints(out_dir)[-1][1])
            summary["backbone"] = str(out_dir / "teacher_backbone.pth")
    if writer is not None:
        writer.close()
    runtime.barrier(dist_info)
    return summary


def pca_batch(dataset, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """A fixed batch of up to 4 images at the global crop size (at least 64 px), for feature maps."""
    images, _ = load_eval_images(dataset, range(len(dataset)), max(cfg.data.global_size, 64), limit=4)
    return images.to(device)


def log_feature_maps(writer, backbone: VisionTransformer, images: torch.Tensor, step: int) -> np.ndarray:
    """PCA and cosine-similarity maps of a fixed batch to TensorBoard (computed on every rank, logged by rank 0);
    returns the PCA figure."""
    pca = pca_figure(backbone, images)
    cosine = cosine_map_figure(backbone, images)
    if writer is not None:
        writer.add_image("features/pca", pca, step, dataformats="HWC")
        writer.add_image("features/cosine", cosine, step, dataformats="HWC")
    return pca


def _log_scalars(writer, step, terms, sched, grad_norm, seconds, cfg, dist_info, device, stats) -> None:
    for name, value in terms.items():
        writer.add_scalar(f"loss/{name}", value, step)
    writer.add_scalar("schedule/lr", sched.lr, step)
    writer.add_scalar("schedule/weight_decay", sched.weight_decay, step)
    writer.add_scalar("schedule/momentum", sched.momentum, step)
    writer.add_scalar("schedule/teacher_temp", sched.teacher_temp, step)
    writer.add_scalar("train/grad_norm", float(grad_norm), step)
    writer.add_scalar("train/images_per_s", cfg.data.batch_size * dist_info.world_size / seconds, step)
    writer.add_scalar("train/images_skipped", stats["images_skipped"], step)
    if device.type == "cuda":
        writer.add_scalar("train/max_memory_gib", torch.cuda.max_memory_allocated(device) / 2**30, step)
    else:
        import resource

        writer.add_scalar("train/max_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, step)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    try:
        summary = train(cfg)
    finally:
        runtime.teardown_distributed()
    if "checkpoint" in summary:
        print(f"\nfinished {summary['step']} steps; final loss {summary['losses'].get('total', float('nan')):.4f}")
        print(f"  checkpoint:        {summary['checkpoint']}")
        print(f"  teacher backbone:  {summary['backbone']}  (released DINOv3 format)")
        print(f"  TensorBoard logs:  {Path(summary['output_dir']) / 'tensorboard'}")
        print(f"  PCA feature map:   {summary['pca_png']}")


if __name__ == "__main__":
    main()
