"""The self-distillation objective of one step: DINO on the class tokens, iBOT on the masked patch tokens, KoLeo on
the global crops' class tokens, and Gram anchoring when it is on, with the teacher-side centering (losses/).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from config import GramConfig, KoLeoCrops, LossConfig, ModelConfig
from health import HealthPanel
from losses.coding_rate import CodingRateLoss
from losses.dino import DINOLoss
from losses.gram import GramAnchoringLoss
from losses.ibot import IBOTLoss
from losses.koleo import DistributedKoLeoLoss, KoLeoLoss


class StudentOutputs(NamedTuple):
    """What a student's forward over all crops gives the objective."""

    # Head outputs: prototype scores [.., K], or with the coding-rate objective the normalized embeddings [.., d].
    dino: torch.Tensor  # class-token head outputs of every crop [(2 + n_local) B, K], crop-major
    ibot: torch.Tensor  # patch head outputs of the masked global-crop patches [M, K']
    cls_global: torch.Tensor  # the global crops' class tokens [2B, C] (KoLeo)
    global_patches: torch.Tensor | None = None  # the global crops' patch tokens [2B, P, C] (Gram anchoring)


class TeacherOutputs(NamedTuple):
    """What the EMA teacher's forward over the global crops gives the objective (and the health panel)."""

    dino: torch.Tensor  # class-token head outputs [2B, K], crop-major
    ibot: torch.Tensor  # patch head outputs of the masked global-crop patches [M, K']
    cls: torch.Tensor  # the global crops' class tokens [2B, C]


def shuffled_rows(targets: torch.Tensor) -> torch.Tensor:
    """The shuffled-targets control: every target row goes to a random other sample (a permutation from the
    global generator, which the loop seeds per step). An objective that no longer ties a crop to its own image,
    what a misaligned target or mask would do; what it still learns is not the cross-view objective's doing."""
    return targets[torch.randperm(targets.shape[0], device=targets.device)]


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

    def __init__(self, model: ModelConfig, loss: LossConfig, gram: GramConfig | None = None, process_group=None):
        super().__init__()
        self.cfg = loss
        # process_group: the ranks whose samples form the batch (None: all; distill.py: one student's ranks).
        centering = dict(centering=loss.centering, center_momentum=loss.center_momentum,
                         sinkhorn_iterations=loss.sinkhorn_iterations, sinkhorn_impl=model.kernel_impl,
                         process_group=process_group)
        self.dino = DINOLoss(model.dino_prototypes, student_temp=loss.student_temp, queue_size=loss.sinkhorn_queue,
                             **centering)
        self.ibot = IBOTLoss(model.ibot_prototypes, student_temp=loss.student_temp, **centering)
        self.koleo = build_koleo(loss, process_group)
        self.coding_rate = CodingRateLoss(loss.coding_rate_eps) if loss.objective == "coding_rate" else None
        self.gram = GramAnchoringLoss(
            normalize=gram.normalize, remove_neg=gram.remove_neg, img_level=gram.img_level,
            tokens_used=gram.tokens_used, resize_mode=gram.resize_mode, resize_antialias=gram.resize_antialias,
            impl=model.kernel_impl,
        ) if gram is not None and gram.enabled else None

    def forward(self, student_out: StudentOutputs, teacher_out: tuple[torch.Tensor, torch.Tensor], batch: dict,
                teacher_temp: float, n_global: int, dino_local_weight: float = 1.0, gram_targets: tuple | None = None,
                gram_weight: float = 0.0, health: HealthPanel | None = None) -> dict:
        """teacher_out: the teacher's DINO and iBOT logits first (`TeacherOutputs`, or a pair). gram_targets:
        (Gram-teacher patch tokens [2B, P_t, C], their grid, the student's grid) for a step with the Gram loss, which
        needs student_out.global_patches. health: a panel that measures this step's targets (a log step)."""
        dino_student, ibot_student, cls_global = student_out.dino, student_out.ibot, student_out.cls_global
        n_images = batch["global_crops"].shape[0]
        rate = None
        if self.coding_rate is not None:
            dino, ibot, rate = self._coding_rate_terms(student_out, teacher_out, batch["mask_weights"], n_images,
                                                       n_global, dino_local_weight, health)
        else:
            dino_teacher_logits, ibot_teacher_logits = teacher_out[:2]
            dino_targets = self.dino.teacher_probs(dino_teacher_logits, teacher_temp)
            ibot_targets = self.ibot.teacher_probs(ibot_teacher_logits, teacher_temp)
            # The centering state moves on after this step's targets (the official order); the losses below read
            # only the targets.
            if self.cfg.centering == "softmax":
                self.dino.update_center(dino_teacher_logits)
                self.ibot.update_center(ibot_teacher_logits)
            if self.cfg.sinkhorn_queue:
                self.dino.update_queue(dino_teacher_logits)
            if health is not None:
                health.observe_targets(dino_targets, ibot_targets, n_global)
            if self.cfg.shuffle_targets:
                dino_targets, ibot_targets = shuffled_rows(dino_targets), shuffled_rows(ibot_targets)
            dino = self.dino(dino_student, dino_targets, n_global_crops=n_global, local_weight=dino_local_weight)
            ibot = self.ibot(ibot_student, ibot_targets, batch["mask_weights"], n_images=n_images)
        koleo = koleo_of_crops(self.koleo, cls_global, n_global, self.cfg.koleo_crops)
        total = self.cfg.dino_weight * dino.loss + self.cfg.ibot_weight * ibot + self.cfg.koleo_weight * koleo
        terms = {"dino": dino.loss, "dino_global": dino.global_loss, "dino_local": dino.local_loss, "ibot": ibot,
                 "koleo": koleo}
        if rate is not None:
            total = total - self.cfg.coding_rate_weight * rate
            terms["coding_rate"] = rate
        if gram_targets is not None:
            student_patches = student_out.global_patches
            teacher_patches, teacher_grid, student_grid = gram_targets
            gram = self.gram(student_patches, teacher_patches, student_grid, teacher_grid,
                             batch["masks"].view(student_patches.shape[:2]))
            total = total + gram_weight * gram
            terms["gram"] = gram
        return {"total": total, **terms}

    def _coding_rate_terms(self, student_out: StudentOutputs, teacher_out: tuple, mask_weights: torch.Tensor,
                           n_images: int, n_global: int, dino_local_weight: float,
                           health: HealthPanel | None) -> tuple:
        """The coding-rate objective's class alignment (a DINOLossOutput), patch alignment and coding rate R; the
        heads' outputs are normalized embeddings here (SSLNet with embeddings=True)."""
        dino_teacher, ibot_teacher = teacher_out[:2]
        if health is not None:
            health.observe_embeddings(dino_teacher, n_global)
        if self.cfg.shuffle_targets:
            dino_teacher, ibot_teacher = shuffled_rows(dino_teacher), shuffled_rows(ibot_teacher)
        align = self.coding_rate.class_alignment(student_out.dino, dino_teacher, n_global, dino_local_weight)
        patches = self.coding_rate.patch_alignment(student_out.ibot, ibot_teacher, mask_weights, n_images)
        rate = self.coding_rate.rate(student_out.dino[: dino_teacher.shape[0]], n_global)
        return align, patches, rate
