"""AdamW parameter groups as the official code makes them, the value of every schedule at a step, and gradient
clipping per module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from config import GramConfig, LossConfig, OptimConfig, TeacherConfig


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


def clip_per_module(modules: tuple[nn.Module, ...], max_norm: float) -> torch.Tensor:
    """Clip each module's gradients to `max_norm` on its own (the official loop clips backbone and heads apart,
    so a head's large gradient does not shrink the backbone's); returns the norm over all of them."""
    norms = [torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm) for module in modules]
    norms = [norm.full_tensor() if hasattr(norm, "full_tensor") else norm for norm in norms]  # FSDP2: DTensors
    return torch.linalg.vector_norm(torch.stack(norms))
