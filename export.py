"""Take a backbone out of PyTorch: ONNX with RoPE at any resolution, and Hugging Face folders, both checked against
the project's own forward.

    python export.py onnx --checkpoint runs/demo/teacher_backbone.pth --out backbone.onnx
    python export.py onnx --checkpoint CKPT --out backbone.onnx --intermediate-layers 4 11 17 23
    python export.py hf --checkpoint CKPT --out dinov3-hf/   # then transformers.AutoModel.from_pretrained("dinov3-hf")

Checkpoints: anything models.checkpoint.load_any_backbone reads -- a released-format ViT or ConvNeXt backbone, Hugging
Face DINOv3ViTModel weights (state dict, .safetensors or save_pretrained folder), a train.py checkpoint or run folder
(the EMA teacher's backbone) or a distill.py checkpoint (the student's backbone).

ONNX: one input `pixel_values` [batch, channels, height, width] (float32, normalized as for the PyTorch model); batch,
height and width are dynamic, height and width multiples of the patch size. The RoPE coordinates and angles are
computed inside the graph from the patch grid (Range, Sin and Cos nodes): no table baked for one resolution and no
extra input. Outputs, the eval-mode model's final-norm features:
    ViT       class_token [B, C], register_tokens [B, R, C], patch_tokens [B, h*w, C] (row-major over the patch grid)
    ConvNeXt  class_token [B, C], patch_tokens [B, h*w, C] (the last stage resized to the 16-px grid, as in PyTorch)
    timm / torchvision students of distill.py: as ConvNeXt (the last feature map pooled and resized, the final norm;
              the adapters to the teacher's width are not part of the backbone); height and width dynamic down to
              the network's total stride
--intermediate-layers I J ... adds layer{I}_class_token, (ViT) layer{I}_register_tokens and layer{I}_patch_tokens for
those blocks (ViT) or stages (ConvNeXt), 0-based, as get_intermediate_layers(norm=True) gives them. Attention is
exported as plain operators (scaled_dot_product_attention, never the Triton kernel), in float32.

Hugging Face: config.json + model.safetensors that transformers.AutoModel.from_pretrained loads as DINOv3ViTModel
(ViT) or DINOv3ConvNextModel (ConvNeXt); written with safetensors alone (timm/torchvision backbones: ONNX only). DINOv3ViTModel's last_hidden_state is
[class, registers, patches] after the final norm, like the ONNX outputs; DINOv3ConvNextModel's is [pooled, stride-32
tokens] after the norm (Hugging Face does not resize to the 16-px grid).

Verification (on by default, --no-verify skips it): the ONNX file runs in onnxruntime (CPU) and the Hugging Face
folder in transformers at --verify-sizes, on random images, against the PyTorch model; every output's relative
error |out - ref| / |ref| must be at most 1e-4 (ONNX) or 1e-5 (Hugging Face), and the folder must load with no
missing or unexpected keys. The optional packages are in requirements/export.txt.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import tyro
from torch import nn

from models.checkpoint import (
    StateDict,
    convnext_to_hf,
    export_official,
    hf_convnext_config,
    hf_vit_config,
    load_any_backbone,
    official_to_hf,
)
from models.convnext import MIN_INPUT_SIZE, ConvNeXt
from models.external import ExternalBackbone
from models.vit import VisionTransformer

REQUIREMENTS = "requirements/export.txt"
ONNX_TOLERANCE = 1e-4
HF_TOLERANCE = 1e-5
INPUT_NAME = "pixel_values"

Size = tuple[int, int]
ErrorRow = tuple[Size, str, float]  # (image size, output name, relative error)


class ExportCheckFailed(RuntimeError):
    """The exported model does not reproduce the PyTorch model (or does not load where it should)."""


def require(package: str, purpose: str) -> ModuleType:
    """Import an optional package, or say which requirements file brings it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ModuleNotFoundError(
            f"{purpose} needs the optional package {package!r}, which is not installed: "
            f"pip install -r {REQUIREMENTS}"
        ) from err


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """|out - ref| / |ref| (Frobenius norms, float64); inf when the shapes differ."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    if ref.numel() == 0:
        return 0.0
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ====================================================================================================
# Inputs
# ====================================================================================================


def load_export_backbone(checkpoint: str | None) -> nn.Module:
    """The backbone of a checkpoint in eval mode, float32 on the CPU, attention through SDPA (exportable ops)."""
    backbone = load_any_backbone(checkpoint).float().eval()
    if isinstance(backbone, VisionTransformer):
        backbone.set_attn_impl("sdpa")
    return backbone


def min_side(backbone: nn.Module) -> int:
    if isinstance(backbone, ExternalBackbone):
        return backbone.min_input_size
    return MIN_INPUT_SIZE if isinstance(backbone, ConvNeXt) else backbone.patch_size


def check_sizes(sizes: tuple[Size, ...], backbone: nn.Module) -> None:
    """Image sizes must be multiples of the patch size (what the exported graph takes) and not too small."""
    p, smallest = backbone.patch_size, min_side(backbone)
    not_multiple = [f"{h}x{w}" for h, w in sizes if h % p or w % p]
    if not_multiple:
        fixed = ", ".join(f"{h - h % p}x{w - w % p}" for h, w in sizes if h % p or w % p)
        raise ValueError(
            f"image size(s) {', '.join(not_multiple)} are not multiples of the patch size {p}: the exported model "
            f"takes heights and widths that are multiples of {p}; use e.g. {fixed} (crop images to a multiple of {p})"
        )
    too_small = [f"{h}x{w}" for h, w in sizes if min(h, w) < smallest]
    if too_small:
        raise ValueError(f"image size(s) {', '.join(too_small)} are smaller than this backbone's smallest input "
                         f"side of {smallest} px")


def check_layers(layers: tuple[int, ...], backbone: nn.Module) -> list[int]:
    """The intermediate layers asked for, sorted (the order get_intermediate_layers returns them in)."""
    if isinstance(backbone, VisionTransformer):
        n, what = len(backbone.blocks), "blocks"
    else:
        n, what = len(backbone.stage_channels()) if isinstance(backbone, ExternalBackbone) else 4, "stages"
    outside = [i for i in layers if not 0 <= i < n]
    if outside:
        raise ValueError(f"--intermediate-layers {outside} are outside this backbone's {n} {what} (0 to {n - 1})")
    return sorted(set(layers))


def output_path(out: str | None, example: str) -> Path:
    if out is None:
        raise ValueError(f"no output given: pass --out {example}")
    return Path(out).expanduser()


# ====================================================================================================
# ONNX
# ====================================================================================================


class ViTGraph(nn.Module):
    """A VisionTransformer's eval-mode forward as a tuple of named outputs, for torch.onnx.

    Built from the model's own pieces rather than `forward`, whose per-crop-size RoPE cache is a dict keyed by the
    grid size (a symbolic size cannot be a dict key while exporting); verification compares the result with
    `forward` and `get_intermediate_layers` at several resolutions.
    """

    def __init__(self, vit: VisionTransformer, layers: list[int]):
        super().__init__()
        self.vit, self.layers = vit, layers

    def output_names(self) -> list[str]:
        names = ["class_token", "register_tokens", "patch_tokens"]
        return names + [f"layer{i}_{name}" for i in self.layers for name in names]

    def split(self, normed: torch.Tensor) -> list[torch.Tensor]:
        R = self.vit.n_prefix
        return [normed[:, 0], normed[:, 1:R], normed[:, R:]]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vit = self.vit
        tokens, (h, w) = vit.prepare_tokens(pixel_values, None)
        # h and w are symbolic while exporting: the coordinates and angles become graph nodes of the grid size.
        rope = vit.rope_embed(h, w)
        picked = []
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens, rope, vit.n_prefix)
            if i in self.layers:
                picked.append(vit.norm(tokens))
        outputs = self.split(vit.norm(tokens))
        for normed in picked:
            outputs += self.split(normed)
        return tuple(outputs)


class ConvNeXtGraph(nn.Module):
    """A ConvNeXt's (or a timm/torchvision backbone's) eval-mode forward (and chosen stages) as a tuple of named
    outputs, for torch.onnx; the stage features are computed once for all outputs."""

    def __init__(self, net: ConvNeXt | ExternalBackbone, layers: list[int]):
        super().__init__()
        self.net, self.layers = net, layers

    def output_names(self) -> list[str]:
        names = ["class_token", "patch_tokens"]
        return names + [f"layer{i}_{name}" for i in self.layers for name in names]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net = self.net
        grid = net.grid(pixel_values)
        maps = net.stage_features(pixel_values)
        normed = net.norm(net.tokens(maps[-1], grid))
        outputs = [normed[:, 0], normed[:, 1:]]
        for i in self.layers:
            tokens = net.tokens(maps[i], grid)
            if i == len(maps) - 1:  # only the last stage has a norm, as in get_intermediate_layers
                tokens = net.norm(tokens)
            outputs += [tokens[:, 0], tokens[:, 1:]]
        return tuple(outputs)


def graph_module(backbone: nn.Module, layers: list[int]) -> ViTGraph | ConvNeXtGraph:
    if isinstance(backbone, VisionTransformer):
        return ViTGraph(backbone, layers).eval()
    return ConvNeXtGraph(backbone, layers).eval()


def reference_outputs(backbone: nn.Module, layers: list[int], x: torch.Tensor) -> list[torch.Tensor]:
    """What the ONNX outputs must equal, from the model's own forward and get_intermediate_layers."""
    with torch.no_grad():
        out = backbone(x)
        if isinstance(backbone, VisionTransformer):
            refs = [out["x_norm_clstoken"], out["x_storage_tokens"], out["x_norm_patchtokens"]]
            if layers:
                for patches, cls, extra in backbone.get_intermediate_layers(
                    x, n=layers, return_class_token=True, return_extra_tokens=True
                ):
                    refs += [cls, extra, patches]
            return refs
        refs = [out["x_norm_clstoken"], out["x_norm_patchtokens"]]
        if layers:
            for patches, cls in backbone.get_intermediate_layers(x, n=layers, return_class_token=True):
                refs += [cls, patches]
        return refs


