"""DINOv3 self-supervised pretraining in one file: config, model, loss, loop, checkpoints, logging.

    python train.py                                   # the `demo` preset: vit_tiny on generated images, CPU
    torchrun --nproc_per_node=8 train.py vitl16 --data.path /data/imagenet/train
    python train.py demo --optim.iterations 50 --run.output-dir runs/try

A step, in order: a multi-crop batch (2 global + n local crops per image, iBOT masks on some global crops)
-> the student (backbone + DINO head + iBOT head) sees every crop, masked -> the EMA teacher sees the global
crops, unmasked -> teacher outputs are centered with Sinkhorn-Knopp -> L = L_DINO + L_iBOT + 0.1 L_KoLeo
-> backward, gradient clipping, AdamW with layer-wise lr decay -> EMA update of the teacher -> log ->
checkpoint (atomic; resumable exactly).

The later phases are the same loop with more switched on (paper sections 4 and 5.1):
- Gram anchoring (`--gram.enabled`, presets `gram-anchor`, `demo-gram`): a frozen Gram teacher, a copy of the
  EMA teacher taken at `gram.start_iteration` (or loaded with `--gram.init-from`) and refreshed to the current
  EMA teacher every `gram.update_frequency` steps at most `gram.max_updates` times, sees each global crop's
  region at `data.gram_teacher_size` (2x); its patch map is resampled to the student's grid and the objective
  gains w_Gram * L_Gram (losses/gram.py).
- High-resolution adaptation (presets `hrft`, `demo-hrft`): each step draws its (global, local, Gram-teacher)
  crop sizes from `data.size_schedule` with `data.size_probabilities`, from (seed, step) alone.
Both start from an earlier run: `--init-from` takes a train.py checkpoint (or run folder) or a released
DINOv3 backbone.
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
from data.augment import AugmentConfig, CropSizes, CropSizeSchedule
from data.datasets import ImageDataset, build_dataset, build_loader
from data.masking import MaskingCollate
from dense import fast_dense_set, log_dense_metric
from eval import cosine_map_figure, knn_eval, load_eval_images, load_procedural_sets, pca_figure, save_png
from kernels.common import KernelImpl
from kernels.sinkhorn import SINKHORN_ITERATIONS
from losses.dino import CENTER_MOMENTUM, DINOLoss
from losses.gram import GramAnchoringLoss, GramTokens, ResizeMode
from losses.ibot import IBOTLoss
from losses.koleo import DistributedKoLeoLoss, KoLeoLoss
from models.checkpoint import (
    TRAIN_CHECKPOINT_FORMAT,
    CheckpointError,
    backbone_weights,
    checkpoint_path_or_error,
    load_backbone,
    read_checkpoint_file,
    read_weights,
)
from models.heads import DINOHead
from models.vit import VIT_ARCHS, AttnImpl, VisionTransformer, build_vit
from schedules import Schedule, constant, sqrt_scaled_lr

logger = logging.getLogger("dinov3")


# ====================================================================================================
# Config
# ====================================================================================================


# Global batches the official configs were run with (per-GPU batch x GPUs).
VIT7B_GLOBAL_BATCH = 16 * 256
# The high-resolution config gives 8 per GPU; the GPU count is the pretraining's 256 (the config does not say).
HRFT_GLOBAL_BATCH = 8 * 256
VITL_IM1K_GLOBAL_BATCH = 64 * 32

KoLeoCrops = Literal["both", "first"]

# The optimizer, teacher, loss, augmentation and crop-size defaults below are the ViT-7B pretraining config's
# (dinov3_vit7b16_pretrain.yaml); presets change what differs from it.


@dataclass
class ModelConfig:
    arch: Literal[tuple(VIT_ARCHS)] = "vit_small"  # type: ignore[valid-type]
    drop_path_rate: float = 0.0
    layerscale_init: float | None = None  # None: the architecture's own (models/vit.py)
    # RoPE box jitter drawn per block and crop group (the official ViT) or once per forward; None: the arch's.
    rope_jitter_per: Literal["block", "forward"] | None = None
    attn_impl: AttnImpl = "auto"  # the attention kernel's auto/triton/reference, or sdpa / xformers (README.md)
    dino_prototypes: int = 65536
    dino_hidden: int = 2048
    dino_bottleneck: int = 256
    ibot_prototypes: int = 65536
    ibot_hidden: int = 2048
    ibot_bottleneck: int = 256
    # Prototype scores as cosine similarities (unit-norm prototypes, DINOv1/v2) instead of DINOv3's raw Linear.
    normalize_prototypes: bool = False
    # Sinkhorn and Gram kernels (README.md, "Kernel dispatch"); "reference" materializes the Gram matrices.
    kernel_impl: KernelImpl = "auto"


@dataclass
class DataConfig:
    path: str | None = None  # image folder or .txt file list; None = the photos bundled with scikit-image/learn
    batch_size: int = 64  # per rank; global batch = batch_size x world size
    num_workers: int = 8
    global_size: int = CropSizes.global_size
    local_size: int = CropSizes.local_size
    mask_probability: float = MaskingCollate.mask_probability  # fraction of global crops that get iBOT masks
    mask_ratio: tuple[float, float] = MaskingCollate.mask_ratio  # fraction of patches masked in a masked crop
    # Side of the Gram teacher's crops (same region as each global crop; 2x in the recipe). None: the Gram
    # teacher sees the global crops themselves. Used only with --gram.enabled.
    gram_teacher_size: int | None = None
    # High-resolution adaptation: per-step (global, local, Gram-teacher) sizes drawn with these probabilities;
    # when set they replace global_size, local_size and gram_teacher_size.
    size_schedule: tuple[tuple[int, int, int], ...] = ()
    size_probabilities: tuple[float, ...] = ()


@dataclass
class OptimConfig:
    iterations: int = 1_000_000
    # Effective values: the official configs give base learning rates that their scaling rule multiplies by
    # 4 sqrt(global batch / 1024) (schedules.sqrt_scaled_lr); each preset states the global batch it assumes.
    lr: Schedule = field(default_factory=lambda: Schedule(
        peak=sqrt_scaled_lr(5e-5, VIT7B_GLOBAL_BATCH), start=0.0, warmup_iterations=100_000))
    weight_decay: Schedule = field(default_factory=lambda: constant(0.04))
    # The prototypes (the heads' last layers) get learning rate 0 for this many steps.
    freeze_last_layer_iterations: int = 5_000
    beta1: float = 0.9
    beta2: float = 0.99
    layerwise_decay: float = 0.98
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 30.0  # on each of backbone, DINO head and iBOT head separately, as the official loop


@dataclass
class TeacherConfig:
    """The EMA teacher: the temperature of its targets and its momentum."""

    temp: Schedule = field(default_factory=lambda: Schedule(peak=0.07, start=0.04, warmup_iterations=100_000))
    momentum: Schedule = field(default_factory=lambda: constant(0.994))  # the paper's text: 0.999


@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    # "both": the released code's KoLeo, on each global crop's class tokens, (KoLeo(crop 1) + KoLeo(crop 2));
    # "first": the paper's text, on the first global crop only.
    koleo_crops: KoLeoCrops = "both"
    # Neighbour sets: None, this rank's batch of each crop (koleo_loss_distributed false); N: groups of N
    # consecutive images of the global batch, across ranks (the paper's 16; the high-resolution config).
    koleo_group_size: int | None = None
    student_temp: float = 0.1
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"
    sinkhorn_iterations: int = SINKHORN_ITERATIONS
    center_momentum: float = CENTER_MOMENTUM  # softmax centering only
    # Weight of the local-crop DINO terms (the official `reweight_dino_local_loss` schedule); 1 is the plain loss.
    dino_local_weight: Schedule = field(default_factory=lambda: constant(1.0))


@dataclass
class GramConfig:
    """Gram anchoring (paper section 4; recipe: weight 2, update every 10k steps, at most 3 updates)."""

    enabled: bool = False
    weight: Schedule = field(default_factory=lambda: constant(2.0))
    # Step at which the loss switches on; without init_from the Gram teacher is the EMA teacher of that step.
    start_iteration: int = 0
    # Gram teacher weights instead: a train.py checkpoint or run folder (its EMA teacher), or a released backbone.
    init_from: str | None = None
    update_frequency: int = 10_000  # the Gram teacher becomes the current EMA teacher every N steps (0: never)
    max_updates: int = 3
    tokens_used: GramTokens = "all"
    normalize: bool = True
    remove_neg: bool = False
    img_level: bool = True  # one Gram matrix per image (False: one over the batch)
    resize_mode: ResizeMode = "bicubic"  # Gram-teacher patch map -> student grid
    resize_antialias: bool = False  # the official default


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
    dense_every: int = 0  # dense metric of the teacher every N steps (0: off): ridge-probe mIoU on generated scenes
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/inf instead of stopping
    max_nonfinite_skips: int = 10
    dist_timeout_s: float = 600.0
    print_config: bool = False  # print the resolved config as JSON and exit


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Start from an earlier run instead of random weights: a train.py checkpoint (or a run folder: its newest
    # checkpoint) gives student, EMA teacher and heads; a released DINOv3 / Hugging Face backbone gives the
    # backbones (heads start fresh). Ignored when output_dir already holds a checkpoint to resume.
    init_from: str | None = None
    # From a train.py checkpoint the student takes the student's weights ("student": continue where the run
    # was) or the EMA teacher's ("teacher": the official high-resolution recipe restarts both from the teacher).
    init_student_from: Literal["student", "teacher"] = "student"
    # With a train.py checkpoint in init_from: take its step, optimizer and loss state too, so this config's
    # schedules continue that run's step count (the official Gram anchoring config is iterations 1M-1.2M of the
    # pretraining run) and its data stream goes on where it was.
    init_continues_run: bool = False


def _demo() -> TrainConfig:
    """vit_tiny on generated images (`--data.path procedural`) at small crops: a few minutes on a laptop CPU,
    with the teacher's k-NN accuracy on held-out labeled procedural images at initialization and every 100 steps.

    Departures from the recipe: LayerScale starts at 1.0 (at 1e-5 the class token of a fresh net is the same for
    every image, so the teacher's targets carry no signal until the blocks grow), the teacher temperature stays
    at 0.04, flips are on (as DINOv2), and the schedules are minutes long. Even so a run of minutes ends near what raw
    pixels give: docs/ablations.md measures these and the other knobs, and says why.
    """
    return TrainConfig(
        model=ModelConfig(arch="vit_tiny", layerscale_init=1.0, dino_prototypes=1024, dino_hidden=512,
                          dino_bottleneck=128, ibot_prototypes=1024, ibot_hidden=512, ibot_bottleneck=128),
        data=DataConfig(path="procedural", batch_size=16, num_workers=2, global_size=96, local_size=48),
        # Flips and the nominal blur probabilities: the augmentation every measurement in docs/ was made with.
        augment=AugmentConfig(n_local_crops=4, flip_p=0.5, first_global_blur_p=1.0, second_global_blur_p=0.1),
        optim=OptimConfig(iterations=300, lr=Schedule(peak=1e-3, start=0.0, warmup_iterations=15),
                          freeze_last_layer_iterations=10),
        teacher=TeacherConfig(temp=constant(0.04), momentum=constant(0.99)),
        run=RunConfig(output_dir="runs/demo", log_every=25, checkpoint_every=100, knn_every=100,
                      knn_train_images=1000),
    )


def _imagenet_style(arch: str, prototypes: int, batch_size: int, drop_path: float) -> TrainConfig:
    """A DINOv2-style ViT-S/B/L run on an image folder (not an official DINOv3 config; see vitl16-im1k)."""
    return TrainConfig(
        model=ModelConfig(arch=arch, drop_path_rate=drop_path, dino_prototypes=prototypes,
                          ibot_prototypes=prototypes),
        data=DataConfig(batch_size=batch_size),
        augment=AugmentConfig(flip_p=0.5),
        optim=OptimConfig(iterations=250_000, lr=Schedule(peak=1e-3, start=0.0, end=1e-6, warmup_iterations=25_000),
                          freeze_last_layer_iterations=1250),
        teacher=TeacherConfig(temp=Schedule(peak=0.07, start=0.04, warmup_iterations=25_000),
                              momentum=Schedule(peak=0.992, end=1.0)),
        run=RunConfig(output_dir=f"runs/{arch}"),
    )


def _vit7b() -> TrainConfig:
    """dinov3_vit7b16_pretrain.yaml: 1M steps (1000 epochs of 1000) at a global batch of 4096 (16 x 256 GPUs)."""
    # Optimizer, teacher, losses and augmentation: the config groups' defaults, which are this config's.
    return TrainConfig(
        model=ModelConfig(arch="vit_7b", drop_path_rate=0.4, dino_prototypes=262144, dino_hidden=8192,
                          dino_bottleneck=512, ibot_prototypes=98304, ibot_hidden=4096, ibot_bottleneck=384),
        data=DataConfig(batch_size=VIT7B_GLOBAL_BATCH // 256),
        # The official config also compiles the model (train.compile: true); --run.compile does that here.
        run=RunConfig(output_dir="runs/vit7b16", parallel="fsdp", activation_checkpointing=True),
    )


def _gram_anchor() -> TrainConfig:
    """dinov3_vit7b16_gram_anchor.yaml: the pretraining run continued to 1.2M steps (`--init-from` its checkpoint
    at 1M; the run takes that step). From 1M the Gram weight rises by a cosine from 0 to 2 over 1000 steps and the
    DINO local-crop weight falls from 1 to 0.5; the Gram teacher is the EMA teacher of step 1M, refreshed at 1.01M,
    1.02M and 1.03M, and sees 512 px crops without photometric distortions."""
    cfg = _vit7b()
    refinement_start = 1_000_000
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, gram_teacher_size=512),
        augment=dataclasses.replace(cfg.augment, gram_teacher_photometric=False),
        optim=dataclasses.replace(
            cfg.optim, iterations=1_200_000,
            lr=Schedule(peak=sqrt_scaled_lr(3e-5, VIT7B_GLOBAL_BATCH), start=0.0, warmup_iterations=100_000)),
        teacher=dataclasses.replace(cfg.teacher, momentum=constant(0.999)),
        loss=dataclasses.replace(cfg.loss, dino_local_weight=Schedule(
            peak=1.0, start=1.0, end=0.5, warmup_iterations=refinement_start, cosine_iterations=1000)),
        gram=GramConfig(enabled=True, start_iteration=refinement_start, update_frequency=10_000, max_updates=3,
                        weight=Schedule(peak=0.0, start=0.0, end=2.0, warmup_iterations=refinement_start,
                                        cosine_iterations=1000)),
        init_continues_run=True,
        run=dataclasses.replace(cfg.run, output_dir="runs/gram-anchor"),
    )


# The official high-resolution (global, local, Gram-teacher) crop sizes and their probabilities.
OFFICIAL_HRFT_SIZES = ((512, 112, 768), (768, 112, 1152), (768, 168, 1152), (768, 224, 1152), (768, 336, 1152))
OFFICIAL_HRFT_PROBABILITIES = (0.3, 0.3, 0.3, 0.05, 0.05)


def _hrft() -> TrainConfig:
    """dinov3_vit7b16_high_res_adapt.yaml: 30k steps (the paper's text says 10k) at a global batch of 2048, sizes
    drawn per step; student and EMA teacher start from the adapted run's teacher, which is also the (never
    refreshed) Gram teacher; the lr rises by a half cosine from 0 over the first 10k steps, then stays."""
    cfg = _vit7b()
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, batch_size=HRFT_GLOBAL_BATCH // 256, size_schedule=OFFICIAL_HRFT_SIZES,
                                 size_probabilities=OFFICIAL_HRFT_PROBABILITIES),
        augment=dataclasses.replace(cfg.augment, gram_teacher_photometric=False),
        optim=dataclasses.replace(
            cfg.optim, iterations=30_000, freeze_last_layer_iterations=0,
            lr=Schedule(peak=0.0, start=0.0, end=sqrt_scaled_lr(1.25e-5, HRFT_GLOBAL_BATCH), cosine_iterations=10_000)),
        teacher=TeacherConfig(temp=constant(0.07), momentum=constant(0.999)),
        loss=dataclasses.replace(cfg.loss, koleo_group_size=16, dino_local_weight=constant(0.5)),
        gram=GramConfig(enabled=True, weight=constant(1.5), update_frequency=0),
        init_student_from="teacher",
        run=dataclasses.replace(cfg.run, output_dir="runs/hrft", checkpoint_every=250),
    )


def _vitl_im1k() -> TrainConfig:
    """vitl_im1k_lin834.yaml, the official "fast setup" (82.0 k-NN / 83.5 linear on ImageNet-1k): 100 epochs of
    1250 steps at a global batch of 2048 (64 x 32 GPUs), with its own ViT-L variant (vit_large_im1k). The config
    uses the older scheduler, whose warmups include their endpoint: its values differ from these by at most one
    warmup step's increment (under 1e-4 relative). Its RoPE runs in bf16; here in float32."""
    epoch = 1250
    return TrainConfig(
        model=ModelConfig(arch="vit_large_im1k", drop_path_rate=0.3),
        data=DataConfig(batch_size=VITL_IM1K_GLOBAL_BATCH // 32, global_size=224, local_size=96),
        augment=AugmentConfig(flip_p=0.5),
        optim=OptimConfig(
            iterations=100 * epoch,
            lr=Schedule(peak=sqrt_scaled_lr(1e-3, VITL_IM1K_GLOBAL_BATCH), start=0.0, end=1e-6,
                        warmup_iterations=10 * epoch),
            weight_decay=Schedule(peak=0.04, end=0.4), freeze_last_layer_iterations=epoch, beta2=0.999,
            layerwise_decay=0.9, clip_grad=3.0),
        teacher=TeacherConfig(temp=Schedule(peak=0.07, start=0.04, warmup_iterations=30 * epoch),
                              momentum=Schedule(peak=0.992, end=1.0)),
        run=RunConfig(output_dir="runs/vitl16-im1k", checkpoint_every=3 * epoch),
    )


def _continuation(cfg: TrainConfig, iterations: int) -> TrainConfig:
    """A later phase of `cfg`'s run from step 0: same model and losses, the plateau of its schedules, no
    last-layer freeze (the CPU demo chain)."""
    optim = dataclasses.replace(cfg.optim, iterations=iterations, lr=constant(cfg.optim.lr.final),
                                weight_decay=constant(cfg.optim.weight_decay.final), freeze_last_layer_iterations=0)
    teacher = TeacherConfig(temp=constant(cfg.teacher.temp.final), momentum=constant(cfg.teacher.momentum.final))
    return dataclasses.replace(cfg, optim=optim, teacher=teacher)


def _demo_gram() -> TrainConfig:
    """`demo` -> Gram anchoring on CPU: 60 steps from runs/demo, Gram teacher on 2x crops (192 px), refreshed at
    steps 20 and 40 (a short stand-in for gram-anchor: weight 2 from step 0, photometric ops on its crops)."""
    cfg = _continuation(_demo(), iterations=60)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, gram_teacher_size=192),
        gram=GramConfig(enabled=True, weight=constant(2.0), update_frequency=20, max_updates=2),
        init_from="runs/demo",
        run=dataclasses.replace(cfg.run, output_dir="runs/demo-gram", checkpoint_every=20, knn_every=60),
    )


