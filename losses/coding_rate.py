"""A coding-rate objective in the style of SimDINO (Wu et al. 2025, arXiv 2502.10385): the alternative to the DINO and
iBOT cross-entropies that `--loss.objective coding_rate` selects, kept as an example of forking the objective.

No prototypes, no centering, no temperatures. The student's and the EMA teacher's heads give L2-normalized embeddings
z (the heads' bottleneck, models/heads.py), and the terms are

    class alignment   the mean over DINO's crop pairs (losses/dino.py: every student crop against each teacher
                      global crop other than itself) of the image mean of  1/2 ||z_s - z_t||^2 = 1 - z_s . z_t
    patch alignment   iBOT's weighting (losses/ibot.py) of  1 - z_s . z_t  over the masked patch tokens
    coding rate       R_eps(Z) = 1/2 logdet(I + d / (n eps^2) Z^T Z) of the student's class-token embeddings Z [n, d]
                      of each global crop, averaged over the global crops

and the objective is dino_weight * class alignment + ibot_weight * patch alignment - coding_rate_weight * R. The
alignment alone is minimized by mapping every image to one point; R grows with the number of directions the batch's
embeddings span, which is what keeps them apart (the job Sinkhorn-Knopp centering does for DINO). R is computed on
each rank's own batch, as the default KoLeo is.
"""

from __future__ import annotations

import torch

from losses.dino import DINOLossOutput, crop_pair_mean


def coding_rate(embeddings: torch.Tensor, eps: float) -> torch.Tensor:
    """R_eps(Z) = 1/2 logdet(I_d + d / (n eps^2) Z^T Z) of Z [n, d], in float32, through the smaller of the two
    equal determinants (I_n + a Z Z^T when n < d)."""
    if embeddings.dim() != 2 or embeddings.shape[0] < 1:
        raise ValueError(f"coding_rate: embeddings must be [n >= 1, d], got {tuple(embeddings.shape)}")
    n, d = embeddings.shape
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        z = embeddings.float()
        gram = z @ z.T if n < d else z.T @ z
        scaled = torch.eye(gram.shape[0], device=z.device) + (d / (n * eps**2)) * gram
        return torch.linalg.cholesky(scaled).diagonal().log().sum()  # 1/2 logdet = sum of log of L's diagonal


class CodingRateLoss(torch.nn.Module):
    """The coding-rate objective's three terms (see the module docstring), each unweighted; objective.SSLLosses
    weighs and sums them."""

    def __init__(self, eps: float = 0.5):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"CodingRateLoss: eps must be > 0, got {eps}")
        self.eps = float(eps)

    def class_alignment(self, student: torch.Tensor, teacher: torch.Tensor, n_global_crops: int,
                        local_weight: float = 1.0) -> DINOLossOutput:
        """student [n_crops * B, d] and teacher [n_global_crops * B, d] embeddings, crop-major (as DINOLoss's)."""
        if student.dim() != 2 or teacher.dim() != 2 or student.shape[1] != teacher.shape[1]:
            raise ValueError(f"CodingRateLoss: student and teacher embeddings must be [rows, d] with the same d, got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        n_images = teacher.shape[0] // n_global_crops
        if n_images < 1 or teacher.shape[0] % n_global_crops or student.shape[0] % n_images:
            raise ValueError(f"CodingRateLoss: {teacher.shape[0]} teacher rows and {student.shape[0]} student rows "
                             f"are not whole crops of the same images for n_global_crops={n_global_crops}")
        with torch.autocast(device_type=student.device.type, enabled=False):
            s = student.float().unflatten(0, (-1, n_images))
            t = teacher.float().unflatten(0, (n_global_crops, n_images))
            distance = 1.0 - torch.einsum("sbd,tbd->st", s, t) / n_images
        return crop_pair_mean(distance, n_global_crops, local_weight)

    def patch_alignment(self, student: torch.Tensor, teacher: torch.Tensor, mask_weights: torch.Tensor,
                        n_images: int) -> torch.Tensor:
        """student / teacher [M, d] embeddings of the masked patch tokens, mask_weights [M] (iBOT's)."""
        with torch.autocast(device_type=student.device.type, enabled=False):
            distance = 1.0 - (student.float() * teacher.float()).sum(dim=-1)
            return (distance * mask_weights.float()).sum() / n_images

    def rate(self, student_cls_global: torch.Tensor, n_global_crops: int) -> torch.Tensor:
        """Mean over the global crops of R_eps of their student class-token embeddings [n_global_crops * B, d]."""
        per_crop = student_cls_global.unflatten(0, (n_global_crops, -1))
        return sum(coding_rate(z, self.eps) for z in per_crop) / n_global_crops
