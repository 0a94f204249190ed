"""Gram anchoring (DINOv3 section 4): hold the student's patch-similarity structure to a Gram teacher's.

The student's patch tokens of the global crops (the normed backbone output, computed with the iBOT masks
applied, as in the official code) are compared with the Gram teacher's patch tokens of the same crops:

    L_Gram = mean over images and P² entries of (ŜŜᵀ - ĜĜᵀ)²      Ŝ, Ĝ: L2-normalized P x d features

The Gram teacher is a frozen earlier copy of the EMA teacher (train.py creates and refreshes it). With the
high-resolution variant it sees each global crop's region at a larger size (2x by default); its patch map is
then resampled to the student's grid (bicubic, as the paper) before the Gram matrices are compared, which
smooths it (paper section 4.3). The loss itself is the fused kernel of dino_kernels/gram.py: no P x P matrix.

`tokens_used` picks the patches that enter the loss: "all" (the recipe), or only the patches the student saw
"masked" / "unmasked". Those subsets differ in size per image, so they form one Gram matrix over the batch
(`img_level=False`, the official restriction). Its weight is a schedule of the training config (train.py,
`gram.weight`; w_Gram = 2 in the paper).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dino_kernels.common import KernelImpl
from dino_kernels.gram import gram_loss

GramTokens = Literal["all", "masked", "unmasked"]
ResizeMode = Literal["bicubic", "bilinear", "nearest-exact", "area"]


def resample_patch_grid(
    patches: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int], mode: ResizeMode = "bicubic",
    antialias: bool = False,
) -> torch.Tensor:
    """[n, h*w, d] patch tokens on an h x w grid -> [n, h'*w', d] on `out_grid`, interpolated as an image."""
    n, n_patches, dim = patches.shape
    if n_patches != grid[0] * grid[1]:
        raise ValueError(f"{n_patches} patch tokens do not form the stated {grid[0]}x{grid[1]} grid")
    if tuple(grid) == tuple(out_grid):
        return patches
    image = patches.transpose(1, 2).reshape(n, dim, grid[0], grid[1])
    # Antialiasing exists for the (bi)linear and bicubic filters only; align_corners=False keeps the grids'
    # pixel areas aligned (a 2x downsample averages each 2x2 block's neighbourhood).
    options = {"align_corners": False, "antialias": antialias} if mode in ("bicubic", "bilinear") else {}
    resized = F.interpolate(image.float(), size=tuple(out_grid), mode=mode, **options).to(patches.dtype)
    return resized.flatten(2).transpose(1, 2)


class GramAnchoringLoss(nn.Module):
    """student patches [n, P, d] (with grad) vs Gram-teacher patches [n, P_t, d] on a possibly finer grid."""

    def __init__(
        self,
        normalize: bool = True,
        remove_neg: bool = False,
        img_level: bool = True,
        tokens_used: GramTokens = "all",
        resize_mode: ResizeMode = "bicubic",
        resize_antialias: bool = False,
        impl: KernelImpl = "auto",
    ) -> None:
        super().__init__()
        if tokens_used not in ("all", "masked", "unmasked"):
            raise ValueError(f"tokens_used must be 'all', 'masked' or 'unmasked', got {tokens_used!r}")
        if tokens_used != "all" and img_level:
            raise ValueError(
                f"tokens_used={tokens_used!r} keeps a different number of patches per image, so the Gram matrix "
                "is taken over the whole batch: set img_level=False (--gram.no-img-level)"
            )
        self.normalize = normalize
        self.remove_neg = remove_neg
        self.img_level = img_level
        self.tokens_used = tokens_used
        self.resize_mode = resize_mode
        self.resize_antialias = resize_antialias
        self.impl = impl

    def forward(
        self,
        student_patches: torch.Tensor,
        teacher_patches: torch.Tensor,
        student_grid: tuple[int, int],
        teacher_grid: tuple[int, int],
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """masks: bool [n, P], True where the student's patch was masked (needed unless tokens_used='all')."""
        if student_patches.shape[1] != student_grid[0] * student_grid[1]:
            raise ValueError(
                f"student has {student_patches.shape[1]} patch tokens, not a {student_grid[0]}x{student_grid[1]} grid"
            )
        with torch.no_grad():
            teacher_patches = resample_patch_grid(teacher_patches.detach(), teacher_grid, student_grid, self.resize_mode,
                                                  self.resize_antialias)
        if teacher_patches.shape != student_patches.shape:
            raise ValueError(
                f"Gram teacher patches {tuple(teacher_patches.shape)} do not match the student's "
                f"{tuple(student_patches.shape)}: the Gram teacher must see the same crops (same count and width)"
            )
        if self.tokens_used != "all":
            if masks is None or masks.shape != student_patches.shape[:2]:
                raise ValueError(f"tokens_used={self.tokens_used!r} needs the student's masks as a bool [n, P] tensor")
            keep = masks if self.tokens_used == "masked" else ~masks
            student_patches = student_patches[keep].unsqueeze(0)
            teacher_patches = teacher_patches[keep].unsqueeze(0)
            if student_patches.shape[1] == 0:  # no masked (or no unmasked) patch in this batch: nothing to anchor
                return student_patches.sum() * 0.0
        return gram_loss(student_patches, teacher_patches, normalize=self.normalize, remove_neg=self.remove_neg,
                         img_level=self.img_level, impl=self.impl)
