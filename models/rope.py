"""DINOv3 axial 2-D rotary position embedding (RoPE) with RoPE-box jittering.

Every patch of an h x w grid gets a 2-D coordinate (row, column) in a box that is [-1, 1] at rest.
Each head of dimension D uses D/4 periods per axis; the angle of token t for axis a and period i is
2*pi*coord[t, a] / period[i]. The D/2 angles [axis-h periods, axis-w periods] are tiled twice to length D
and applied in rotate-half form: x*cos + rotate_half(x)*sin. Prefix tokens (class + registers) are not
rotated.

During training the box is augmented (the paper's "RoPE-box jittering"): an optional uniform shift per
axis, an optional log-uniform stretch per axis (`jitter`) and an optional isotropic log-uniform rescale
(`rescale`; s=2 turns [-1, 1] into [-f, f] with f in [0.5, 2]). One draw per forward per crop size, shared
by all images of that size.

What leaves this module is a `Rope`: the (augmented) coordinates and the periods, which is all the Triton
attention kernel needs (it computes angles in registers), plus sin/cos tables for the PyTorch path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

# The rotation is the attention kernel's reference math (models import dino_kernels, never the reverse).
from dino_kernels.rope_attention import apply_rope, rope_angles

CoordNormalization = Literal["separate", "min", "max"]


@dataclass
class Rope:
    """Positional information of one crop size, shared by every image and every block of a forward."""

    coords: torch.Tensor  # [N_patch, 2] float32, (row, col) in the (augmented) box
    periods: torch.Tensor  # [D/4] float32
    sin: torch.Tensor  # [N_patch, D] float32
    cos: torch.Tensor  # [N_patch, D] float32


def rope_periods(
    head_dim: int,
    base: float | None = 100.0,
    min_period: float | None = None,
    max_period: float | None = None,
) -> torch.Tensor:
    """The D/4 periods of one head: base**(2i/(D/2)), or log-spaced between min_period and max_period."""
    if head_dim % 4 != 0:
        raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
    n = head_dim // 4
    if base is not None:
        if min_period is not None or max_period is not None:
            raise ValueError("give either base or (min_period, max_period) for RoPE periods, not both")
        return base ** (2 * torch.arange(n, dtype=torch.float64) / (head_dim // 2))
    if min_period is None or max_period is None:
        raise ValueError("RoPE periods need base, or both min_period and max_period")
    return min_period * (max_period / min_period) ** torch.linspace(0, 1, n, dtype=torch.float64)


def patch_coords(
    h: int, w: int, normalize: CoordNormalization = "separate", device: torch.device | str | None = None
) -> torch.Tensor:
    """Patch-center coordinates of an h x w grid in [-1, 1], row-major, shape [h*w, 2] float32.

    "separate" normalizes each axis by its own length; "min"/"max" divide both by the shorter/longer side,
    so a non-square grid keeps its aspect ratio (the longer/shorter axis then exceeds/stays inside [-1, 1]).
    """
    if normalize == "separate":
        den_h, den_w = h, w
    elif normalize == "max":
        den_h = den_w = max(h, w)
    elif normalize == "min":
        den_h = den_w = min(h, w)
    else:
        raise ValueError(f"unknown RoPE coordinate normalization {normalize!r}; use separate, min or max")
    rows = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / den_h
    cols = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / den_w
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2)
    return 2.0 * grid - 1.0


def augment_coords(
    coords: torch.Tensor,
    shift: float | None = None,
    jitter: float | None = None,
    rescale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RoPE-box jittering: shift (uniform per axis), jitter (log-uniform per axis), rescale (log-uniform, isotropic)."""
    coords = coords.clone()
    # Random numbers are drawn on the CPU so a seeded generator gives the same box on every device.
    if shift is not None:
        offset = torch.empty(2).uniform_(-shift, shift, generator=generator)
        coords += offset.to(coords.device)
    if jitter is not None:
        log_j = math.log(jitter)
        stretch = torch.empty(2).uniform_(-log_j, log_j, generator=generator).exp()
        coords *= stretch.to(coords.device)
    if rescale is not None:
        log_s = math.log(rescale)
        factor = torch.empty(1).uniform_(-log_s, log_s, generator=generator).exp()
        coords *= factor.to(coords.device)
    return coords


def rope_tokens(x: torch.Tensor, rope: Rope, n_prefix: int) -> torch.Tensor:
    """Rotate the patch tokens of x ([B, H, N, D], N = n_prefix + N_patch) in float32 (or float64 for float64
    inputs); prefix tokens untouched."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.shape[-2] != n_prefix + rope.coords.shape[0]:
        raise ValueError(
            f"RoPE was built for {rope.coords.shape[0]} patches + {n_prefix} prefix tokens, "
            f"but the sequence has {x.shape[-2]} tokens"
        )
    rotated = apply_rope(x[..., n_prefix:, :], rope.sin, rope.cos)
    return torch.cat([x[..., :n_prefix, :], rotated], dim=-2)


class RopeEmbedding(nn.Module):
    """Holds the periods (checkpoint key `rope_embed.periods`) and builds the `Rope` of a crop size."""

    def __init__(
        self,
        head_dim: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize: CoordNormalization = "separate",
        shift: float | None = None,
        jitter: float | None = None,
        rescale: float | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize = normalize
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        self.generator: torch.Generator | None = None  # set with `seed()` for reproducible jitter
        self.register_buffer("periods", torch.empty(head_dim // 4), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        periods = rope_periods(self.head_dim, self.base, self.min_period, self.max_period)
        with torch.no_grad():
            self.periods.copy_(periods.to(self.periods.dtype))

    def seed(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, h: int, w: int) -> Rope:
        coords = patch_coords(h, w, self.normalize, device=self.periods.device)
        if self.training:
            coords = augment_coords(coords, self.shift, self.jitter, self.rescale, self.generator)
        periods = self.periods.float()  # sin/cos in float32 whatever the model dtype
        angles = rope_angles(coords, periods)
        return Rope(coords=coords, periods=periods, sin=angles.sin(), cos=angles.cos())
