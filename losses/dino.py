"""DINO loss: cross-entropy from teacher class-token targets to student class-token prototype scores.

Multi-crop pairing (DINOv3): the student sees n_global (2) global crops and n_local (8) local crops of each
image, the EMA teacher sees the global crops only. Every student local crop is compared with both teacher
global crops, and every student global crop with the teacher output of the *other* global crop (the pairs
of a crop with itself are skipped). For a pair (student crop s, teacher crop t) the term is

    CE(s, t) = mean over images b of  -sum_k p_t[b, k] * log_softmax(z_s[b] / student_temp)[k]

and the loss is the mean of CE over the n_global * (n_global - 1) + n_local * n_global pairs. That is the
official normalization: DINOv2 divides the sum over pairs by the pair count, and DINOv3 computes the
local-crop and global-crop means separately and recombines them with weights proportional to their pair
counts (which gives the same number at loss weight 1). Both means are returned for logging.

Teacher targets p are computed by `teacher_probs` from the teacher head's scores: Sinkhorn-Knopp centering
(dino_kernels/sinkhorn.py), or softmax((scores - center) / teacher_temp) with a center that follows an EMA of the batch
mean of teacher scores. The temperatures, iteration count, momentum and the weights of the objective's terms are
config values (config.LossConfig, config.TeacherConfig), not restated here.

`SelfDistillationLoss` (the student temperature and teacher centering) is shared with the iBOT loss.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dino_kernels.common import KernelImpl, reduction_group
from dino_kernels.sinkhorn import SINKHORN_ITERATIONS, sinkhorn_knopp

CENTER_MOMENTUM = 0.9  # softmax centering's EMA of the teacher logits (DINOv1/v2)

Centering = Literal["sinkhorn_knopp", "softmax"]


def _positive_float(owner: str, name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value}")
    return value


def _valid_rows(owner: str, logits: torch.Tensor, n_valid: int | None) -> int:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        what = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{owner}: teacher logits must be a floating-point [samples, prototypes] tensor, got {what}")
    if n_valid is None:
        return logits.shape[0]
    if isinstance(n_valid, bool) or not isinstance(n_valid, int) or not 0 <= n_valid <= logits.shape[0]:
        raise ValueError(
            f"{owner}: n_valid must be an int in [0, {logits.shape[0]}] (the leading rows that are not padding), "
            f"got {n_valid!r}"
        )
    return n_valid


def softmax_centered_probs(
    teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float, n_valid: int
) -> torch.Tensor:
    """softmax((logits - center) / teacher_temp) in float32; rows from n_valid on (padding) are zeros."""
    probs = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)
    probs[n_valid:] = 0.0
    return probs


@torch.no_grad()
def ema_center_update(
    center: torch.Tensor, teacher_logits: torch.Tensor, n_valid: int, momentum: float, process_group=None
) -> None:
    """center <- momentum * center + (1 - momentum) * mean of the valid rows of all ranks, in place.

    A step where no rank has a valid row leaves the center unchanged (decided on the device: no host sync).
    """
    valid = teacher_logits[:n_valid].float()
    # Sum and count travel in one all-reduce.
    sum_and_count = torch.cat([valid.sum(dim=0), valid.new_tensor([n_valid])])
    group = reduction_group(process_group)
    if group is not None:
        dist.all_reduce(sum_and_count, group=group)
    count = sum_and_count[-1]
    batch_mean = sum_and_count[:-1] / count.clamp(min=1.0)
    updated = center * momentum + batch_mean * (1.0 - momentum)
    center.copy_(torch.where(count > 0, updated, center))


class SelfDistillationLoss(nn.Module):
    """What the DINO and iBOT losses share: the student temperature and the teacher centering.

    out_dim: number of prototypes K. centering: "sinkhorn_knopp" (DINOv3) or "softmax" (EMA center, which
    is then a buffer `center` [K] saved with the module's state). process_group: the ranks whose samples are
    centered together (None: all ranks when torch.distributed is initialized). sinkhorn_impl: forwarded to
    `sinkhorn_knopp` ("auto", "triton" or "reference").
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        centering: Centering = "sinkhorn_knopp",
        center_momentum: float = CENTER_MOMENTUM,
        sinkhorn_iterations: int = SINKHORN_ITERATIONS,
        process_group=None,
        sinkhorn_impl: KernelImpl = "auto",
        queue_size: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"{owner}: out_dim (number of prototypes) must be a positive int, got {out_dim!r}")
        if centering not in ("sinkhorn_knopp", "softmax"):
            raise ValueError(f"{owner}: centering must be 'sinkhorn_knopp' or 'softmax', got {centering!r}")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"{owner}: center_momentum must lie in [0, 1), got {center_momentum}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"{owner}: queue_size must be an int >= 0 (rows of earlier steps), got {queue_size!r}")
        if queue_size and centering != "sinkhorn_knopp":
            raise ValueError(f"{owner}: queue_size needs centering='sinkhorn_knopp' (the queue feeds its balancing)")
        self.out_dim = out_dim
        self.student_temp = _positive_float(owner, "student_temp", student_temp)
        self.centering = centering
        self.center_momentum = float(center_momentum)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.process_group = process_group
        self.sinkhorn_impl = sinkhorn_impl
        if centering == "softmax":
            self.register_buffer("center", torch.zeros(out_dim))
        # The Sinkhorn-Knopp queue: the teacher scores of recent steps, newest first, balanced together with this
        # step's rows so that a small batch is not forced to spread each row over K / B prototypes. Saved with
        # the module's state, so a resumed run sees the same queue.
        self.queue_size = queue_size
        if queue_size:
            self.register_buffer("queue", torch.zeros(queue_size, out_dim))
            self.register_buffer("queue_rows", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def teacher_probs(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_valid: int | None = None
    ) -> torch.Tensor:
        """Teacher targets [N, K] float32 (rows sum to 1) from teacher head scores [N, K].

        n_valid: number of leading valid rows (the rest is padding and comes back as zeros). With softmax
        centering this uses the current center; call `update_center` with the same scores afterwards.
        """
        owner = type(self).__name__
        n_valid = _valid_rows(owner, teacher_logits, n_valid)
        if teacher_logits.shape[1] != self.out_dim:
            raise ValueError(
                f"{owner}: teacher logits have {teacher_logits.shape[1]} prototypes, expected {self.out_dim}"
            )
        teacher_temp = _positive_float(owner, "teacher_temp", teacher_temp)
        if self.centering == "sinkhorn_knopp" and self.queue_size:
            return self._queued_sinkhorn_probs(teacher_logits, teacher_temp, n_valid)
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(
                teacher_logits, teacher_temp, self.sinkhorn_iterations, n_valid, self.process_group,
                impl=self.sinkhorn_impl,
            )
        return softmax_centered_probs(teacher_logits, self.center, teacher_temp, n_valid)

    def _queued_sinkhorn_probs(self, teacher_logits: torch.Tensor, teacher_temp: float, n_valid: int) -> torch.Tensor:
        """This step's valid rows balanced together with the queued ones; only this step's targets come back."""
        queued = self.queue[: int(self.queue_rows)]
        rows = torch.cat([teacher_logits[:n_valid].float(), queued])
        probs = sinkhorn_knopp(rows, teacher_temp, self.sinkhorn_iterations, None, self.process_group,
                               impl=self.sinkhorn_impl)
        out = torch.zeros(teacher_logits.shape, dtype=torch.float32, device=teacher_logits.device)
        out[:n_valid] = probs[:n_valid]
        return out

    @torch.no_grad()
    def update_queue(self, teacher_logits: torch.Tensor, n_valid: int | None = None) -> None:
        """Sinkhorn-Knopp queue only: push this step's valid teacher scores (call after `teacher_probs`, like
        `update_center`); the oldest rows drop out."""
        owner = type(self).__name__
        if not self.queue_size:
            raise ValueError(f"{owner}: update_queue needs queue_size > 0")
        n_valid = _valid_rows(owner, teacher_logits, n_valid)
        merged = torch.cat([teacher_logits[:n_valid].float(), self.queue])[: self.queue_size]
        self.queue.copy_(merged)
        self.queue_rows.fill_(min(self.queue_size, int(self.queue_rows) + n_valid))

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor, n_valid: int | None = None) -> None:
        """Softmax centering only: EMA update of `center` with the mean teacher scores of all ranks.

        As in the official code, the targets of a step use the center from the previous steps: call
        `teacher_probs` first, then this. Every rank of the process group must call it (it all-reduces).
        """
        owner = type(self).__name__
        if self.centering != "softmax":
            raise ValueError(
                f"{owner}: update_center is for centering='softmax'; Sinkhorn-Knopp centering keeps no center"
            )
        n_valid = _valid_rows(owner, teacher_logits, n_valid)
        ema_center_update(self.center, teacher_logits, n_valid, self.center_momentum, self.process_group)

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, student_temp={self.student_temp}, centering={self.centering!r}"