def _demo_hrft() -> TrainConfig:
    """`demo-gram` -> high-resolution adaptation on CPU: 40 steps from runs/demo-gram; the official five size
    triples scaled to the demo (global 128-160 px instead of 512-768, Gram teacher 1.5x as in the config)."""
    cfg = _continuation(_demo(), iterations=40)
    sizes = ((128, 48, 192), (160, 48, 240), (160, 64, 240), (160, 80, 240), (160, 96, 240))
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, size_schedule=sizes, size_probabilities=OFFICIAL_HRFT_PROBABILITIES),
        gram=GramConfig(enabled=True, weight=constant(2.0), update_frequency=0),
        init_from="runs/demo-gram",
        init_student_from="teacher",
        run=dataclasses.replace(cfg.run, output_dir="runs/demo-hrft", checkpoint_every=20, knn_every=40),
    )


PRESETS: dict[str, tuple[str, TrainConfig]] = {
    "demo": ("vit_tiny on generated images, CPU, a few minutes, k-NN before and after (the default)", _demo()),
    "demo-gram": ("Gram anchoring of the demo run (runs/demo), CPU, a few minutes", _demo_gram()),
    "demo-hrft": ("high-resolution adaptation of runs/demo-gram, CPU, a few minutes", _demo_hrft()),
    "vits16": ("ViT-S/16 on an image folder (--data.path), DINOv2-style schedule", _imagenet_style("vit_small", 65536, 64, 0.1)),
    "vitb16": ("ViT-B/16 on an image folder (--data.path), DINOv2-style schedule", _imagenet_style("vit_base", 65536, 64, 0.1)),
    "vitl16": ("ViT-L/16 on an image folder (--data.path), DINOv2-style schedule", _imagenet_style("vit_large", 65536, 32, 0.3)),
    "vitl16-im1k": ("vitl_im1k_lin834.yaml: ViT-L on ImageNet-1k (--data.path), the official fast setup", _vitl_im1k()),
    "vit7b16": ("dinov3_vit7b16_pretrain.yaml: the ViT-7B/16 pretraining", _vit7b()),
    "gram-anchor": ("dinov3_vit7b16_gram_anchor.yaml: Gram anchoring, --init-from the pretraining checkpoint at 1M", _gram_anchor()),
    "hrft": ("dinov3_vit7b16_high_res_adapt.yaml: high-resolution adaptation, --init-from a checkpoint", _hrft()),
}


