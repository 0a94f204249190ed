"""DINOv3 self-supervised pretraining: the presets, a run's state, one step, checkpoints and the loop, read top
to bottom; the pieces shared with distill.py live in config.py, student_teacher.py, objective.py, optimizer.py,
monitor.py and runtime.py.

    python train.py                                   # the `demo` preset: vit_tiny on generated images, CPU
    torchrun --nproc_per_node=8 train.py vitl16 --data.path /data/imagenet/train
    python train.py demo --optim.iterations 50 --run.output-dir runs/try

A step, in order: a multi-crop batch (2 global + n local crops per image, iBOT masks on some global crops)
-> the student (backbone + DINO head + iBOT head) sees every crop, masked -> the EMA teacher sees the global
crops, unmasked -> teacher outputs are centered with Sinkhorn-Knopp -> L = weighted L_DINO + L_iBOT + L_KoLeo
(`--loss.*-weight`)
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

import runtime
from config import (
    OFFICIAL_HRFT_PROBABILITIES,
    OFFICIAL_HRFT_SIZES,
    VIT7B_GLOBAL_BATCH,
    DataConfig,
    GramConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TeacherConfig,
    group_problems,
    parse_cli,
    raise_problems,
    run_problems,
    sharded_checkpoints,
    value_problems,
)
from data.augment import AugmentConfig, CropSizes, CropSizeSchedule
from data.datasets import ImageDataset, build_dataset, build_loader
from data.mixture import MixtureImages, MixtureSampler, MixtureSchedule
from data.shards import ShardImages, ShardProgress, build_shard_loader
from dense import fast_dense_set, log_dense_metric
from figures import save_png
from health import HealthPanel
from models.checkpoint import (
    TRAIN_CHECKPOINT_FORMAT,
    CheckpointError,
    backbone_weights,
    checkpoint_path_or_error,
    load_backbone,
    read_checkpoint_file,
    read_sharded_metadata,
    read_weights,
)
from models.vit import VIT_ARCHS, VisionTransformer, build_vit
from monitor import log_feature_maps, log_knn, log_memory, pca_batch, start_run_folder
from objective import SSLLosses
from optimizer import Schedules, apply_schedules, clip_per_module, param_groups, schedules_at
from probes import load_procedural_sets
from schedules import Schedule, constant, sqrt_scaled_lr
from student_teacher import SSLNet, build_student_teacher, copy_weights, ema_update, vit_overrides, wrap_for_parallel

logger = logging.getLogger("dinov3")


# ====================================================================================================
# Config: the groups of config.py composed, and the presets (named instances)
# ====================================================================================================


# Global batches the official configs were run with (per-GPU batch x GPUs); the 7B's is config.VIT7B_GLOBAL_BATCH.
# The high-resolution config gives 8 per GPU; the GPU count is the pretraining's 256 (the config does not say).
HRFT_GLOBAL_BATCH = 8 * 256
VITL_IM1K_GLOBAL_BATCH = 64 * 32


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
    with the teacher's k-NN accuracy on held-out labeled procedural images at initialization and every 250 steps.

    Departures from the recipe: LayerScale starts at 1.0 (at 1e-5 the class token of a fresh net is the same for
    every image, so the teacher's targets carry no signal until the blocks grow), the teacher temperature stays
    at 0.04, flips are on (as DINOv2), and the schedules are minutes long. docs/ablations.md measures these and the
    other knobs; it also shows that at this budget the k-NN gain comes from KoLeo, not from the cross-view terms.
    """
    return TrainConfig(
        model=ModelConfig(arch="vit_tiny", layerscale_init=1.0, dino_prototypes=1024, dino_hidden=512,
                          dino_bottleneck=128, ibot_prototypes=1024, ibot_hidden=512, ibot_bottleneck=128),
        data=DataConfig(path="procedural", batch_size=16, num_workers=2, global_size=96, local_size=48),
        # Flips and the nominal blur probabilities: the augmentation every measurement in docs/ was made with.
        augment=AugmentConfig(n_local_crops=4, flip_p=0.5, first_global_blur_p=1.0, second_global_blur_p=0.1),
        # lr: 1e-3 left k-NN at 15 % after 1000 steps, 5e-5 reached 30 % (docs/ablations.md, section 1).
        optim=OptimConfig(iterations=750, lr=Schedule(peak=5e-5, start=0.0, warmup_iterations=15),
                          freeze_last_layer_iterations=10),
        teacher=TeacherConfig(temp=constant(0.04), momentum=constant(0.99)),
        run=RunConfig(output_dir="runs/demo", log_every=50, checkpoint_every=250, knn_every=250,
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


def _small_batch() -> TrainConfig:
    """ViT-S/16 on an image folder at 64 images per step (one small GPU): the vits16 schedule with what
    docs/ablations.md measured at 16 and 64 images per step. The lr is 1e-4 (1e-3 leaves k-NN at its value at
    initialization, 5e-5 to 1e-4 doubles it), LayerScale starts at 1.0 (at 1e-5 the DINO term stays flat), the
    centering stays Sinkhorn-Knopp (softmax centering with unit-norm prototypes collapsed) and KoLeo stays on
    (without it k-NN fell below initialization); 32 to 1024 prototypes behaved alike, so the heads are small."""
    cfg = _imagenet_style("vit_small", 4096, 64, 0.1)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, layerscale_init=1.0),
        optim=dataclasses.replace(cfg.optim, lr=dataclasses.replace(cfg.optim.lr, peak=1e-4)),
        run=dataclasses.replace(cfg.run, output_dir="runs/vits16-small-batch"),
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
    "vits16-small-batch": ("ViT-S/16 on an image folder at 64 images per step (one small GPU), docs/ablations.md",
                           _small_batch()),
    "vitb16": ("ViT-B/16 on an image folder (--data.path), DINOv2-style schedule", _imagenet_style("vit_base", 65536, 64, 0.1)),
    "vitl16": ("ViT-L/16 on an image folder (--data.path), DINOv2-style schedule", _imagenet_style("vit_large", 65536, 32, 0.3)),
    "vitl16-im1k": ("vitl_im1k_lin834.yaml: ViT-L on ImageNet-1k (--data.path), the official fast setup", _vitl_im1k()),
    "vit7b16": ("dinov3_vit7b16_pretrain.yaml: the ViT-7B/16 pretraining", _vit7b()),
    "gram-anchor": ("dinov3_vit7b16_gram_anchor.yaml: Gram anchoring, --init-from the pretraining checkpoint at 1M", _gram_anchor()),
    "hrft": ("dinov3_vit7b16_high_res_adapt.yaml: high-resolution adaptation, --init-from a checkpoint", _hrft()),
}