def export_onnx(backbone: nn.Module, out: Path, layers: list[int], opset: int) -> list[str]:
    """Write the ONNX file (dynamic batch, height, width); returns the output names."""
    graph = graph_module(backbone, layers)
    p = backbone.patch_size
    min_grid = math.ceil(min_side(backbone) / p)
    batch = torch.export.Dim("batch", min=1)
    grid_h = torch.export.Dim("grid_h", min=min_grid)
    grid_w = torch.export.Dim("grid_w", min=min_grid)
    # Batch 2 and two different grid sides above the minimum: no size of the example gets baked in as a constant.
    example = torch.randn(2, backbone.cfg.in_chans, p * (min_grid + 2), p * (min_grid + 3))
    program = torch.onnx.export(
        graph,
        (example,),
        input_names=[INPUT_NAME],
        output_names=graph.output_names(),
        dynamic_shapes=({0: batch, 2: p * grid_h, 3: p * grid_w},),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))  # weights inside the file, or next to it (<out>.data) past protobuf's 2 GB
    return graph.output_names()


def verify_onnx(path: Path, backbone: nn.Module, layers: list[int], sizes: tuple[Size, ...],
                batch: int = 2, seed: int = 0) -> list[ErrorRow]:
    """Relative error of every output of the ONNX file in onnxruntime (CPU) against the PyTorch model, per size."""
    ort = require("onnxruntime", "verifying the ONNX export (--no-verify skips it)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    if inputs != [INPUT_NAME]:
        raise ExportCheckFailed(f"the ONNX graph takes inputs {inputs}, expected only {INPUT_NAME!r}")
    names = [o.name for o in session.get_outputs()]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for h, w in sizes:
        x = torch.randn(batch, backbone.cfg.in_chans, h, w, generator=generator)
        outputs = session.run(None, {INPUT_NAME: x.numpy()})
        refs = reference_outputs(backbone, layers, x)
        rows += [((h, w), name, relative_error(torch.from_numpy(out), ref))
                 for name, out, ref in zip(names, outputs, refs, strict=True)]
    return rows


# ====================================================================================================
# Hugging Face
# ====================================================================================================


def hf_config_and_weights(backbone: nn.Module) -> tuple[dict, StateDict]:
    """config.json contents and the weights (save_pretrained's names, float32) of the Hugging Face model."""
    weights = {k: v.float() for k, v in export_official(backbone).items()}
    if isinstance(backbone, VisionTransformer):
        return hf_vit_config(backbone.cfg, weights), official_to_hf(weights)
    return hf_convnext_config(backbone.cfg), convnext_to_hf(weights)


def write_hf_folder(folder: Path, config: dict, weights: StateDict) -> None:
    save_file = require("safetensors.torch", "writing model.safetensors").save_file
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out {folder} is a file; the Hugging Face export writes a folder")
    folder.mkdir(parents=True, exist_ok=True)
    # Clones: q, k and v are views of one qkv tensor, and safetensors refuses tensors that share memory.
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in weights.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def hf_references(backbone: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor, int | slice]]:
    """(name, the project's tensor, which tokens of DINOv3*Model's last_hidden_state hold it)."""
    with torch.no_grad():
        if isinstance(backbone, VisionTransformer):
            out, R = backbone(x), backbone.n_prefix
            return [("class_token", out["x_norm_clstoken"], 0), ("register_tokens", out["x_storage_tokens"],
                    slice(1, R)), ("patch_tokens", out["x_norm_patchtokens"], slice(R, None))]
        last_stage = backbone.stage_features(x)[-1]
        pooled = backbone.norm(last_stage.mean(dim=(-2, -1)))
        stride32 = backbone.norm(last_stage.flatten(2).transpose(1, 2))
        return [("class_token", pooled, 0), ("stride32_tokens", stride32, slice(1, None))]


