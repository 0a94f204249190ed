"""Memory per GPU of a train.py run, on paper: what each rank holds for a preset on a cluster of a given size,
and the largest batch per GPU that fits.

    python -m bench.memory_model                                    # vit7b16 on 256 x 80 GB GPUs
    python -m bench.memory_model --preset vitl16 --gpus 32 --gpu-memory-gb 40
    python -m bench.memory_model --preset gram-anchor --batch-size 8
    python -m bench.memory_model --check                            # the model against a real CPU step

Pure arithmetic from the config (train.PRESETS, models.vit.VIT_ARCHS): nothing is allocated, no GPU is needed.
Per GPU (rank 0, the rank with the most rows when FSDP2 pads a shard), in bytes:
- parameters, gradients, AdamW moments, EMA teacher, Gram teacher: every tensor's exact shape, sharded over the
  ranks the way FSDP2's `fully_shard` does it (dim 0 split into ceil(rows / ranks), float32 master weights);
- FSDP2 working copies: the all-gathered parameters (in the compute dtype) of the units that stay gathered (the
  roots: each network's backbone root and heads; FSDP2 keeps a root gathered after its forward) and of two blocks
  (the one running, the one prefetched), plus, in backward, the unsharded gradients of the largest unit and their
  float32 copy for the reduce-scatter;
- activations: the tensors each op saves for the backward, derived from the shapes of a block (LayerNorm inputs
  and statistics, the qkv projection, flash attention's output and log-sum-exp -- never an N x N matrix --, the FFN
  hidden layers, the LayerScale inputs), of the embeddings, final norm, heads and losses, for the global and local
  crops, at the dtype each op produces (float32 on the CPU; on CUDA with bf16 autocast: matmul inputs and outputs
  in bf16, LayerNorm, normalize and log-softmax in float32, as autocast's op lists say); with activation
  checkpointing only each block's input is kept, and one block is recomputed at a time in the backward;
- checkpoint traffic: the bytes one checkpoint makes each rank write, for train.py's single file gathered on
  rank 0 (which also holds the whole state in host memory) and for a per-rank sharded checkpoint.
The largest batch per GPU is the largest `data.batch_size` whose peak fits in the GPU memory less a reserve (CUDA
context and cuBLAS workspace, NCCL buffers, the caching allocator's fragmentation; 8 GB by default: an
assumption, not a measurement).

`--check` runs real training steps of a small config on the CPU (one process, float32) and prints predicted
against measured: the parameter, gradient, optimizer and teacher bytes are counted from the tensors (they must
match exactly), the activations from the tensors autograd saves (saved-tensor hooks) and from the allocator
(torch.profiler's memory events), with and without activation checkpointing. tests/test_memory_model.py asserts
the same figures. What this machine cannot check: the CUDA/bf16 dtypes of each saved tensor (derived from
autocast's rules), the FSDP2 working copies (derived from its documented behaviour) and the reserve.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

import train
from models.vit import VIT_ARCHS, ViTConfig

GB = 1e9
GIB = 2**30
DEFAULT_RESERVE_GB = 8.0
BATCH_LIMIT = 4096  # largest_batch looks no further
CPU_RNG_STATE_BYTES = 5056  # torch.get_rng_state(): what a checkpointed block keeps to replay its dropout draws
BATCH = "the batch (crops, iBOT masks)"  # saved by the patch embedding and the masking, allocated by the loader


# ====================================================================================================
# Parameter shapes (the tensors train.py builds, by name)
# ====================================================================================================


def backbone_shapes(vit: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of models.vit.VisionTransformer with its shape (buffers excluded)."""
    C, p = vit.embed_dim, vit.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (C, vit.in_chans, p, p), "patch_embed.proj.bias": (C,),
        "cls_token": (1, 1, C),
    }
    if vit.n_storage_tokens:
        shapes["storage_tokens"] = (1, vit.n_storage_tokens, C)
    shapes["mask_token"] = (1, C)
    for i in range(vit.depth):
        shapes.update(block_shapes(vit, prefix=f"blocks.{i}."))
    shapes.update({"norm.weight": (C,), "norm.bias": (C,)})
    if vit.untie_global_and_local_cls_norm:
        shapes.update({"local_cls_norm.weight": (C,), "local_cls_norm.bias": (C,)})
    return shapes