def validate_config(cfg: TrainConfig, world_size: int) -> None:
    """Reject impossible combinations before any data is read or any weight is built."""
    patch = VIT_ARCHS[cfg.model.arch].patch_size
    problems = []
    if cfg.data.global_size % patch or cfg.data.global_size < patch:
        problems.append(f"data.global_size={cfg.data.global_size} is not a positive multiple of the patch size {patch}")
    if cfg.data.local_size < patch:  # other sides are fine: the ViT drops the remainder
        problems.append(f"data.local_size={cfg.data.local_size} is smaller than one {patch} px patch")
    if cfg.data.batch_size < 1:
        problems.append(f"data.batch_size={cfg.data.batch_size} must be at least 1 (it is per rank)")
    for name, (lo, hi) in (("augment.global_scale", cfg.augment.global_scale),
                           ("augment.local_scale", cfg.augment.local_scale), ("data.mask_ratio", cfg.data.mask_ratio)):
        if not 0 <= lo <= hi <= 1:
            problems.append(f"{name}={(lo, hi)} must satisfy 0 <= low <= high <= 1")
    if not 0 <= cfg.data.mask_probability <= 1:
        problems.append(f"data.mask_probability={cfg.data.mask_probability} must be in [0, 1]")
    if cfg.optim.iterations < 1:
        problems.append("optim.iterations must be at least 1")
    for name, schedule in (("optim.lr", cfg.optim.lr), ("optim.weight_decay", cfg.optim.weight_decay),
                           ("teacher.temp", cfg.teacher.temp), ("teacher.momentum", cfg.teacher.momentum),
                           ("loss.dino_local_weight", cfg.loss.dino_local_weight), ("gram.weight", cfg.gram.weight)):
        problems += schedule.problems(name)
    if cfg.loss.koleo_group_size is not None and cfg.loss.koleo_group_size < 2:
        problems.append(f"loss.koleo_group_size={cfg.loss.koleo_group_size} must be >= 2 (or None: the rank's batch)")
    if cfg.init_continues_run and cfg.init_from is None:
        problems.append("init_continues_run needs --init-from (the train.py checkpoint whose run to continue)")
    problems += _phase_problems(cfg, patch)
    if cfg.run.parallel == "fsdp" and world_size == 1:
        logger.info("parallel=fsdp with one process: sharding over a single rank (works, saves nothing)")
    if problems:
        raise ValueError("invalid training config:\n  - " + "\n  - ".join(problems))


