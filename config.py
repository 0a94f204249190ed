"""The config groups train.py and distill.py are made of: plain dataclasses that tyro turns into `--group.field`
flags. Each entry point composes them into its own top-level config and keeps its presets (named instances) at its
top; the defaults here are the ViT-7B pretraining config's (dinov3_vit7b16_pretrain.yaml), so a preset states only
what differs from it. `group_problems` holds the checks both entry points apply before anything is built.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro

from data.augment import AugmentConfig, CropSizes
from data.masking import MaskingCollate
from data.mixture import mixture_problems
from dino_kernels.common import KernelImpl
from dino_kernels.sinkhorn import SINKHORN_ITERATIONS
from losses.dino import CENTER_MOMENTUM
from losses.gram import GramTokens, ResizeMode
from models.vit import VIT_ARCHS, AttnImpl
from schedules import Schedule, constant, sqrt_scaled_lr

# The ViT-7B pretraining's global batch (16 per GPU x 256 GPUs), which the default learning rate is scaled for.
VIT7B_GLOBAL_BATCH = 16 * 256

KoLeoCrops = Literal["both", "first"]


@dataclass
class ModelConfig:
    arch: Literal[tuple(VIT_ARCHS)] = "vit_small"  # type: ignore[valid-type]
    drop_path_rate: float = 0.0
    layerscale_init: float | None = None  # None: the architecture's own (models/vit.py)
    # RoPE box jitter drawn per block and crop group (the official ViT) or once per forward; None: the arch's.
    rope_jitter_per: Literal["block", "forward"] | None = None
    patch_size: int | None = None  # None: the architecture's (16); e.g. 8 for 4x the tokens of a small crop
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
    # Image folder, .txt file list, or WebDataset tar shards ('shards/{000000..000999}.tar', data/shards.py);
    # None = the photos bundled with scikit-image/learn.
    path: str | None = None
    batch_size: int = 64  # per rank; global batch = batch_size x world size
    num_workers: int = 8
    shuffle_buffer: int = 1000  # tar shards: samples each data-loader worker shuffles among
    # The data mixture (data/mixture.py), instead of `path`: several folders / lists / shards, each sample's part by
    # `ratios` on heterogeneous steps; a step is homogeneous (all of it from `homogeneous_part`, an index into
    # `parts`) with probability `homogeneous_p`. The released recipe's form: ImageNet-1k homogeneous 10 % of the
    # steps, e.g. --data.parts curated.txt retrieved.txt in1k/train --data.ratios 0.8 0.2 0
    # --data.homogeneous-part 2 --data.homogeneous-p 0.1
    parts: tuple[str, ...] = ()
    ratios: tuple[float, ...] = ()
    homogeneous_part: int | None = None
    homogeneous_p: float = 0.0
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
    # "dino": the recipe's DINO + iBOT cross-entropies against centered prototype targets. "coding_rate": not the
    # recipe, the SimDINO-style alternative of losses/coding_rate.py (alignment of the heads' normalized embeddings,
    # minus coding_rate_weight x the coding rate); dino_weight and ibot_weight then weigh its two alignments.
    objective: Literal["dino", "coding_rate"] = "dino"
    coding_rate_weight: float = 0.1
    coding_rate_eps: float = 0.5
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
    # Not in the recipe: Sinkhorn-Knopp balances the DINO targets of this step together with the teacher scores
    # of the last N class-token rows (a queue, as SwAV does for small batches); 0 is the recipe's one-step balance.
    sinkhorn_queue: int = 0
    center_momentum: float = CENTER_MOMENTUM  # softmax centering only
    # Weight of the local-crop DINO terms (the official `reweight_dino_local_loss` schedule); 1 is the plain loss.
    dino_local_weight: Schedule = field(default_factory=lambda: constant(1.0))
    # A control, not a recipe setting: every DINO and iBOT target row goes to a random other sample of the step, so
    # the objective no longer ties a crop to its own image. Whatever a run learns with it is not the cross-view
    # objective's doing (docs/ablations.md); `--loss.koleo-weight 0` is the other control.
    shuffle_targets: bool = False


@dataclass
class GramConfig:
    """Gram anchoring (paper section 4); the defaults are the gram-anchor config's."""

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
    # "file": one checkpoint_<step>.pth gathered to rank 0; "sharded": a folder checkpoint_<step>/ in which every
    # rank writes and reads only its own shards (torch.distributed.checkpoint); "auto": sharded with
    # parallel=fsdp over several processes, else file (README.md, "Resuming and fault tolerance").
    checkpoint_format: Literal["auto", "file", "sharded"] = "auto"
    # Sharded checkpoints only: write in a background thread (the step waits for a copy in memory, not the disk).
    async_checkpoint: bool = False
    resume: bool = True  # continue from the newest checkpoint in output_dir when there is one
    pca_every: int = 0  # log PCA and cosine feature maps every N steps (0: only at the end)
    knn_every: int = 0  # k-NN accuracy of the teacher on the procedural labeled set every N steps (0: off)
    knn_train_images: int = 500  # reference images of that set (and half as many held-out ones)
    dense_every: int = 0  # dense metric of the teacher every N steps (0: off): ridge-probe mIoU on generated scenes
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/inf instead of stopping
    max_nonfinite_skips: int = 10
    dist_timeout_s: float = 600.0
    print_config: bool = False  # print the resolved config as JSON and exit