class DINOLossOutput(NamedTuple):
    loss: torch.Tensor  # mean over all crop pairs: what the objective uses
    global_loss: torch.Tensor  # mean over (student global, other teacher global) pairs, for logging
    local_loss: torch.Tensor  # mean over (student local, teacher global) pairs, for logging


def crop_pair_mean(pair_terms: torch.Tensor, n_global_crops: int, local_weight: float = 1.0) -> DINOLossOutput:
    """The objective's mean over crop pairs of `pair_terms` [student crops, teacher crops] (global crops first):
    every student global crop against each other teacher global crop, every local crop against each teacher
    global crop, the local terms scaled by local_weight; and the unweighted global and local means."""
    other_crop = ~torch.eye(n_global_crops, dtype=torch.bool, device=pair_terms.device)
    global_terms = pair_terms[:n_global_crops][other_crop]
    local_terms = pair_terms[n_global_crops:].flatten()
    n_terms = global_terms.numel() + local_terms.numel()
    loss = (global_terms.sum() + local_weight * local_terms.sum()) / n_terms
    global_loss = global_terms.mean() if global_terms.numel() else pair_terms.new_zeros(())
    local_loss = local_terms.mean() if local_terms.numel() else pair_terms.new_zeros(())
    return DINOLossOutput(loss, global_loss, local_loss)