def verify_hf(folder: Path, backbone: nn.Module, sizes: tuple[Size, ...], batch: int = 2,
              seed: int = 0) -> list[ErrorRow]:
    """Load the folder with transformers (no missing/unexpected keys) and compare its outputs, per size."""
    transformers = require("transformers", "verifying the Hugging Face export (--no-verify skips it)")
    model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True, local_files_only=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ExportCheckFailed(f"transformers loaded {folder} with {problems}")
    expected = "DINOv3ViTModel" if isinstance(backbone, VisionTransformer) else "DINOv3ConvNextModel"
    if type(model).__name__ != expected:
        raise ExportCheckFailed(f"transformers built a {type(model).__name__} from {folder}, expected {expected}")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for h, w in sizes:
        x = torch.randn(batch, backbone.cfg.in_chans, h, w, generator=generator)
        with torch.no_grad():
            hidden = model(pixel_values=x).last_hidden_state
        rows += [((h, w), name, relative_error(hidden[:, tokens], ref))
                 for name, ref, tokens in hf_references(backbone, x)]
    return rows


# ====================================================================================================
# Command line
# ====================================================================================================


@dataclass
class ExportArgs:
    checkpoint: str | None = None  # ViT/ConvNeXt backbone, HF weights or folder, train.py/distill.py checkpoint
    out: str | None = None  # the .onnx file (onnx) or the folder (hf) to write
    verify: bool = True  # run the export against the PyTorch model afterwards (--no-verify skips it)
    verify_sizes: tuple[tuple[int, int], ...] = ((224, 224), (160, 288), (448, 448))  # H W pairs, multiples of 16
    verify_batch: int = 2


