"""Backbone checkpoints: the released DINOv3 format (ours), Hugging Face `DINOv3ViTModel`, and files.

Our `VisionTransformer.state_dict()` *is* the released format, so exporting is taking the state dict
(on the CPU, contiguous) and loading a released file is a strict `load_state_dict`. Hugging Face keeps
separate q/k/v projections and other names; `hf_to_official` converts them. When no preset is given the
architecture is inferred from the tensor shapes (embed dim, depth, FFN kind and width, head dim from the
RoPE periods) and matched against the released presets.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from models.vit import VIT_ARCHS, VisionTransformer, ViTConfig

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable file, wrong format, or keys/shapes that do not fit."""


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def read_checkpoint_file(path: str | Path) -> dict:
    """torch.load with errors that say what is wrong with the file instead of a pickle traceback."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted save? use an earlier checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds (zip, pickle, EOF, index errors) for a bad file
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects other than tensors and plain containers; it was not "
                "written by this codebase or a released DINOv3 model, so it is not loaded (unsafe to unpickle)"
            ) from err
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt file?): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


# ----------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------


TRAIN_CHECKPOINT_FORMAT = "dinov3-train-checkpoint"  # train.py's full checkpoints ("format" entry)
DISTILL_FORMAT = "dinov3-distill-checkpoint"  # distill.py's per-student checkpoints


def describe_checkpoint(obj: dict) -> str:
    """What a loaded checkpoint holds, in words, for error messages: "a train.py training checkpoint (vit_small,
    step 40)", "a released-format ViT backbone (weights only; embed dim 384, 12 blocks)", ..."""
    kind = obj.get("format")
    if kind == TRAIN_CHECKPOINT_FORMAT:
        config = obj.get("config")
        arch = config.get("model", {}).get("arch", "?") if isinstance(config, dict) else "?"
        return f"a train.py training checkpoint ({arch}, step {obj.get('step')})"
    if kind == DISTILL_FORMAT:
        return f"a distill.py student checkpoint ({obj.get('arch')}, step {obj.get('step')})"
    state_dict = _strip_prefix(obj)
    if "cls_token" in state_dict and "patch_embed.proj.weight" in state_dict:
        depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
        return (f"a released-format ViT backbone (weights only; embed dim {state_dict['cls_token'].shape[-1]}, "
                f"{depth} blocks)")
    if "embeddings.cls_token" in state_dict:
        return "a Hugging Face DINOv3ViTModel state dict (weights only)"
    if "downsample_layers.0.0.weight" in state_dict:
        return "a ConvNeXt backbone (weights only)"
    return f"a dict of {len(obj)} entries that this codebase does not know (first keys: {', '.join(list(obj)[:6])})"


def detect_format(state_dict: StateDict) -> str:
    """'official' (released DINOv3 / ours), 'hf' (transformers DINOv3ViTModel) or a CheckpointError."""
    if "cls_token" in state_dict and "patch_embed.proj.weight" in state_dict:
        return "official"
    if "embeddings.cls_token" in state_dict and "embeddings.patch_embeddings.weight" in state_dict:
        return "hf"
    hint = ("; a train.py checkpoint holds the EMA teacher's backbone under its 'teacher' entry and writes it in "
            "the released format as teacher_backbone.pth next to itself" if state_dict.get("format") == TRAIN_CHECKPOINT_FORMAT
            else "")
    raise CheckpointError(
        "expected a ViT backbone state dict in the released DINOv3 or Hugging Face format, but this is not a ViT "
        f"backbone state dict: it is {describe_checkpoint(state_dict)}{hint}"
    )