def validate_config(cfg: TrainConfig, world_size: int) -> None:
    """Reject impossible combinations before any data is read or any weight is built."""
    if cfg.model.patch_size is not None and cfg.model.patch_size < 1:
        raise ValueError(f"invalid training config: model.patch_size={cfg.model.patch_size} must be >= 1 (or None: "
                         f"the architecture's)")
    patch = cfg.model.patch_size or VIT_ARCHS[cfg.model.arch].patch_size
    problems = group_problems(cfg.data, cfg.augment, cfg.optim, cfg.loss, cfg.teacher.temp, patch)
    for name, schedule in (("teacher.momentum", cfg.teacher.momentum), ("gram.weight", cfg.gram.weight)):
        problems += schedule.problems(name)
    problems += value_problems("teacher.momentum", cfg.teacher.momentum, low=0.0, high=1.0)
    problems += run_problems(cfg.run)
    if cfg.init_continues_run and cfg.init_from is None:
        problems.append("init_continues_run needs --init-from (the train.py checkpoint whose run to continue)")
    if cfg.init_student_from == "teacher" and cfg.init_from is None:
        problems.append("init_student_from='teacher' needs --init-from (the checkpoint whose teacher to start from)")
    gram = cfg.gram
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
    if cfg.run.checkpoint_format == "sharded" and cfg.run.parallel == "ddp" and world_size > 1:
        problems.append("run.checkpoint_format='sharded' with parallel=ddp: every DDP rank holds the whole state, there "
                        "is nothing to shard; use --run.parallel fsdp or the file format")
    if cfg.run.async_checkpoint and not sharded_checkpoints(cfg.run, world_size):
        problems.append("run.async_checkpoint needs sharded checkpoints (--run.parallel fsdp over several processes, "
                        "or --run.checkpoint-format sharded)")
    if cfg.run.parallel == "fsdp" and world_size == 1:
        logger.info("parallel=fsdp with one process: sharding over a single rank (works, saves nothing)")
    raise_problems("training", problems)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """`train.py [preset] [--field value ...]`; without a preset name, `demo`."""
    return parse_cli(PRESETS, argv)


# ====================================================================================================
# The state of a run
# ====================================================================================================


@dataclass
class TrainState:
    """What the steps change and a checkpoint keeps."""

    student: SSLNet
    teacher: SSLNet  # the EMA teacher
    gram_teacher: VisionTransformer | None  # the frozen Gram teacher (None without Gram anchoring)
    model: nn.Module  # the student, or DDP around it: what the forward runs
    optimizer: torch.optim.Optimizer
    losses: SSLLosses  # their only state: the softmax centers, when softmax centering is on
    step: int = 0  # completed steps: the next step to run
    stats: dict = field(default_factory=lambda: {"nonfinite_skips": 0, "images_skipped": 0})


def build_state(cfg: TrainConfig, dist_info: runtime.Dist) -> TrainState:
    """Student, EMA teacher, Gram teacher, losses and AdamW, on the device and wrapped for data parallelism."""
    student, teacher = build_student_teacher(cfg.model, embeddings=cfg.loss.objective == "coding_rate")
    gram_teacher = build_gram_teacher(cfg)
    for net in (student, teacher, gram_teacher):
        if net is not None:
            net.to(dist_info.device)
    losses = SSLLosses(cfg.model, cfg.loss, cfg.gram).to(dist_info.device)
    model = wrap_for_parallel(student, teacher, cfg.run, dist_info, gram_teacher)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.optim), lr=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2))
    return TrainState(student, teacher, gram_teacher, model, optimizer, losses)


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


# ====================================================================================================
# One step
# ====================================================================================================


def prepare_step(state: TrainState, cfg: TrainConfig, rank: int) -> Schedules:
    """The schedules' values for the step about to run, set on the optimizer; the step's seeds; the Gram teacher
    refreshed when its schedule says so."""
    sched = schedules_at(state.step, cfg.optim, cfg.teacher, cfg.loss, cfg.gram)
    apply_schedules(state.optimizer, sched)
    # The student's RoPE boxes are the same on every rank (the teachers, in evaluation mode, draw none); drop path
    # differs per rank. Both derive from (seed, step): resume-proof.
    state.student.backbone.rope_embed.seed(runtime.derived_seed(cfg.run.seed, state.step, 1))
    torch.manual_seed(runtime.derived_seed(cfg.run.seed, state.step, 3, rank))
    event = gram_teacher_event(state.step, cfg.gram)
    if event is not None:
        copy_weights(state.gram_teacher, state.teacher.backbone)
        logger.info(f"step {state.step}: Gram teacher {'created from' if event == 'create' else 'updated to'} "
                    "the EMA teacher")
    return sched