@dataclass
class OnnxArgs(ExportArgs):
    """ONNX with dynamic batch, height and width; RoPE computed in the graph; verified with onnxruntime."""

    intermediate_layers: tuple[int, ...] = ()  # also output these blocks (ViT) / stages (ConvNeXt), 0-based
    opset: int = 18


@dataclass
class HfArgs(ExportArgs):
    """A Hugging Face DINOv3ViTModel / DINOv3ConvNextModel folder (config.json + model.safetensors)."""


def print_errors(rows: list[ErrorRow], tolerance: float, what: str) -> None:
    print(f"relative error |{what} - PyTorch| / |PyTorch| (tolerance {tolerance:g}):")
    for (h, w), name, error in rows:
        print(f"  {h:>5d}x{w:<5d} {name:<28s} {error:.2e}")


def check_errors(rows: list[ErrorRow], tolerance: float, what: str) -> None:
    failed = [f"{name} at {h}x{w}: {error:.2e}" for (h, w), name, error in rows if not error <= tolerance]
    if failed:
        raise ExportCheckFailed(f"the {what} export differs from the PyTorch model by more than {tolerance:g}: "
                                f"{'; '.join(failed)}")


def check_common_args(args: ExportArgs) -> None:
    if not args.verify_sizes or any(h < 1 or w < 1 for h, w in args.verify_sizes):
        raise ValueError(f"--verify-sizes needs one or more positive H W pairs, got {args.verify_sizes}")
    if args.verify_batch < 1:
        raise ValueError(f"--verify-batch must be at least 1, got {args.verify_batch}")