def sharded_checkpoints(run: RunConfig, world_size: int) -> bool:
    """Whether this run writes sharded checkpoint folders (run.checkpoint_format, "auto" resolved)."""
    if run.checkpoint_format == "auto":
        return run.parallel == "fsdp" and world_size > 1
    return run.checkpoint_format == "sharded"


# The official high-resolution (global, local, Gram-teacher) crop sizes and their probabilities.
OFFICIAL_HRFT_SIZES = ((512, 112, 768), (768, 112, 1152), (768, 168, 1152), (768, 224, 1152), (768, 336, 1152))
OFFICIAL_HRFT_PROBABILITIES = (0.3, 0.3, 0.3, 0.05, 0.05)


def parse_cli(presets: dict, argv: list[str] | None = None):
    """`[preset] [--field value ...]` -> that preset with the fields overridden; without a preset name, the first
    preset. `--deterministic` and `--print-config` are short for `--run.deterministic` and `--run.print-config`;
    `--debug` is dropped."""
    short = {"--deterministic": "--run.deterministic", "--print-config": "--run.print-config"}
    # --debug belongs to runtime.run_cli (tracebacks of user errors), not to the config.
    argv = [short.get(arg, arg) for arg in (sys.argv[1:] if argv is None else argv) if arg != "--debug"]
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [next(iter(presets)), *argv]
    if argv[0] not in presets and not argv[0].startswith("-"):
        raise SystemExit(f"unknown preset {argv[0]!r}; choose one of: {', '.join(presets)}")
    return tyro.extras.overridable_config_cli(presets, args=argv)


