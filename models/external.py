"""Backbones from timm and torchvision as students and evaluation backbones, with the ViT's output dictionary.

A spec names one: `timm:<model name>` (`timm.create_model(name, pretrained=False, features_only=True)`; timm is an
optional dependency, requirements/timm.txt) or `torchvision:<model name>` (`torchvision.models.get_model(name,
weights=None)` cut by `torchvision.models.feature_extraction.create_feature_extractor` at the feature map its
classifier pools). Weights are never downloaded: the network starts at its library's random initialization, or takes
a local state dict file (`load_pretrained`: the library's own key names, classifier keys ignored).

The forward returns per crop what a ViT or the project's ConvNeXt returns:
    x_norm_clstoken     [B, C]     global average pool of the last feature map, through `norm`
    x_norm_patchtokens  [B, P, C]  the last feature map resized bilinearly to the 16-px grid, through `norm`
    x_storage_tokens    [B, 0, C], x_prenorm [B, 1 + P, C], masks (passed through)
`norm` is a LayerNorm over the channels added on top of the library's network (the released DINOv3 ConvNeXts end
with one too): it puts the pooled vector and the patches on the same scale for the heads, probes and k-NN.
timm's levels (`features_only` gives every stride) are the "stages" of `get_intermediate_layers`; a torchvision
extractor has one stage. iBOT masks: "ignore" (see models/convnext.py) or "pixel" (masked 16-px patches zeroed).

Saved backbones (`export_external`) are {"format": EXTERNAL_FORMAT, "spec", "weights"}: the spec rebuilds the
network, so `models.checkpoint.load_any_backbone` reads them, and distill.py checkpoints of such students.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from models.convnext import levels_as_vit_layers, mask_patch_pixels, pooled_and_grid_tokens
from models.vit import forward_crops

LIBRARIES = ("timm", "torchvision")
EXTERNAL_FORMAT = "dinov3-external-backbone"
PATCH_SIZE = 16  # the grid of the teacher's patch tokens that the feature map is resized to
# Where a torchvision classifier pools its last feature map (module, function or method names of the traced graph).
_POOLING_NODE = re.compile(r"(^|\.)(avgpool|adaptive_avg_pool2d|mean)(_\d+)?$")

MaskMode = Literal["ignore", "pixel"]


class SpecError(ValueError):
    """A student spec that names no usable backbone (unknown library or model, no spatial features, bad input)."""


@dataclass(frozen=True)
class ExternalConfig:
    spec: str  # "timm:resnet18", "torchvision:mobilenet_v3_small"
    in_chans: int = 3
    patch_size: int = PATCH_SIZE
    mask_mode: MaskMode = "ignore"


def is_external(arch: str) -> bool:
    """Whether a student/backbone name is a `library:model` spec."""
    return arch.partition(":")[0] in LIBRARIES and ":" in arch


def split_spec(spec: str) -> tuple[str, str]:
    library, _, name = spec.partition(":")
    if library not in LIBRARIES or not name:
        raise SpecError(f"{spec!r} is not a backbone spec: write timm:<model> or torchvision:<model>")
    return library, name


def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise SpecError("timm students need the timm package: pip install -r requirements/timm.txt") from err
    return timm


def _timm_extractor(name: str) -> nn.Module:
    timm = _import_timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:5]
        raise SpecError(f"timm has no model {name!r}" + (f" (close: {', '.join(close)})" if close else "")
                        + "; timm.list_models() lists them")
    try:
        # ViT-family models take any input size only with dynamic_img_size; convolutional ones reject the keyword.
        return timm.create_model(name, pretrained=False, features_only=True, dynamic_img_size=True)
    except TypeError:
        pass
    try:
        return timm.create_model(name, pretrained=False, features_only=True)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise SpecError(f"timm:{name} has no spatial feature maps (features_only: {err})") from err


def _pooled_map_node(model: nn.Module, spec: str) -> str:
    """The node of the traced classifier whose output its global pooling reads: the last feature map."""
    from torchvision.models.feature_extraction import get_graph_node_names

    _, nodes = get_graph_node_names(model, suppress_diff_warning=True)  # leaves the model's mode as it was
    pools = [i for i, node in enumerate(nodes) if _POOLING_NODE.search(node)]
    if not pools or pools[-1] == 0:
        raise SpecError(f"{spec} has no spatial feature map: its classifier pools no [B, C, H, W] map (a ViT reads "
                        "its class token); use a convolutional or hierarchical model")
    return nodes[pools[-1] - 1]


def _torchvision_extractor(name: str) -> nn.Module:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = [m for m in known if name.split("_")[0] in m][:5]
        raise SpecError(f"torchvision has no classification model {name!r}"
                        + (f" (close: {', '.join(close)})" if close else "")
                        + "; torchvision.models.list_models(module=torchvision.models) lists them")
    model = torchvision.models.get_model(name, weights=None)
    node = _pooled_map_node(model, f"torchvision:{name}")
    # The extractor keeps the model's mode: training mode, as a new module is (batch statistics, updated BN stats).
    return create_feature_extractor(model.train(), return_nodes={node: "map"})


def build_extractor(spec: str) -> nn.Module:
    """The library's feature extractor for `spec`, randomly initialized by the library (seed with torch first)."""
    library, name = split_spec(spec)
    return _timm_extractor(name) if library == "timm" else _torchvision_extractor(name)