def forward_losses(state: TrainState, batch: dict, sched: Schedules, autocast: bool,
                   health: HealthPanel | None = None, log_step: bool = False) -> dict:
    """Teacher on the global crops, student (possibly DDP-wrapped) on all crops, the Gram teacher on its crops when
    this step has a Gram loss, and the loss terms. `health` sees the teacher's class tokens of every step and, on a
    log step, its targets."""
    device_type = batch["global_crops"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        teacher_out = state.teacher.teacher_forward(batch["global_crops"], batch["mask_indices"])
        if health is not None:
            health.observe_class_tokens(teacher_out.cls)
        gram_targets = None
        if state.gram_teacher is not None and sched.gram_weight > 0:
            gram_targets = gram_teacher_targets(state.gram_teacher, batch)
        student_out = state.model(batch["global_crops"], batch["local_crops"], batch["masks"], batch["mask_indices"])
        return state.losses(student_out, teacher_out, batch, sched.teacher_temp, n_global=2,
                            dino_local_weight=sched.dino_local_weight, gram_targets=gram_targets,
                            gram_weight=sched.gram_weight, health=health if log_step else None)


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


def backward_and_update(state: TrainState, total: torch.Tensor, sched: Schedules, clip_grad: float) -> torch.Tensor:
    """Backward, gradient clipping, AdamW step (the frozen prototypes have lr 0: `apply_schedules`), EMA teacher
    update; returns the norm of all gradients before clipping."""
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    student = state.student
    grad_norm = clip_per_module((student.backbone, student.dino_head, student.ibot_head), clip_grad)
    # A finite loss can still have NaN/inf gradients (an overflow in backward): stepping would write them into the
    # weights and the next checkpoint. The norm is the same on every rank (gradients are reduced before it).
    if not torch.isfinite(grad_norm).item():
        return grad_norm  # no update: the loop stops or skips the step
    state.optimizer.step()
    ema_update(state.teacher, student, sched.momentum)
    return grad_norm


def train_step(state: TrainState, batch: dict, sched: Schedules, cfg: TrainConfig, dist_info: runtime.Dist,
               health: HealthPanel | None = None, log_step: bool = False) -> tuple[dict, torch.Tensor | None]:
    """Forward, losses and -- when the loss is finite on every rank -- backward and update. Returns the loss terms
    and the gradient norm (None: no backward ran)."""
    autocast = dist_info.device.type == "cuda" and cfg.run.bf16
    terms = forward_losses(state, batch, sched, autocast, health, log_step)
    finite = runtime.all_reduce_max(0.0 if torch.isfinite(terms["total"]).item() else 1.0, dist_info) == 0.0
    grad_norm = backward_and_update(state, terms["total"], sched, cfg.optim.clip_grad) if finite else None
    return terms, grad_norm


def skip_nonfinite_step(state: TrainState, terms: dict, grad_norm: torch.Tensor | None, cfg: TrainConfig) -> None:
    """A step with a non-finite loss or gradient norm: stop, or skip it and count it (`runtime.skip_or_stop`)."""
    what = f"loss became {terms['total'].item()}" if grad_norm is None else f"gradient norm became {grad_norm.item()}"
    parts = ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
    state.stats["nonfinite_skips"] = runtime.skip_or_stop(
        what, state.step, state.stats["nonfinite_skips"], cfg.run.skip_nonfinite, cfg.run.max_nonfinite_skips,
        Path(cfg.run.output_dir), detail=f" ({parts})")
    state.optimizer.zero_grad(set_to_none=True)


# ====================================================================================================
# Checkpoints
# ====================================================================================================


def save_checkpoint(state: TrainState, cfg: TrainConfig, dist_info: runtime.Dist) -> Path | None:
    """Every rank takes part (FSDP gathers); rank 0 writes checkpoint + released-format teacher backbone."""
    student_state, optim_state = runtime.full_state(state.student, state.optimizer)
    teacher_state = runtime.full_state(state.teacher)
    gram_state = runtime.full_state(state.gram_teacher) if state.gram_teacher is not None else None
    out_dir = Path(cfg.run.output_dir)
    path = runtime.checkpoint_path(out_dir, state.step)
    if dist_info.is_main:
        payload = {
            "format": TRAIN_CHECKPOINT_FORMAT,
            "step": state.step,  # number of completed steps: the next step to run
            "config": dataclasses.asdict(cfg),
            "student": student_state,
            "teacher": teacher_state,
            "optimizer": optim_state,
            "losses": state.losses.state_dict(),
            "stats": state.stats,
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


def sharded_state(state: TrainState) -> dict:
    """What a sharded checkpoint holds, as torch.distributed.checkpoint state dicts: this rank's shards of the
    student, EMA teacher, Gram teacher and AdamW moments (DTensors under FSDP2, the tensors themselves in one
    process), and the losses' state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tree = {"student": get_model_state_dict(state.student), "teacher": get_model_state_dict(state.teacher),
            "optimizer": get_optimizer_state_dict(state.student, state.optimizer),
            "losses": state.losses.state_dict()}
    if state.gram_teacher is not None:
        tree["gram_teacher"] = get_model_state_dict(state.gram_teacher)
    return tree


class Checkpointer:
    """Writes the run's checkpoints: single files (`save_checkpoint`) or sharded folders.

    A sharded checkpoint `checkpoint_<step>/` is written as `checkpoint_<step>.tmp/`: each rank its RNG state
    (`rng_<rank>.pt`) and, through torch.distributed.checkpoint, its own shards; DCP's coordinator (rank 0) writes
    `.metadata` only after every rank has written; then rank 0 adds meta.json and renames the folder
    (runtime.commit_sharded). With --run.async-checkpoint the shards are copied in memory and written by a
    background thread over a process group of its own; rank 0 commits when it is done (checked every step, and
    before the next save and at the end), so at most one save is in flight.
    The released-format teacher backbone is gathered to rank 0 alone (never the optimizer) at every save."""

    def __init__(self, cfg: TrainConfig, dist_info: runtime.Dist):
        self.cfg, self.dist_info = cfg, dist_info
        self.sharded = sharded_checkpoints(cfg.run, dist_info.world_size)
        self.out_dir = Path(cfg.run.output_dir)
        self.pending: tuple | None = None  # (future, final folder, meta) of an asynchronous save in flight
        self.group = None
        if self.sharded and cfg.run.async_checkpoint and dist_info.enabled:
            import datetime

            import torch.distributed as dist

            # DCP's own collectives run in the background thread: never on the training's process group.
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.run.dist_timeout_s))

    def save(self, state: TrainState) -> Path | None:
        if not self.sharded:
            return save_checkpoint(state, self.cfg, self.dist_info)
        import torch.distributed.checkpoint as dcp

        self.finish()  # the previous asynchronous save, committed
        cfg, dist_info = self.cfg, self.dist_info
        backbone = runtime.full_state(state.teacher.backbone)  # every rank takes part, rank 0 gets the tensors
        final = runtime.checkpoint_path(self.out_dir, state.step, sharded=True)
        tmp = runtime.sharded_temp_path(final)
        if dist_info.is_main:
            runtime.atomic_save(backbone, self.out_dir / "teacher_backbone.pth")
            runtime.remove_path(tmp)  # left by a save of this step that was killed
        runtime.barrier(dist_info)
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(runtime.rng_states(), tmp / f"rng_{dist_info.rank}.pt")
        meta = {"format": TRAIN_CHECKPOINT_FORMAT, "layout": "sharded", "step": state.step,
                "world_size": dist_info.world_size, "global_batch": cfg.data.batch_size * dist_info.world_size,
                "config": dataclasses.asdict(cfg), "stats": dict(state.stats)}
        try:
            if cfg.run.async_checkpoint:
                future = dcp.async_save(sharded_state(state), checkpoint_id=tmp, process_group=self.group,
                                        no_dist=not dist_info.enabled)
                self.pending = (future, final, meta)
                return final
            dcp.save(sharded_state(state), checkpoint_id=tmp, no_dist=not dist_info.enabled)
        except (Exception, dcp.CheckpointException) as err:  # DCP's is a BaseException
            raise _sharded_write_error(final, err) from err
        self._commit(final, meta)
        runtime.barrier(dist_info)
        return final

    def poll(self) -> None:
        """Commit an asynchronous save that has finished (no collective: each rank looks at its own)."""
        if self.pending is not None and self.pending[0].done():
            self.finish()

    def finish(self) -> None:
        """Wait for the asynchronous save in flight, if any, and commit it."""
        if self.pending is None:
            return
        from torch.distributed.checkpoint import CheckpointException

        future, final, meta = self.pending
        self.pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as err:  # DCP's is a BaseException
            raise _sharded_write_error(final, err) from err
        self._commit(final, meta)

    def _commit(self, final: Path, meta: dict) -> None:
        # DCP's coordinator wrote .metadata after every rank reported its shards written: rank 0 may commit.
        if self.dist_info.is_main:
            runtime.commit_sharded(final, meta)
            runtime.prune_checkpoints(self.out_dir, self.cfg.run.keep_last)


def _sharded_write_error(final: Path, err: Exception) -> OSError:
    return OSError(f"could not write sharded checkpoint {final} ({type(err).__name__}: {str(err)[:500]}); "
                   "the previous checkpoint is intact")


COMPATIBLE_FIELDS = ("model.arch", "model.dino_prototypes", "model.dino_hidden", "model.dino_bottleneck",
                     "model.ibot_prototypes", "model.ibot_hidden", "model.ibot_bottleneck")


def _check_compatible(saved: dict, cfg: TrainConfig, path: Path, fix: str) -> None:
    for dotted in COMPATIBLE_FIELDS:
        section, name = dotted.split(".")
        old, new = saved[section][name], getattr(getattr(cfg, section), name)
        if old != new:
            raise CheckpointError(f"{path} was trained with {dotted}={old!r} but this run has {new!r}; {fix}")


def load_checkpoint(path: Path, cfg: TrainConfig, state: TrainState) -> dict:
    """Restore a run from its checkpoint (weights, optimizer, losses, RNG, step and stats); the payload's
    "gram_teacher" entry, when there is one, is loaded into the Gram teacher (the caller decides what a missing one
    means)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if path.is_dir():
        return load_sharded_checkpoint(path, cfg, state)
    payload = read_checkpoint_file(path)
    if payload.get("format") != TRAIN_CHECKPOINT_FORMAT:
        kind = "a released-format backbone (weights only)" if "cls_token" in payload else "not a training checkpoint"
        raise CheckpointError(
            f"{path} is {kind}; --run.resume expects a full training checkpoint written by train.py "
            "(to start from backbone weights, use them to initialize a new run instead)"
        )
    _check_compatible(payload["config"], cfg, path, "use the same value or another --run.output-dir")
    runtime.set_full_state(state.student, payload["student"])
    runtime.set_full_state(state.teacher, payload["teacher"])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    # AdamW has no state yet for parameters that never had a gradient (the prototypes while the last layer is
    # frozen): load without them (not strict), then drop the placeholder state (step 1, zero moments) the loader
    # gives them, so that their first update is their first AdamW step, as in a run that was never interrupted.
    set_optimizer_state_dict(state.student, state.optimizer, payload["optimizer"],
                             options=dataclasses.replace(options, strict=False))
    for name, param in state.student.named_parameters():
        if name not in payload["optimizer"]["state"]:
            state.optimizer.state.pop(param, None)
    if state.gram_teacher is not None and "gram_teacher" in payload:
        runtime.set_full_state(state.gram_teacher, payload["gram_teacher"])
    state.losses.load_state_dict(payload["losses"])
    runtime.set_rng_states(payload["rng"])
    state.step, state.stats = payload["step"], payload["stats"]
    return payload


def load_sharded_checkpoint(path: Path, cfg: TrainConfig, state: TrainState) -> dict:
    """Restore a run from a sharded checkpoint folder: each rank reads only the pieces of its own shards, whatever
    the number of processes that wrote it (DCP reshards); returns meta.json's entries (with "gram_teacher" when the
    folder holds one). The RNG states are each rank's own when the number of processes is the same."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    meta, saved = read_sharded_metadata(path)
    if meta.get("format") != TRAIN_CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a train.py sharded checkpoint (meta.json format {meta.get('format')!r})")
    _check_compatible(meta["config"], cfg, path, "use the same value or another --run.output-dir")
    tree = sharded_state(state)  # the templates DCP loads into (fresh AdamW state for every parameter)
    if state.gram_teacher is not None and not any(k.startswith("gram_teacher.") for k in saved):
        del tree["gram_teacher"]
    # AdamW state exists only for parameters that had a gradient (not the prototypes while frozen): load the
    # others as they are, then drop their placeholder state as load_checkpoint does.
    no_state = [fqn for fqn in tree["optimizer"]["state"] if f"optimizer.state.{fqn}.exp_avg" not in saved]
    for fqn in no_state:
        del tree["optimizer"]["state"][fqn]
    expected = set(dcp_keys(tree))
    missing = sorted(k for k in expected if k not in saved and not k.startswith("optimizer.param_groups"))
    if missing:
        raise CheckpointError(f"sharded checkpoint {path} does not fit this run: {len(missing)} entries missing, "
                              f"e.g. {missing[:5]}")
    try:  # DCP's CheckpointException is a BaseException
        dcp.load(tree, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
    except (Exception, dcp.CheckpointException) as err:
        raise CheckpointError(f"sharded checkpoint {path} is damaged: its shards cannot be read (a missing or "
                              f"truncated .distcp file?): {type(err).__name__}: {str(err)[:300]}") from err
    for part in ("student", "teacher", "gram_teacher"):
        if part in tree:
            set_model_state_dict(getattr(state, part), tree[part])
    set_optimizer_state_dict(state.student, state.optimizer, tree["optimizer"])
    names = set(no_state)
    for name, param in state.student.named_parameters():
        if name in names:
            state.optimizer.state.pop(param, None)
    state.losses.load_state_dict(tree["losses"])
    distributed = torch.distributed.is_initialized()
    rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if meta["world_size"] == world_size:
        runtime.set_rng_states(torch.load(path / f"rng_{rank}.pt", weights_only=True))
    else:
        logger.info(f"{path} was written by {meta['world_size']} processes, this run has {world_size}: weights, "
                    "optimizer, step and data stream continue exactly; per-rank random states start afresh")
        if meta["global_batch"] != cfg.data.batch_size * world_size:
            logger.warning(f"the global batch changes from {meta['global_batch']} to {cfg.data.batch_size * world_size}"
                           f" (data.batch_size x processes): the data stream does not continue where it was; keep "
                           f"data.batch_size = {meta['global_batch']} / processes to continue it exactly")
    state.step, state.stats = meta["step"], meta["stats"]
    return {**meta, **({"gram_teacher": True} if "gram_teacher" in tree else {})}


def dcp_keys(tree: dict, prefix: str = "") -> list[str]:
    """The flat keys torch.distributed.checkpoint gives a nested state dict ("optimizer.state.<fqn>.exp_avg")."""
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict):
            keys += dcp_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def resolve_checkpoint_source(source: str, option: str) -> Path:
    """The file behind --init-from / --gram.init-from (a file or a run folder), checked before anything is built."""
    return checkpoint_path_or_error(source, f"{option} needs the earlier phase's output: run it first (e.g. `python "
                                            "train.py demo` before demo-gram) or pass a train.py or released checkpoint")


@dataclass(frozen=True)
class StartingPoint:
    """Where a run's weights come from, found (and checked) before anything is built."""

    resume: Path | None  # the newest checkpoint of this run's own folder
    init: Path | None  # --init-from's file, when not resuming
    gram_init: Path | None  # --gram.init-from's file, when not resuming (a resumed run has its own Gram teacher)


def find_starting_point(cfg: TrainConfig, is_main: bool = True) -> StartingPoint:
    """The newest complete checkpoint of the run's folder (rank 0 first moves incomplete ones aside:
    `runtime.set_aside_incomplete`), else the files of --init-from and --gram.init-from. RunFinished when the
    folder's newest checkpoint is at the end of the schedule already."""
    out_dir = Path(cfg.run.output_dir)
    if cfg.run.resume and is_main:
        runtime.set_aside_incomplete(out_dir)
    existing = runtime.list_checkpoints(out_dir) if cfg.run.resume else []
    resume = existing[-1][1] if existing else None
    if existing and existing[-1][0] >= cfg.optim.iterations:
        raise runtime.RunFinished(f"{out_dir} is finished: {resume.name} is at step {existing[-1][0]} of "
                                  f"optim.iterations={cfg.optim.iterations}; nothing to run (raise --optim.iterations "
                                  "to train further)")
    init = resolve_checkpoint_source(cfg.init_from, "--init-from") if cfg.init_from and resume is None else None
    gram_init = resolve_checkpoint_source(cfg.gram.init_from, "--gram.init-from") if (
        cfg.gram.enabled and cfg.gram.init_from and resume is None) else None
    return StartingPoint(resume, init, gram_init)


def restore_or_initialize(state: TrainState, cfg: TrainConfig, start: StartingPoint) -> None:
    """Resume this run, continue an earlier run's step count (--init-continues-run), or take an earlier run's
    weights (--init-from); then give the Gram teacher its weights if the checkpoint held none."""
    gram_restored = False
    restored_from = start.resume or (start.init if cfg.init_continues_run else None)
    if restored_from is not None:
        payload = load_checkpoint(restored_from, cfg, state)
        gram_restored = "gram_teacher" in payload
        how = "resumed from" if start.resume else "continuing the run of"
        logger.info(f"{how} {restored_from} at step {state.step}"
                    + (f" (--init-from {cfg.init_from} not used: resuming)" if start.resume and cfg.init_from else ""))
        if state.step >= cfg.optim.iterations:
            raise CheckpointError(f"{restored_from} is at step {state.step}, not before optim.iterations="
                                  f"{cfg.optim.iterations}: nothing left to run (raise --optim.iterations)")
    elif start.init is not None:
        initialize_from(start.init, cfg, state.student, state.teacher)
    if state.gram_teacher is not None and not gram_restored:
        if cfg.gram.init_from:
            path = start.gram_init or resolve_checkpoint_source(cfg.gram.init_from, "--gram.init-from")
            load_gram_teacher(path, cfg, state.gram_teacher)
        elif state.step > cfg.gram.start_iteration:
            raise CheckpointError(
                f"{restored_from} holds no Gram teacher, but this run's Gram teacher was due at step "
                f"{cfg.gram.start_iteration} (gram.start_iteration) and the checkpoint is at step {state.step}: "
                "pass --gram.init-from with the weights to anchor to, or a later --gram.start-iteration")


def initialize_from(path: Path, cfg: TrainConfig, student: SSLNet, teacher: SSLNet) -> None:
    """Weights of an earlier run for a new one (optimizer, schedules and data stream start afresh)."""
    payload = read_weights(path)
    if payload.get("format") == TRAIN_CHECKPOINT_FORMAT:
        _check_compatible(payload["config"], cfg, path, "set this run's model options to the checkpoint's")
        runtime.set_full_state(student, payload[cfg.init_student_from])
        runtime.set_full_state(teacher, payload["teacher"])
        logger.info(f"initialized from {path} (step {payload['step']}): student from its {cfg.init_student_from}, "
                    "EMA teacher from its teacher")
        return
    weights = load_backbone(payload, cfg.model.arch).state_dict()  # released or Hugging Face layout, checked
    runtime.set_full_state(student.backbone, weights)
    runtime.set_full_state(teacher.backbone, weights)
    logger.info(f"initialized both backbones from {path} (a backbone-only file: DINO and iBOT heads start fresh)")


def load_gram_teacher(path: Path, cfg: TrainConfig, gram_teacher: VisionTransformer) -> None:
    """--gram.init-from: a train.py checkpoint's EMA-teacher backbone, or a released / Hugging Face backbone."""
    weights = load_backbone(backbone_weights(read_weights(path), str(path)), cfg.model.arch).state_dict()
    runtime.set_full_state(gram_teacher, weights)
    logger.info(f"Gram teacher loaded from {path}")


# ====================================================================================================
# Data, logging and evaluation
# ====================================================================================================


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


def build_train_dataset(cfg: TrainConfig) -> ImageDataset | ShardImages:
    """The dataset of data.path, or the mixture of data.parts (folders, lists and shards; data/mixture.py). A part's
    samples are drawn by index, so shards in a mixture are read by random access (ShardImages.as_list)."""
    if not cfg.data.parts:
        return build_dataset(cfg.data.path)
    parts = [build_dataset(path) for path in cfg.data.parts]
    parts = [part.as_list() if isinstance(part, ShardImages) else part for part in parts]
    return MixtureImages(parts, list(cfg.data.parts))


def mixture_schedule(dataset: MixtureImages, cfg: TrainConfig) -> MixtureSchedule:
    return MixtureSchedule(tuple(len(part) for part in dataset.parts), tuple(cfg.data.ratios),
                           cfg.data.homogeneous_part, cfg.data.homogeneous_p, cfg.run.seed)


def build_train_loader(dataset: ImageDataset | ShardImages, cfg: TrainConfig, start_step: int, patch_size: int,
                       dist_info: runtime.Dist, stats: dict | None = None):
    """The multi-crop, masked batches of this rank, from `start_step` on (the same stream as an uninterrupted run;
    tar shards: from the checkpoint's shard stream index on, data/shards.py; a mixture: from its parts' counters,
    data/mixture.py)."""
    stats = stats or {}
    sampler = None
    if isinstance(dataset, MixtureImages):
        sampler = MixtureSampler(dataset, mixture_schedule(dataset, cfg), cfg.data.batch_size, dist_info.rank,
                                 dist_info.world_size, start_step, stats.get("part_counts"))
    augment = dataclasses.replace(cfg.augment, patch_size=patch_size)
    common = dict(batch_size=cfg.data.batch_size, rank=dist_info.rank, world_size=dist_info.world_size,
                  seed=cfg.run.seed, start_step=start_step, num_workers=cfg.data.num_workers, patch_size=patch_size,
                  mask_probability=cfg.data.mask_probability, mask_ratio=cfg.data.mask_ratio)
    if isinstance(dataset, ShardImages):
        return build_shard_loader(dataset, augment, crop_size_schedule(cfg), start_shard=stats.get("resume_shard", 0),
                                  shuffle_buffer=cfg.data.shuffle_buffer, **common)
    return build_loader(dataset, augment, crop_size_schedule(cfg), sampler=sampler, **common)


class Monitor:
    """Logs each step's terms and schedules and evaluates the EMA teacher: feature maps, k-NN on the procedural
    labeled set and the dense metric, every `run.*_every` steps and at the end; keeps their histories."""

    def __init__(self, cfg: TrainConfig, dataset: ImageDataset | ShardImages, state: TrainState,
                 dist_info: runtime.Dist):
        self.cfg, self.dist_info, self.teacher = cfg, dist_info, state.teacher.backbone
        out_dir = Path(cfg.run.output_dir)
        self.writer = start_run_folder(out_dir, cfg, dist_info, state.step)
        if isinstance(dataset, ShardImages):
            dataset = dataset.preview()
        self.pca_images = pca_batch(dataset, cfg.data.global_size, dist_info.device)
        self.knn_sets = load_procedural_sets(cfg.run.knn_train_images, cfg.run.knn_train_images // 2,
                                             size=cfg.data.global_size, n_classes=10) if cfg.run.knn_every else None
        self.dense_set = fast_dense_set(cfg.data.global_size) if cfg.run.dense_every else None
        self.progress = runtime.Progress(cfg.optim.iterations, state.step)
        self.start_step = state.step
        self.last: dict[str, float] = {}
        self.term_history: dict[str, list[float]] = {}  # per term; "gram" only from the steps that had it
        self.knn_history: dict[int, dict[str, float]] = {}  # step -> accuracies (step 0: the initialization)
        self.dense_history: dict[int, dict[str, float]] = {}  # step -> dense metric (step 0: the initialization)
        self.health = HealthPanel(cfg.model.dino_prototypes, cfg.model.ibot_prototypes, objective=cfg.loss.objective)
        self.step_seconds = 0.0  # the logged steps' wall time: what the health panel's overhead is measured against
        if state.step == 0:
            self.evaluate(0, knn=self.knn_sets is not None, dense=self.dense_set is not None)

    def evaluate(self, step: int, maps: bool = False, knn: bool = False, dense: bool = False) -> np.ndarray | None:
        pca = log_feature_maps(self.writer, self.teacher, self.pca_images, step) if maps else None
        if knn:
            self.knn_history[step] = log_knn(self.writer, self.teacher, self.knn_sets, step)
        if dense:
            self.dense_history[step] = log_dense_metric(self.writer, self.teacher, self.dense_set, step)
        return pca

    def evaluate_if_due(self, step: int) -> None:
        run, end = self.cfg.run, step == self.cfg.optim.iterations
        self.evaluate(step, maps=bool(run.pca_every) and step % run.pca_every == 0,
                      knn=bool(run.knn_every) and (step % run.knn_every == 0 or end),
                      dense=bool(run.dense_every) and (step % run.dense_every == 0 or end))

    def is_log_step(self, step: int) -> bool:
        """Whether step `step` is logged in full: the console line and the health panel."""
        return step % self.cfg.run.log_every == 0 or step == self.cfg.optim.iterations or step == self.start_step + 1

    def log_step(self, step: int, terms: dict, sched: Schedules, grad_norm: torch.Tensor, seconds: float,
                 batch: dict, stats: dict) -> None:
        cfg, images_per_s = self.cfg, self.cfg.data.batch_size * self.dist_info.world_size / seconds
        # The mean over ranks (each rank's terms are over its own share of the batch: its masked crops, its KoLeo
        # neighbours), so that runs on different numbers of processes log comparable curves.
        self.last = runtime.mean_over_ranks(terms, self.dist_info)
        self.step_seconds += seconds
        for name, value in self.last.items():
            self.term_history.setdefault(name, []).append(value)
        health = self.health.scalars(step, self.last) if self.is_log_step(step) else None
        if self.writer is not None:
            for name, value in self.last.items():
                self.writer.add_scalar(f"loss/{name}", value, step)
            scalars = {"schedule/lr": sched.lr, "schedule/weight_decay": sched.weight_decay,
                       "schedule/momentum": sched.momentum, "schedule/teacher_temp": sched.teacher_temp,
                       "schedule/dino_local_weight": sched.dino_local_weight}
            if cfg.gram.enabled:
                scalars["schedule/gram_weight"] = sched.gram_weight
            scalars.update({"train/grad_norm": float(grad_norm), "train/images_per_s": images_per_s,
                            "train/images_skipped": stats["images_skipped"]})
            if "part_counts" in stats:  # the realized mixture: each part's share of the images so far
                total = max(sum(stats["part_counts"]), 1)
                scalars.update({f"data/part{i}_share": count / total for i, count in enumerate(stats["part_counts"])})
            scalars.update({f"health/{name}": value for name, value in (health or {}).items()})
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            log_memory(self.writer, step, self.dist_info.device)
        if self.dist_info.is_main and health is not None:
            last = self.last
            eta = runtime.Progress.format_seconds(self.progress.eta_seconds(step - 1))
            gram = f" gram {last['gram']:.4g}" if "gram" in last else ""
            crops = f"  crops {batch['global_crops'].shape[-1]}px" if cfg.data.size_schedule else ""
            skipped = f"  {stats['images_skipped']} unusable images skipped" if stats["images_skipped"] else ""
            if "part_counts" in stats:
                skipped += "  parts " + "/".join(str(count) for count in stats["part_counts"])
            logger.info(f"step {step}/{cfg.optim.iterations}  loss {last['total']:.4f} (dino {last['dino']:.4f} "
                        f"ibot {last['ibot']:.4f} koleo {last['koleo']:.4f}{gram})  lr {sched.lr:.2e}{crops}  "
                        f"{images_per_s:.1f} img/s  eta {eta}{skipped}  | {self.health.console(health)}")

    def finish(self, state: TrainState) -> dict:
        """The run's summary; at the end of the schedule also the final feature map and the output paths."""
        out_dir = Path(self.cfg.run.output_dir)
        summary = {"step": state.step, "losses": self.last, "history": self.term_history.get("total", []),
                   "term_history": self.term_history, "knn": self.knn_history, "dense": self.dense_history,
                   "output_dir": str(out_dir), "stats": state.stats, "health": {
                       "verdict": self.health.verdict(), "history": self.health.history,
                       "overhead": self.health.seconds / max(self.step_seconds, 1e-9)}}
        if self.dist_info.is_main:
            logger.info(f"{self.health.verdict()} (health panel overhead "
                        f"{100 * summary['health']['overhead']:.2f} % of the step time)")
        if state.step == self.cfg.optim.iterations:
            figure = self.evaluate(state.step, maps=True)
            if self.dist_info.is_main:
                summary["pca_png"] = str(save_png(figure, out_dir / "pca_features.png"))
                summary["checkpoint"] = str(runtime.list_checkpoints(out_dir)[-1][1])
                summary["backbone"] = str(out_dir / "teacher_backbone.pth")
        if self.writer is not None:
            self.writer.close()
        return summary


# ====================================================================================================
# The run
# ====================================================================================================


def train(cfg: TrainConfig, images: ImageDataset | None = None) -> dict:
    """Run (or resume) a training run; returns a summary (final step, loss history, paths).

    `images` replaces the dataset named by cfg.data.path (tests pass a ProceduralDataset). What a user can get wrong
    -- the config, another run in the output folder, the checkpoint to resume, the weights to start from, the data --
    raises before any process group, model or loader is built (`runtime.run_cli` makes it one line, exit status 2);
    rank 0 holds the output folder's lock until the run ends.
    """
    rank, world_size = runtime.launch_rank_and_world()
    runtime.setup_logging(Path(cfg.run.output_dir), rank == 0)
    with runtime.checks_before_building():
        validate_config(cfg, world_size)
    with runtime.run_folder_lock(Path(cfg.run.output_dir), rank == 0):
        with runtime.checks_before_building():
            start = find_starting_point(cfg, is_main=rank == 0)
            dataset = images if images is not None else build_train_dataset(cfg)
        return run_training(cfg, start, dataset)


def run_training(cfg: TrainConfig, start: StartingPoint, dataset: ImageDataset | ShardImages) -> dict:
    """The run itself, once `train` has checked what it starts from."""
    dist_info = runtime.setup_distributed(cfg.run.device, cfg.run.dist_timeout_s)
    if cfg.run.deterministic:
        runtime.make_deterministic()
    runtime.seed_everything(cfg.run.seed)
    state = build_state(cfg, dist_info)
    restore_or_initialize(state, cfg, start)
    if cfg.run.compile:
        for net in (state.student.backbone, state.teacher.backbone, state.gram_teacher):
            if net is not None:
                net.compile()
    loader = build_train_loader(dataset, cfg, state.step, state.student.backbone.patch_size, dist_info, state.stats)
    shard_progress = None
    if isinstance(dataset, ShardImages):
        shard_progress = ShardProgress(state.stats.get("resume_shard", 0), cfg.data.num_workers)
    mixture = mixture_schedule(dataset, cfg) if isinstance(dataset, MixtureImages) else None
    if mixture is not None:
        state.stats.setdefault("part_counts", [0] * len(dataset.parts))
    monitor = Monitor(cfg, dataset, state, dist_info)

    checkpointer = Checkpointer(cfg, dist_info)
    stop = runtime.StopFlag()
    stop.install()
    data_iter = iter(loader)
    try:
        while state.step < cfg.optim.iterations:
            t0 = time.perf_counter()
            batch = next(data_iter)
            if shard_progress is not None:
                shard_progress.consumed(batch)
            batch = runtime.to_device(batch, dist_info.device)
            sched = prepare_step(state, cfg, dist_info.rank)
            terms, grad_norm = train_step(state, batch, sched, cfg, dist_info, monitor.health,
                                          monitor.is_log_step(state.step + 1))
            if mixture is not None:  # each part's position: what a resumed sampler starts from
                counts = mixture.step_counts(state.step, cfg.data.batch_size * dist_info.world_size)
                state.stats["part_counts"] = [int(a + b) for a, b in zip(state.stats["part_counts"], counts)]
            state.step += 1  # from here on: this step's number in the log and in the checkpoint names
            if grad_norm is None or not torch.isfinite(grad_norm).item():
                skip_nonfinite_step(state, terms, grad_norm, cfg)
            else:
                state.stats["images_skipped"] += int(batch.get("n_skipped", 0))
                monitor.log_step(state.step, terms, sched, grad_norm, time.perf_counter() - t0, batch, state.stats)
            monitor.evaluate_if_due(state.step)

            stop_now = runtime.all_reduce_max(1.0 if stop.is_set else 0.0, dist_info) > 0
            checkpointer.poll()
            if runtime.is_due(state.step, cfg.run.checkpoint_every) or state.step == cfg.optim.iterations or stop_now:
                if shard_progress is not None:
                    state.stats["resume_shard"] = shard_progress.resume_shard(
                        lambda v: -runtime.all_reduce_max(-v, dist_info))
                checkpointer.save(state)
            if stop_now:
                logger.info(f"received {stop.signal_name or 'a stop signal'}: checkpoint saved at step {state.step}, "
                            "exiting")
                break
        checkpointer.finish()
    finally:
        stop.restore()
        del data_iter

    summary = monitor.finish(state)
    runtime.barrier(dist_info)
    return summary


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
        print(f"  health:            {summary['health']['verdict']}")
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
    runtime.run_cli(main, one_line=(CheckpointError,))