def _phase_problems(cfg: TrainConfig, patch: int) -> list[str]:
    """What is wrong with the Gram-anchoring and high-resolution settings."""
    problems = []
    data, gram = cfg.data, cfg.gram
    if data.gram_teacher_size is not None and (data.gram_teacher_size % patch or data.gram_teacher_size < patch):
        problems.append(f"data.gram_teacher_size={data.gram_teacher_size} is not a positive multiple of the patch size {patch}")
    if len(data.size_schedule) != len(data.size_probabilities):
        problems.append(f"data.size_schedule has {len(data.size_schedule)} size triples but data.size_probabilities "
                        f"has {len(data.size_probabilities)} values: give one probability per triple")
    elif data.size_schedule:
        if min(data.size_probabilities) < 0 or not math.isclose(sum(data.size_probabilities), 1.0, abs_tol=1e-6):
            problems.append(f"data.size_probabilities={data.size_probabilities} must be >= 0 and sum to 1")
        bad = [size for g, local, t in data.size_schedule for size in (g, t) if size % patch or size < patch]
        bad += [local for _, local, _ in data.size_schedule if local < patch]
        if bad:
            problems.append(f"data.size_schedule sizes {sorted(set(bad))} do not fit the patch size {patch}: global and "
                            "Gram-teacher sizes must be positive multiples of it, local sizes at least one patch")
    if gram.enabled:
        if gram.start_iteration < 0 or gram.update_frequency < 0 or gram.max_updates < 0:
            problems.append("gram.start_iteration, gram.update_frequency and gram.max_updates must be >= 0")
        if gram.tokens_used != "all" and gram.img_level:
            problems.append(f"gram.tokens_used={gram.tokens_used!r} needs --gram.no-img-level (a different number of "
                            "patches per image: one Gram matrix over the batch)")
        if cfg.init_from is None and gram.init_from is None and gram.start_iteration == 0:
            problems.append("the Gram teacher would be the randomly initialized teacher of step 0: pass --init-from "
                            "(the pretraining checkpoint to refine), --gram.init-from, or --gram.start-iteration > 0")
        if gram.start_iteration >= cfg.optim.iterations:
            problems.append(f"gram.start_iteration={gram.start_iteration} is not before optim.iterations="
                            f"{cfg.optim.iterations}: the Gram loss would never run")
    if cfg.init_student_from == "teacher" and cfg.init_from is None:
        problems.append("init_student_from='teacher' needs --init-from (the checkpoint whose teacher to start from)")
    return problems


def parse_config(argv: list[str] | None = None, presets: dict | None = None):
    """`train.py [preset] [--field value ...]`; without a preset name, `demo`. distill.py passes its presets.
    `--deterministic` and `--print-config` are short for `--run.deterministic` and `--run.print-config`."""
    presets = PRESETS if presets is None else presets
    short = {"--deterministic": "--run.deterministic", "--print-config": "--run.print-config"}
    argv = [short.get(arg, arg) for arg in (sys.argv[1:] if argv is None else argv)]
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]
    if argv[0] not in presets and not argv[0].startswith("-"):
        raise SystemExit(f"unknown preset {argv[0]!r}; choose one of: {', '.join(presets)}")
    return tyro.extras.overridable_config_cli(presets, args=argv)


# ====================================================================================================
# Model: backbone + heads, student and EMA teacher
# ====================================================================================================


def vit_overrides(cfg: ModelConfig) -> dict:
    """The ViT fields this config sets on top of its architecture's (models/vit.py holds the defaults)."""
    fields = {"layerscale_init": cfg.layerscale_init, "rope_jitter_per": cfg.rope_jitter_per}
    return {name: value for name, value in fields.items() if value is not None}


class SSLNet(nn.Module):
    """A backbone with its DINO (class token) and iBOT (patch tokens) heads."""

    def __init__(self, cfg: ModelConfig, drop_path_rate: float):
        super().__init__()
        self.backbone: VisionTransformer = build_vit(cfg.arch, drop_path_rate=drop_path_rate, attn_impl=cfg.attn_impl,
                                                     **vit_overrides(cfg))
        dim = self.backbone.embed_dim
        self.dino_head = DINOHead(dim, cfg.dino_prototypes, cfg.dino_hidden, cfg.dino_bottleneck,
                                  normalize_prototypes=cfg.normalize_prototypes)
        self.ibot_head = DINOHead(dim, cfg.ibot_prototypes, cfg.ibot_hidden, cfg.ibot_bottleneck,
                                  normalize_prototypes=cfg.normalize_prototypes)

    def forward(self, global_crops, local_crops, masks, mask_indices):
        """Student pass over all crops: DINO logits of every crop, iBOT logits of the masked patches, the class
        tokens of the global crops (KoLeo) and their patch tokens [2B, P, C] (Gram anchoring)."""
        crops = [global_crops] + ([local_crops] if local_crops.numel() else [])
        outs = self.backbone(crops, [masks] + [None] * (len(crops) - 1))
        cls_tokens = torch.cat([o["x_norm_clstoken"] for o in outs])  # [2B + nB, C], crop-major
        global_patches = outs[0]["x_norm_patchtokens"]
        masked_patches = global_patches.flatten(0, 1).index_select(0, mask_indices)
        return self.dino_head(cls_tokens), self.ibot_head(masked_patches), outs[0]["x_norm_clstoken"], global_patches

    @torch.no_grad()
    def teacher_forward(self, global_crops, mask_indices):
        out = self.backbone(global_crops)
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        return self.dino_head(out["x_norm_clstoken"]), self.ibot_head(patches)


