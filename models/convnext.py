"""ConvNeXt backbones for distillation students, with the ViT's output dictionary and the released key names.

    stem: 4x4 stride-4 conv + LayerNorm -> stage 1 -> [LayerNorm + 2x2 stride-2 conv -> stage i] x 3 -> final norm
    block: 7x7 depthwise conv -> LayerNorm -> Linear C->4C -> GELU -> Linear 4C->C -> layer scale -> drop path

Sizes (DESIGN.md): Tiny depths (3,3,9,3) dims (96,192,384,768); Small (3,3,27,3) same dims; Base (3,3,27,3)
(128,256,512,1024); Large (3,3,27,3) (192,384,768,1536); layer scale starts at 1e-6. `convnext_test` is a
tiny preset for tests.

To be a drop-in student for the DINO/iBOT losses, the forward returns per crop what the ViT returns:
    x_norm_clstoken     [B, C]     global average pool of the last stage, through the final norm
    x_storage_tokens    [B, 0, C]  (a ConvNeXt has no registers)
    x_norm_patchtokens  [B, P, C]  the last stage (stride 32) resized bilinearly to the ViT's 16-px grid,
                                   (H // 16) x (W // 16), flattened row-major: P matches a ViT's patch count
    x_prenorm           [B, 1 + P, C]  the pooled vector and the resized patches before the final norm
    masks               the iBOT masks that were passed in (or None)
The class vector and the patches go through the same final LayerNorm, as in the released DINOv3 ConvNeXts.

iBOT masks (`mask_mode`) -- a ConvNeXt has no mask token, so this is a choice:
    "ignore" (default): the network sees the unmasked crop and the masks are only passed through, which is what
        the released DINOv3 ConvNeXt code does; the iBOT loss then asks the student's patch features at the masked
        positions to match the teacher's there (patch-level distillation rather than masked prediction).
    "pixel": every masked 16x16 patch of the input is set to 0 -- the dataset mean color, since crops are
        ImageNet-normalized -- before the stem, so the student has to predict the teacher's features of pixels it
        did not see, like a ViT does with its mask token. No extra parameter, so the state dict is unchanged.

State-dict keys equal the released DINOv3 ConvNeXt checkpoints': `downsample_layers.0.{0,1}` (stem conv, norm),
`downsample_layers.i.{0,1}` (norm, conv), `stages.i.j.{dwconv,norm,pwconv1,pwconv2,gamma}`, `norm`.
`load_convnext` reads such a state dict (or file) and infers the size from the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.vit import add_residual, forward_crops

MaskMode = Literal["ignore", "pixel"]


@dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple[int, int, int, int] = (3, 3, 9, 3)
    dims: tuple[int, int, int, int] = (96, 192, 384, 768)
    in_chans: int = 3
    layerscale_init: float = 1e-6
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0  # rate of the last block; it rises linearly from 0 over the blocks
    patch_size: int = 16  # the ViT grid the patch features are resized to
    mask_mode: MaskMode = "ignore"

    @property
    def embed_dim(self) -> int:
        return self.dims[-1]


CONVNEXT_ARCHS: dict[str, ConvNeXtConfig] = {
    "convnext_test": ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(24, 48, 96, 192)),
    "convnext_tiny": ConvNeXtConfig(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_small": ConvNeXtConfig(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "convnext_base": ConvNeXtConfig(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnext_large": ConvNeXtConfig(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
}

# The stem divides the side by 4 and each of the 3 downsamplings by 2: smaller inputs leave no pixel to convolve.
MIN_INPUT_SIZE = 32


def mask_patch_pixels(x: torch.Tensor, masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero (= the mean color of normalized crops) every pixel of the masked patches [B, h * w] of the
    `patch_size` grid of images [B, C, H, W]: iBOT masking for a network without a mask token."""
    h, w = x.shape[-2] // patch_size, x.shape[-1] // patch_size
    if masks.shape != (x.shape[0], h * w):
        raise ValueError(f"masks must have shape {(x.shape[0], h * w)} (batch, patches), got {tuple(masks.shape)}")
    p = patch_size
    pixel_mask = masks.view(-1, 1, h, 1, w, 1).expand(-1, -1, -1, p, -1, p).reshape(-1, 1, h * p, w * p)
    # Rows/columns past the last whole patch (sides that are not multiples of 16) are never masked.
    pixel_mask = F.pad(pixel_mask, (0, x.shape[-1] - w * p, 0, x.shape[-2] - h * p), value=False)
    return x.masked_fill(pixel_mask, 0.0)