def run_onnx(args: OnnxArgs) -> list[ErrorRow]:
    """Export to ONNX, then (unless --no-verify) compare with the PyTorch model; returns the error rows."""
    # Missing packages and bad arguments are reported before the checkpoint is read.
    require("onnx", "export.py onnx")
    require("onnxscript", "export.py onnx (torch.onnx's exporter)")
    if args.verify:
        require("onnxruntime", "verifying the ONNX export (--no-verify skips it)")
    out = output_path(args.out, "backbone.onnx")
    check_common_args(args)
    backbone = load_export_backbone(args.checkpoint)
    check_sizes(args.verify_sizes, backbone)
    layers = check_layers(args.intermediate_layers, backbone)
    names = export_onnx(backbone, out, layers, args.opset)
    print(f"wrote {out} ({type(backbone).__name__}; input {INPUT_NAME}; outputs {', '.join(names)})")
    if not args.verify:
        return []
    rows = verify_onnx(out, backbone, layers, args.verify_sizes, args.verify_batch)
    print_errors(rows, ONNX_TOLERANCE, "onnxruntime")
    check_errors(rows, ONNX_TOLERANCE, "ONNX")
    return rows


def run_hf(args: HfArgs) -> list[ErrorRow]:
    """Write the Hugging Face folder, then (unless --no-verify) load it with transformers and compare."""
    require("safetensors", "export.py hf")
    if args.verify:
        require("transformers", "verifying the Hugging Face export (--no-verify skips it)")
    folder = output_path(args.out, "dinov3-hf/")
    check_common_args(args)
    backbone = load_export_backbone(args.checkpoint)
    if isinstance(backbone, ExternalBackbone):
        raise ValueError(f"{backbone.cfg.spec} has no Hugging Face DINOv3 model class; export it with "
                         "`export.py onnx` (or load it with models.checkpoint.load_any_backbone)")
    check_sizes(args.verify_sizes, backbone)
    config, weights = hf_config_and_weights(backbone)
    write_hf_folder(folder, config, weights)
    print(f"wrote {folder}/config.json and model.safetensors ({config['architectures'][0]})")
    if not args.verify:
        return []
    rows = verify_hf(folder, backbone, args.verify_sizes, args.verify_batch)
    print_errors(rows, HF_TOLERANCE, "transformers")
    check_errors(rows, HF_TOLERANCE, "Hugging Face")
    return rows


SUBCOMMANDS = {"onnx": OnnxArgs, "hf": HfArgs}


def main(argv: list[str] | None = None) -> list[ErrorRow]:
    usage = "\n\n".join(__doc__.split("\n\n")[:2])
    args = tyro.extras.subcommand_cli_from_dict(SUBCOMMANDS, args=argv, description=usage)
    if isinstance(args, OnnxArgs):
        return run_onnx(args)
    return run_hf(args)


if __name__ == "__main__":
    main()
