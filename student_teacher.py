"""The networks a self-distillation run trains: a backbone with its DINO and iBOT heads (`SSLNet`), the student and
its EMA teacher, and how they are spread over processes (DDP, or FSDP2 per block) and over memory (activation
checkpointing).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

import runtime
from config import ModelConfig, RunConfig
from models.heads import DINOHead
from models.vit import VisionTransformer, build_vit
from objective import StudentOutputs, TeacherOutputs


def vit_overrides(cfg: ModelConfig) -> dict:
    """The ViT fields this config sets on top of its architecture's (models/vit.py holds the defaults)."""
    fields = {"layerscale_init": cfg.layerscale_init, "rope_jitter_per": cfg.rope_jitter_per,
              "patch_size": cfg.patch_size}
    return {name: value for name, value in fields.items() if value is not None}


def multi_crop_tokens(backbone: nn.Module, global_crops: torch.Tensor, local_crops: torch.Tensor,
                  masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One backbone pass over the global crops (iBOT-masked by `masks`) and the local crops, if any: the class tokens
    of every crop [(2 + n_local) B, C], crop-major, and the global crops' class tokens [2B, C] and patch tokens
    [2B, P, C]."""
    crops = [global_crops] + ([local_crops] if local_crops.numel() else [])
    outs = backbone(crops, [masks] + [None] * (len(crops) - 1))
    cls_tokens = torch.cat([o["x_norm_clstoken"] for o in outs])
    return cls_tokens, outs[0]["x_norm_clstoken"], outs[0]["x_norm_patchtokens"]


class SSLNet(nn.Module):
    """A backbone with its DINO (class token) and iBOT (patch tokens) heads."""

    def __init__(self, cfg: ModelConfig, drop_path_rate: float, embeddings: bool = False):
        super().__init__()
        # embeddings: the heads give their normalized bottleneck embeddings instead of prototype scores (the
        # coding-rate objective); the prototype layers are then unused, which DDP must be told.
        self.backbone: VisionTransformer = build_vit(cfg.arch, drop_path_rate=drop_path_rate, attn_impl=cfg.attn_impl,
                                                     **vit_overrides(cfg))
        dim = self.backbone.embed_dim
        self.dino_head = DINOHead(dim, cfg.dino_prototypes, cfg.dino_hidden, cfg.dino_bottleneck,
                                  normalize_prototypes=cfg.normalize_prototypes, embeddings_only=embeddings)
        self.ibot_head = DINOHead(dim, cfg.ibot_prototypes, cfg.ibot_hidden, cfg.ibot_bottleneck,
                                  normalize_prototypes=cfg.normalize_prototypes, embeddings_only=embeddings)

    def forward(self, global_crops, local_crops, masks, mask_indices) -> StudentOutputs:
        """Student pass over all crops: DINO logits of every crop, iBOT logits of the masked patches, the class
        tokens of the global crops (KoLeo) and their patch tokens (Gram anchoring)."""
        cls_tokens, cls_global, global_patches = multi_crop_tokens(self.backbone, global_crops, local_crops, masks)
        masked_patches = global_patches.flatten(0, 1).index_select(0, mask_indices)
        return StudentOutputs(self.dino_head(cls_tokens), self.ibot_head(masked_patches), cls_global, global_patches)

    @torch.no_grad()
    def teacher_forward(self, global_crops, mask_indices) -> TeacherOutputs:
        out = self.backbone(global_crops)
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        cls_tokens = out["x_norm_clstoken"]
        return TeacherOutputs(self.dino_head(cls_tokens), self.ibot_head(patches), cls_tokens)


def build_student_teacher(cfg: ModelConfig, embeddings: bool = False) -> tuple[SSLNet, SSLNet]:
    """Student and EMA teacher at the same initialization; `embeddings`: see SSLNet."""
    student = SSLNet(cfg, cfg.drop_path_rate, embeddings)
    teacher = SSLNet(cfg, drop_path_rate=0.0, embeddings=embeddings)
    teacher.load_state_dict(student.state_dict())
    # Evaluation mode, as the official loop keeps it: no dropped paths and no RoPE box jitter for the teacher.
    teacher.requires_grad_(False).eval()
    return student, teacher


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """dst's parameters := src's (same architecture; FSDP2 shards copied shard by shard)."""
    _reshard(src)
    _reshard(dst)
    for d, s in zip(dst.parameters(), src.parameters(), strict=True):
        _local(d).copy_(_local(s))


@torch.no_grad()
def ema_update(teacher: SSLNet, student: SSLNet, momentum: float) -> None:
    _reshard(teacher)
    t_params = [_local(p) for p in teacher.parameters()]
    s_params = [_local(p.detach()) for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def _reshard(net: nn.Module) -> None:
    """FSDP2 keeps a root module's parameters gathered after its forward (expecting a backward); the teacher
    has no backward, so its modules are resharded explicitly before the EMA update touches the shards."""
    for module in net.modules():
        if hasattr(module, "reshard") and hasattr(module, "unshard"):
            module.reshard()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 parameter (a DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def wrap_for_parallel(student: SSLNet, teacher: SSLNet, cfg: RunConfig, dist_info: runtime.Dist,
                      gram_teacher: VisionTransformer | None = None) -> nn.Module:
    """DDP around the student, or FSDP2 `fully_shard` per block (student, teacher, Gram teacher sharded alike)."""
    if cfg.activation_checkpointing:
        checkpoint_activations(student.backbone.blocks)
    if cfg.parallel == "fsdp" and dist_info.enabled:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if (
            dist_info.device.type == "cuda" and cfg.bf16) else MixedPrecisionPolicy()
        # FSDP2 hooks its pre-backward all-gather onto every output of a sharded module and warns (on every rank,
        # every step) when an output is a view, which an in-place op could strip of the hook. The backbone's outputs
        # are views -- class token, registers and patch tokens are slices of one normalized tensor -- but nothing
        # modifies them in place (torch.cat, index_select, the heads and the Gram loss read them), and the FSDP runs
        # of tests/test_train.py match one process on the whole batch to 1e-5. Cloning them would copy every patch
        # token of every crop for nothing.
        warnings.filterwarnings("ignore",
                                message=r"FSDP2-wrapped module \(FSDPVisionTransformer\) returned a view tensor")
        # Backbone and heads are sharded units of their own (not the SSLNet root), so the teacher's
        # teacher_forward, which calls them directly, triggers their all-gathers too.
        for net in (student, teacher):
            for block in net.backbone.blocks:
                fully_shard(block, mp_policy=mp)
            for part in (net.backbone, net.dino_head, net.ibot_head):
                fully_shard(part, mp_policy=mp)
        if gram_teacher is not None:  # sharded like the teacher's backbone, so copy_weights pairs equal shards
            for block in gram_teacher.blocks:
                fully_shard(block, mp_policy=mp)
            fully_shard(gram_teacher, mp_policy=mp)
        return student
    if dist_info.enabled:
        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(student, device_ids=device_ids,
                                                   find_unused_parameters=student.dino_head.embeddings_only)
    return student


def checkpoint_activations(blocks: nn.ModuleList) -> None:
    """Each block keeps only its input and recomputes its activations in backward (memory for compute)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