def pooled_and_grid_tokens(feature_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, C, h', w'] -> [B, 1 + P, C]: the global average pool, then the map resized bilinearly to `grid`,
    flattened row-major (what a ViT's class and patch tokens are to the losses and probes)."""
    pooled = feature_map.mean(dim=(-2, -1))
    # antialias only matters when the grid is coarser than the map (never at stride 32 -> 16).
    patches = F.interpolate(feature_map, size=grid, mode="bilinear", antialias=True, align_corners=False)
    return torch.cat([pooled.unsqueeze(1), patches.flatten(2).transpose(1, 2)], dim=1)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (the stem's and the downsamplings' norms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, dim: int, layerscale_init: float, norm_eps: float, drop_path_rate: float):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layerscale_init = layerscale_init
        self.gamma = nn.Parameter(torch.full((dim,), layerscale_init))
        self.drop_path_rate = drop_path_rate

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        # The pointwise layers run channels-last, as Linear layers (faster than 1x1 convs in PyTorch).
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return (y * self.gamma).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_residual(x, self.branch, self.drop_path_rate, self.training)


class ConvNeXt(nn.Module):
    def __init__(self, cfg: ConvNeXtConfig):
        super().__init__()
        if len(cfg.depths) != 4 or len(cfg.dims) != 4 or min(cfg.depths) < 1 or min(cfg.dims) < 1:
            raise ValueError(f"ConvNeXt needs 4 positive depths and 4 positive dims, got {cfg.depths} / {cfg.dims}")
        if cfg.mask_mode not in ("ignore", "pixel"):
            raise ValueError(f"unknown ConvNeXt mask_mode {cfg.mask_mode!r}; use 'ignore' or 'pixel'")
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.n_storage_tokens = 0
        stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, cfg.dims[0], kernel_size=4, stride=4), LayerNorm2d(cfg.dims[0], eps=cfg.norm_eps)
        )
        downsamples = [
            nn.Sequential(LayerNorm2d(cfg.dims[i], eps=cfg.norm_eps),
                          nn.Conv2d(cfg.dims[i], cfg.dims[i + 1], kernel_size=2, stride=2))
            for i in range(3)
        ]
        self.downsample_layers = nn.ModuleList([stem, *downsamples])
        n_blocks = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.stages = nn.ModuleList()
        for stage, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            first = sum(cfg.depths[:stage])
            self.stages.append(nn.Sequential(*(
                Block(dim, cfg.layerscale_init, cfg.norm_eps, rates[first + j]) for j in range(depth)
            )))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated normal (std 0.02) conv and linear weights, zero biases, unit norms, gamma = layerscale_init."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, Block):
                nn.init.constant_(module.gamma, module.layerscale_init)

    @property
    def blocks(self) -> list[Block]:
        """All residual blocks in depth order (what activation checkpointing and per-block code iterate over)."""
        return [block for stage in self.stages for block in stage]

    # -- inputs --------------------------------------------------------------------------------------

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"expected float images [B, C, H, W], got {tuple(x.shape)} {x.dtype}")
        if x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"the model takes {self.cfg.in_chans}-channel images, got {x.shape[1]} channels")
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"image of {x.shape[-2]}x{x.shape[-1]} px is too small for a ConvNeXt (total stride 32): "
                f"use crops of at least {MIN_INPUT_SIZE} px"
            )

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The ViT patch grid of an image: (H // patch, W // patch)."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def mask_pixels(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Zero (= the mean color of normalized crops) every pixel of the masked patches of the 16-px grid."""
        return mask_patch_pixels(x, masks, self.patch_size)

    # -- forward -------------------------------------------------------------------------------------

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output map [B, C_i, H/2^(i+2), W/2^(i+2)] of each of the 4 stages."""
        maps = []
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
            maps.append(x)
        return maps

    def tokens(self, feature_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, C, h', w'] -> [B, 1 + P, C]: the global average pool, then the map resized to the ViT grid."""
        return pooled_and_grid_tokens(feature_map, grid)

    def forward_features_list(
        self, x_list: list[torch.Tensor], masks_list: list[torch.Tensor | None]
    ) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for x, masks in zip(x_list, masks_list, strict=True):
            self._check_image(x)
            grid = self.grid(x)
            if masks is not None and self.cfg.mask_mode == "pixel":
                x = self.mask_pixels(x, masks)
            prenorm = self.tokens(self.stage_features(x)[-1], grid)
            normed = self.norm(prenorm)
            outputs.append({
                "x_norm_clstoken": normed[:, 0],
                "x_storage_tokens": normed[:, 1:1],
                "x_norm_patchtokens": normed[:, 1:],
                "x_prenorm": prenorm,
                "masks": masks,
            })
        return outputs

    def forward(
        self, x: torch.Tensor | list[torch.Tensor], masks: torch.Tensor | list[torch.Tensor | None] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """One tensor -> one output dict; a list of crop tensors (with a list of masks) -> a list of dicts."""
        return forward_crops(self.forward_features_list, x, masks)

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int | list[int] = 1, reshape: bool = False, return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch features of the last `n` stages (or the stages listed in `n`) on the ViT grid, like the ViT's.

        Only the last stage has a norm (the final one); earlier stages are returned as they are.
        """
        self._check_image(x)
        wanted = list(range(4 - n, 4)) if isinstance(n, int) else list(n)
        if not wanted or not all(0 <= i < 4 for i in wanted):
            raise ValueError(f"asked for stages {wanted} of a 4-stage ConvNeXt")
        grid = self.grid(x)
        maps = self.stage_features(x)
        return levels_as_vit_layers(maps, wanted, grid, self.tokens, self.norm if norm else None, reshape,
                                    return_class_token)


def levels_as_vit_layers(maps: list[torch.Tensor], wanted: list[int], grid: tuple[int, int], to_tokens,
                         final_norm, reshape: bool, return_class_token: bool) -> tuple:
    """`get_intermediate_layers` of a backbone of feature maps, shaped like the ViT's: the levels `wanted` as tokens
    on the ViT grid (`to_tokens(map, grid)`: class token first), `final_norm` (None: none) on the last level only."""
    patches, class_tokens = [], []
    for i in wanted:
        tokens = to_tokens(maps[i], grid)
        if final_norm is not None and i == len(maps) - 1:
            tokens = final_norm(tokens)
        class_tokens.append(tokens[:, 0])
        patch = tokens[:, 1:]
        if reshape:
            patch = patch.reshape(patch.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
        patches.append(patch)
    return tuple(zip(patches, class_tokens)) if return_class_token else tuple(patches)


def build_convnext(arch: str | ConvNeXtConfig = "convnext_tiny", **overrides) -> ConvNeXt:
    """A ConvNeXt from a preset name of CONVNEXT_ARCHS (or a config) with any config field overridden."""
    if isinstance(arch, str):
        if arch not in CONVNEXT_ARCHS:
            raise ValueError(f"unknown ConvNeXt preset {arch!r}; choose one of {', '.join(CONVNEXT_ARCHS)}")
        arch = CONVNEXT_ARCHS[arch]
    return ConvNeXt(replace(arch, **overrides))


def infer_convnext_config(state_dict: dict[str, torch.Tensor]) -> ConvNeXtConfig:
    """The sizes (depths, dims, input channels) of a ConvNeXt state dict, read from its shapes."""
    if "downsample_layers.0.0.weight" not in state_dict:
        raise ValueError(
            f"not a ConvNeXt state dict (no 'downsample_layers.0.0.weight'; first keys: {list(state_dict)[:5]})"
        )
    dims = tuple(state_dict[f"stages.{i}.0.gamma"].shape[0] for i in range(4))
    depths = tuple(
        1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith(f"stages.{i}.")) for i in range(4)
    )
    in_chans = state_dict["downsample_layers.0.0.weight"].shape[1]
    return ConvNeXtConfig(depths=depths, dims=dims, in_chans=in_chans)


def load_convnext(source: str | Path | dict[str, torch.Tensor], arch: str | ConvNeXtConfig | None = None,
                  **overrides) -> ConvNeXt:
    """A ConvNeXt holding the weights of a state dict or file (strict); the size is inferred when arch is None.

    `overrides` set run-time fields such as mask_mode or drop_path_rate.
    """
    from models.checkpoint import (
        CheckpointError, _strip_prefix, build_with_weights, read_checkpoint_file, resolve_preset,
    )

    state_dict = read_checkpoint_file(source) if isinstance(source, (str, Path)) else source
    state_dict = _strip_prefix(state_dict)
    if arch is None:
        try:
            cfg = infer_convnext_config(state_dict)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
    else:
        cfg = resolve_preset(arch, CONVNEXT_ARCHS, "ConvNeXt")
    # Strict: clear errors for missing/unexpected keys and shape mismatches.
    model = build_with_weights(ConvNeXt, replace(cfg, **overrides), state_dict)
    return model
