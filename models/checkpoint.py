"""Backbone checkpoints: the released DINOv3 format (ours), Hugging Face `DINOv3ViTModel` / `DINOv3ConvNextModel`,
train.py and distill.py checkpoints, and files.

Our `VisionTransformer.state_dict()` *is* the released format, so exporting is taking the state dict
(on the CPU, contiguous) and loading a released file is a strict `load_state_dict`. Hugging Face keeps
separate q/k/v projections and other names; `hf_to_official` converts them and `official_to_hf` (with
`hf_vit_config`) goes the other way; `convnext_to_hf` / `hf_to_convnext` do the same for ConvNeXt. When no
preset is given the architecture is inferred from the tensor shapes (embed dim, depth, FFN kind and width,
head dim from the RoPE periods) and matched against the released presets.

`load_any_backbone` is the one place that turns any checkpoint argument the entry points take (a file, a
train.py run folder or sharded checkpoint folder, a Hugging Face folder, a state dict) into a ViT or
ConvNeXt backbone; `read_sharded_checkpoint` is the one place that reads a sharded folder outside a run's resume.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from models.convnext import ConvNeXtConfig, load_convnext
from models.external import EXTERNAL_FORMAT, is_external, load_external
from models.rope import rope_periods
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


HOW_TO_GET_A_CHECKPOINT = (
    "pass --checkpoint PATH: a released DINOv3 backbone (.pth), a Hugging Face DINOv3ViTModel state dict or "
    "save_pretrained folder, or a train.py / distill.py checkpoint (file, sharded checkpoint folder or run folder); "
    "`make run` trains the demo model and writes runs/demo/teacher_backbone.pth"
)


def _looks_sharded(path: Path) -> bool:
    """A folder that is (or was meant to be) a train.py sharded checkpoint: its name or its DCP files say so."""
    import runtime

    name = path.name.removesuffix(".tmp")
    return bool(runtime.SHARDED_PATTERN.match(name)) or (path / ".metadata").exists() or any(path.glob("*.distcp"))


def checkpoint_path_or_error(checkpoint: str | Path | None, how_to_get: str = HOW_TO_GET_A_CHECKPOINT) -> Path:
    """The file or folder behind a checkpoint argument: the file itself, a train.py sharded checkpoint folder, a
    train.py run folder's newest checkpoint (file or sharded folder), or a Hugging Face save_pretrained folder's
    model.safetensors (else pytorch_model.bin); errors end with `how_to_get`."""
    import runtime  # the repository root's shared helpers: list_checkpoints knows train.py's file names

    if checkpoint is None:
        raise ValueError(f"no checkpoint given: {how_to_get}")
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: {how_to_get}")
    if path.is_dir():
        if runtime.is_sharded_checkpoint(path) and not path.name.endswith(".tmp"):
            return path
        if _looks_sharded(path):
            raise CheckpointError(
                f"{path} is a sharded checkpoint folder without its {runtime.SHARDED_MARKER} (written last): its save "
                "did not finish (killed or failed), so it is incomplete; use an earlier checkpoint of the run")
        found = runtime.list_checkpoints(path)
        if found:
            return found[-1][1]
        weights = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        if not weights:
            raise CheckpointError(
                f"folder {path} holds no checkpoint_*.pth or checkpoint_* sharded folder (a train.py run folder) and "
                "no model.safetensors or pytorch_model.bin (a Hugging Face save_pretrained folder, single and "
                f"unsharded): {how_to_get}"
            )
        path = weights[0]
    return path


def read_weights(path: Path) -> dict:
    """The contents of a torch checkpoint file, a safetensors file or a train.py sharded checkpoint folder (its
    weights, without the optimizer: `read_sharded_checkpoint`)."""
    if Path(path).is_dir():
        return read_sharded_checkpoint(Path(path))
    if path.suffix != ".safetensors":
        return read_checkpoint_file(path)
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for a damaged header or data
        raise CheckpointError(f"{path} is not a readable safetensors file: {type(err).__name__}: {err}") from err


SHARDED_WEIGHTS = ("student", "teacher", "gram_teacher")


def read_sharded_metadata(path: Path) -> tuple[dict, dict]:
    """A train.py sharded checkpoint folder's meta.json and DCP's index of what it holds (flat key -> metadata),
    with a CheckpointError for an unfinished or damaged folder."""
    import json

    import torch.distributed.checkpoint as dcp

    import runtime

    marker = path / runtime.SHARDED_MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is a sharded checkpoint folder without its {runtime.SHARDED_MARKER} (written "
                              "last): its save did not finish; use an earlier checkpoint of the run")
    problem = runtime.checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"sharded checkpoint {path} is damaged: {problem}; use an earlier checkpoint of the run")
    try:
        return json.loads(marker.read_text()), dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as err:
        raise CheckpointError(f"sharded checkpoint {path} is damaged: its {runtime.SHARDED_MARKER} or .metadata "
                              f"cannot be read ({type(err).__name__}: {err})") from err


def read_sharded_checkpoint(path: Path, parts: tuple[str, ...] = SHARDED_WEIGHTS) -> dict:
    """A train.py sharded checkpoint folder read whole in this process, without a process group: its meta.json
    (format, step, config, stats) and the full tensors of `parts`, never the optimizer's -- laid out as a
    single-file checkpoint, so everything that reads one (backbone_weights, --init-from, distill.py's teacher)
    reads this too. The one place that reads such a folder outside a training run's own resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    payload, saved = read_sharded_metadata(path)
    weights: dict[str, dict] = {}
    for key, item in saved.items():
        part, _, name = key.partition(".")
        if part in parts and isinstance(item, TensorStorageMetadata):
            weights.setdefault(part, {})[name] = torch.empty(item.size, dtype=item.properties.dtype)
    try:  # DCP's CheckpointException is a BaseException
        dcp.load(weights, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    except (Exception, dcp.CheckpointException) as err:  # a missing or truncated shard file
        raise CheckpointError(f"sharded checkpoint {path} is damaged: its shards cannot be read (a missing or "
                              f"truncated .distcp file?): {type(err).__name__}: {str(err)[:300]}") from err
    return {**payload, **weights}


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
    if kind == EXTERNAL_FORMAT:
        return f"a {obj.get('spec')} backbone (distill.py's export)"
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


def backbone_weights(payload: dict, source: str) -> dict:
    """The backbone state dict inside a checkpoint: a train.py checkpoint's EMA teacher backbone, a distill.py
    checkpoint's student backbone, else the payload itself."""
    kind = payload.get("format")
    if kind == TRAIN_CHECKPOINT_FORMAT:
        entry, what = "teacher", "teacher backbone weights ('teacher' entry)"
    elif kind == DISTILL_FORMAT:
        entry, what = "student", "student backbone weights ('student' entry)"
    else:
        return payload
    weights = {k[len("backbone."):]: v for k, v in (payload.get(entry) or {}).items() if k.startswith("backbone.")}
    if not weights:
        program = "train.py" if kind == TRAIN_CHECKPOINT_FORMAT else "distill.py"
        raise CheckpointError(f"{source} is a {program} checkpoint without {what}")
    return weights


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
        registers = take("embeddings.register_tokens")
        if registers.shape[1] > 0:  # a model without registers keeps a [1, 0, C] tensor in Hugging Face
            out["storage_tokens"] = registers
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


# ----------------------------------------------------------------------------------------------------
# Any checkpoint -> a backbone
# ----------------------------------------------------------------------------------------------------


def _is_hf_convnext(state_dict: StateDict) -> bool:
    return any(k in state_dict for k in ("stages.0.downsample_layers.0.weight",
                                         "model.stages.0.downsample_layers.0.weight"))


def load_any_backbone(checkpoint: str | Path | dict | None, how_to_get: str = HOW_TO_GET_A_CHECKPOINT) -> nn.Module:
    """A ViT, ConvNeXt or timm/torchvision backbone (CPU, as stored) from a checkpoint argument or an in-memory
    checkpoint dict.

    Reads released-format ViT and ConvNeXt backbones, Hugging Face DINOv3ViTModel / DINOv3ConvNextModel weights
    (a state dict file, a .safetensors file or a save_pretrained folder), train.py checkpoints (the EMA teacher's
    backbone), distill.py checkpoints (the student's backbone) and distill.py's timm/torchvision backbone exports.
    The architecture comes from the tensor shapes, or from the spec saved with a timm/torchvision student.
    """
    if isinstance(checkpoint, dict):
        payload, source = checkpoint, "the given state dict"
    else:
        path = checkpoint_path_or_error(checkpoint, how_to_get)
        payload, source = read_weights(path), str(path)
    # timm / torchvision backbones: the saved spec rebuilds the network.
    if payload.get("format") == EXTERNAL_FORMAT:
        return load_external(payload["spec"], payload["weights"])
    if payload.get("format") == DISTILL_FORMAT and is_external(str(payload.get("arch"))):
        return load_external(payload["arch"], backbone_weights(payload, source))
    weights = _strip_prefix(backbone_weights(payload, source))
    if _is_hf_convnext(weights):
        weights = hf_to_convnext(weights)
    if "downsample_layers.0.0.weight" in weights:
        return load_convnext(weights)
    if not any(k in weights for k in ("cls_token", "embeddings.cls_token")):
        raise CheckpointError(
            f"{source} holds {describe_checkpoint(payload)}, not a backbone: expected a released DINOv3 ViT or "
            "ConvNeXt backbone, Hugging Face DINOv3ViTModel / DINOv3ConvNextModel weights, or a train.py / distill.py "
            f"checkpoint; {how_to_get}"
        )
    return load_backbone(weights)


# ----------------------------------------------------------------------------------------------------
# To Hugging Face (the inverse of hf_to_official; ConvNeXt both ways)
# ----------------------------------------------------------------------------------------------------


def rope_theta_of(periods: torch.Tensor, head_dim: int) -> float:
    """The base ("rope_theta") of RoPE periods made as base**(4i/D). Periods made otherwise (log-spaced between a
    min and a max period) have no base, and Hugging Face's DINOv3ViTModel, which rebuilds them from one, cannot
    hold them: a CheckpointError."""
    periods = periods.double()
    # periods[1] = base**(4/D); rounded to 6 digits so float32 periods give 100, not 100.00000381.
    base = float(f"{periods[1].item() ** (head_dim / 4):.6g}") if periods.numel() > 1 else 100.0
    if not torch.allclose(periods, rope_periods(head_dim, base), rtol=1e-5, atol=0.0):
        raise CheckpointError(
            f"the backbone's RoPE periods {periods[:4].tolist()}... are not base**(4i/{head_dim}) for any base (a "
            "min/max-period model?); Hugging Face DINOv3ViTModel only rebuilds periods from rope_theta: export it "
            "to ONNX instead, or keep the released format"
        )
    return base


def official_to_hf(state_dict: StateDict) -> StateDict:
    """Released-format ViT weights -> Hugging Face DINOv3ViTModel weights, as save_pretrained writes them
    (blocks named `layer.N.*`; hf_to_official reads this back).

    The masked qkv bias becomes q/k/v biases with the mask applied (a k bias only where the mask keeps one);
    the RoPE periods are dropped (Hugging Face rebuilds them from rope_theta: check with rope_theta_of) and so is
    the 7B's local-crop class norm (used only on local crops during training).
    """
    sd = _strip_prefix(state_dict)
    C = sd["cls_token"].shape[-1]
    out: StateDict = {
        "embeddings.cls_token": sd["cls_token"].reshape(1, 1, C),
        "embeddings.mask_token": sd["mask_token"].reshape(1, 1, C),
        "embeddings.register_tokens": sd.get("storage_tokens", torch.zeros(1, 0, C, dtype=sd["cls_token"].dtype)),
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"layer.{i}."
        for norm in ("norm1", "norm2"):
            out[dst + f"{norm}.weight"] = sd[src + f"{norm}.weight"]
            out[dst + f"{norm}.bias"] = sd[src + f"{norm}.bias"]
        for name, weight in zip("qkv", sd[src + "attn.qkv.weight"].chunk(3)):
            out[dst + f"attention.{name}_proj.weight"] = weight
        if src + "attn.qkv.bias" in sd:
            mask = sd[src + "attn.qkv.bias_mask"].to(sd[src + "attn.qkv.bias"].dtype)
            for name, bias, keep in zip("qkv", (sd[src + "attn.qkv.bias"] * mask).chunk(3), mask.chunk(3)):
                if name != "k" or keep.any():
                    out[dst + f"attention.{name}_proj.bias"] = bias
        out[dst + "attention.o_proj.weight"] = sd[src + "attn.proj.weight"]
        if src + "attn.proj.bias" in sd:
            out[dst + "attention.o_proj.bias"] = sd[src + "attn.proj.bias"]
        out[dst + "layer_scale1.lambda1"] = sd[src + "ls1.gamma"]
        out[dst + "layer_scale2.lambda1"] = sd[src + "ls2.gamma"]
        swiglu = src + "mlp.w1.weight" in sd
        names = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if swiglu else {
            "fc1": "up_proj", "fc2": "down_proj"
        }
        for name, hf_name in names.items():
            for kind in ("weight", "bias"):
                if f"{src}mlp.{name}.{kind}" in sd:
                    out[f"{dst}mlp.{hf_name}.{kind}"] = sd[f"{src}mlp.{name}.{kind}"]
    key_biases = {f"layer.{i}.attention.k_proj.bias" in out for i in range(depth)}
    if len(key_biases) > 1:
        raise CheckpointError("some blocks mask their k bias and others do not; DINOv3ViTModel has one key_bias flag")
    return out


def hf_vit_config(cfg: ViTConfig, state_dict: StateDict) -> dict:
    """config.json of the Hugging Face DINOv3ViTModel that holds the released-format weights `state_dict` of a
    ViT with architecture `cfg` (the weights decide the k bias and rope_theta)."""
    if cfg.rope_normalize != "separate":
        raise CheckpointError(f"RoPE coordinates normalized by {cfg.rope_normalize!r}: Hugging Face DINOv3ViTModel "
                              "only has per-axis ('separate') normalization; export it to ONNX instead")
    sd = _strip_prefix(state_dict)
    mask = sd.get("blocks.0.attn.qkv.bias_mask")
    swiglu = cfg.ffn == "swiglu"
    return {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.ffn_hidden,
        "use_gated_mlp": swiglu,
        "hidden_act": "silu" if swiglu else "gelu",  # both exact, as F.silu / F.gelu in models/vit.py
        "layer_norm_eps": cfg.norm_eps,
        "layerscale_value": cfg.layerscale_init,
        "rope_theta": rope_theta_of(sd["rope_embed.periods"], cfg.head_dim),
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "num_register_tokens": cfg.n_storage_tokens,
        "query_bias": cfg.qkv_bias,
        "key_bias": mask is not None and bool(mask.chunk(3)[1].any()),
        "value_bias": cfg.qkv_bias,
        "proj_bias": cfg.proj_bias,
        "mlp_bias": cfg.ffn_bias,
        "pos_embed_shift": cfg.rope_shift,  # training-time RoPE-box jittering, as in models/rope.py
        "pos_embed_jitter": cfg.rope_jitter,
        "pos_embed_rescale": cfg.rope_rescale,
        "image_size": 224,  # not used by the forward (RoPE follows the input size)
        "dtype": "float32",
    }


# ConvNeXt block parameters: released name -> Hugging Face name.
_CONVNEXT_BLOCK_NAMES = {"dwconv": "depthwise_conv", "norm": "layer_norm", "pwconv1": "pointwise_conv1",
                         "pwconv2": "pointwise_conv2", "gamma": "gamma"}


def _convnext_key_to_hf(key: str) -> str:
    if m := re.fullmatch(r"downsample_layers\.(\d)\.(\d)\.(weight|bias)", key):
        return f"stages.{m[1]}.downsample_layers.{m[2]}.{m[3]}"
    if (m := re.fullmatch(r"stages\.(\d)\.(\d+)\.(\w+?)(\.weight|\.bias|)", key)) and m[3] in _CONVNEXT_BLOCK_NAMES:
        return f"stages.{m[1]}.layers.{m[2]}.{_CONVNEXT_BLOCK_NAMES[m[3]]}{m[4]}"
    if m := re.fullmatch(r"norm\.(weight|bias)", key):
        return f"layer_norm.{m[1]}"
    raise CheckpointError(f"unknown key {key!r} in a ConvNeXt state dict")


def convnext_to_hf(state_dict: StateDict) -> StateDict:
    """Released-format ConvNeXt weights -> Hugging Face DINOv3ConvNextModel weights, as save_pretrained writes
    them (the same tensors under other names)."""
    return {_convnext_key_to_hf(k): v for k, v in _strip_prefix(state_dict).items()}


def hf_to_convnext(hf: StateDict) -> StateDict:
    """Hugging Face DINOv3ConvNextModel weights (a file, or the model's state_dict() with `model.` in front of the
    stages) -> released-format ConvNeXt weights."""
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    # The names are a bijection: invert it on the names a ConvNeXt of these depths has.
    depths = [1 + max(int(k.split(".")[3]) for k in hf if k.startswith(f"stages.{i}.layers.")) for i in range(4)]
    released = ["norm.weight", "norm.bias"]
    for i, depth in enumerate(depths):
        released += [f"downsample_layers.{i}.{j}.{kind}" for j in range(2) for kind in ("weight", "bias")]
        released += [f"stages.{i}.{j}.{name}{kind}" for j in range(depth) for name in _CONVNEXT_BLOCK_NAMES
                     for kind in ((".weight", ".bias") if name != "gamma" else ("",))]
    to_released = {_convnext_key_to_hf(k): k for k in released}
    unknown = sorted(set(hf) - set(to_released))
    if unknown:
        raise CheckpointError(f"unknown keys in the Hugging Face ConvNeXt state dict: {unknown[:10]}")
    return {to_released[k]: v for k, v in hf.items()}


def hf_convnext_config(cfg: ConvNeXtConfig) -> dict:
    """config.json of the Hugging Face DINOv3ConvNextModel with the architecture `cfg`."""
    return {
        "architectures": ["DINOv3ConvNextModel"],
        "model_type": "dinov3_convnext",
        "hidden_sizes": list(cfg.dims),
        "depths": list(cfg.depths),
        "num_channels": cfg.in_chans,
        "hidden_act": "gelu",  # exact GELU, as F.gelu in models/convnext.py
        "layer_norm_eps": cfg.norm_eps,
        "layer_scale_init_value": cfg.layerscale_init,
        "image_size": 224,
        "dtype": "float32",
    }