class ExternalBackbone(nn.Module):
    """A timm or torchvision network's feature maps as the project's backbone interface (module docstring)."""

    def __init__(self, cfg: ExternalConfig, features: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.library, self.name = split_spec(cfg.spec)
        self.features = features if features is not None else build_extractor(cfg.spec)
        self.patch_size = cfg.patch_size
        self.n_storage_tokens = 0
        self.embed_dim = self.stage_channels()[-1]
        self.norm = nn.LayerNorm(self.embed_dim)

    def stage_channels(self) -> list[int]:
        if self.library == "timm":
            return list(self.features.feature_info.channels())
        return [self.map_shapes(224)[-1][1]]  # torchvision extractors do not record their widths

    @property
    def reduction(self) -> int:
        """The stride of the last feature map (the smallest input side that leaves it one pixel)."""
        if self.library == "timm":
            return int(self.features.feature_info.reduction()[-1])
        return 256 // self.map_shapes(256)[-1][-1]

    def map_shapes(self, size: int, batch: int = 2) -> list[torch.Size]:
        """The feature maps' shapes for [batch, C, size, size] images, from a forward on the meta device: no
        memory, no compute, and the real batch-norm statistics are not touched."""
        meta = {name: torch.empty_like(t, device="meta")
                for name, t in (*self.features.named_parameters(), *self.features.named_buffers())}
        x = torch.zeros(batch, self.cfg.in_chans, size, size, device="meta")
        with torch.no_grad():
            out = torch.func.functional_call(self.features, meta, (x,))
        return [m.shape for m in (out.values() if isinstance(out, dict) else out)]

    @property
    def min_input_size(self) -> int:
        return max(self.reduction, self.patch_size)

    @property
    def blocks(self) -> list[nn.Module]:
        return []  # no per-block structure that activation checkpointing could wrap

    @torch.no_grad()
    def init_weights(self) -> None:
        """The library's initialization again (seeded by the caller), norm reset."""
        self.features.load_state_dict(build_extractor(self.cfg.spec).state_dict())
        self.norm.reset_parameters()

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.features(x)
        return list(out.values()) if isinstance(out, dict) else list(out)

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every level's feature map [B, C_i, h_i, w_i] (timm: one per stride; torchvision: the last)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected images [B, {self.cfg.in_chans}, H, W], got {tuple(x.shape)}")
        return self._maps(x)

    def tokens(self, feature_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return pooled_and_grid_tokens(feature_map, grid)

    def forward_features_list(self, x_list: list[torch.Tensor],
                              masks_list: list[torch.Tensor | None]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for x, masks in zip(x_list, masks_list, strict=True):
            grid = self.grid(x)
            if masks is not None and self.cfg.mask_mode == "pixel":
                x = mask_patch_pixels(x, masks, self.patch_size)
            prenorm = self.tokens(self.stage_features(x)[-1], grid)
            normed = self.norm(prenorm)
            outputs.append({"x_norm_clstoken": normed[:, 0], "x_storage_tokens": normed[:, 1:1],
                            "x_norm_patchtokens": normed[:, 1:], "x_prenorm": prenorm, "masks": masks})
        return outputs

    def forward(self, x: torch.Tensor | list[torch.Tensor],
                masks: torch.Tensor | list[torch.Tensor | None] | None = None):
        """One tensor -> one output dict; a list of crop tensors (with a list of masks) -> a list of dicts."""
        return forward_crops(self.forward_features_list, x, masks)

    def get_intermediate_layers(self, x: torch.Tensor, n: int | list[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple:
        """Tokens of the last `n` levels (or the levels listed in `n`) on the 16-px grid; only the last is normed."""
        maps = self.stage_features(x)
        count = len(maps)
        wanted = list(range(count - n, count)) if isinstance(n, int) else list(n)
        if not wanted or not all(0 <= i < count for i in wanted):
            raise ValueError(f"asked for levels {wanted} of a backbone with {count} feature levels")
        grid = self.grid(x)
        return levels_as_vit_layers(maps, wanted, grid, self.tokens, self.norm if norm else None, reshape,
                                    return_class_token)


def build_external(spec: str, mask_mode: MaskMode = "ignore") -> ExternalBackbone:
    return ExternalBackbone(ExternalConfig(spec, mask_mode=mask_mode))


def set_batchnorm_momentum(module: nn.Module, momentum: float) -> None:
    """Every BatchNorm's running-statistics momentum. The libraries' own suit their long ImageNet schedules
    (torchvision's MobileNets and EfficientNets: 0.01); in a short distillation the running statistics would still
    be mostly their initial values at the end, and the eval-mode network (probes, export) would not be the trained
    one."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def spec_problem(spec: str, sizes: list[int]) -> str | None:
    """One line naming what keeps `spec` from training on square crops of `sizes` px, or None. Built and run on
    the meta device: no weights allocated, nothing computed, so it costs nothing before the teacher is read."""
    try:
        with torch.device("meta"):
            backbone = build_external(spec)
    except SpecError as err:
        return str(err)
    except Exception as err:  # a spec's model that its own library cannot build (or trace)
        return f"{spec} cannot be built: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    backbone.train()
    for size in sorted(set(sizes)):
        try:
            shapes = backbone.map_shapes(size)
        except Exception as err:  # the libraries raise many kinds (size asserts, empty convolutions, ...)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            return f"{spec} cannot take {size}x{size} px crops ({first}); use larger crops or another model"
        if len(shapes[-1]) != 4:
            return f"{spec} gives no spatial feature map (its output is {tuple(shapes[-1])})"
    return None


def load_pretrained(backbone: ExternalBackbone, path: str | Path) -> None:
    """Weights of the library's model from a local file (a state dict in the library's key names, e.g. a timm or
    torchvision checkpoint fetched by hand): every feature-extractor tensor must be there; the classifier's keys
    are ignored. Nothing is downloaded."""
    from models.checkpoint import CheckpointError, _strip_prefix, read_weights

    state_dict = read_weights(Path(path))
    for wrapper in ("state_dict", "model"):  # training scripts' checkpoints nest the weights
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    state_dict = _strip_prefix(state_dict)
    expected = backbone.features.state_dict()
    missing = [k for k in expected if k not in state_dict]
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or wrong:
        raise CheckpointError(f"{path} does not hold {backbone.cfg.spec}'s weights: "
                              + (f"missing {len(missing)} keys {missing[:5]}" if missing else "")
                              + ("; " if missing and wrong else "") + (f"shape mismatches {wrong[:3]}" if wrong else ""))
    backbone.features.load_state_dict({k: state_dict[k] for k in expected})


def export_external(backbone: ExternalBackbone) -> dict:
    """The saved form: the spec that rebuilds the network and its weights (CPU, contiguous copies)."""
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in backbone.state_dict().items()}
    return {"format": EXTERNAL_FORMAT, "spec": backbone.cfg.spec, "weights": weights}


def load_external(spec: str, weights: dict[str, torch.Tensor]) -> ExternalBackbone:
    """The backbone of `spec` holding `weights` (its state dict: `features.*`, `norm.*`), strictly."""
    from models.checkpoint import CheckpointError

    backbone = build_external(spec)
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"the saved weights do not fit {spec} (another model?): {str(err)[:300]}") from err
    return backbone
