"""iBOT loss: masked-patch prediction against the teacher's view of the same patches.

The student sees its global crops with some patch tokens replaced by the mask token (half of the global crops,
10-50% of their patches). For each masked token t, the student's iBOT-head scores z_t are compared with the
teacher target p_t for the same position of the *unmasked* crop (the EMA teacher's patch token through the
teacher iBOT head, centered over all masked tokens of all ranks: Sinkhorn-Knopp with n_valid = the number of
masked tokens on this rank, or softmax with an EMA center):

    L_iBOT = (1 / n_images) * sum over masked tokens t of  w_t * -sum_k p_t[k] * log_softmax(z_t / student_temp)[k]

with w_t = 1 / (number of masked tokens in t's image), so each masked image contributes the mean CE of its
masked tokens, and n_images the number of student global-crop images on this rank, masked or not (2 * B).
This is the official normalization (iBOTPatchLoss.forward_masked). It enters the objective with weight 1.

Padding: rows with weight 0 contribute nothing, so a batch padded to a fixed number of masked tokens only
needs zero weights (and n_valid for the teacher centering) on its padding rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.dino import SelfDistillationLoss


class IBOTLoss(SelfDistillationLoss):
    """Masked-patch iBOT loss (see the module docstring); centering as in `SelfDistillationLoss`.

    forward(student_logits, teacher_probs, mask_weights, n_images):
      student_logits: [M, K] student iBOT-head scores of the masked tokens;
      teacher_probs: [M, K] targets from `teacher_probs` for the same tokens, no grad;
      mask_weights: [M] per-token weights (`data.masking.ibot_mask_weights`; 0 for padding rows);
      n_images: the number of student global-crop images on this rank, masked or not (2 * B).
    With M = 0 the loss is a zero that is still connected to the student's graph.
    """

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        mask_weights: torch.Tensor,
        n_images: int,
    ) -> torch.Tensor:
        self._check(student_logits, teacher_probs, mask_weights, n_images)
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        token_ce = -(teacher_probs.float() * log_probs).sum(dim=-1)
        return (token_ce * mask_weights.float()).sum() / n_images

    def _check(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, mask_weights: torch.Tensor, n_images: int
    ) -> None:
        for name, tensor in (("student_logits", student_logits), ("teacher_probs", teacher_probs)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[1] != self.out_dim:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"IBOTLoss: {name} must be [masked tokens, {self.out_dim}], got {shape}")
        n_tokens = student_logits.shape[0]
        if teacher_probs.shape[0] != n_tokens:
            raise ValueError(
                f"IBOTLoss: student_logits has {n_tokens} masked tokens but teacher_probs has "
                f"{teacher_probs.shape[0]}; both must hold the same masked positions in the same order"
            )
        if teacher_probs.requires_grad:
            raise ValueError(
                "IBOTLoss: teacher_probs requires grad; compute the teacher side under torch.no_grad() (or use "
                "teacher_probs()), the loss must not train the teacher"
            )
        if not isinstance(mask_weights, torch.Tensor) or tuple(mask_weights.shape) != (n_tokens,):
            shape = tuple(mask_weights.shape) if isinstance(mask_weights, torch.Tensor) else type(mask_weights).__name__
            raise ValueError(
                f"IBOTLoss: mask_weights must be [{n_tokens}] (one weight per masked token, see data.masking.ibot_mask_weights), "
                f"got {shape}"
            )
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
            raise ValueError(
                f"IBOTLoss: n_images must be a positive int (student global-crop images on this rank, masked or "
                f"not), got {n_images!r}"
            )