def build_student_teacher(cfg: TrainConfig) -> tuple[SSLNet, SSLNet]:
    student = SSLNet(cfg.model, cfg.model.drop_path_rate)
    teacher = SSLNet(cfg.model, drop_path_rate=0.0)
    teacher.load_state_dict(student.state_dict())
    # Evaluation mode, as the official loop keeps it: no dropped paths and no RoPE box jitter for the teacher.
    teacher.requires_grad_(False).eval()
    return student, teacher


def build_gram_teacher(cfg: TrainConfig) -> VisionTransformer | None:
    """The frozen Gram teacher (a backbone only), or None without Gram anchoring. Its weights come from the EMA
    teacher (`copy_weights`) or from --gram.init-from (`load_gram_teacher`)."""
    if not cfg.gram.enabled:
        return None
    gram_teacher = build_vit(cfg.model.arch, drop_path_rate=0.0, attn_impl=cfg.model.attn_impl,
                             **vit_overrides(cfg.model))
    return gram_teacher.requires_grad_(False).eval()


def gram_teacher_event(step: int, cfg: GramConfig) -> Literal["create", "update"] | None:
    """Whether the Gram teacher becomes a copy of the EMA teacher before `step` runs: a pure function of the
    step, so a resumed run repeats the same schedule. "create" at start_iteration (unless the Gram teacher was
    loaded with init_from), "update" every update_frequency steps after it, max_updates times at most."""
    if not cfg.enabled:
        return None
    if step == cfg.start_iteration and cfg.init_from is None:
        return "create"
    since = step - cfg.start_iteration
    if cfg.update_frequency > 0 and since > 0 and since % cfg.update_frequency == 0 \
            and since // cfg.update_frequency <= cfg.max_updates:
        return "update"
    return None


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """dst's parameters := src's (same architecture; FSDP2 shards copied shard by shard)."""
    _reshard(src)
    _reshard(dst)
    for d, s in zip(dst.parameters(), src.parameters(), strict=True):
        _local(d).copy_(_local(s))


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


def wrap_for_parallel(student: SSLNet, teacher: SSLNet, cfg: RunConfig, dist_info: runtime.Dist,
                      gram_teacher: VisionTransformer | None = None) -> nn.Module:
    """DDP around the student, or FSDP2 `fully_shard` per block (student, teacher, Gram teacher sharded alike)."""
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
        if gram_teacher is not None:  # sharded like the teacher's backbone, so copy_weights pairs equal shards
            for block in gram_teacher.blocks:
                fully_shard(block, mp_policy=mp)
            fully_shard(gram_teacher, mp_policy=mp)
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