def block_shapes(vit: ViTConfig, prefix: str = "") -> dict[str, tuple[int, ...]]:
    C, F = vit.embed_dim, vit.ffn_hidden
    shapes = {"norm1.weight": (C,), "norm1.bias": (C,), "attn.qkv.weight": (3 * C, C)}
    if vit.qkv_bias:
        shapes["attn.qkv.bias"] = (3 * C,)
    shapes["attn.proj.weight"] = (C, C)
    if vit.proj_bias:
        shapes["attn.proj.bias"] = (C,)
    shapes.update({"ls1.gamma": (C,), "norm2.weight": (C,), "norm2.bias": (C,)})
    layers = (("w1", F, C), ("w2", F, C), ("w3", C, F)) if vit.ffn == "swiglu" else (("fc1", F, C), ("fc2", C, F))
    for name, rows, cols in layers:
        shapes[f"mlp.{name}.weight"] = (rows, cols)
        if vit.ffn_bias:
            shapes[f"mlp.{name}.bias"] = (rows,)
    shapes["ls2.gamma"] = (C,)
    return {prefix + name: shape for name, shape in shapes.items()}


def head_shapes(in_dim: int, prototypes: int, hidden: int, bottleneck: int) -> dict[str, tuple[int, ...]]:
    """models.heads.DINOHead with its 3 layers."""
    return {"mlp.0.weight": (hidden, in_dim), "mlp.0.bias": (hidden,), "mlp.2.weight": (hidden, hidden),
            "mlp.2.bias": (hidden,), "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
            "last_layer.weight": (prototypes, bottleneck)}


def sslnet_shapes(cfg: train.TrainConfig) -> dict[str, tuple[int, ...]]:
    """Parameters of train.SSLNet (student or EMA teacher): backbone + DINO head + iBOT head."""
    m = cfg.model
    vit = vit_config(cfg)
    shapes = {f"backbone.{k}": v for k, v in backbone_shapes(vit).items()}
    for name, (k, hidden, bottleneck) in (("dino_head", (m.dino_prototypes, m.dino_hidden, m.dino_bottleneck)),
                                          ("ibot_head", (m.ibot_prototypes, m.ibot_hidden, m.ibot_bottleneck))):
        shapes.update({f"{name}.{key}": s for key, s in head_shapes(vit.embed_dim, k, hidden, bottleneck).items()})
    return shapes


def vit_config(cfg: train.TrainConfig) -> ViTConfig:
    return dataclasses.replace(VIT_ARCHS[cfg.model.arch], **train.vit_overrides(cfg.model))


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def shard_numel(shape: tuple[int, ...], ranks: int) -> int:
    """Elements of rank 0's FSDP2 shard: dim 0 cut into ceil(rows / ranks)-row pieces (rank 0 gets a full one)."""
    return math.ceil(shape[0] / ranks) * numel(shape[1:])