def group_problems(data: DataConfig, augment: AugmentConfig, optim: OptimConfig, loss: LossConfig,
                   teacher_temp: Schedule, patch: int) -> list[str]:
    """What is wrong with the data, augmentation, optimizer and loss settings of a run on `patch`-pixel patches."""
    problems = []
    if data.parts:
        problems += mixture_problems(len(data.parts), data.ratios, data.homogeneous_part, data.homogeneous_p)
        if data.path is not None:
            problems.append(f"data.path={data.path!r} and data.parts are both set: a mixture replaces the dataset, "
                            "add --data.path None")
    if data.global_size % patch or data.global_size < patch:
        problems.append(f"data.global_size={data.global_size} is not a positive multiple of the patch size {patch}")
    if data.local_size < patch:  # other sides are fine: the ViT drops the remainder
        problems.append(f"data.local_size={data.local_size} is smaller than one {patch} px patch")
    if data.batch_size < 1:
        problems.append(f"data.batch_size={data.batch_size} must be at least 1 (it is per rank)")
    for name, (lo, hi) in (("augment.global_scale", augment.global_scale),
                           ("augment.local_scale", augment.local_scale), ("data.mask_ratio", data.mask_ratio)):
        if not 0 <= lo <= hi <= 1:
            problems.append(f"{name}={(lo, hi)} must satisfy 0 <= low <= high <= 1")
    if not 0 <= data.mask_probability <= 1:
        problems.append(f"data.mask_probability={data.mask_probability} must be in [0, 1]")
    if optim.iterations < 1:
        problems.append("optim.iterations must be at least 1")
    if augment.n_local_crops and not data.size_schedule and data.local_size > data.global_size:
        problems.append(f"data.local_size={data.local_size} is larger than data.global_size={data.global_size}: local "
                        "crops are the small views; swap the two or lower --data.local-size")
    for name, schedule in (("optim.lr", optim.lr), ("optim.weight_decay", optim.weight_decay),
                           ("teacher.temp", teacher_temp), ("loss.dino_local_weight", loss.dino_local_weight)):
        problems += schedule.problems(name)
    problems += value_problems("optim.lr", optim.lr, low=0.0)
    problems += value_problems("optim.weight_decay", optim.weight_decay, low=0.0)
    problems += value_problems("teacher.temp", teacher_temp, low=0.0, low_inclusive=False)
    if loss.coding_rate_eps <= 0:
        problems.append(f"loss.coding_rate_eps={loss.coding_rate_eps} must be > 0")
    if loss.objective == "coding_rate" and loss.sinkhorn_queue:
        problems.append("loss.sinkhorn_queue is for --loss.objective dino (the coding-rate objective has no centering)")
    if loss.sinkhorn_queue < 0:
        problems.append(f"loss.sinkhorn_queue={loss.sinkhorn_queue} must be >= 0 (0: no queue)")
    if loss.sinkhorn_queue and loss.centering != "sinkhorn_knopp":
        problems.append("loss.sinkhorn_queue needs --loss.centering sinkhorn_knopp (the queue feeds its balancing)")
    if loss.koleo_group_size is not None and loss.koleo_group_size < 2:
        problems.append(f"loss.koleo_group_size={loss.koleo_group_size} must be >= 2 (or None: the rank's batch)")
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
        bad += [local for g, local, _ in data.size_schedule if augment.n_local_crops and local > g]
        if bad:
            problems.append(f"data.size_schedule sizes {sorted(set(bad))} do not fit the patch size {patch}: global and "
                            "Gram-teacher sizes must be positive multiples of it, local sizes at least one patch and "
                            "at most the global size")
    return problems


def value_problems(name: str, schedule: Schedule, low: float, high: float | None = None,
                   low_inclusive: bool = True) -> list[str]:
    """Values of `schedule` (start, peak, end) outside [low, high] (low excluded when not low_inclusive)."""
    bound = f"{'>=' if low_inclusive else '>'} {low:g}" + ("" if high is None else f" and <= {high:g}")
    problems = []
    for part in ("start", "peak", "end"):
        value = getattr(schedule, part)
        if value is None:
            continue
        if value < low or (value == low and not low_inclusive) or (high is not None and value > high):
            flag = "--" + name.replace("_", "-") + "." + part
            problems.append(f"{name}.{part}={value:g} must be {bound} ({flag})")
    return problems


def run_problems(run: RunConfig) -> list[str]:
    """What is wrong with the run settings both entry points share."""
    problems = []
    if run.checkpoint_every < 0:
        problems.append(f"run.checkpoint_every={run.checkpoint_every} must be >= 0 (0: a checkpoint only at the end "
                        "and when the run is stopped)")
    if run.log_every < 1:
        problems.append(f"run.log_every={run.log_every} must be >= 1")
    if run.device == "cuda" and not torch.cuda.is_available():
        problems.append("run.device='cuda' but no CUDA device is visible: use --run.device cpu (or auto)")
    return problems


def raise_problems(what: str, problems: list[str]) -> None:
    """One line naming every problem (ValueError), or nothing when there is none."""
    if problems:
        raise ValueError(f"invalid {what} config: " + "; ".join(problems))
