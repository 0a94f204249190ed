"""The DINOv3 Vision Transformer, with module names equal to the released checkpoints' keys.

Patch embedding (16 px), a class token, 4 register ("storage") tokens, pre-norm blocks (LayerNorm,
attention with a qkv bias whose k part is masked out, LayerScale, MLP or SwiGLU FFN, stochastic depth),
a final LayerNorm and, for the 7B, an untied LayerNorm for the class token of local crops. Positions
come from 2-D RoPE (models/rope.py) applied inside attention to patch tokens only.

`model.state_dict()` is exactly the released format (models/checkpoint.py loads and converts).
The forward takes one image tensor or a list of crops of different sizes (global + local), each with
an optional iBOT mask, and returns per crop a dict with the normed class/register/patch tokens and the
pre-norm tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from dino_kernels.rope_attention import rope_attention, uses_triton
from models.rope import CoordNormalization, Rope, RopeEmbedding, rope_tokens

# "auto", "triton", "reference": dino_kernels.rope_attention's dispatch; "sdpa", "xformers": other backends.
AttnImpl = Literal["auto", "triton", "reference", "sdpa", "xformers"]
FfnKind = Literal["mlp", "swiglu"]


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    ffn: FfnKind = "mlp"
    ffn_ratio: float = 4.0
    swiglu_align: int = 8  # SwiGLU hidden size = int(C*ratio*2/3) rounded up to this multiple
    patch_size: int = 16
    in_chans: int = 3
    n_storage_tokens: int = 4
    qkv_bias: bool = True
    mask_k_bias: bool = True  # the k part of the qkv bias is multiplied by 0 (a bias on k cancels in softmax)
    proj_bias: bool = True
    ffn_bias: bool = True
    layerscale_init: float = 1e-5
    norm_eps: float = 1e-5
    drop_path_rate: float = 0.0
    untie_global_and_local_cls_norm: bool = False
    rope_base: float | None = 100.0
    rope_min_period: float | None = None
    rope_max_period: float | None = None
    rope_normalize: CoordNormalization = "separate"
    rope_shift: float | None = None
    rope_jitter: float | None = None
    rope_rescale: float | None = 2.0  # RoPE-box jittering: box [-1,1] -> [-s,s], s log-uniform in [1/2, 2]
    # In training, a new box draw for every block and crop group (the official ViT calls its RoPE module inside
    # the block loop), or one per forward pass and crop size ("forward").
    rope_jitter_per: Literal["block", "forward"] = "block"
    attn_impl: AttnImpl = "auto"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.embed_dim * self.ffn_ratio)
        if self.ffn == "mlp":
            return hidden
        d = int(hidden * 2 / 3)
        return d + (-d % self.swiglu_align)


# Released hyperparameters (DESIGN.md; the 7B has no qkv bias and an untied local-crop class norm).
VIT_ARCHS: dict[str, ViTConfig] = {
    "vit_tiny": ViTConfig(embed_dim=192, depth=4, num_heads=3),
    "vit_small": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_small_plus": ViTConfig(embed_dim=384, depth=12, num_heads=6, ffn="swiglu", ffn_ratio=6.0),
    "vit_base": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_plus": ViTConfig(embed_dim=1280, depth=32, num_heads=20, ffn="swiglu", ffn_ratio=6.0),
    # The ViT-L of the official ImageNet-1k "fast setup" (vitl_im1k_lin834.yaml): no registers, a k bias that is
    # not masked, plain LayerNorm (eps 1e-6), no RoPE rescale jitter.
    "vit_large_im1k": ViTConfig(embed_dim=1024, depth=24, num_heads=16, n_storage_tokens=0, mask_k_bias=False,
                                norm_eps=1e-6, rope_rescale=None),
    "vit_7b": ViTConfig(
        embed_dim=4096, depth=40, num_heads=32, ffn="swiglu", ffn_ratio=3.0, swiglu_align=64,
        qkv_bias=False, untie_global_and_local_cls_norm=True,
    ),
}


# ----------------------------------------------------------------------------------------------------
# Attention: the one entry point every backend goes through.
# ----------------------------------------------------------------------------------------------------


def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError as err:
        raise RuntimeError(
            "attn_impl='xformers' needs the optional xformers package (pip install -r requirements/gpu.txt)"
        ) from err
    return xops


def _unknown_attn_impl(impl) -> ValueError:
    return ValueError(f"unknown attention implementation {impl!r}; use {', '.join(get_args(AttnImpl))}")


def _check_attn_impl(impl) -> None:
    if impl not in get_args(AttnImpl):
        raise _unknown_attn_impl(impl)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope | None, n_prefix: int, impl: AttnImpl = "auto"
) -> torch.Tensor:
    """softmax(rot(q) rot(k)^T / sqrt(D)) v for q, k, v of shape [B, N, H, D]; returns [B, N, H, D].

    q, k, v are typically strided views of the qkv projection's [B, N, 3, H, D] output. RoPE rotates the
    tokens after the first `n_prefix` (class + registers).
    impl: "triton" and "reference" are `dino_kernels.rope_attention.rope_attention`'s. "sdpa" (RoPE in PyTorch,
    float32, then `scaled_dot_product_attention`) and "xformers" (RoPE in PyTorch, then
    `memory_efficient_attention`; CUDA only) are other backends. "auto" is the kernel where its dispatch runs
    Triton on a GPU and SDPA everywhere else.
    """
    if impl == "auto":
        # Not the kernel's own "auto": where that would run the reference (the CPU, fp32 on CUDA), SDPA is the
        # fused backend, while the reference is the specification and holds the N x N scores; and on the CPU
        # under TRITON_INTERPRET a model runs SDPA, not the interpreted kernel.
        impl = "triton" if q.is_cuda and uses_triton(q, "auto") else "sdpa"
    if impl in ("triton", "reference"):
        coords, periods = (rope.coords, rope.periods) if rope is not None else (None, None)
        return rope_attention(q, k, v, coords, periods, n_prefix, impl=impl)
    if impl == "sdpa":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
        if rope is not None:
            q = rope_tokens(q, rope, n_prefix).to(v.dtype)
            k = rope_tokens(k, rope, n_prefix).to(v.dtype)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    if impl == "xformers":
        if not q.is_cuda:
            raise RuntimeError("attn_impl='xformers' has no CPU kernels; use 'sdpa' on the CPU")
        xops = _xformers_ops()
        if rope is not None:
            q = rope_tokens(q.transpose(1, 2), rope, n_prefix).to(v.dtype).transpose(1, 2)
            k = rope_tokens(k.transpose(1, 2), rope, n_prefix).to(v.dtype).transpose(1, 2)
        return xops.memory_efficient_attention(q, k, v)
    raise _unknown_attn_impl(impl)


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.proj.in_channels * self.patch_size**2)
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, C]


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class LinearKMaskedBias(nn.Linear):
    """The qkv projection: its bias is multiplied by `bias_mask` (1 for q and v, 0 for k), as released."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mask_k_bias: bool):
        super().__init__(in_features, out_features, bias=bias)
        if bias:
            mask = torch.ones(out_features)
            if mask_k_bias:
                mask[out_features // 3 : 2 * out_features // 3] = 0
            self.register_buffer("bias_mask", mask)
        else:
            self.bias_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.impl: AttnImpl = cfg.attn_impl
        self.qkv = LinearKMaskedBias(cfg.embed_dim, 3 * cfg.embed_dim, cfg.qkv_bias, cfg.mask_k_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.proj_bias)

    def forward(self, x: torch.Tensor, rope: Rope | None, n_prefix: int) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.unbind(2)
        out = attention(q, k, v, rope, n_prefix, self.impl)
        return self.proj(out.reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def add_residual(x: torch.Tensor, branch, drop_rate: float, training: bool) -> torch.Tensor:
    """x + branch(x), with stochastic depth computed on a random subset of the batch.

    Dropping a residual for a sample is the same as not computing it: the branch runs only on the
    kept samples and their update is scaled by B/kept, so drop path 0.4 also saves 40% of the compute.
    """
    if not training or drop_rate == 0.0:
        return x + branch(x)
    batch = x.shape[0]
    n_keep = max(int(batch * (1 - drop_rate)), 1)
    keep = torch.randperm(batch, device=x.device)[:n_keep]
    update = branch(x[keep]).to(x.dtype)
    return torch.index_add(x, 0, keep, update, alpha=batch / n_keep)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ls1 = LayerScale(cfg.embed_dim, cfg.layerscale_init)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        ffn_cls = SwiGLUFFN if cfg.ffn == "swiglu" else Mlp
        self.mlp = ffn_cls(cfg.embed_dim, cfg.ffn_hidden, cfg.ffn_bias)
        self.ls2 = LayerScale(cfg.embed_dim, cfg.layerscale_init)
        self.drop_path_rate = cfg.drop_path_rate

    def forward(self, x: torch.Tensor, rope: Rope | None, n_prefix: int) -> torch.Tensor:
        x = add_residual(
            x, lambda t: self.ls1(self.attn(self.norm1(t), rope, n_prefix)), self.drop_path_rate, self.training
        )
        return add_residual(x, lambda t: self.ls2(self.mlp(self.norm2(t))), self.drop_path_rate, self.training)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


def forward_crops(forward_features_list, x, masks):
    """The forward convention every backbone shares: a tensor gives one output dict, a list of crop tensors
    (with a list of masks, or None) gives a list of dicts."""
    if isinstance(x, torch.Tensor):
        return forward_features_list([x], [masks])[0]
    masks_list = masks if masks is not None else [None] * len(x)
    if len(masks_list) != len(x):
        raise ValueError(f"got {len(x)} crop tensors but {len(masks_list)} masks; pass one mask (or None) per crop")
    return forward_features_list(list(x), list(masks_list))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.embed_dim % cfg.num_heads != 0:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        _check_attn_impl(cfg.attn_impl)
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.n_storage_tokens = cfg.n_storage_tokens
        self.n_prefix = 1 + cfg.n_storage_tokens
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        if cfg.n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.zeros(1, cfg.n_storage_tokens, cfg.embed_dim))
        else:
            self.storage_tokens = None
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))
        self.rope_embed = RopeEmbedding(
            cfg.head_dim, cfg.rope_base, cfg.rope_min_period, cfg.rope_max_period, cfg.rope_normalize,
            cfg.rope_shift, cfg.rope_jitter, cfg.rope_rescale,
        )
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        if cfg.untie_global_and_local_cls_norm:
            self.local_cls_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        else:
            self.local_cls_norm = None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.rope_embed.reset_parameters()
        self.patch_embed.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, LayerScale)):
                module.reset_parameters()

    def set_attn_impl(self, impl: AttnImpl) -> None:
        _check_attn_impl(impl)
        self.cfg = replace(self.cfg, attn_impl=impl)
        for block in self.blocks:
            block.attn.impl = impl

    # -- inputs --------------------------------------------------------------------------------------

    def _check_image(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point images (normalized), got dtype {x.dtype}; convert with .float()")
        if x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"the model takes {self.cfg.in_chans}-channel images, got {x.shape[1]} channels")
        h, w = x.shape[-2:]
        p = self.patch_size
        if h < p or w < p:
            raise ValueError(f"image of {h}x{w} px is smaller than one {p}x{p} patch; resize it to at least {p} px")
        # Sides that are not multiples of the patch size are cropped to the smaller multiple.
        return x[..., : h - h % p, : w - w % p]

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens (mask token where masked) with the class and register tokens in front."""
        x = self._check_image(x)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)
        cls_token = self.cls_token
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks must have shape {tuple(tokens.shape[:2])} (batch, patches), got {tuple(masks.shape)}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        else:
            # Keeps mask_token in the autograd graph so DDP sees a gradient for it on every step.
            cls_token = cls_token + 0 * self.mask_token
        prefix = [cls_token.expand(tokens.shape[0], -1, -1)]
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens.expand(tokens.shape[0], -1, -1))
        return torch.cat([*prefix, tokens], dim=1), (h, w)

    def _ropes(self, grids: list[tuple[int, int]]) -> list[Rope]:
        """The Rope of each crop group. A draw is shared by the images of a group; with rope_jitter_per="forward"
        also by the groups of one crop size."""
        if self._jitters_per_block():
            return [self.rope_embed(*hw) for hw in grids]
        by_size = {hw: self.rope_embed(*hw) for hw in dict.fromkeys(grids)}
        return [by_size[hw] for hw in grids]

    def _jitters_per_block(self) -> bool:
        embed = self.rope_embed
        jitters = embed.shift is not None or embed.jitter is not None or embed.rescale is not None
        return self.training and jitters and self.cfg.rope_jitter_per == "block"

    # -- forward -------------------------------------------------------------------------------------

    def forward_features_list(
        self, x_list: list[torch.Tensor], masks_list: list[torch.Tensor | None]
    ) -> list[dict[str, torch.Tensor]]:
        tokens, grids = [], []
        for x, masks in zip(x_list, masks_list, strict=True):
            t, hw = self.prepare_tokens(x, masks)
            tokens.append(t)
            grids.append(hw)
        ropes = self._ropes(grids)
        for i, block in enumerate(self.blocks):
            if i > 0 and self._jitters_per_block():
                ropes = self._ropes(grids)
            tokens = [block(t, rope, self.n_prefix) for t, rope in zip(tokens, ropes)]
        outputs = []
        for index, (x, masks) in enumerate(zip(tokens, masks_list)):
            # By convention the second entry of a training list holds the local crops.
            if self.local_cls_norm is not None and self.training and index == 1:
                cls_reg = self.local_cls_norm(x[:, : self.n_prefix])
                patches = self.norm(x[:, self.n_prefix :])
            else:
                normed = self.norm(x)
                cls_reg, patches = normed[:, : self.n_prefix], normed[:, self.n_prefix :]
            outputs.append(
                {
                    "x_norm_clstoken": cls_reg[:, 0],
                    "x_storage_tokens": cls_reg[:, 1:],
                    "x_norm_patchtokens": patches,
                    "x_prenorm": x,
                    "masks": masks,
                }
            )
        return outputs

    def forward(
        self, x: torch.Tensor | list[torch.Tensor], masks: torch.Tensor | list[torch.Tensor | None] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """One tensor -> one output dict; a list of crop tensors (with a list of masks) -> a list of dicts."""
        return forward_crops(self.forward_features_list, x, masks)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` blocks (or of the blocks listed in `n`), as the released models give them."""
        tokens, hw = self.prepare_tokens(x, None)
        wanted = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else list(n)
        rope = self._ropes([hw])[0]
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, rope, self.n_prefix)
            if i in wanted:
                outputs.append(self.norm(tokens) if norm else tokens)
        if len(outputs) != len(wanted):
            raise ValueError(f"asked for blocks {list(wanted)} of a {len(self.blocks)}-block model")
        class_tokens = [out[:, 0] for out in outputs]
        extra_tokens = [out[:, 1 : self.n_prefix] for out in outputs]
        patches = [out[:, self.n_prefix :] for out in outputs]
        if reshape:
            patches = [p.reshape(p.shape[0], *hw, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        if return_extra_tokens:
            return tuple(zip(patches, extra_tokens))
        return tuple(patches)


def build_vit(arch: str | ViTConfig = "vit_small", **overrides) -> VisionTransformer:
    """A ViT from a preset name of VIT_ARCHS (or a config) with any config field overridden."""
    if isinstance(arch, str):
        if arch not in VIT_ARCHS:
            raise ValueError(f"unknown ViT preset {arch!r}; choose one of {', '.join(VIT_ARCHS)}")
        arch = VIT_ARCHS[arch]
    return VisionTransformer(replace(arch, **overrides))