def param_groups(student: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups as the official code makes them: layer-wise lr decay (`layer_id`), patch embedding lr x
    patch_embed_lr_mult, no weight decay on biases, norms and LayerScale gammas (the learned tokens do get it),
    and the prototype layers (`last_layer`) in groups of their own, frozen at lr 0 for the first steps."""
    depth = len(student.backbone.blocks)
    groups: dict[tuple, dict] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = cfg.layerwise_decay ** (depth + 1 - layer_id(name, depth))
        if "patch_embed" in name:
            lr_mult *= cfg.patch_embed_lr_mult
        no_wd = name.endswith("bias") or "norm" in name or "gamma" in name
        key = (lr_mult, 0.0 if no_wd else 1.0, "last_layer" in name)
        group = groups.setdefault(key, {"params": [], "lr_mult": key[0], "wd_mult": key[1], "last_layer": key[2]})
        group["params"].append(param)
    return list(groups.values())


@dataclass(frozen=True)
class Schedules:
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_frozen: bool
    dino_local_weight: float = 1.0
    gram_weight: float = 0.0  # 0: no Gram loss this step (and no Gram-teacher forward)


def schedules_at(step: int, optim: OptimConfig, teacher: TeacherConfig, loss: LossConfig | None = None,
                 gram: GramConfig | None = None) -> Schedules:
    """Every scheduled value at `step`: a pure function, so resuming needs only the step."""
    total = optim.iterations
    gram_weight = 0.0
    if gram is not None and gram.enabled and step >= gram.start_iteration:
        gram_weight = gram.weight.at(step, total)
    return Schedules(
        lr=optim.lr.at(step, total),
        weight_decay=optim.weight_decay.at(step, total),
        momentum=teacher.momentum.at(step, total),
        teacher_temp=teacher.temp.at(step, total),
        last_layer_frozen=step < optim.freeze_last_layer_iterations,
        dino_local_weight=1.0 if loss is None else loss.dino_local_weight.at(step, total),
        gram_weight=gram_weight,
    )


def apply_schedules(optimizer: torch.optim.Optimizer, sched: Schedules) -> None:
    for group in optimizer.param_groups:
        frozen = group.get("last_layer", False) and sched.last_layer_frozen
        group["lr"] = 0.0 if frozen else sched.lr * group["lr_mult"]
        group["weight_decay"] = sched.weight_decay * group["wd_mult"]


# ====================================================================================================
# Losses of one step
# ====================================================================================================


def build_koleo(loss: LossConfig, process_group=None) -> nn.Module:
    """KoLeo over each rank's own batch (no group size: no communication), or over groups of
    loss.koleo_group_size consecutive images of the global batch, even when a group spans ranks."""
    if loss.koleo_group_size is None:
        return KoLeoLoss(group_size=None)
    return DistributedKoLeoLoss(group_size=loss.koleo_group_size, process_group=process_group)


def koleo_of_crops(koleo: nn.Module, cls_global: torch.Tensor, n_global: int, crops: KoLeoCrops) -> torch.Tensor:
    """The official objective's KoLeo term: KoLeo of each global crop's class tokens ([n_global * B, C],
    crop-major), summed over the crops (its code's crop average times n_global); crops="first": the paper's text,
    the first global crop only."""
    per_crop = cls_global.unflatten(0, (n_global, -1))
    return sum(koleo(tokens) for tokens in (per_crop[:1] if crops == "first" else per_crop))


class SSLLosses(nn.Module):
    """DINO + iBOT + KoLeo (+ Gram anchoring) with their teacher centering; the only state is the optional softmax
    centers."""

    def __init__(self, cfg: TrainConfig, process_group=None):
        super().__init__()
        loss, model = cfg.loss, cfg.model
        self.cfg = loss
        # process_group: the ranks whose samples form the batch (None: all; distill.py: one student's ranks).
        centering = dict(centering=loss.centering, center_momentum=loss.center_momentum,
                         sinkhorn_iterations=loss.sinkhorn_iterations, sinkhorn_impl=model.kernel_impl,
                         process_group=process_group)
        self.dino = DINOLoss(model.dino_prototypes, student_temp=loss.student_temp, **centering)
        self.ibot = IBOTLoss(model.ibot_prototypes, student_temp=loss.student_temp, **centering)
        self.koleo = build_koleo(loss, process_group)
        gram = cfg.gram
        self.gram = GramAnchoringLoss(
            normalize=gram.normalize, remove_neg=gram.remove_neg, img_level=gram.img_level,
            tokens_used=gram.tokens_used, resize_mode=gram.resize_mode, resize_antialias=gram.resize_antialias,
            impl=model.kernel_impl,
        ) if gram.enabled else None

    def forward(self, student_out, teacher_out, batch: dict, teacher_temp: float, n_global: int,
                dino_local_weight: float = 1.0, gram_targets: tuple | None = None, gram_weight: float = 0.0) -> dict:
        """gram_targets: (Gram-teacher patch tokens [2B, P_t, C], their grid, the student's grid) for a step with
        the Gram loss; student_out then holds the student's global-crop patch tokens as its 4th entry."""
        dino_student, ibot_student, cls_global = student_out[:3]
        dino_teacher_logits, ibot_teacher_logits = teacher_out
        dino_targets = self.dino.teacher_probs(dino_teacher_logits, teacher_temp)
        ibot_targets = self.ibot.teacher_probs(ibot_teacher_logits, teacher_temp)
        dino = self.dino(dino_student, dino_targets, n_global_crops=n_global, local_weight=dino_local_weight)
        ibot = self.ibot(ibot_student, ibot_targets, batch["mask_weights"], n_images=batch["global_crops"].shape[0])
        koleo = koleo_of_crops(self.koleo, cls_global, n_global, self.cfg.koleo_crops)
        total = self.cfg.dino_weight * dino.loss + self.cfg.ibot_weight * ibot + self.cfg.koleo_weight * koleo
        terms = {"dino": dino.loss, "dino_global": dino.global_loss, "dino_local": dino.local_loss, "ibot": ibot,
                 "koleo": koleo}
        if gram_targets is not None:
            student_patches = student_out[3]
            teacher_patches, teacher_grid, student_grid = gram_targets
            gram = self.gram(student_patches, teacher_patches, student_grid, teacher_grid,
                             batch["masks"].view(student_patches.shape[:2]))
            total = total + gram_weight * gram
            terms["gram"] = gram
        if self.cfg.centering == "softmax":
            self.dino.update_center(dino_teacher_logits)
            self.ibot.update_center(ibot_teacher_logits)
        return {"total": total, **terms}


def forward_losses(model: nn.Module, teacher: SSLNet, losses: SSLLosses, batch: dict, sched: Schedules,
                   autocast: bool, gram_teacher: VisionTransformer | None = None) -> dict:
    """Teacher on the global crops, student (possibly DDP-wrapped: `model`) on all crops, the Gram teacher on its
    crops when this step has a Gram loss, and the loss terms."""
    device_type = batch["global_crops"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        teacher_out = teacher.teacher_forward(batch["global_crops"], batch["mask_indices"])
        gram_targets = None
        if gram_teacher is not None and sched.gram_weight > 0:
            gram_targets = gram_teacher_targets(gram_teacher, batch)
        student_out = model(batch["global_crops"], batch["local_crops"], batch["masks"], batch["mask_indices"])
        return losses(student_out, teacher_out, batch, sched.teacher_temp, n_global=2,
                      dino_local_weight=sched.dino_local_weight, gram_targets=gram_targets,
                      gram_weight=sched.gram_weight)


@torch.no_grad()
def gram_teacher_targets(gram_teacher: VisionTransformer, batch: dict) -> tuple:
    """The Gram teacher's patch tokens of its crops (the global crops when there are no separate ones), with
    their grid and the student's grid."""
    patch = gram_teacher.patch_size
    crops = batch.get("gram_teacher_crops", batch["global_crops"])
    patches = gram_teacher(crops)["x_norm_patchtokens"]
    grid = (crops.shape[-2] // patch, crops.shape[-1] // patch)
    student_grid = (batch["global_crops"].shape[-2] // patch, batch["global_crops"].shape[-1] // patch)
    return patches, grid, student_grid


def backward_and_update(total: torch.Tensor, student: SSLNet, teacher: SSLNet, optimizer: torch.optim.Optimizer,
                        sched: Schedules, clip_grad: float) -> torch.Tensor:
    """Backward, gradient clipping, AdamW step (the frozen prototypes have lr 0: `apply_schedules`), EMA teacher
    update; returns the norm of all gradients before clipping."""
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = clip_per_module((student.backbone, student.dino_head, student.ibot_head), clip_grad)
    # A finite loss can still have NaN/inf gradients (an overflow in backward): stepping would write them into the
    # weights and the next checkpoint. The norm is the same on every rank (gradients are reduced before it).
    if not torch.isfinite(grad_norm).item():
        return grad_norm  # no update: the loop stops or skips the step
    optimizer.step()
    ema_update(teacher, student, sched.momentum)
    return grad_norm


def clip_per_module(modules: tuple[nn.Module, ...], max_norm: float) -> torch.Tensor:
    """Clip each module's gradients to `max_norm` on its own (the official loop clips backbone and heads apart,
    so a head's large gradient does not shrink the backbone's); returns the norm over all of them."""
    norms = [torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm) for module in modules]
    norms = [norm.full_tensor() if hasattr(norm, "full_tensor") else norm for norm in norms]  # FSDP2: DTensors
    return torch.linalg.vector_norm(torch.stack(norms))


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


def _set_full_state(module: nn.Module, state: dict) -> None:
    """Load a full (unsharded) state dict into a plain or FSDP2-sharded module, strictly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def save_checkpoint(step: int, cfg: TrainConfig, student: SSLNet, teacher: SSLNet, optimizer, losses: SSLLosses,
                    stats: dict, dist_info: runtime.Dist, gram_teacher: VisionTransformer | None = None) -> Path | None:
    """Every rank takes part (FSDP gathers); rank 0 writes checkpoint + released-format teacher backbone."""
    student_state, optim_state = _full_state(student, optimizer)
    teacher_state = _full_state(teacher)
    gram_state = _full_state(gram_teacher) if gram_teacher is not None else None
    out_dir = Path(cfg.run.output_dir)
    path = runtime.checkpoint_path(out_dir, step)
    if dist_info.is_main:
        payload = {
            "format": TRAIN_CHECKPOINT_FORMAT,
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
        if gram_state is not None:  # a snapshot of an earlier teacher: not recoverable from anything else
            payload["gram_teacher"] = gram_state
        runtime.atomic_save(payload, path)
        backbone = {k[len("backbone."):]: v for k, v in teacher_state.items() if k.startswith("backbone.")}
        runtime.atomic_save(backbone, out_dir / "teacher_backbone.pth")
        runtime.prune_checkpoints(out_dir, cfg.run.keep_last)
    runtime.barrier(dist_info)
    return path if dist_info.is_main else None


COMPATIBLE_FIELDS = ("model.arch", "model.dino_prototypes", "model.dino_hidden", "model.dino_bottleneck",
                     "model.ibot_prototypes", "model.ibot_hidden", "model.ibot_bottleneck")


def _check_compatible(saved: dict, cfg: TrainConfig, path: Path, fix: str) -> None:
    for dotted in COMPATIBLE_FIELDS:
        section, name = dotted.split(".")
        old, new = saved[section][name], getattr(getattr(cfg, section), name)
        if old != new:
            raise CheckpointError(f"{path} was trained with {dotted}={old!r} but this run has {new!r}; {fix}")


def load_checkpoint(path: Path, cfg: TrainConfig, student: SSLNet, teacher: SSLNet, optimizer,
                    losses: SSLLosses, gram_teacher: VisionTransformer | None = None) -> dict:
    """Restore a run from its checkpoint; the payload's "gram_teacher" entry, when there is one, is loaded into
    `gram_teacher` (the caller decides what a missing one means)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    payload = read_checkpoint_file(path)
    if payload.get("format") != TRAIN_CHECKPOINT_FORMAT:
        kind = "a released-format backbone (weights only)" if "cls_token" in payload else "not a training checkpoint"
        raise CheckpointError(
            f"{path} is {kind}; --run.resume expects a full training checkpoint written by train.py "
            "(to start from backbone weights, use them to initialize a new run instead)"
        )
    _check_compatible(payload["config"], cfg, path, "use the same value or another --run.output-dir")
    _set_full_state(student, payload["student"])
    _set_full_state(teacher, payload["teacher"])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    # AdamW has no state yet for parameters that never had a gradient (the prototypes while the last layer is
    # frozen): load without them (not strict), then drop the placeholder state (step 1, zero moments) the loader
    # gives them, so that their first update is their first AdamW step, as in a run that was never interrupted.
    set_optimizer_state_dict(student, optimizer, payload["optimizer"],
                             options=dataclasses.replace(options, strict=False))
    for name, param in student.named_parameters():
        if name not in payload["optimizer"]["state"]:
            optimizer.state.pop(param, None)
    if gram_teacher is not None and "gram_teacher" in payload:
        _set_full_state(gram_teacher, payload["gram_teacher"])
    losses.load_state_dict(payload["losses"])
    runtime.set_rng_states(payload["rng"])
    return payload


def resolve_checkpoint_source(source: str, option: str) -> Path:
    """The file behind --init-from / --gram.init-from (a file or a run folder), checked before anything is built."""
    return checkpoint_path_or_error(source, f"{option} needs the earlier phase's output: run it first (e.g. `python "
                                            "train.py demo` before demo-gram) or pass a train.py or released checkpoint")


def initialize_from(path: Path, cfg: TrainConfig, student: SSLNet, teacher: SSLNet) -> None:
    """Weights of an earlier run for a new one (optimizer, schedules and data stream start afresh)."""
    payload = read_weights(path)
    if payload.get("format") == TRAIN_CHECKPOINT_FORMAT:
        _check_compatible(payload["config"], cfg, path, "set this run's model options to the checkpoint's")
        _set_full_state(student, payload[cfg.init_student_from])
        _set_full_state(teacher, payload["teacher"])
        logger.info(f"initialized from {path} (step {payload['step']}): student from its {cfg.init_student_from}, "
                    "EMA teacher from its teacher")
        return
    weights = load_backbone(payload, cfg.model.arch).state_dict()  # released or Hugging Face layout, checked
    _set_full_state(student.backbone, weights)
    _set_full_state(teacher.backbone, weights)
    logger.info(f"initialized both backbones from {path} (a backbone-only file: DINO and iBOT heads start fresh)")


def load_gram_teacher(path: Path, cfg: TrainConfig, gram_teacher: VisionTransformer) -> None:
    """--gram.init-from: a train.py checkpoint's EMA-teacher backbone, or a released / Hugging Face backbone."""
    weights = load_backbone(backbone_weights(read_weights(path), str(path)), cfg.model.arch).state_dict()
    _set_full_state(gram_teacher, weights)
    logger.info(f"Gram teacher loaded from {path}")


# ====================================================================================================
# The loop
# ====================================================================================================


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _seed_step(student: SSLNet, seed: int, step: int, rank: int) -> None:
    """Per-step seeds: the student's RoPE boxes are the same on every rank (the teachers, in evaluation mode,
    draw none); drop path differs per rank. Resume-proof."""
    student.backbone.rope_embed.seed(runtime.derived_seed(seed, step, 1))
    torch.manual_seed(runtime.derived_seed(seed, step, 3, rank))


def crop_size_schedule(cfg: TrainConfig) -> CropSizeSchedule:
    """The crop sizes of every step: fixed, or drawn per step from data.size_schedule (same on every rank).
    Gram-teacher crops are made only when the Gram loss is on and their size differs from the global crops'."""
    def gram_size(global_size: int, size: int | None) -> int | None:
        return size if cfg.gram.enabled and size not in (None, global_size) else None

    if cfg.data.size_schedule:
        choices = tuple(CropSizes(g, l, gram_size(g, t)) for g, l, t in cfg.data.size_schedule)
        return CropSizeSchedule(choices, tuple(cfg.data.size_probabilities), cfg.run.seed)
    sizes = CropSizes(cfg.data.global_size, cfg.data.local_size, gram_size(cfg.data.global_size, cfg.data.gram_teacher_size))
    return CropSizeSchedule((sizes,), (1.0,), cfg.run.seed)


def train(cfg: TrainConfig, images: ImageDataset | None = None) -> dict:
    """Run (or resume) a training run; returns a summary (final step, loss history, paths).

    `images` replaces the dataset named by cfg.data.path (tests pass a ProceduralDataset).
    """
    dist_info = runtime.setup_distributed(cfg.run.device, cfg.run.dist_timeout_s)
    out_dir = Path(cfg.run.output_dir)
    runtime.setup_logging(out_dir, dist_info.is_main)
    validate_config(cfg, dist_info.world_size)
    existing = runtime.list_checkpoints(out_dir) if cfg.run.resume else []
    # Missing weights files and a missing or empty dataset raise here, before any model is built.
    init_path = resolve_checkpoint_source(cfg.init_from, "--init-from") if cfg.init_from and not existing else None
    # (A resumed run takes its Gram teacher from its own checkpoint: --gram.init-from is read only when that lacks one.)
    gram_init_path = resolve_checkpoint_source(cfg.gram.init_from, "--gram.init-from") if (
        cfg.gram.enabled and cfg.gram.init_from and not existing) else None
    dataset = images if images is not None else build_dataset(cfg.data.path)
    if cfg.run.deterministic:
        runtime.make_deterministic()
    runtime.seed_everything(cfg.run.seed)
    device = dist_info.device

    student, teacher = build_student_teacher(cfg)
    gram_teacher = build_gram_teacher(cfg)
    for net in (student, teacher, gram_teacher):
        if net is not None:
            net.to(device)
    losses = SSLLosses(cfg).to(device)
    model = wrap_for_parallel(student, teacher, cfg.run, dist_info, gram_teacher)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.optim), lr=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2))

    start_step, stats = 0, {"nonfinite_skips": 0, "images_skipped": 0}
    gram_restored = False
    restored_from = existing[-1][1] if existing else init_path if cfg.init_continues_run else None
    if restored_from is not None:
        payload = load_checkpoint(restored_from, cfg, student, teacher, optimizer, losses, gram_teacher)
        start_step, stats = payload["step"], payload["stats"]
        gram_restored = "gram_teacher" in payload
        how = "resumed from" if existing else "continuing the run of"
        logger.info(f"{how} {restored_from} at step {start_step}"
                    + (f" (--init-from {cfg.init_from} not used: resuming)" if existing and cfg.init_from else ""))
        if start_step >= cfg.optim.iterations:
            raise CheckpointError(f"{restored_from} is at step {start_step}, not before optim.iterations="
                                  f"{cfg.optim.iterations}: nothing left to run (raise --optim.iterations)")
    elif init_path is not None:
        initialize_from(init_path, cfg, student, teacher)
    if gram_teacher is not None and not gram_restored:
        if cfg.gram.init_from:
            path = gram_init_path or resolve_checkpoint_source(cfg.gram.init_from, "--gram.init-from")
            load_gram_teacher(path, cfg, gram_teacher)
        elif start_step > cfg.gram.start_iteration:
            raise CheckpointError(
                f"{restored_from} holds no Gram teacher, but this run's Gram teacher was due at step "
                f"{cfg.gram.start_iteration} (gram.start_iteration) and the checkpoint is at step {start_step}: "
                "pass --gram.init-from with the weights to anchor to, or a later --gram.start-iteration")
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if cfg.run.compile:
        student.backbone.compile()
        teacher.backbone.compile()
        if gram_teacher is not None:
            gram_teacher.compile()

    writer = None
    if dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out_dir / "tensorboard", purge_step=start_step)

    sizes = crop_size_schedule(cfg)
    loader = build_loader(
        dataset, dataclasses.replace(cfg.augment, patch_size=student.backbone.patch_size), sizes,
        batch_size=cfg.data.batch_size, rank=dist_info.rank,
        world_size=dist_info.world_size, seed=cfg.run.seed, start_step=start_step,
        num_workers=cfg.data.num_workers, patch_size=student.backbone.patch_size,
        mask_probability=cfg.data.mask_probability, mask_ratio=cfg.data.mask_ratio,
    )
    # Every rank runs these evaluations (with FSDP the teacher's forward is collective); rank 0 logs them.
    pca_images = pca_batch(dataset, cfg, device)
    knn_sets = load_procedural_sets(cfg.run.knn_train_images, cfg.run.knn_train_images // 2,
                                    size=cfg.data.global_size, n_classes=10) if cfg.run.knn_every else None
    dense_set = fast_dense_set(cfg.data.global_size) if cfg.run.dense_every else None

    stop = runtime.StopFlag()
    stop.install()
    progress = runtime.Progress(cfg.optim.iterations, start_step)
    autocast = device.type == "cuda" and cfg.run.bf16
    last: dict = {}
    term_history: dict[str, list[float]] = {}  # per loss term; "gram" only from the steps that had the Gram loss
    knn_history: dict[int, dict[str, float]] = {}  # step -> k-NN accuracies (step 0: the initialization)
    if knn_sets is not None and start_step == 0:
        knn_history[0] = log_knn(writer, teacher.backbone, knn_sets, 0)
    dense_history: dict[int, dict[str, float]] = {}  # step -> dense metric (step 0: the initialization)
    if dense_set is not None and start_step == 0:
        dense_history[0] = log_dense_metric(writer, teacher.backbone, dense_set, 0)
    step = start_step
    data_iter = iter(loader)
    try:
        while step < cfg.optim.iterations:
            t0 = time.perf_counter()
            batch = to_device(next(data_iter), device)
            sched = schedules_at(step, cfg.optim, cfg.teacher, cfg.loss, cfg.gram)
            apply_schedules(optimizer, sched)
            _seed_step(student, cfg.run.seed, step, dist_info.rank)
            event = gram_teacher_event(step, cfg.gram)
            if event is not None:
                copy_weights(gram_teacher, teacher.backbone)
                logger.info(f"step {step}: Gram teacher {'created from' if event == 'create' else 'updated to'} "
                            "the EMA teacher")

            terms = forward_losses(model, teacher, losses, batch, sched, autocast, gram_teacher)

            finite = runtime.all_reduce_max(0.0 if torch.isfinite(terms["total"]).item() else 1.0, dist_info) == 0.0
            grad_norm = backward_and_update(terms["total"], student, teacher, optimizer, sched,
                                            cfg.optim.clip_grad) if finite else None
            step += 1  # from here on: this step's number in the log and in the checkpoint names
            if grad_norm is None or not torch.isfinite(grad_norm).item():
                what = (f"loss became {terms['total'].item()}" if grad_norm is None
                        else f"gradient norm became {grad_norm.item()}")
                if not cfg.run.skip_nonfinite or stats["nonfinite_skips"] >= cfg.run.max_nonfinite_skips:
                    parts = ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                    raise FloatingPointError(
                        f"{what} at step {step} ({parts}); stopping. The last good checkpoint in {out_dir} is "
                        "intact; lower optim.lr or use --run.skip-nonfinite to skip such steps"
                    )
                stats["nonfinite_skips"] += 1
                logger.warning(f"step {step}: {what}, step skipped ({stats['nonfinite_skips']} so far, at most "
                               f"{cfg.run.max_nonfinite_skips})")
                optimizer.zero_grad(set_to_none=True)
            else:
                stats["images_skipped"] += int(batch.get("n_skipped", 0))

                seconds = time.perf_counter() - t0
                last = {k: v.item() for k, v in terms.items()}
                for name, value in last.items():
                    term_history.setdefault(name, []).append(value)
                if writer is not None:
                    _log_scalars(writer, step, last, sched, grad_norm, seconds, cfg, dist_info, device, stats)
                if dist_info.is_main and (step % cfg.run.log_every == 0 or step == cfg.optim.iterations or step == start_step + 1):
                    eta = runtime.Progress.format_seconds(progress.eta_seconds(step - 1))
                    gram = f" gram {last['gram']:.4g}" if "gram" in last else ""
                    crops = f"  crops {batch['global_crops'].shape[-1]}px" if cfg.data.size_schedule else ""
                    skipped = f"  {stats['images_skipped']} unusable images skipped" if stats["images_skipped"] else ""
                    logger.info(f"step {step}/{cfg.optim.iterations}  loss {last['total']:.4f} (dino {last['dino']:.4f} "
                                f"ibot {last['ibot']:.4f} koleo {last['koleo']:.4f}{gram})  lr {sched.lr:.2e}{crops}  "
                                f"{cfg.data.batch_size * dist_info.world_size / seconds:.1f} img/s  eta {eta}{skipped}")
            if cfg.run.pca_every and step % cfg.run.pca_every == 0:
                log_feature_maps(writer, teacher.backbone, pca_images, step)
            if cfg.run.knn_every and (step % cfg.run.knn_every == 0 or step == cfg.optim.iterations):
                knn_history[step] = log_knn(writer, teacher.backbone, knn_sets, step)
            if cfg.run.dense_every and (step % cfg.run.dense_every == 0 or step == cfg.optim.iterations):
                dense_history[step] = log_dense_metric(writer, teacher.backbone, dense_set, step)

            stop_now = runtime.all_reduce_max(1.0 if stop.is_set else 0.0, dist_info) > 0
            if step % cfg.run.checkpoint_every == 0 or step == cfg.optim.iterations or stop_now:
                save_checkpoint(step, cfg, student, teacher, optimizer, losses, stats, dist_info, gram_teacher)
            if stop_now:
                logger.info(f"received {stop.signal_name or 'a stop signal'}: checkpoint saved at step {step}, exiting")
                break
    finally:
        stop.restore()
        del data_iter

    summary = {"step": step, "losses": last, "history": term_history.get("total", []), "term_history": term_history,
               "knn": knn_history, "dense": dense_history, "output_dir": str(out_dir), "stats": stats}
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


def log_knn(writer, backbone: VisionTransformer, knn_sets: tuple, step: int) -> dict[str, float]:
    """k-NN accuracies of `backbone` on the held-out procedural set, logged (every rank computes them)."""
    accuracy = knn_eval(backbone, *knn_sets)
    if writer is not None:
        for name, value in accuracy.items():
            writer.add_scalar(f"knn/{name}", value, step)
    logger.info(f"step {step}: k-NN on the procedural set " + " ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return accuracy


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
    writer.add_scalar("schedule/dino_local_weight", sched.dino_local_weight, step)
    if cfg.gram.enabled:
        writer.add_scalar("schedule/gram_weight", sched.gram_weight, step)
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
    if cfg.run.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
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
    knn = summary.get("knn", {})
    if len(knn) >= 2:
        first, last = min(knn), max(knn)
        start = "initialization" if first == 0 else f"step {first}"
        print(f"  k-NN top-1 (k=20) on held-out procedural images (10 classes, chance 10%): "
              f"{100 * knn[first]['top1_k20']:.1f}% at {start} -> {100 * knn[last]['top1_k20']:.1f}% at step {last}")
    if summary.get("dense"):
        curve = ", ".join(f"step {s}: {100 * r['miou']:.1f}%" for s, r in sorted(summary["dense"].items()))
        print(f"  dense metric (ridge-probe mIoU on generated scenes, 11 classes): {curve}")


if __name__ == "__main__":
    main()