def fsdp_units(cfg: train.TrainConfig, net: str) -> dict[str, list[tuple[int, ...]]]:
    """The parameters of each FSDP2 unit of one network, as train.wrap_for_parallel shards them: every block, the
    backbone root (embeddings, tokens, final norms), each head (the Gram teacher: blocks and root only)."""
    shapes = sslnet_shapes(cfg)
    units: dict[str, list[tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if net == "gram" and not name.startswith("backbone."):
            continue
        parts = name.split(".")
        if parts[1] == "blocks":
            unit = f"block {parts[2]}"
        elif parts[0] == "backbone":
            unit = "backbone root"
        else:
            unit = parts[0]
        units.setdefault(unit, []).append(shape)
    return units


# ====================================================================================================
# Activations: what autograd saves, per crop group
# ====================================================================================================


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what the ops save: `compute` for matmul inputs/outputs and the FFN, `wide` for the
    ops that autocast runs in float32 (LayerNorm, normalize, log-softmax) and for the losses."""

    name: str
    compute: int  # 4 (float32) or 2 (bf16 autocast)
    wide: int = 4
    device: str = "cuda"

    @property
    def autocast(self) -> bool:
        return self.compute == 2


FP32_CPU = Precision("float32 (CPU)", 4, device="cpu")
FP32_CUDA = Precision("float32", 4, device="cuda")
BF16_CUDA = Precision("bf16 autocast", 2, device="cuda")


def attention_impl(cfg: train.TrainConfig, precision: Precision) -> str:
    """models.vit.attention's choice: the Triton kernel for bf16 on CUDA, SDPA (RoPE in PyTorch) otherwise."""
    impl = cfg.model.attn_impl
    if impl == "auto":
        return "triton" if precision.device == "cuda" and precision.autocast else "sdpa"
    return impl


def kept(batch: int, drop_path: float) -> int:
    """Samples a residual branch runs on (models.vit.add_residual: stochastic depth drops whole samples)."""
    return batch if drop_path == 0.0 else max(int(batch * (1 - drop_path)), 1)


def block_saved(vit: ViTConfig, tokens: int, patches: int, precision: Precision, attn: str,
                drop_path: float = 0.0, images: int = 1, residual: int = 4) -> dict[str, int]:
    """Bytes one block call saves for the backward, for `images` images of `tokens` tokens each (`patches` of them
    patch tokens), by tensor; `residual`: bytes per element of the residual stream (2 under FSDP2's bf16 mixed
    precision, which casts each block's input). With stochastic depth everything saved belongs to the kept
    samples: the branch input is a gathered copy, and the index_add that merges a branch's update keeps the
    update and the indices."""
    C, H, F = vit.embed_dim, vit.num_heads, vit.ffn_hidden
    c, w = precision.compute, precision.wide
    n = kept(images, drop_path) * tokens
    # A linear under autocast saves a bf16 copy of its float32 input (LayerNorm outputs are float32); each linear
    # makes its own copy (autocast caches casts of parameters only). Without autocast the LayerNorm output itself.
    linear_in = 2 if precision.autocast else 4
    saved = {
        "norm1 input (residual stream)": n * C * w,
        "norm1/norm2 mean and rstd": 2 * n * 2 * w,
        "qkv input": n * C * linear_in,
        "qkv output (q, k, v)": n * 3 * C * c,
        "attention output": n * C * c,
        "attention log-sum-exp": n * H * 4,
    }
    if attn == "triton":
        saved["RoPE coordinates"] = patches * 2 * 4  # float32 (row, col) of this call's box; no sin/cos tables
    if attn in ("sdpa", "xformers"):
        saved["rotated q and k (RoPE in PyTorch)"] = 2 * n * C * c
        # sin and cos tables (float32) of this call's RoPE box
        saved["RoPE sin/cos tables"] = 2 * patches * vit.head_dim * 4
        if precision.device == "cpu":  # CPU flash attention returns [B, H, N, D]: the reshape for proj copies
            saved["attention output, reshaped for proj"] = n * C * c
    saved["proj output (LayerScale input)"] = n * C * c
    saved["norm2 input (residual stream)"] = n * C * w
    ffn_inputs = 2 if vit.ffn == "swiglu" and precision.autocast else 1
    saved["FFN input"] = ffn_inputs * n * C * linear_in
    if vit.ffn == "swiglu":  # w1 out (silu input), silu out, w2 out, their product (w3 input)
        saved["FFN hidden (SwiGLU: 4 tensors)"] = 4 * n * F * c
    else:  # fc1 out (GELU input), GELU out (fc2 input)
        saved["FFN hidden (MLP: 2 tensors)"] = 2 * n * F * c
    saved["FFN output (LayerScale input)"] = n * C * c
    if drop_path > 0:
        saved["residual updates (index_add keeps them)"] = 2 * n * C * residual
        saved["stochastic depth indices"] = 2 * images * 8  # views of a randperm of the whole batch
    return saved


@dataclass(frozen=True)
class CropGroup:
    name: str
    images: int  # crops of this size on the rank (2B global, n_local * B local)
    size: int
    patches: int
    tokens: int
    masked: bool


def crop_groups(cfg: train.TrainConfig, batch: int) -> list[CropGroup]:
    """The student's crop groups; with a size schedule (high-resolution adaptation) the largest sizes."""
    vit = vit_config(cfg)
    global_size, local_size = cfg.data.global_size, cfg.data.local_size
    if cfg.data.size_schedule:
        global_size = max(g for g, _, _ in cfg.data.size_schedule)
        local_size = max(loc for _, loc, _ in cfg.data.size_schedule)
    groups = []
    for name, images, size, masked in (("global", 2 * batch, global_size, True),
                                       ("local", cfg.augment.n_local_crops * batch, local_size, False)):
        if images:
            patches = (size // vit.patch_size) ** 2
            groups.append(CropGroup(name, images, size, patches, patches + 1 + vit.n_storage_tokens, masked))
    return groups


def gram_teacher_size(cfg: train.TrainConfig) -> int:
    if cfg.data.size_schedule:
        return max(t for _, _, t in cfg.data.size_schedule)
    return cfg.data.gram_teacher_size or cfg.data.global_size


def expected_masked(cfg: train.TrainConfig, batch: int) -> int:
    """iBOT-masked patch tokens on a rank: mask_probability of the 2B global crops, a ratio drawn in mask_ratio
    (stratified: its mean on average)."""
    patches = crop_groups(cfg, batch)[0].patches
    return round(2 * batch * cfg.data.mask_probability * sum(cfg.data.mask_ratio) / 2 * patches)


def head_saved(in_dim: int, hidden: int, bottleneck: int, tokens: int, precision: Precision) -> int:
    """DINOHead on `tokens` tokens: its input, the two hidden layers before and after GELU, the bottleneck before
    and after L2 normalization (float32 under autocast, and its bf16 copy for the prototype layer), norms."""
    c, w = precision.compute, precision.wide
    if precision.autocast:
        per_token = in_dim * 2 + 4 * hidden * c + bottleneck * (w + w + 2) + 2 * w
    else:
        per_token = (in_dim + 4 * hidden + 2 * bottleneck) * w + 2 * w
    return tokens * per_token


def activations(cfg: train.TrainConfig, batch: int, precision: Precision, checkpointing: bool,
                n_masked: int | None = None, residual: int = 4) -> dict[str, int]:
    """Bytes held for the backward at the end of the forward (student + losses), by part; `residual`: bytes per
    element of the residual stream between blocks (see block_saved)."""
    vit = vit_config(cfg)
    m = cfg.model
    attn = attention_impl(cfg, precision)
    C, w = vit.embed_dim, precision.wide
    groups = crop_groups(cfg, batch)
    masked = expected_masked(cfg, batch) if n_masked is None else n_masked
    out: dict[str, int] = {}
    for g in groups:
        if checkpointing:  # the checkpoint keeps the block input
            blocks = vit.depth * g.images * g.tokens * C * residual
        else:
            blocks = vit.depth * sum(block_saved(vit, g.tokens, g.patches, precision, attn, m.drop_path_rate,
                                                 g.images, residual).values())
        out[f"blocks, {g.name} crops" + (" (inputs of the checkpoints)" if checkpointing else "")] = blocks
    if checkpointing:  # what each checkpoint keeps besides the input: the RoPE box, the RNG state (CPU memory)
        kept_extra = 0
        for g in groups:
            if attn in ("sdpa", "xformers"):
                kept_extra += 2 * g.patches * vit.head_dim * 4  # sin and cos tables (float32)
            if precision.device == "cpu":
                kept_extra += CPU_RNG_STATE_BYTES
        if kept_extra:
            out["blocks (RoPE tables, RNG states kept by the checkpoints)"] = vit.depth * kept_extra
    batch_tensors = embed = final = 0
    for g in groups:
        crops = g.images * 3 * g.size * g.size
        batch_tensors += crops * 4 + (g.images * g.patches if g.masked else 0)  # float32 crops, bool iBOT masks
        embed += crops * 2 if precision.autocast else 0  # the patch-embedding conv's bf16 copy of its input
        final += g.images * g.tokens * (C * w + 2 * w)  # final LayerNorm input and statistics
        if g.name == "global":  # the normed output: KoLeo saves a view of its class tokens, which keeps it all
            final += g.images * g.tokens * C * w
    out[BATCH] = batch_tensors
    if embed:
        out["patch embedding (bf16 crops)"] = embed
    out["final norm"] = final
    n_cls = sum(g.images for g in groups)
    out["DINO head"] = head_saved(C, m.dino_hidden, m.dino_bottleneck, n_cls, precision)
    out["iBOT head"] = head_saved(C, m.ibot_hidden, m.ibot_bottleneck, masked, precision)
    # log-softmax outputs (float32) of every student token, the teacher's Sinkhorn targets they are scored against
    out["DINO loss (log-probs, targets)"] = (n_cls + 2 * batch) * m.dino_prototypes * 4
    out["iBOT loss (log-probs, targets)"] = 2 * masked * m.ibot_prototypes * 4 + masked * 4
    if cfg.gram.enabled:
        g = groups[0]
        teacher_patches = (gram_teacher_size(cfg) // vit.patch_size) ** 2
        # the Gram teacher's patch features (float32 after its final norm), resampled to the student grid, and
        # the normalized student patches the loss keeps
        out["Gram (teacher features, resampled, normalized student)"] = (
            g.images * teacher_patches * C * 4 + 2 * g.images * g.patches * C * 4)
    return out


# ====================================================================================================
# The whole rank
# ====================================================================================================


@dataclass
class Prediction:
    preset: str
    gpus: int
    batch: int
    precision: Precision
    checkpointing: bool
    static: dict[str, int] = field(default_factory=dict)  # held the whole step
    activations: dict[str, int] = field(default_factory=dict)  # held from forward to backward
    transient: dict[str, int] = field(default_factory=dict)  # the largest short-lived extra (not summed: max)
    checkpoint: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.static.values()) + sum(self.activations.values()) + max(self.transient.values(), default=0)


def predict(cfg: train.TrainConfig, gpus: int, batch: int | None = None, precision: Precision | None = None,
            checkpointing: bool | None = None, n_masked: int | None = None, preset: str = "") -> Prediction:
    """Per-GPU bytes of one rank of `cfg` on `gpus` GPUs. precision: BF16_CUDA when the run uses bf16 (the default
    on GPUs), FP32_CPU for a CPU run. checkpointing: the config's run.activation_checkpointing by default."""
    batch = cfg.data.batch_size if batch is None else batch
    precision = precision or (BF16_CUDA if cfg.run.bf16 else FP32_CUDA)
    checkpointing = cfg.run.activation_checkpointing if checkpointing is None else checkpointing
    fsdp = cfg.run.parallel == "fsdp" and gpus > 1
    ddp = cfg.run.parallel == "ddp" and gpus > 1
    shapes = sslnet_shapes(cfg)
    backbone = [s for name, s in shapes.items() if name.startswith("backbone.")]

    def local(tensors) -> int:  # fp32 elements this rank stores of these tensors
        return sum(shard_numel(s, gpus) if fsdp else numel(s) for s in tensors)

    pred = Prediction(preset, gpus, batch, precision, checkpointing)
    n_student = local(shapes.values())
    pred.static["student parameters (fp32)"] = n_student * 4
    pred.static["gradients (fp32)"] = n_student * 4
    pred.static["AdamW moments (2 x fp32)"] = 2 * n_student * 4
    if precision.device == "cpu":  # AdamW's per-tensor step counters: float32 scalars on the CPU (there even on GPUs)
        pred.static["AdamW step counters"] = len(shapes) * 4
    pred.static["EMA teacher (fp32)"] = n_student * 4
    if cfg.gram.enabled:
        pred.static["Gram teacher (fp32)"] = local(backbone) * 4
    if ddp:
        pred.static["DDP gradient buckets (fp32)"] = n_student * 4
    if fsdp:
        gathered = 2 if precision.autocast else 4  # all-gathered in the mixed-precision param dtype
        units = fsdp_units(cfg, "student")
        unit_numel = {name: sum(numel(s) for s in tensors) for name, tensors in units.items()}
        roots = unit_numel["backbone root"] + unit_numel["dino_head"] + unit_numel["ibot_head"]
        largest_block = max(n for name, n in unit_numel.items() if name.startswith("block"))
        # roots stay gathered from their forward: the student's until its backward, the teacher's until the EMA
        # update reshards it, the Gram teacher's backbone root; plus the running and the prefetched block
        pred.static["FSDP gathered roots (student + teacher heads, backbone roots)"] = gathered * (
            2 * roots + (unit_numel["backbone root"] if cfg.gram.enabled else 0))
        pred.static["FSDP gathered blocks (running + prefetched)"] = gathered * 2 * largest_block
        largest_unit = max(unit_numel.values())
        pred.transient["backward: unsharded grads of the largest unit (+ fp32 reduce-scatter copy)"] = (
            largest_unit * (gathered + (4 if gathered != 4 else 0)))
    # FSDP2's mixed precision casts each block's input to bf16: the residual stream between blocks is bf16 then
    residual = 2 if fsdp and precision.autocast else precision.wide
    pred.activations = activations(cfg, batch, precision, checkpointing, n_masked, residual)
    if precision.autocast and not fsdp:  # autocast caches a bf16 copy of each weight that requires grad
        pred.activations["autocast's bf16 weight copies"] = n_student * 2

    vit = vit_config(cfg)
    groups = crop_groups(cfg, batch)
    attn = attention_impl(cfg, precision)
    biggest = max(groups, key=lambda g: g.images * g.tokens)
    residual_grads = 2 * biggest.images * biggest.tokens * vit.embed_dim * 4
    if checkpointing:
        recompute = max(sum(block_saved(vit, g.tokens, g.patches, precision, attn, cfg.model.drop_path_rate,
                                        g.images, residual).values()) for g in groups)
        pred.transient["backward: one block recomputed (+ residual-stream grads)"] = recompute + residual_grads
    masked = expected_masked(cfg, batch) if n_masked is None else n_masked
    n_cls = sum(g.images for g in groups)
    m = cfg.model
    logits = (2 * batch + n_cls) * m.dino_prototypes + (2 * masked) * m.ibot_prototypes  # teacher + student
    pred.transient["losses: teacher and student logits, float32 copies"] = logits * precision.compute + (
        n_cls * m.dino_prototypes + masked * m.ibot_prototypes) * 4
    pred.checkpoint = checkpoint_traffic(cfg, gpus)
    return pred


def checkpoint_traffic(cfg: train.TrainConfig, gpus: int) -> dict[str, int]:
    """Bytes of one checkpoint: train.py's single file (gathered on rank 0, which writes it and the released-format
    teacher backbone) against a per-rank sharded checkpoint (each rank writes its FSDP2 shards)."""
    shapes = sslnet_shapes(cfg)
    backbone = [s for name, s in shapes.items() if name.startswith("backbone.")]
    full = sum(numel(s) for s in shapes.values())
    # student, EMA teacher, two AdamW moments (+ the Gram teacher)
    state = full * 4 * 4 + (sum(numel(s) for s in backbone) * 4 if cfg.gram.enabled else 0)
    released = sum(numel(s) for s in backbone) * 4
    shard = sum(shard_numel(s, gpus) for s in shapes.values()) * 4 * 4 + (
        sum(shard_numel(s, gpus) for s in backbone) * 4 if cfg.gram.enabled else 0)
    return {
        "single file: rank 0 writes (checkpoint + teacher_backbone.pth)": state + released,
        "single file: rank 0 host memory for the gathered state": state,
        "single file: every other rank writes": 0,
        "single file: each rank sends to rank 0": shard,
        "sharded: each rank writes": shard,
    }


def largest_batch(cfg: train.TrainConfig, gpus: int, budget_bytes: float, checkpointing: bool,
                  precision: Precision | None = None, limit: int | None = None) -> int:
    """The largest batch per GPU whose predicted peak fits in budget_bytes (0: not even one image)."""
    best = 0
    for batch in range(1, (limit or BATCH_LIMIT) + 1):
        if predict(cfg, gpus, batch, precision, checkpointing).peak > budget_bytes:
            break
        best = batch
    return best


# ====================================================================================================
# Report
# ====================================================================================================


def _fits(batch: int) -> str:
    return f"at least {batch}" if batch == BATCH_LIMIT else str(batch)


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def report(cfg: train.TrainConfig, preset: str, gpus: int, gpu_memory_gb: float, reserve_gb: float) -> str:
    budget = gpu_memory_gb * GB - reserve_gb * GB
    pred = {ac: predict(cfg, gpus, checkpointing=ac, preset=preset) for ac in (True, False)}
    groups = crop_groups(cfg, cfg.data.batch_size)
    n_params = sum(numel(s) for s in sslnet_shapes(cfg).values())
    n_backbone = sum(numel(s) for k, s in sslnet_shapes(cfg).items() if k.startswith("backbone."))
    lines = [
        f"{preset}: {cfg.model.arch} ({n_backbone / 1e9:.2f}B backbone, {n_params / 1e9:.2f}B with heads), "
        f"{cfg.run.parallel} over {gpus} GPUs, batch {cfg.data.batch_size} per GPU, "
        + ", ".join(f"{g.images} x {g.size} px {g.name} crops ({g.tokens} tokens)" for g in groups)
        + f", drop path {cfg.model.drop_path_rate}, {pred[True].precision.name}, "
        f"attention {attention_impl(cfg, pred[True].precision)}"
        + (", Gram teacher" if cfg.gram.enabled else ""),
        "",
        "| per GPU (GiB) | with activation checkpointing | without |",
        "|---|---:|---:|",
    ]

    def row(name: str, a: int | None, b: int | None) -> None:
        lines.append(f"| {name} | {_gib(a) if a is not None else '':>8} | {_gib(b) if b is not None else '':>8} |")

    for name, value in pred[True].static.items():
        row(name, value, pred[False].static[name])
    for name in dict.fromkeys([*pred[True].activations, *pred[False].activations]):
        row(f"activations: {name}", pred[True].activations.get(name), pred[False].activations.get(name))
    for name in dict.fromkeys([*pred[True].transient, *pred[False].transient]):
        row(f"transient: {name}", pred[True].transient.get(name), pred[False].transient.get(name))
    row("**peak** (static + activations + largest transient)", pred[True].peak, pred[False].peak)
    per_image = {ac: (predict(cfg, gpus, cfg.data.batch_size + 1, checkpointing=ac).peak - pred[ac].peak)
                 for ac in (True, False)}
    row("each further image per GPU", per_image[True], per_image[False])
    fits = {ac: largest_batch(cfg, gpus, budget, ac) for ac in (True, False)}
    lines.append("")
    for g in groups:
        per = {ac: sum(v for k, v in pred[ac].activations.items() if k.startswith(f"blocks, {g.name}"))
               / cfg.data.batch_size for ac in (True, False)}
        lines.append(f"Block activations per image, {g.images // cfg.data.batch_size} {g.name} crops: "
                     f"{per[True] / GIB:.3f} GiB with checkpointing, {per[False] / GIB:.3f} GiB without.")
    lines += [
        "",
        f"Largest batch per GPU that fits {gpu_memory_gb:g} GB less a reserve of {reserve_gb:g} GB "
        f"({budget / GIB:.1f} GiB): {_fits(fits[True])} with activation checkpointing, {_fits(fits[False])} without "
        f"(the preset: {cfg.data.batch_size}, checkpointing {'on' if cfg.run.activation_checkpointing else 'off'}).",
        "",
        "Checkpoint traffic per checkpoint:",
    ]
    for name, value in pred[True].checkpoint.items():
        lines.append(f"  {name}: {value / GB:.2f} GB")
    return "\n".join(lines)


# ====================================================================================================
# Measurement on the CPU (the check)
# ====================================================================================================

# A small config whose every part runs in seconds on a CPU: ViT-tiny (4 blocks), 64 + 32 px crops, small heads,
# stochastic depth 0.4 as in the 7B recipe.
CHECK_ARGS = [
    "demo", "--model.arch", "vit_tiny", "--model.drop-path-rate", "0.4",
    "--model.dino-prototypes", "512", "--model.dino-hidden", "256",
    "--model.dino-bottleneck", "64", "--model.ibot-prototypes", "512", "--model.ibot-hidden", "256",
    "--model.ibot-bottleneck", "64", "--model.kernel-impl", "reference", "--model.attn-impl", "sdpa",
    "--data.global-size", "64", "--data.local-size", "32", "--augment.n-local-crops", "4", "--data.batch-size", "4",
    "--data.num-workers", "0", "--optim.freeze-last-layer-iterations", "0", "--run.device", "cpu",
    "--run.knn-every", "0", "--run.output-dir", "/nonexistent",
]


def check_config(*flags: str) -> train.TrainConfig:
    return train.parse_config([*CHECK_ARGS, *flags])


def saved_bytes(fn, *modules) -> int:
    """Bytes of the unique storages autograd saves while fn runs, the modules' parameters and buffers excluded."""
    import torch

    excluded = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def measure_cpu(cfg: train.TrainConfig, steps: int = 2) -> dict:
    """Run `steps` real training steps of cfg on the CPU in this process (float32, one rank) and measure, at the
    last step: the bytes of the student's parameters, gradients and AdamW state and of the teacher (from the
    tensors), the bytes autograd saves during forward_losses (unique storages, parameters excluded) and the net
    bytes the allocator holds when forward_losses returns (torch.profiler memory events); also the number of masked
    tokens of that batch."""
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile

    import runtime
    from data.datasets import ProceduralDataset, build_loader

    runtime.seed_everything(cfg.run.seed)
    dist_info = runtime.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    state = train.build_state(cfg, dist_info)
    student, teacher, gram_teacher, optimizer = state.student, state.teacher, state.gram_teacher, state.optimizer
    dataset = ProceduralDataset(n=64, size=max(cfg.data.global_size, 64), n_classes=4, seed=0)
    patch = student.backbone.patch_size
    loader = build_loader(dataset, dataclasses.replace(cfg.augment, patch_size=patch), train.crop_size_schedule(cfg),
                          batch_size=cfg.data.batch_size, seed=cfg.run.seed, num_workers=0, patch_size=patch,
                          mask_probability=cfg.data.mask_probability, mask_ratio=cfg.data.mask_ratio)
    data = iter(loader)
    if gram_teacher is not None:
        train.copy_weights(gram_teacher, teacher.backbone)
    nets = [net for net in (student, teacher, gram_teacher) if net is not None]
    measured: dict = {}
    for step in range(steps):
        batch = next(data)
        state.step = step
        sched = train.prepare_step(state, cfg, rank=0)
        last = step == steps - 1
        if not last:
            terms = train.forward_losses(state, batch, sched, False)
        else:
            out: dict = {}
            gc.collect()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                measured["saved_bytes"] = saved_bytes(
                    lambda: out.update(terms=train.forward_losses(state, batch, sched, False)), *nets)
            terms = out["terms"]
            measured["held_bytes"] = sum(e.self_cpu_memory_usage for e in prof.events())
            measured["n_masked"] = len(batch["mask_indices"])
        train.backward_and_update(state, terms["total"], sched, cfg.optim.clip_grad)
        if last:  # after the update: this step's gradients are still there (zero_grad runs before a backward)
            def nbytes(tensors):
                return sum(t.numel() * t.element_size() for t in tensors)

            measured["student parameters (fp32)"] = nbytes(student.parameters())
            measured["gradients (fp32)"] = nbytes(p.grad for p in student.parameters() if p.grad is not None)
            moments = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
            measured["AdamW moments (2 x fp32)"] = nbytes(moments)
            measured["AdamW step counters"] = nbytes(s["step"] for s in optimizer.state.values())
            measured["EMA teacher (fp32)"] = nbytes(teacher.parameters())
            if gram_teacher is not None:
                measured["Gram teacher (fp32)"] = nbytes(gram_teacher.parameters())
            measured["parameter shapes"] = {name: tuple(p.shape) for name, p in student.named_parameters()}
        del terms
    return measured


def check(flags: tuple[str, ...] = ()) -> list[dict]:
    """Predicted against measured for the check config, with and without activation checkpointing."""
    rows = []
    for ac in (False, True):
        cfg = check_config(*flags, *(["--run.activation-checkpointing"] if ac else []))
        measured = measure_cpu(cfg)
        pred = predict(cfg, gpus=1, precision=FP32_CPU, n_masked=measured["n_masked"])
        for name, value in pred.static.items():
            rows.append({"checkpointing": ac, "component": name, "predicted": value, "measured": measured[name]})
        # Saved-tensor hooks see every tensor autograd keeps (a checkpoint keeps its inputs that way too), but not
        # what a checkpoint keeps in Python (RoPE tables, RNG state); the allocator sees all that the forward
        # allocated and still holds, but not the batch, which the loader allocated before.
        blocks_python = "blocks (RoPE tables, RNG states kept by the checkpoints)"
        rows.append({"checkpointing": ac, "component": "activations: tensors saved for the backward",
                     "predicted": sum(v for k, v in pred.activations.items() if k != blocks_python),
                     "measured": measured["saved_bytes"]})
        rows.append({"checkpointing": ac, "component": "activations: allocator, held after the forward",
                     "predicted": sum(v for k, v in pred.activations.items() if k != BATCH),
                     "measured": measured["held_bytes"]})
    return rows


def format_check(rows: list[dict]) -> str:
    lines = ["| activation checkpointing | component | predicted (bytes) | measured (bytes) | predicted / measured |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'on' if r['checkpointing'] else 'off'} | {r['component']} | {r['predicted']:,} | "
                     f"{r['measured']:,} | {r['predicted'] / r['measured']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit7b16", choices=list(train.PRESETS))
    parser.add_argument("--gpus", type=int, default=256)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--reserve-gb", type=float, default=DEFAULT_RESERVE_GB,
                        help="kept free for the CUDA context, NCCL buffers and fragmentation")
    parser.add_argument("--batch-size", type=int, default=None, help="per GPU (default: the preset's)")
    parser.add_argument("--check", action="store_true", help="compare with real CPU steps of a small config")
    parser.add_argument("overrides", nargs="*", help="train.py flags, e.g. --run.parallel ddp (after --)")
    args = parser.parse_args(argv)
    if args.check:
        print(format_check(check(tuple(args.overrides))))
        return
    cfg = train.parse_config([args.preset, *args.overrides])
    if args.batch_size is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=args.batch_size))
    print(report(cfg, args.preset, args.gpus, args.gpu_memory_gb, args.reserve_gb))


if __name__ == "__main__":
    main()