class DINOLoss(SelfDistillationLoss):
    """Class-token DINO loss over the multi-crop pairs (see the module docstring for the definition).

    forward(student_logits, teacher_probs, n_global_crops=2):
      student_logits: [n_crops * B, K] student DINO-head scores, crop-major (all images' crop 0, then crop 1,
        ...), the n_global_crops global crops first, then the local crops;
      teacher_probs: [n_global_crops * B, K] targets from `teacher_probs`, same crop-major order, no grad.
    Returns DINOLossOutput(loss, global_loss, local_loss); a part without pairs (no local crops) is 0.
    """

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, n_global_crops: int = 2,
        local_weight: float = 1.0,
    ) -> DINOLossOutput:
        """local_weight scales the local-crop terms inside the pair-count-weighted mean (the official
        `local_loss_weight_schedule`); the reported global_loss / local_loss means stay unweighted."""
        n_student_crops, n_images = self._check(student_logits, teacher_probs, n_global_crops)
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        log_probs = log_probs.view(n_student_crops, n_images, self.out_dim)
        targets = teacher_probs.float().view(n_global_crops, n_images, self.out_dim)
        # ce[s, t]: CE of student crop s against teacher crop t, averaged over the images. A matmul over B * K
        # terms: kept in float32 even when the caller runs under autocast.
        with torch.autocast(device_type=log_probs.device.type, enabled=False):
            ce = -torch.einsum("sbk,tbk->st", log_probs, targets) / n_images
        return crop_pair_mean(ce, n_global_crops, local_weight)

    def _check(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, n_global_crops: int) -> tuple[int, int]:
        """Validate shapes; return (number of student crops, images per crop)."""
        for name, tensor in (("student_logits", student_logits), ("teacher_probs", teacher_probs)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[1] != self.out_dim:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(
                    f"DINOLoss: {name} must be [crops * B, {self.out_dim}] (crop-major rows, K prototypes), got {shape}"
                )
        if teacher_probs.requires_grad:
            raise ValueError(
                "DINOLoss: teacher_probs requires grad; compute the teacher side under torch.no_grad() (or use "
                "teacher_probs()), the loss must not train the teacher"
            )
        if isinstance(n_global_crops, bool) or not isinstance(n_global_crops, int) or n_global_crops < 1:
            raise ValueError(f"DINOLoss: n_global_crops must be a positive int, got {n_global_crops!r}")
        n_teacher_rows, n_student_rows = teacher_probs.shape[0], student_logits.shape[0]
        if n_teacher_rows == 0 or n_teacher_rows % n_global_crops:
            raise ValueError(
                f"DINOLoss: teacher_probs has {n_teacher_rows} rows, not a positive multiple of "
                f"n_global_crops={n_global_crops}; pass the teacher's global crops stacked crop-major"
            )
        n_images = n_teacher_rows // n_global_crops
        if n_student_rows % n_images or n_student_rows < n_teacher_rows:
            raise ValueError(
                f"DINOLoss: student_logits has {n_student_rows} rows; with B={n_images} images it must be "
                f"(n_global_crops + n_local_crops) * B >= {n_teacher_rows}, global crops first"
            )
        n_student_crops = n_student_rows // n_images
        if n_global_crops == 1 and n_student_crops == 1:
            raise ValueError("DINOLoss: one global crop and no local crop leave no crop pair to compare")
        return n_student_crops, n_images
