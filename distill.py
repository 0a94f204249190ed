"""Distillation of a frozen teacher into one or more students at once (DINOv3 section 5.2), in one file.

    python distill.py                                   # `demo`: train.py's demo teacher -> vit_tiny + convnext_tiny
    torchrun --nproc_per_node=2 distill.py demo --students vit_tiny:1,convnext_tiny:1 --run.device cpu
    torchrun --nproc_per_node=8 distill.py paper --teacher.checkpoint vit7b.pth --data.path /data/train \\
        --students vit_small:2,vit_base:2,vit_large:4

A step, in order: every rank loads its shard of the global batch -> the frozen teacher (no EMA) runs once on that
shard, under no_grad (bf16 on GPU) -> crops, iBOT masks and teacher outputs are all-gathered over all ranks -> each
student's rank group splits the whole global batch among its ranks -> student forward (masked global crops + local
crops), losses against the teacher outputs -> backward (gradients averaged within the group), gradient clipping,
AdamW -> log -> per-student checkpoints and exported backbones.

Students and ranks (`--students arch[:ranks],...`: ViT presets of models/vit.py, ConvNeXt presets of
models/convnext.py, or any timm / torchvision image backbone as `timm:<model>` / `torchvision:<model>`, models/
external.py: the library's feature extractor, its last feature map resized to the 16-px grid as the patch tokens and
its global pool as the class token; random init, or local weights by --student.pretrained SPEC=PATH): with rank counts (summing to the world size) each student is trained by its own group of ranks
(torch.distributed.new_group); without counts every rank trains every student in turn on its own shard, which is
plain data parallelism (nothing to gather); one process trains all students in turn on the whole batch. Each
student sees the whole global batch each step in every layout: the layout changes the speed, not the result.

Group sizes: the groups meet at every step's all-gather, so a step lasts as long as the slowest group. With W ranks,
a global batch of B images, teacher cost C_T and student training costs C_i per image, a rank of group i spends
B/W * C_T on the teacher and B/w_i * C_i on its student: choose w_i proportional to C_i (and dividing B). Runs
measure C_i per student (summary.json, the final printout) and, on several ranks, print the balancing counts.

Objectives (`--teacher.objective auto` picks from the checkpoint):
- "heads", from a train.py checkpoint: the pretraining objective against the teacher's head outputs (DINO + iBOT +
  KoLeo (the `--loss.*` weights), Sinkhorn-Knopp on the teacher side, no Gram loss). Students get their own DINO/iBOT heads with the
  teacher's prototype counts: the losses compare distributions over prototypes, so the widths need not match. The
  teacher shares its heads' normalized bottleneck embeddings (512 floats per class token for the 7B instead of 256k
  logits: a much smaller all-gather) and the students' ranks apply its prototype layers to their own part.
- "features", from a backbone-only file (released DINOv3 format; Hugging Face DINOv3ViTModel weights as .pth, .bin,
  .safetensors or a model folder), or any checkpoint with --teacher.objective features: student adapters
  (`features.adapter`: an MLP or one linear layer to the teacher's width, dropped at export) on the class and patch
  tokens, cosine or smooth-L1 distance (`features.distance`) to the teacher's tokens:
  L = features.cls_weight L_cls + features.patch_weight L_patch + features.koleo_weight KoLeo.
  L_cls pairs each student global crop with the teacher's view of the same crop and each local crop with both
  teacher global crops; L_patch compares every patch of the student's (iBOT-masked) global crops with the teacher's
  patch of the unmasked crop.

Phases: `optim.iterations` main steps (train.py's schedules), then `phases.cooldown_iterations` of cosine lr decay to
`optim.min_lr`, then `phases.high_res_iterations` with a (global, local) crop-size pair drawn per step by
data/augment.py's CropSizeSchedule (no Gram loss) at the lr the previous phase ended with.

Outputs per student: `<output_dir>/<arch>/checkpoint_XXXXXXXX.pth` (atomic; a run resumes from the newest step every
student has) and `<output_dir>/<arch>/backbone.pth` (ViT: released format for models.checkpoint.load_backbone;
ConvNeXt: released ConvNeXt keys for models.convnext.load_convnext; timm/torchvision: the spec and the weights, for
models.checkpoint.load_any_backbone; folder timm-<model>); `summary.json` counts the teacher's images per
rank (each image once per step over all ranks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import runtime
from config import (
    OFFICIAL_HRFT_PROBABILITIES,
    OFFICIAL_HRFT_SIZES,
    VIT7B_GLOBAL_BATCH,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    group_problems,
    parse_cli,
    raise_problems,
    run_problems,
)
from config import (
    TeacherConfig as EMATeacherConfig,
)
from data.augment import AugmentConfig, CropSizes, CropSizeSchedule
from data.datasets import ImageDataset, build_dataset, build_loader
from data.shards import is_shard_pattern
from data.masking import ibot_mask_weights
from dense import DenseSet, dense_metric, fast_dense_set, log_dense_metric, write_dense_metric
from figures import pca_figure, save_png
from dino_kernels.common import KernelImpl
from models.checkpoint import (
    DISTILL_FORMAT,
    TRAIN_CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_path_or_error,
    describe_checkpoint,
    export_official,
    load_backbone,
    read_checkpoint_file,
    read_weights,
)
from models.convnext import CONVNEXT_ARCHS, MIN_INPUT_SIZE, MaskMode, build_convnext
from models.external import (
    ExternalBackbone,
    build_external,
    export_external,
    is_external,
    load_pretrained,
    set_batchnorm_momentum,
    spec_problem,
)
from models.heads import DINOHead
from models.vit import VIT_ARCHS, AttnImpl, VisionTransformer, build_vit
from monitor import pca_batch, start_run_folder
from objective import SSLLosses, StudentOutputs, build_koleo, koleo_of_crops
from optimizer import Schedules, apply_schedules, clip_per_module, param_groups
from optimizer import schedules_at as ssl_schedules_at
from schedules import Schedule, constant, cosine_between
from student_teacher import SSLNet, checkpoint_activations, multi_crop_tokens

logger = logging.getLogger("dinov3")

N_GLOBAL = 2  # global crops per image
STUDENT_ARCHS = (*VIT_ARCHS, *CONVNEXT_ARCHS)  # and any timm:<model> / torchvision:<model> (models/external.py)
HEADS_TERMS = ("total", "dino", "dino_global", "dino_local", "ibot", "koleo")
FEATURE_TERMS = ("total", "cls", "cls_global", "cls_local", "patch", "koleo")
TEACHER_HOW_TO = ("pass --teacher.checkpoint: a train.py checkpoint or run folder (its heads are distilled) or a "
                  "backbone file or Hugging Face folder (its features are); `python train.py` writes the demo teacher")


# ====================================================================================================
# Config
# ====================================================================================================


@dataclass
class TeacherConfig:
    checkpoint: str | None = None  # train.py checkpoint, or a released / Hugging Face backbone file or folder
    objective: Literal["auto", "heads", "features"] = "auto"  # auto: heads when the checkpoint has them
    arch: str | None = None  # backbone-only files: ViT preset (None: inferred from the shapes)
    attn_impl: AttnImpl = "auto"
    kernel_impl: KernelImpl = "auto"  # Sinkhorn-Knopp (README.md, "Kernel dispatch")
    # Temperature of the teacher's targets (the frozen teacher has no momentum).
    temp: Schedule = field(default_factory=lambda: EMATeacherConfig().temp)


@dataclass
class StudentConfig:
    """Options shared by every student."""

    drop_path_rate: float = 0.0
    layerscale_init: float | None = None  # None: the architecture's own (ViT 1e-5, ConvNeXt 1e-6)
    convnext_mask_mode: MaskMode = "ignore"  # iBOT masks for ConvNeXt, timm and torchvision students (convnext.py)
    attn_impl: AttnImpl = "auto"
    feature_head_hidden: int = 2048  # "features" objective, mlp adapter: hidden width of the projection heads
    # Local weights for timm/torchvision students, as SPEC=PATH (e.g. timm:resnet18=resnet18.pth): a state dict in
    # the library's key names; students not listed start from the library's random initialization.
    pretrained: tuple[str, ...] = ()
    # timm/torchvision students: BatchNorm running-statistics momentum (None: the library's; models/external.py)
    batchnorm_momentum: float | None = 0.1


@dataclass
class FeaturesConfig:
    """The "features" objective (module docstring): adapters from the student's tokens to the teacher's, the
    distance and the weight of each term (cls: class token; patch: patch tokens; koleo: the student's own class
    tokens)."""

    adapter: Literal["mlp", "linear"] = "mlp"  # mlp: Linear-GELU-Linear; linear: one layer (a 1x1 conv on the map)
    distance: Literal["cosine", "smooth_l1"] = "cosine"
    smooth_l1_beta: float = 1.0  # smooth_l1: where it turns from quadratic to linear (teacher tokens are normed)
    cls_weight: float = 1.0
    patch_weight: float = 1.0
    koleo_weight: float = 0.1


@dataclass
class PhasesConfig:
    cooldown_iterations: int = 0  # after optim.iterations: cosine lr decay to cooldown_end_lr
    cooldown_end_lr: float = 1e-6
    high_res_iterations: int = 0  # after the cooldown: mixed-resolution crops, no Gram loss
    # (global size, local size, probability) per step; the official high-resolution choices, Gram sizes dropped.
    high_res_sizes: tuple[tuple[int, int, float], ...] = tuple(
        (g, local, p) for (g, local, _), p in zip(OFFICIAL_HRFT_SIZES, OFFICIAL_HRFT_PROBABILITIES))


@dataclass
class DistillConfig:
    # Comma-separated arch[:ranks], e.g. vit_small:2,vit_base:2,convnext_tiny:1 (no counts: every rank trains every
    # student in turn). Architectures: the ViT presets of models/vit.py, the ConvNeXt presets of models/convnext.py,
    # timm:<model> and torchvision:<model> (models/external.py), e.g. timm:resnet18,torchvision:mobilenet_v3_small.
    students: str = "vit_small"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)  # batch_size: per rank (the teacher's shard)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)  # the "heads" objective
    features: FeaturesConfig = field(default_factory=FeaturesConfig)  # the "features" objective
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/distill"))


def _demo() -> DistillConfig:
    """train.py's demo teacher (the newest checkpoint of runs/demo, `make run`) into a vit_tiny and a ConvNeXt-Tiny:
    CPU, a few minutes."""
    return DistillConfig(
        students="vit_tiny,convnext_tiny",
        teacher=TeacherConfig(checkpoint="runs/demo", temp=constant(0.07)),
        data=DataConfig(batch_size=16, num_workers=2, global_size=96, local_size=48),
        # train.py's demo augmentation, which made the teacher.
        augment=AugmentConfig(n_local_crops=4, flip_p=0.5, first_global_blur_p=1.0, second_global_blur_p=0.1),
        optim=OptimConfig(iterations=40, lr=Schedule(peak=5e-4, start=0.0, warmup_iterations=10),
                          freeze_last_layer_iterations=10),
        phases=PhasesConfig(cooldown_iterations=10, high_res_iterations=6,
                            high_res_sizes=((128, 48, 0.5), (160, 64, 0.5))),
        run=RunConfig(output_dir="runs/demo_distill", log_every=10, checkpoint_every=20),
    )


def _demo_backbones() -> DistillConfig:
    """The demo teacher into a timm ResNet-18 and a torchvision MobileNetV3-Small (README, "Distill into your own
    backbone"): the features objective (the teacher's tokens through linear adapters), for the teacher's own budget
    of 750 steps of 16 images, at the learning rate that suits these convolutional students. The images are the
    teacher's own training images (generated, as the paper distills on the pretraining data): BatchNorm students
    keep the statistics of the images they were distilled on, and the bundled photos left the ResNet's unfit for the
    generated images it is evaluated on."""
    cfg = _demo()
    return dataclasses.replace(
        cfg, students="timm:resnet18,torchvision:mobilenet_v3_small",
        teacher=dataclasses.replace(cfg.teacher, checkpoint="runs/demo", objective="features"),
        data=dataclasses.replace(cfg.data, path="procedural"),
        features=FeaturesConfig(adapter="linear"),
        optim=dataclasses.replace(cfg.optim, iterations=694, lr=dataclasses.replace(cfg.optim.lr, peak=2e-3)),
        phases=dataclasses.replace(cfg.phases, cooldown_iterations=50),
        run=dataclasses.replace(cfg.run, output_dir="runs/demo_distill_backbones", log_every=50,
                                checkpoint_every=250),
    )


def _paper() -> DistillConfig:
    """Section 5.2: the pretraining objective and hyperparameters (the config groups' defaults, which are the 7B
    pretraining's), 1M steps, 250k cooldown, 10k high-res steps."""
    return DistillConfig(
        students="vit_small,vit_base,vit_large",
        data=DataConfig(batch_size=VIT7B_GLOBAL_BATCH // 256),
        phases=PhasesConfig(cooldown_iterations=250_000, high_res_iterations=10_000),
        run=RunConfig(output_dir="runs/distill"),
    )


PRESETS: dict[str, tuple[str, DistillConfig]] = {
    "demo": ("train.py's demo teacher -> vit_tiny + convnext_tiny on the bundled photos, CPU (the default)", _demo()),
    "demo-backbones": ("the demo teacher -> timm:resnet18 + torchvision:mobilenet_v3_small, 750 steps, CPU",
                       _demo_backbones()),
    "paper": ("the paper's distillation schedule (pass --teacher.checkpoint and --data.path)", _paper()),
}


def parse_config(argv: list[str] | None = None) -> DistillConfig:
    """`distill.py [preset] [--field value ...]`; without a preset name, `demo`."""
    return parse_cli(PRESETS, argv)


# ====================================================================================================
# Teacher
# ====================================================================================================


class Teacher(nn.Module):
    """The frozen teacher. `forward` runs it on this rank's shard and returns what is shared with the students:
    cls [2b, d] and patches [2b, P, d] -- the DINO/iBOT heads' normalized bottleneck embeddings ("heads") or the
    backbone's normed tokens ("features"). `images_seen` counts the images it has run on."""

    def __init__(self, net: nn.Module, objective: Literal["heads", "features"], model_cfg: ModelConfig | None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.objective = objective
        self.model_cfg = model_cfg  # heads: the sizes the students' heads copy
        self.images_seen = 0

    @property
    def backbone(self) -> VisionTransformer:
        return self.net.backbone if self.objective == "heads" else self.net

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: no drop path, no RoPE jitter, ever

    @torch.no_grad()
    def forward(self, global_crops: torch.Tensor) -> dict[str, torch.Tensor]:
        self.images_seen += global_crops.shape[0] // N_GLOBAL
        out = self.backbone(global_crops)
        if self.objective == "features":
            return {"cls": out["x_norm_clstoken"], "patches": out["x_norm_patchtokens"]}
        return {"cls": self.net.dino_head.bottleneck(out["x_norm_clstoken"]),
                "patches": self.net.ibot_head.bottleneck(out["x_norm_patchtokens"])}

    @torch.no_grad()
    def head_logits(self, cls_embeddings: torch.Tensor, masked_patch_embeddings: torch.Tensor):
        """"heads": the teacher's prototype scores from shared bottleneck embeddings (DINO [N, K], iBOT [M, K'])."""
        return (self.net.dino_head.last_layer(cls_embeddings),
                self.net.ibot_head.last_layer(masked_patch_embeddings))


def load_teacher(cfg: TeacherConfig) -> Teacher:
    """The frozen teacher named by cfg.checkpoint, with its objective (see the module docstring)."""
    payload = read_weights(checkpoint_path_or_error(cfg.checkpoint, TEACHER_HOW_TO))
    has_heads = payload.get("format") == TRAIN_CHECKPOINT_FORMAT
    objective = cfg.objective if cfg.objective != "auto" else ("heads" if has_heads else "features")
    if objective == "heads" and not has_heads:
        raise CheckpointError(f"{cfg.checkpoint} holds no DINO/iBOT heads (it is {describe_checkpoint(payload)}, "
                              "not a train.py checkpoint): use --teacher.objective features (or auto) to distill its "
                              "backbone features")
    if has_heads:
        saved = payload["config"]["model"]
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        model_cfg = ModelConfig(**{k: v for k, v in saved.items() if k in known})
        net = SSLNet(model_cfg, drop_path_rate=0.0)
        net.load_state_dict(payload["teacher"])  # the EMA teacher of the run, heads included
        net.backbone.set_attn_impl(cfg.attn_impl)
        if objective == "features":
            return Teacher(net.backbone, "features", None)
        return Teacher(net, "heads", model_cfg)
    backbone = load_backbone(payload, arch=cfg.arch, attn_impl=cfg.attn_impl)
    return Teacher(backbone, "features", None)


# ====================================================================================================
# Students and their rank groups
# ====================================================================================================


@dataclass(frozen=True)
class StudentSpec:
    index: int  # position in --students: seeds and the order of collectives derive from it
    arch: str
    ranks: tuple[int, ...]  # the ranks that train this student (its group)

    @property
    def name(self) -> str:
        return self.arch


def parse_students(spec: str, world_size: int, global_batch: int) -> list[StudentSpec]:
    """'arch[:ranks],...' -> one StudentSpec per student, with its ranks; every error says what to change."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError("students: give at least one student, e.g. --students vit_small or vit_small:2,vit_base:2")
    archs, counts = [], []
    for entry in entries:
        arch, count = split_student_entry(entry)
        if arch not in STUDENT_ARCHS and not is_external(arch):
            raise ValueError(f"students: unknown architecture {arch!r}; choose from {', '.join(STUDENT_ARCHS)}, "
                             "timm:<model> or torchvision:<model>")
        if count and (not count.isdigit() or int(count) < 1):
            raise ValueError(f"students: rank count {count!r} of {arch} must be a positive integer")
        archs.append(arch)
        counts.append(int(count) if count else None)
    duplicates = sorted({a for a in archs if archs.count(a) > 1})
    if duplicates:
        raise ValueError(f"students: {', '.join(duplicates)} listed twice; each student writes to <output_dir>/<arch>")
    given = [c for c in counts if c is not None]
    if given and len(given) != len(counts):
        raise ValueError("students: give a rank count to every student (arch:ranks) or to none")
    if world_size == 1 or not given:
        # One process, or no counts: every rank trains every student in turn, each on the whole batch.
        return [StudentSpec(i, arch, tuple(range(world_size))) for i, arch in enumerate(archs)]
    if sum(given) != world_size:
        raise ValueError(f"students: rank counts {given} sum to {sum(given)}, but {world_size} ranks are running; "
                         f"make them add up to the world size (or leave them out to train every student on all ranks)")
    specs, first = [], 0
    for i, (arch, count) in enumerate(zip(archs, given)):
        if global_batch % count:
            raise ValueError(f"students: {arch} has {count} ranks, which do not divide the global batch of "
                             f"{global_batch} images (data.batch_size x world size); change the counts or the batch")
        specs.append(StudentSpec(i, arch, tuple(range(first, first + count))))
        first += count
    return specs


def split_student_entry(entry: str) -> tuple[str, str]:
    """'arch[:ranks]' -> (arch, ranks or ''); a timm:<model>[:ranks] spec keeps its library prefix."""
    if is_external(entry):
        spec, _, count = entry.rpartition(":")
        return (spec, count) if is_external(spec) else (entry, "")
    arch, _, count = entry.partition(":")
    return arch, count


def suggest_rank_counts(seconds_per_image: list[float], world_size: int) -> list[int]:
    """Rank counts (>= 1 each, summing to world_size) that equalize the students' step times.

    A group of w ranks trains on B/w images per rank, so its step takes B/w * c: giving each next rank to the group
    with the slowest step minimizes the slowest one. The counts must still divide the global batch.
    """
    if world_size < len(seconds_per_image):
        raise ValueError(f"{len(seconds_per_image)} students need at least as many ranks, got {world_size}")
    counts = [1] * len(seconds_per_image)
    for _ in range(world_size - len(counts)):
        slowest = max(range(len(counts)), key=lambda i: seconds_per_image[i] / counts[i])
        counts[slowest] += 1
    return counts


def build_groups(specs: list[StudentSpec], dist_info: runtime.Dist) -> list:
    """One process group per student (all ranks must create every group, in the same order)."""
    if not dist_info.enabled:
        return [None] * len(specs)
    return [dist.new_group(list(spec.ranks)) for spec in specs]


class Student(nn.Module):
    """A student backbone (ViT or ConvNeXt) with a class-token head and a patch-token head.

    Heads: DINO and iBOT heads (the "heads" objective) or projection MLPs to the teacher's width ("features").
    """

    def __init__(self, backbone: nn.Module, class_head: nn.Module, patch_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.class_head = class_head
        self.patch_head = patch_head

    def forward(self, global_crops, local_crops, masks, mask_indices=None) -> StudentOutputs:
        """Class-head outputs of every crop (crop-major), patch-head outputs of the global crops' patches (only the
        masked ones when mask_indices is given, else all [2B, P, .]), and the global crops' class tokens [2B, C]."""
        cls_tokens, cls_global, patches = multi_crop_tokens(self.backbone, global_crops, local_crops, masks)
        if mask_indices is not None:
            patches = patches.flatten(0, 1).index_select(0, mask_indices)
        return StudentOutputs(self.class_head(cls_tokens), self.patch_head(patches), cls_global)


def build_backbone(arch: str, cfg: StudentConfig) -> nn.Module:
    if is_external(arch):
        backbone = build_external(arch, mask_mode=cfg.convnext_mask_mode)
        if cfg.batchnorm_momentum is not None:
            set_batchnorm_momentum(backbone, cfg.batchnorm_momentum)
        weights = pretrained_files(cfg).get(arch)
        if weights is not None:
            load_pretrained(backbone, weights)
        return backbone
    overrides: dict = {"drop_path_rate": cfg.drop_path_rate}
    if cfg.layerscale_init is not None:
        overrides["layerscale_init"] = cfg.layerscale_init
    if arch in VIT_ARCHS:
        return build_vit(arch, attn_impl=cfg.attn_impl, **overrides)
    return build_convnext(arch, mask_mode=cfg.convnext_mask_mode, **overrides)


def pretrained_files(cfg: StudentConfig) -> dict[str, str]:
    """student.pretrained's SPEC=PATH entries as spec -> path."""
    return dict(entry.split("=", 1) for entry in cfg.pretrained)


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, kind: Literal["mlp", "linear"] = "mlp") -> nn.Module:
    """"features" objective: student tokens -> the teacher's width (Linear, GELU, Linear; or one Linear, which on
    the resized feature map is a 1x1 convolution). Trained with the student, dropped at export."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def build_student(spec: StudentSpec, teacher: Teacher, cfg: DistillConfig) -> Student:
    # Seeded per student: its initialization does not depend on which other students share the process.
    torch.manual_seed(runtime.derived_seed(cfg.run.seed, 100, spec.index))
    backbone = build_backbone(spec.arch, cfg.student)
    dim = backbone.embed_dim
    if teacher.objective == "heads":
        m = teacher.model_cfg
        return Student(backbone, DINOHead(dim, m.dino_prototypes, m.dino_hidden, m.dino_bottleneck),
                       DINOHead(dim, m.ibot_prototypes, m.ibot_hidden, m.ibot_bottleneck))
    hidden, kind = cfg.student.feature_head_hidden, cfg.features.adapter
    return Student(backbone, projection_head(dim, hidden, teacher.embed_dim, kind),
                   projection_head(dim, hidden, teacher.embed_dim, kind))


def wrap_student(student: Student, group, group_size: int, device: torch.device) -> nn.Module:
    """DDP over the student's own group (gradients averaged within it); alone in its group, the plain module."""
    if group_size == 1:
        return student
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(student, device_ids=device_ids, process_group=group)


# ====================================================================================================
# Shared teacher inference: all-gather crops, masks and teacher outputs; each rank keeps its students' part
# ====================================================================================================


def gather_crop_major(local: torch.Tensor, n_crops: int, n_images: int, dist_info: runtime.Dist) -> torch.Tensor:
    """This rank's crop-major [n_crops * b, ...] -> the global batch [n_crops, W * b, ...], images in rank order.

    Rank r holds images [r*b, (r+1)*b) of each step (block sharding in data/datasets.py), so the result is the
    same global batch whatever the number of ranks."""
    local = local.reshape(n_crops, n_images, *local.shape[1:])
    if not dist_info.enabled:
        return local
    sendable = local.to(torch.uint8) if local.dtype == torch.bool else local.contiguous()  # gloo has no bool
    parts = [torch.empty_like(sendable) for _ in range(dist_info.world_size)]
    dist.all_gather(parts, sendable)
    return torch.cat(parts, dim=1).to(local.dtype)


def part_of(global_batch: torch.Tensor, part: int, n_parts: int) -> torch.Tensor:
    """Images [part * B/n, (part+1) * B/n) of a [n_crops, B, ...] global batch, crop-major as the collate makes
    them: [n_crops * B/n, ...]."""
    n_images = global_batch.shape[1] // n_parts
    return global_batch[:, part * n_images:(part + 1) * n_images].flatten(0, 1)


def with_ibot_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adds the flat indices and the weights of the masked tokens (data/masking.py's definitions)."""
    return {**batch, "mask_indices": batch["masks"].flatten().nonzero().flatten(),
            "mask_weights": ibot_mask_weights(batch["masks"])}


def share_batch(batch: dict, teacher_out: dict, part: int, n_parts: int, dist_info: runtime.Dist) -> dict:
    """What this rank's students train on: part `part` of `n_parts` of the global batch -- crops, masks, teacher
    outputs -- gathered from the ranks that loaded it and ran the teacher on it."""
    n_images = batch["global_crops"].shape[0] // N_GLOBAL
    tensors = {  # name: (this rank's crop-major tensor, crops per image)
        "global_crops": (batch["global_crops"], N_GLOBAL),
        "local_crops": (batch["local_crops"], batch["local_crops"].shape[0] // n_images),
        "masks": (batch["masks"], N_GLOBAL),
        "teacher_cls": (teacher_out["cls"], N_GLOBAL),
        "teacher_patches": (teacher_out["patches"], N_GLOBAL),
    }
    if n_parts == dist_info.world_size:  # the part is the shard this rank loaded (plain data parallelism)
        return with_ibot_targets({name: local for name, (local, _) in tensors.items()})
    # One tensor at a time, cut at once: only one global-batch tensor is alive at any moment.
    return with_ibot_targets({name: part_of(gather_crop_major(local, n_crops, n_images, dist_info), part, n_parts)
                              for name, (local, n_crops) in tensors.items()})


# ====================================================================================================
# Losses
# ====================================================================================================


def heads_losses(cfg: DistillConfig, teacher: Teacher, group) -> SSLLosses:
    """The pretraining objective (DINO + iBOT + KoLeo) with the teacher's prototype counts; centering and KoLeo
    groups over the student's own ranks, which together hold the whole global batch."""
    model_cfg = dataclasses.replace(teacher.model_cfg, kernel_impl=cfg.teacher.kernel_impl)
    return SSLLosses(model_cfg, cfg.loss, process_group=group)


def _cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos between matching rows (last dim), in float32."""
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-6)


def _smooth_l1_distance(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Smooth-L1 between matching rows, averaged over the last dim, in float32."""
    student, teacher = torch.broadcast_tensors(student.float(), teacher.float())
    return F.smooth_l1_loss(student, teacher, reduction="none", beta=beta).mean(dim=-1)


class FeatureLosses(nn.Module):
    """The "features" objective (module docstring): distances of class and patch tokens, plus KoLeo."""

    def __init__(self, loss: LossConfig, features: FeaturesConfig, group):
        super().__init__()
        self.cfg, self.features = loss, features
        self.koleo = build_koleo(loss, group)

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.features.distance == "smooth_l1":
            return _smooth_l1_distance(student, teacher, self.features.smooth_l1_beta)
        return _cosine_distance(student, teacher)

    def forward(self, student_out: StudentOutputs, batch: dict) -> dict[str, torch.Tensor]:
        cls_projected, patches_projected, cls_global = student_out.dino, student_out.ibot, student_out.cls_global
        teacher_cls = batch["teacher_cls"]  # [2B, C_t], crop-major
        n_images = teacher_cls.shape[0] // N_GLOBAL
        student_cls = cls_projected.view(-1, n_images, cls_projected.shape[-1])  # [crops, B, C_t]
        teacher_cls = teacher_cls.view(N_GLOBAL, n_images, -1)
        same_view = self.distance(student_cls[:N_GLOBAL], teacher_cls).mean(dim=1)  # [2]
        local_to_global = self.distance(student_cls[N_GLOBAL:, None], teacher_cls[None]).mean(dim=2).flatten()
        cls_loss = torch.cat([same_view, local_to_global]).mean()
        patch_loss = self.distance(patches_projected, batch["teacher_patches"]).mean()
        koleo = koleo_of_crops(self.koleo, cls_global, N_GLOBAL, self.cfg.koleo_crops)
        w = self.features
        total = w.cls_weight * cls_loss + w.patch_weight * patch_loss + w.koleo_weight * koleo
        local = local_to_global.mean() if local_to_global.numel() else cls_loss.new_zeros(())
        return {"total": total, "cls": cls_loss, "cls_global": same_view.mean(), "cls_local": local,
                "patch": patch_loss, "koleo": koleo}


# ====================================================================================================
# One student: state, step, checkpoints
# ====================================================================================================


@dataclass
class StudentRun:
    """One student on this rank: its network, optimizer, losses and place in its rank group."""

    spec: StudentSpec
    objective: Literal["heads", "features"]
    net: Student
    model: nn.Module  # net, or DDP around it
    optimizer: torch.optim.Optimizer
    losses: nn.Module
    group: object  # its process group (None in one process)
    group_rank: int
    nonfinite_skips: int = 0

    @property
    def terms(self) -> tuple[str, ...]:
        return HEADS_TERMS if self.objective == "heads" else FEATURE_TERMS

    @property
    def n_ranks(self) -> int:
        return len(self.spec.ranks)

    @property
    def is_leader(self) -> bool:
        return self.group_rank == 0


def setup_student(spec: StudentSpec, group, teacher: Teacher, cfg: DistillConfig,
                  dist_info: runtime.Dist) -> StudentRun:
    net = build_student(spec, teacher, cfg).to(dist_info.device)
    if cfg.run.activation_checkpointing:
        checkpoint_activations(net.backbone.blocks)
    losses = (heads_losses(cfg, teacher, group) if teacher.objective == "heads"
              else FeatureLosses(cfg.loss, cfg.features, group))
    losses.to(dist_info.device)
    model = wrap_student(net, group, len(spec.ranks), dist_info.device)
    # The pretraining's groups: layer-wise lr decay over a ViT's blocks. A ConvNeXt's parameter names hold no
    # "backbone.blocks.i", so all of them get the base lr (no layer-wise decay, no patch-embedding factor).
    optimizer = torch.optim.AdamW(param_groups(net, cfg.optim), lr=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2))
    if cfg.run.compile:
        net.backbone.compile()
    group_rank = spec.ranks.index(dist_info.rank)
    return StudentRun(spec, teacher.objective, net, model, optimizer, losses, group, group_rank)


def _seed_student_step(run: StudentRun, seed: int, step: int, rank: int) -> None:
    """RoPE box: the same on every rank of the group (one box per step, as in one process); drop path: per rank."""
    rope = getattr(run.net.backbone, "rope_embed", None)
    if rope is not None:
        rope.seed(runtime.derived_seed(seed, step, 1, run.spec.index))
    torch.manual_seed(runtime.derived_seed(seed, step, 3, run.spec.index, rank))


def _group_max(value: float, run: StudentRun, device: torch.device) -> float:
    if run.n_ranks == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=run.group)
    return t.item()


def _group_mean(values: torch.Tensor, run: StudentRun) -> torch.Tensor:
    if run.n_ranks > 1:
        dist.all_reduce(values, group=run.group)
        values /= run.n_ranks
    return values


def train_student_step(run: StudentRun, teacher: Teacher, batch: dict, sched: Schedules, step: int,
                       cfg: DistillConfig, dist_info: runtime.Dist) -> torch.Tensor:
    """Forward, losses, backward and optimizer step of one student on this rank's part of the global batch.

    Returns its loss terms averaged over its group (float64 [len(run.terms)]), NaN where the step was skipped.
    """
    device = dist_info.device
    apply_schedules(run.optimizer, sched)
    _seed_student_step(run, cfg.run.seed, step, dist_info.rank)
    autocast = device.type == "cuda" and cfg.run.bf16
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        if teacher.objective == "heads":
            masked_patches = batch["teacher_patches"].flatten(0, 1).index_select(0, batch["mask_indices"])
            teacher_logits = teacher.head_logits(batch["teacher_cls"], masked_patches)
            student_out = run.model(batch["global_crops"], batch["local_crops"], batch["masks"], batch["mask_indices"])
            terms = run.losses(student_out, teacher_logits, batch, sched.teacher_temp, N_GLOBAL)
        else:
            student_out = run.model(batch["global_crops"], batch["local_crops"], batch["masks"])
            terms = run.losses(student_out, batch)

    if not _group_finite(terms["total"], run, device):
        return _nonfinite_step(run, f"loss became {terms['total'].item()}", step, cfg)

    run.optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    # (The prototype layers are frozen by their lr of 0: optimizer.apply_schedules.)
    grad_norm = clip_per_module((run.net.backbone, run.net.class_head, run.net.patch_head), cfg.optim.clip_grad)
    # A finite loss can still have NaN/inf gradients (an overflow in backward): AdamW would write them into the
    # weights, and the next checkpoint would hold a broken student.
    if not _group_finite(grad_norm, run, device):
        return _nonfinite_step(run, f"gradient norm became {grad_norm.item()}", step, cfg)
    run.optimizer.step()
    values = torch.stack([terms[name].detach().double() for name in run.terms]).to(device)
    return _group_mean(values, run).cpu()


def _group_finite(value: torch.Tensor, run: StudentRun, device: torch.device) -> bool:
    """Whether `value` is finite on every rank of the student's group (they must all take the same branch)."""
    return _group_max(0.0 if torch.isfinite(value).item() else 1.0, run, device) == 0.0


def _nonfinite_step(run: StudentRun, what: str, step: int, cfg: DistillConfig) -> torch.Tensor:
    """Stop, or skip this student's update and count it (`runtime.skip_or_stop`); the weights and optimizer state
    are untouched either way. `step` is 0-based; messages use the 1-based numbers of the log and the checkpoints."""
    run.nonfinite_skips = runtime.skip_or_stop(f"{run.spec.name}: {what}", step + 1, run.nonfinite_skips,
                                               cfg.run.skip_nonfinite, cfg.run.max_nonfinite_skips,
                                               student_dir(cfg, run.spec))
    run.optimizer.zero_grad(set_to_none=True)
    return torch.full((len(run.terms),), math.nan, dtype=torch.float64)


def student_dir(cfg: DistillConfig, spec: StudentSpec) -> Path:
    """<output_dir>/<arch>; a timm:<model> spec's folder is timm-<model> (no colon in file names)."""
    return Path(cfg.run.output_dir) / spec.name.replace(":", "-")


def save_student(step: int, run: StudentRun, cfg: DistillConfig) -> None:
    """The group leader writes the checkpoint (atomic) and the exported backbone (released key format)."""
    if not run.is_leader:
        return
    # Plain state dicts: students are replicated (DDP), never sharded. (runtime.full_state's full_state_dict +
    # cpu_offload returns an empty dict on ranks other than 0, and a group's leader may be any rank.)
    folder = student_dir(cfg, run.spec)
    payload = {
        "format": DISTILL_FORMAT,
        "step": step,  # completed steps: the next step to run
        "arch": run.spec.arch,
        "objective": run.objective,
        "config": dataclasses.asdict(cfg),
        "student": {k: v.detach().cpu() for k, v in run.net.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "losses": run.losses.state_dict(),
        "nonfinite_skips": run.nonfinite_skips,
    }
    runtime.atomic_save(payload, runtime.checkpoint_path(folder, step))
    backbone = run.net.backbone
    exported = export_external(backbone) if isinstance(backbone, ExternalBackbone) else export_official(backbone)
    runtime.atomic_save(exported, folder / "backbone.pth")


def resume_step(cfg: DistillConfig, specs: list[StudentSpec], is_main: bool = True) -> int:
    """The newest step every student has a complete checkpoint of (0 for a fresh run); rank 0 first moves incomplete
    ones aside (`runtime.set_aside_incomplete`). RunFinished when that step is the end of the schedule."""
    if is_main:
        for spec in specs:
            runtime.set_aside_incomplete(student_dir(cfg, spec))
    steps = [{s for s, _ in runtime.list_checkpoints(student_dir(cfg, spec))} for spec in specs]
    common = set.intersection(*steps)
    if common and max(common) >= total_steps(cfg):
        raise runtime.RunFinished(f"{cfg.run.output_dir} is finished: every student has its checkpoint of step "
                                  f"{max(common)} of {total_steps(cfg)}; nothing to run (raise --optim.iterations or "
                                  "the phases' iterations to train further)")
    if common:
        return max(common)
    if any(steps):
        have = {spec.name: sorted(s)[-3:] for spec, s in zip(specs, steps)}
        raise CheckpointError(f"the students in {cfg.run.output_dir} have no checkpoint step in common ({have}); "
                              "use another --run.output-dir or --run.no-resume")
    return 0


def load_student(step: int, run: StudentRun, cfg: DistillConfig) -> None:
    path = runtime.checkpoint_path(student_dir(cfg, run.spec), step)
    payload = read_checkpoint_file(path)
    if payload.get("format") != DISTILL_FORMAT:
        raise CheckpointError(f"{path} is {describe_checkpoint(payload)}, but resuming a distillation expects a "
                              f"distill.py student checkpoint of {run.spec.arch}; move it out of {path.parent} or "
                              "use another --run.output-dir")
    if payload["arch"] != run.spec.arch or payload["objective"] != run.objective:
        raise CheckpointError(f"{path} holds a {payload['arch']} student trained with the {payload['objective']!r} "
                              f"objective, this run has {run.spec.arch} / {run.objective!r}; use another "
                              "--run.output-dir")
    run.net.load_state_dict(payload["student"])
    run.optimizer.load_state_dict(payload["optimizer"])
    run.losses.load_state_dict(payload["losses"])
    run.nonfinite_skips = payload["nonfinite_skips"]


def param_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal digests on two ranks mean bitwise-equal replicas."""
    digest = hashlib.sha256()
    for name, param in module.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ====================================================================================================
# Phases and data
# ====================================================================================================


def total_steps(cfg: DistillConfig) -> int:
    return cfg.optim.iterations + cfg.phases.cooldown_iterations + cfg.phases.high_res_iterations


def phase_at(step: int, cfg: DistillConfig) -> Literal["main", "cooldown", "high_res"]:
    if step < cfg.optim.iterations:
        return "main"
    if step < cfg.optim.iterations + cfg.phases.cooldown_iterations:
        return "cooldown"
    return "high_res"


def schedules_at(step: int, cfg: DistillConfig) -> Schedules:
    """The pretraining's schedules during the main phase; then a cosine lr cooldown; then the lr the cooldown ended
    with."""
    main_end = cfg.optim.iterations
    sched = ssl_schedules_at(min(step, main_end), cfg.optim, EMATeacherConfig(temp=cfg.teacher.temp))
    if step < main_end:
        return sched
    cooldown = cfg.phases.cooldown_iterations
    progress = min(step - main_end, cooldown) / max(cooldown, 1)
    lr = cosine_between(sched.lr, cfg.phases.cooldown_end_lr, progress) if cooldown else sched.lr
    return dataclasses.replace(sched, lr=lr)


def crop_sizes(phase: str, cfg: DistillConfig) -> CropSizes | CropSizeSchedule:
    if phase != "high_res":
        return CropSizes(cfg.data.global_size, cfg.data.local_size, None)
    choices = tuple((CropSizes(g, l, None), p) for g, l, p in cfg.phases.high_res_sizes)
    return CropSizeSchedule.weighted(choices, seed=cfg.run.seed)


def build_phase_loader(dataset: ImageDataset, phase: str, start_step: int, cfg: DistillConfig,
                       dist_info: runtime.Dist):
    return build_loader(
        dataset, cfg.augment, crop_sizes(phase, cfg), batch_size=cfg.data.batch_size, rank=dist_info.rank,
        world_size=dist_info.world_size, seed=cfg.run.seed, start_step=start_step,
        num_workers=cfg.data.num_workers, patch_size=16, mask_probability=cfg.data.mask_probability,
        mask_ratio=cfg.data.mask_ratio, pin_memory=dist_info.device.type == "cuda",
    )


def validate_config(cfg: DistillConfig, world_size: int) -> list[StudentSpec]:
    """Reject impossible settings before the teacher is read; returns the students with their ranks."""
    # Every student works on the 16-pixel patch grid.
    problems = group_problems(cfg.data, cfg.augment, cfg.optim, cfg.loss, cfg.teacher.temp, patch=16)
    if cfg.data.parts or is_shard_pattern(cfg.data.path or ""):
        problems.append("data.parts (a mixture) and tar shards are read by train.py only: give distill.py an image "
                        "folder or a .txt list as --data.path")
    problems += run_problems(cfg.run)
    raise_problems("distillation", problems)  # before parse_students, whose errors assume a sound batch
    specs = parse_students(cfg.students, world_size, cfg.data.batch_size * world_size)
    if cfg.run.parallel != "ddp":
        problems.append("run.parallel must be 'ddp': students are data-parallel within their rank groups")
    if cfg.run.checkpoint_format == "sharded" or cfg.run.async_checkpoint:
        problems.append("run.checkpoint_format='sharded' and run.async_checkpoint are train.py's (FSDP): distill.py's "
                        "students are data-parallel, each checkpoint is one file written by its group leader")
    if cfg.phases.cooldown_iterations < 0 or cfg.phases.high_res_iterations < 0:
        problems.append("phases.cooldown_iterations and phases.high_res_iterations must be >= 0")
    if cfg.phases.high_res_iterations:
        try:
            crop_sizes("high_res", cfg)
        except ValueError as err:
            problems.append(f"phases.high_res_sizes: {err}")
    sizes = [cfg.data.global_size, cfg.data.local_size if cfg.augment.n_local_crops else cfg.data.global_size]
    if cfg.phases.high_res_iterations:
        sizes += [s for g, l, _ in cfg.phases.high_res_sizes for s in (g, l)]
    for size in sizes:
        if size % 16:
            problems.append(f"crop size {size} is not a multiple of the 16-pixel patch")
    convnexts = [s.arch for s in specs if s.arch in CONVNEXT_ARCHS]
    if convnexts and min(sizes) < MIN_INPUT_SIZE:
        problems.append(f"{', '.join(convnexts)} need crops of at least {MIN_INPUT_SIZE} px (total stride 32); "
                        f"the smallest configured crop is {min(sizes)} px")
    if cfg.student.feature_head_hidden < 1:
        problems.append("student.feature_head_hidden must be >= 1")
    problems += external_student_problems(cfg, specs, sizes)
    if not cfg.teacher.checkpoint:
        problems.append("teacher.checkpoint is not set: pass a train.py checkpoint or a backbone file")
    elif not Path(cfg.teacher.checkpoint).exists():
        problems.append(f"teacher.checkpoint {cfg.teacher.checkpoint} does not exist "
                        "(the demo teacher is written by `python train.py`)")
    raise_problems("distillation", problems)
    return specs


def external_student_problems(cfg: DistillConfig, specs: list[StudentSpec], sizes: list[int]) -> list[str]:
    """timm/torchvision students: the model exists, has a spatial feature map and takes every configured crop size
    (checked on the meta device, before anything is loaded); student.pretrained names listed students and files."""
    problems = []
    external = [spec.arch for spec in specs if is_external(spec.arch)]
    for arch in external:
        problem = spec_problem(arch, sizes)
        if problem:
            problems.append(f"students: {problem}")
    for entry in cfg.student.pretrained:
        arch, sep, path = entry.partition("=")
        if not sep or arch not in external:
            problems.append(f"student.pretrained entry {entry!r} must be SPEC=PATH with SPEC one of the timm/"
                            f"torchvision students ({', '.join(external) or 'none listed'})")
        elif not Path(path).is_file():
            problems.append(f"student.pretrained: {path} (for {arch}) is not a file")
    if external and cfg.run.activation_checkpointing:
        problems.append(f"run.activation_checkpointing works on ViT/ConvNeXt blocks; {', '.join(external)} have none")
    if cfg.features.smooth_l1_beta <= 0:
        problems.append("features.smooth_l1_beta must be > 0")
    return problems


# ====================================================================================================
# Setup, one step, logging
# ====================================================================================================


def setup_teacher(cfg: DistillConfig, device: torch.device) -> Teacher:
    teacher = load_teacher(cfg.teacher).to(device)
    if device.type == "cuda" and cfg.run.bf16:
        # Inference only: bf16 weights halve the teacher's memory. Buffers (RoPE periods) stay float32.
        for param in teacher.parameters():
            param.data = param.data.to(torch.bfloat16)
    if cfg.run.compile:
        teacher.backbone.compile()
    return teacher


def setup_students(specs: list[StudentSpec], teacher: Teacher, cfg: DistillConfig,
                   dist_info: runtime.Dist) -> list[StudentRun]:
    """This rank's students (every process creates every group, in the same order)."""
    groups = build_groups(specs, dist_info)
    runs = [setup_student(spec, group, teacher, cfg, dist_info)
            for spec, group in zip(specs, groups) if dist_info.rank in spec.ranks]
    logger.info(f"teacher: {type(teacher.backbone).__name__} {teacher.embed_dim}-d, objective {teacher.objective!r}; "
                f"students: " + ", ".join(f"{s.name} on ranks {list(s.ranks)}" for s in specs))
    return runs


def distill_step(runs: list[StudentRun], teacher: Teacher, batch: dict, sched: Schedules, step: int, n_students: int,
                 cfg: DistillConfig, dist_info: runtime.Dist) -> torch.Tensor:
    """The teacher on this rank's shard, then each of this rank's students on its part of the global batch.
    Returns, on every rank, each student's group-mean loss terms and its seconds per image [n_students, terms + 1]."""
    device = dist_info.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.run.bf16):
        teacher_out = teacher(batch["global_crops"])
    # Groups are all ranks or disjoint (parse_students), so this rank's students share one part of the batch.
    shared = share_batch(batch, teacher_out, runs[0].group_rank, runs[0].n_ranks, dist_info)
    del batch, teacher_out
    global_batch = cfg.data.batch_size * dist_info.world_size
    stats = torch.zeros(n_students, len(runs[0].terms) + 1, dtype=torch.float64)
    for run in runs:
        t_student = time.perf_counter()
        values = train_student_step(run, teacher, shared, sched, step, cfg, dist_info)
        seconds = time.perf_counter() - t_student
        if run.is_leader:
            per_image = seconds * run.n_ranks / global_batch
            stats[run.spec.index] = torch.cat([values, torch.tensor([per_image], dtype=torch.float64)])
    if dist_info.enabled:  # each row is filled by its student's group leader only: a sum gathers them
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu()
    return stats


def save_students(step: int, runs: list[StudentRun], cfg: DistillConfig, dist_info: runtime.Dist) -> None:
    for run in runs:
        save_student(step, run, cfg)
    runtime.barrier(dist_info)
    # Old checkpoints go only once every student has this step: a crash between two students' saves then still
    # leaves a step they all have to resume from, even with run.keep_last = 1.
    for run in runs:
        if run.is_leader:
            runtime.prune_checkpoints(student_dir(cfg, run.spec), cfg.run.keep_last)


class Monitor:
    """Logs each step's per-student terms and speeds, evaluates the students' dense features every
    `run.dense_every` steps, and writes the summary."""

    def __init__(self, cfg: DistillConfig, specs: list[StudentSpec], runs: list[StudentRun], teacher: Teacher,
                 start_step: int, dist_info: runtime.Dist):
        self.cfg, self.specs, self.runs, self.teacher, self.dist_info = cfg, specs, runs, teacher, dist_info
        self.writer = start_run_folder(Path(cfg.run.output_dir), cfg, dist_info, start_step)
        self.n_steps, self.start_step = total_steps(cfg), start_step
        self.progress = runtime.Progress(self.n_steps, start_step)
        self.terms = HEADS_TERMS if teacher.objective == "heads" else FEATURE_TERMS
        # Per step, every student's group-mean loss terms and its seconds per image on one rank, shared by all ranks.
        self.history = {spec.name: [] for spec in specs}
        self.last: dict[str, dict[str, float]] = {}
        self.seconds_per_image = torch.zeros(len(specs), dtype=torch.float64)
        self.dense_set = fast_dense_set(cfg.data.global_size) if cfg.run.dense_every else None
        self.dense_history: dict[int, dict[str, dict[str, float]]] = {}  # step -> student -> metric (0: init)
        if self.dense_set is not None and start_step == 0:
            if dist_info.is_main:  # the frozen teacher's value: what the students' patch features are pulled toward
                log_dense_metric(self.writer, teacher.backbone, self.dense_set, 0, tag="dense/teacher")
            self.dense_history[0] = log_students_dense(self.writer, runs, self.dense_set, 0, dist_info)

    def log_step(self, step: int, phase: str, stats: torch.Tensor, sched: Schedules, seconds: float) -> None:
        global_batch = self.cfg.data.batch_size * self.dist_info.world_size
        self.seconds_per_image = (0.9 * self.seconds_per_image + 0.1 * stats[:, -1] if step > self.start_step + 1
                                  else stats[:, -1])
        self.last = {spec.name: dict(zip(self.terms, stats[spec.index, :-1].tolist())) for spec in self.specs}
        for spec in self.specs:
            self.history[spec.name].append(self.last[spec.name]["total"])
        if self.writer is not None:
            for (name, terms), per_image in zip(self.last.items(), stats[:, -1].tolist()):
                for term, value in terms.items():
                    self.writer.add_scalar(f"loss/{name}/{term}", value, step)
                self.writer.add_scalar(f"train/{name}/seconds_per_image", per_image, step)
            self.writer.add_scalar("schedule/lr", sched.lr, step)
            self.writer.add_scalar("schedule/teacher_temp", sched.teacher_temp, step)
            self.writer.add_scalar("train/images_per_s", global_batch / seconds, step)
        if self.dist_info.is_main and (step % self.cfg.run.log_every == 0 or step == self.n_steps
                                       or step == self.start_step + 1):
            eta = runtime.Progress.format_seconds(self.progress.eta_seconds(step - 1))
            losses = "  ".join(f"{name} {values['total']:.4f}" for name, values in self.last.items())
            logger.info(f"step {step}/{self.n_steps} [{phase}]  loss {losses}  lr {sched.lr:.2e}  "
                        f"{global_batch / seconds:.1f} img/s  eta {eta}")
        if self.cfg.run.dense_every and (step % self.cfg.run.dense_every == 0 or step == self.n_steps):
            self.dense_history[step] = log_students_dense(self.writer, self.runs, self.dense_set, step, self.dist_info)

    def finish(self, step: int, dataset: ImageDataset) -> dict:
        """Teacher forwards per rank, per-student results and parameter digests per rank; rank 0 writes
        summary.json. At the end of the schedule each group leader also writes its student's feature map."""
        cfg, dist_info, specs = self.cfg, self.dist_info, self.specs
        out_dir = Path(cfg.run.output_dir)
        teacher_images = _gather_objects(self.teacher.images_seen, dist_info)
        digests = _gather_objects({run.spec.name: param_digest(run.net) for run in self.runs}, dist_info)
        leaders = [run for run in self.runs if run.is_leader]
        if step == self.n_steps and leaders:
            pca_images = pca_batch(dataset, cfg.data.global_size, dist_info.device)
            for run in leaders:
                save_png(pca_figure(run.net.backbone, pca_images), student_dir(cfg, run.spec) / "pca_features.png")
        summary = {
            "step": step,
            "total_steps": self.n_steps,
            "output_dir": str(out_dir),
            "objective": self.teacher.objective,
            "teacher_images_per_rank": teacher_images,  # each image once per step over all ranks
            "global_batch": cfg.data.batch_size * dist_info.world_size,
            "dense": self.dense_history,  # step -> student -> ridge-probe mIoU / pixel accuracy (--run.dense-every)
            "students": {
                spec.name: {
                    "ranks": list(spec.ranks),
                    "losses": self.last.get(spec.name, {}),
                    "history": self.history[spec.name],
                    "seconds_per_image": self.seconds_per_image[spec.index].item(),
                    "param_digests": {str(r): d[spec.name] for r, d in enumerate(digests) if spec.name in d},
                    "folder": str(student_dir(cfg, spec)),
                    "backbone": str(student_dir(cfg, spec) / "backbone.pth"),
                }
                for spec in specs
            },
        }
        if dist_info.world_size >= max(len(specs), 2):  # the layout that balances the measured costs on these ranks
            counts = suggest_rank_counts(self.seconds_per_image.tolist(), dist_info.world_size)
            summary["suggested_students"] = ",".join(f"{spec.name}:{n}" for spec, n in zip(specs, counts))
        if dist_info.is_main:
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.writer is not None:
            self.writer.close()
        return summary


# ====================================================================================================
# The run
# ====================================================================================================


def distill(cfg: DistillConfig, images: ImageDataset | None = None) -> dict:
    """Run (or resume) a distillation; returns a summary (also written to <output_dir>/summary.json by rank 0).

    `images` replaces the dataset named by cfg.data.path (tests pass a ProceduralDataset).
    """
    rank, world_size = runtime.launch_rank_and_world()
    runtime.setup_logging(Path(cfg.run.output_dir), rank == 0)
    with runtime.checks_before_building():  # the user's mistakes, before any process group or model exists
        specs = validate_config(cfg, world_size)
    with runtime.run_folder_lock(Path(cfg.run.output_dir), rank == 0):
        with runtime.checks_before_building():
            start_step = resume_step(cfg, specs, is_main=rank == 0) if cfg.run.resume else 0
            dataset = images if images is not None else build_dataset(cfg.data.path)
        return run_distillation(cfg, specs, start_step, dataset)


def run_distillation(cfg: DistillConfig, specs: list[StudentSpec], start_step: int, dataset: ImageDataset) -> dict:
    """The run itself, once `distill` has checked what it starts from."""
    dist_info = runtime.setup_distributed(cfg.run.device, cfg.run.dist_timeout_s)
    if cfg.run.deterministic:
        runtime.make_deterministic()
    runtime.seed_everything(cfg.run.seed)
    teacher = setup_teacher(cfg, dist_info.device)
    runs = setup_students(specs, teacher, cfg, dist_info)
    if start_step:
        for run in runs:
            load_student(start_step, run, cfg)
        logger.info(f"resumed every student at step {start_step}")
    monitor = Monitor(cfg, specs, runs, teacher, start_step, dist_info)

    stop = runtime.StopFlag()
    stop.install()
    step, phase, data_iter = start_step, None, None
    try:
        while step < monitor.n_steps:
            t0 = time.perf_counter()
            if phase_at(step, cfg) != phase:  # a phase starts: its crop sizes need their own loader
                phase = phase_at(step, cfg)
                data_iter = None  # stops the previous loader's workers
                data_iter = iter(build_phase_loader(dataset, phase, step, cfg, dist_info))
            batch = runtime.to_device(next(data_iter), dist_info.device)
            sched = schedules_at(step, cfg)
            stats = distill_step(runs, teacher, batch, sched, step, len(specs), cfg, dist_info)
            step += 1
            monitor.log_step(step, phase, stats, sched, time.perf_counter() - t0)

            stop_now = runtime.all_reduce_max(1.0 if stop.is_set else 0.0, dist_info) > 0
            if runtime.is_due(step, cfg.run.checkpoint_every) or step == monitor.n_steps or stop_now:
                save_students(step, runs, cfg, dist_info)
            if stop_now:
                logger.info(f"received {stop.signal_name or 'a stop signal'}: checkpoints saved at step {step}, "
                            "exiting")
                break
    finally:
        stop.restore()
        data_iter = None

    summary = monitor.finish(step, dataset)
    runtime.barrier(dist_info)
    return summary


def log_students_dense(writer, runs: list[StudentRun], dense_set: DenseSet, step: int,
                       dist_info: runtime.Dist) -> dict[str, dict[str, float]]:
    """Each student's dense metric, computed by its group's leader, logged by rank 0 as dense/<student>/*."""
    mine = {run.spec.name: dense_metric(run.net.backbone, dense_set) for run in runs if run.is_leader}
    results = {name: result for part in _gather_objects(mine, dist_info) for name, result in part.items()}
    if dist_info.is_main:
        for name, result in results.items():
            write_dense_metric(writer, result, step, tag=f"dense/{name}")
    return results


def _gather_objects(obj: object, dist_info: runtime.Dist) -> list:
    if not dist_info.enabled:
        return [obj]
    gathered = [None] * dist_info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    try:
        summary = distill(cfg)
    finally:
        runtime.teardown_distributed()
    if os.environ.get("RANK", "0") == "0":
        done = "finished" if summary["step"] == summary["total_steps"] else "stopped at step"
        print(f"\n{done} {summary['step']} of {summary['total_steps']} steps ({summary['objective']} objective); "
              f"the teacher ran on {sum(summary['teacher_images_per_rank'])} images in this session")
        for name, result in summary["students"].items():
            total = result["losses"].get("total", float("nan"))
            print(f"  {name:<16} final loss {total:.4f}  {result['seconds_per_image'] * 1e3:.1f} ms/image  "
                  f"backbone: {result['backbone']}")
        if "suggested_students" in summary:
            print(f"  rank counts that balance the measured step times: --students {summary['suggested_students']}")
        print(f"  summary: {Path(summary['output_dir']) / 'summary.json'}")


if __name__ == "__main__":
    runtime.run_cli(main, one_line=(CheckpointError,))