def _strip_prefix(state_dict: StateDict) -> StateDict:
    """Drop a common wrapper prefix ('module.', 'backbone.', '_orig_mod.') that DDP/compile/heads add."""
    out = state_dict
    for prefix in ("module.", "_orig_mod.", "backbone."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def hf_to_official(hf: StateDict, rope_base: float = 100.0, head_dim: int | None = None) -> StateDict:
    """Convert a Hugging Face DINOv3ViTModel state dict to released-format keys and tensors.

    HF keeps no RoPE periods (they are recomputed from `rope_theta`), so they are rebuilt from `rope_base`
    and the head dim; a k bias, if the HF model has one, is kept and left unmasked.
    """
    # transformers' files (save_pretrained, the Hub) name the blocks `layer.N.*`; its state_dict() `model.layer.N.*`.
    hf = {("model." + k if k.startswith("layer.") else k): v for k, v in hf.items()}
    out: StateDict = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return hf[key]

    C = hf["embeddings.cls_token"].shape[-1]
    out["cls_token"] = take("embeddings.cls_token").reshape(1, 1, C)
    out["mask_token"] = take("embeddings.mask_token").reshape(1, C)
    if "embeddings.register_tokens" in hf:
        out["storage_tokens"] = take("embeddings.register_tokens")
    out["patch_embed.proj.weight"] = take("embeddings.patch_embeddings.weight")
    out["patch_embed.proj.bias"] = take("embeddings.patch_embeddings.bias")
    depth = 1 + max(int(m.group(1)) for k in hf if (m := re.match(r"model\.layer\.(\d+)\.", k)))
    for i in range(depth):
        src, dst = f"model.layer.{i}.", f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            out[dst + f"{norm}.weight"] = take(src + f"{norm}.weight")
            out[dst + f"{norm}.bias"] = take(src + f"{norm}.bias")
        a = src + "attention."
        out[dst + "attn.qkv.weight"] = torch.cat([take(a + f"{p}_proj.weight") for p in "qkv"])
        has_bias = {p: a + f"{p}_proj.bias" in hf for p in "qkv"}
        if has_bias["q"] or has_bias["v"]:
            biases = [take(a + f"{p}_proj.bias") if has_bias[p] else torch.zeros(C) for p in "qkv"]
            out[dst + "attn.qkv.bias"] = torch.cat(biases)
            mask = torch.ones(3 * C)
            if not has_bias["k"]:
                mask[C : 2 * C] = 0
            out[dst + "attn.qkv.bias_mask"] = mask
        out[dst + "attn.proj.weight"] = take(a + "o_proj.weight")
        if a + "o_proj.bias" in hf:
            out[dst + "attn.proj.bias"] = take(a + "o_proj.bias")
        out[dst + "ls1.gamma"] = take(src + "layer_scale1.lambda1")
        out[dst + "ls2.gamma"] = take(src + "layer_scale2.lambda1")
        m = src + "mlp."
        names = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if m + "gate_proj.weight" in hf else {
            "up_proj": "fc1", "down_proj": "fc2"
        }
        for hf_name, name in names.items():
            for kind in ("weight", "bias"):
                if f"{m}{hf_name}.{kind}" in hf:
                    out[f"{dst}mlp.{name}.{kind}"] = take(f"{m}{hf_name}.{kind}")
    out["norm.weight"] = take("norm.weight")
    out["norm.bias"] = take("norm.bias")
    unknown = sorted(set(hf) - used - {"rope_embeddings.inv_freq"})
    if unknown:
        raise CheckpointError(f"unknown keys in the Hugging Face state dict: {unknown[:10]}")
    head_dim = head_dim or _guess_head_dim(C, depth)
    from models.rope import rope_periods

    out["rope_embed.periods"] = rope_periods(head_dim, rope_base).float()
    return out


def _guess_head_dim(embed_dim: int, depth: int) -> int:
    for cfg in VIT_ARCHS.values():
        if cfg.embed_dim == embed_dim and cfg.depth == depth:
            return cfg.head_dim
    return 64


def infer_config(state_dict: StateDict) -> ViTConfig:
    """The architecture of a released-format state dict, from its tensor shapes."""
    C = state_dict["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    head_dim = 4 * state_dict["rope_embed.periods"].numel() if "rope_embed.periods" in state_dict else 64
    swiglu = "blocks.0.mlp.w1.weight" in state_dict
    hidden = state_dict["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    patch = state_dict["patch_embed.proj.weight"]
    fields = dict(
        embed_dim=C,
        depth=depth,
        num_heads=C // head_dim,
        ffn="swiglu" if swiglu else "mlp",
        patch_size=patch.shape[-1],
        in_chans=patch.shape[1],
        n_storage_tokens=state_dict["storage_tokens"].shape[1] if "storage_tokens" in state_dict else 0,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        proj_bias="blocks.0.attn.proj.bias" in state_dict,
        ffn_bias=("blocks.0.mlp.w1.bias" if swiglu else "blocks.0.mlp.fc1.bias") in state_dict,
        untie_global_and_local_cls_norm="local_cls_norm.weight" in state_dict,
    )
    # A released preset with the same shapes keeps its exact FFN ratio / alignment.
    for preset in VIT_ARCHS.values():
        if replace(preset, **fields) == preset and preset.ffn_hidden == hidden:
            return preset
    # Not a released shape: choose the FFN ratio that reproduces the stored hidden width.
    cfg = ViTConfig(**fields, ffn_ratio=hidden * 3 / 2 / C if swiglu else hidden / C)
    if cfg.ffn_hidden != hidden:
        raise CheckpointError(f"cannot express an FFN width of {hidden} for embed dim {C}; pass arch= explicitly")
    return cfg


def _apply_state_dict(model: VisionTransformer, state_dict: StateDict) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
        if wrong_shape:
            parts.append(f"shape mismatches ({len(wrong_shape)}): {wrong_shape[:5]}")
        raise CheckpointError(
            "the checkpoint does not fit this model (another model size or format?): " + "; ".join(parts)
        )
    model.load_state_dict(state_dict, strict=True)


def load_backbone(
    source: str | Path | StateDict, arch: str | ViTConfig | None = None, **overrides
) -> VisionTransformer:
    """A VisionTransformer holding the weights of a released-format or Hugging Face state dict (or file).

    `arch` (a preset name or config) is checked against the weights; without it the architecture is
    inferred from the shapes. `overrides` set run-time fields such as attn_impl or drop_path_rate.
    """
    state_dict = read_checkpoint_file(source) if isinstance(source, (str, Path)) else source
    state_dict = _strip_prefix(state_dict)
    if detect_format(state_dict) == "hf":
        cfg_hint = VIT_ARCHS[arch] if isinstance(arch, str) and arch in VIT_ARCHS else arch
        head_dim = cfg_hint.head_dim if isinstance(cfg_hint, ViTConfig) else None
        state_dict = hf_to_official(state_dict, head_dim=head_dim)
    cfg = infer_config(state_dict) if arch is None else resolve_preset(arch, VIT_ARCHS, "ViT")
    try:
        return build_with_weights(VisionTransformer, replace(cfg, **overrides), state_dict)
    except CheckpointError as err:
        if arch is None:
            raise
        name = arch if isinstance(arch, str) else "the given ViT config"
        raise CheckpointError(
            f"{describe_checkpoint(state_dict)} was given where {name} (embed dim {cfg.embed_dim}, {cfg.depth} "
            f"blocks) was expected; {err}"
        ) from err


def resolve_preset(arch, presets: dict, kind: str):
    """A config from a preset name of `presets`, or the config itself."""
    if not isinstance(arch, str):
        return arch
    if arch not in presets:
        raise ValueError(f"unknown {kind} preset {arch!r}; choose one of {', '.join(presets)}")
    return presets[arch]


def build_with_weights(model_cls, cfg, state_dict: StateDict):
    """`model_cls(cfg)` built without initializing (meta device) and then given `state_dict`, strictly."""
    with torch.device("meta"):
        model = model_cls(cfg)
    model = model.to_empty(device="cpu")
    _apply_state_dict(model, state_dict)
    return model


def export_official(model: VisionTransformer) -> StateDict:
    """The backbone's weights in the released DINOv3 format (CPU, contiguous, detached copies)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_official(model: VisionTransformer, path: str | Path) -> None:
    """Write the released-format backbone atomically (runtime.atomic_save: temp file, fsync, rename; a failed
    write leaves the previous file and no temp file)."""
    from runtime import atomic_save  # the repository root's shared helpers (entry points import it too)

    atomic_save(export_official(model), Path(path))
