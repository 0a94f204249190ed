"""RoPE-box-jittered attention: out = softmax(rot(q) rot(k)^T * scale) v, fused in flash-attention kernels.

rot is DINOv3's axial 2-D RoPE (models/rope.py) applied to the patch tokens; the first `n_prefix` tokens
(class + registers) are not rotated. The kernels never see a sin/cos table: they get the per-token
coordinates (which already carry the training-time box shift/jitter/rescale) and the D/4 periods, and
compute the angles in registers. So any jitter works with no table to rebuild, and nothing of size N x N
exists anywhere: the forward keeps a running max and sum per query (online softmax) and saves the
log-sum-exp ([B, H, N]); the backward recomputes the scores block by block.

Layout. q, k, v are [B, N, H, D] with arbitrary strides (normally the q/k/v views `unbind(2)` of the qkv
projection's [B, N, 3, H, D] output): the kernels index them through their strides, nothing is transposed
or copied. The output is a new contiguous [B, N, H, D] tensor, so `out.reshape(B, N, H * D)` feeds the
output projection for free.

RoPE in halves. Angles are tiled twice along D, so with x = [x1, x2] (D/2 each) the rotation is
    r1 = x1 cos - x2 sin,   r2 = x2 cos + x1 sin
with one [tokens, D/2] angle block, and scores split as r1q r1k^T + r2q r2k^T (two dots of depth D/2).
The rotation is orthogonal, so the backward computes dq and dk in the rotated frame and turns them back
with the opposite angle.

RoPE: two placements (`rope_mode`). "inline": each program computes the angles, sines and cosines of the tiles
it loads, so a key block is rotated again by every query block that visits it (D/2 sines and cosines per key
element per query block, on the special-function unit that also evaluates the softmax's exp2: +50 % of that unit's
work at BLOCK_M = 128, +100 % at 64). "prerotate": a prologue kernel writes rot(q) and rot(k) once to head-major
[B, H, N, D] buffers (one read and one write of q and k, two extra buffers alive during the call; the backward
rotates again rather than keeping them), the attention loops then load plain tiles, and only the finished dq and
dk tiles are turned back, once per program. Which is faster depends on N (PREROTATE_MIN_TOKENS).

Kernels: a forward (one program per query block and (batch, head), looping over key blocks); a backward
in the FlashAttention-2 layout without atomics (so it is deterministic): delta = rowsum(dO * O), then one
program per key block looping over query blocks for dk/dv and one per query block looping over key blocks
for dq. Scores are kept in log2 units (scale * log2(e) folded into the operand loaded once) so the
softmax uses exp2. Accumulation is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import triton
import triton.language as tl

from dino_kernels.common import (
    KernelImpl,
    interpreting,
    launch,
    new_buffer,
    quick_benchmark,
    shared_memory_limit,
    use_triton,
)

TRITON_HEAD_DIMS = (32, 64, 128)

# Where the RoPE rotation happens on the Triton path (module docstring, "RoPE: two placements"). The prologue wins
# on long sequences and loses on short ones (local crops), where its extra pass over q and k outweighs the saved
# sines and cosines; rope_mode=None picks by sequence length at this threshold (measurements: docs/kernels.md).
RopeMode = Literal["inline", "prerotate"]
PREROTATE_MIN_TOKENS = 128

# fp32 (and fp64) inputs on a GPU: the Triton kernels run tf32x3 dots there, and their first GPU run ended in an
# illegal memory access in the forward's autotuning (docs/kernels.md). Until a GPU session finds the faulty tile,
# "auto" runs 32- and 64-bit attention on CUDA as the reference (the ViT's attn_impl="auto" as SDPA, which has fp32
# kernels) and a forced impl="triton" refuses it. The interpreter tests and the compile checks still cover these
# tiles (tests/test_compile.py).
FP32_TRITON_ON_GPU = False


def runs_on_gpu(dtype: torch.dtype) -> bool:
    """Whether the Triton kernel takes CUDA inputs of this dtype (FP32_TRITON_ON_GPU)."""
    return dtype in (torch.float16, torch.bfloat16) or FP32_TRITON_ON_GPU


def uses_triton(q: torch.Tensor, impl: KernelImpl) -> bool:
    """`rope_attention`'s dispatch for inputs like q: dino_kernels.common's rule, except that CUDA inputs of a dtype
    the kernel does not take there (`runs_on_gpu`) run the reference under "auto" and raise under "triton"."""
    runs = use_triton(q, impl, "rope_attention")
    if runs and q.is_cuda and not runs_on_gpu(q.dtype):
        if impl == "triton":
            raise RuntimeError(
                f"rope_attention: the Triton kernel is disabled for {q.dtype} on GPUs (its first GPU run hit an "
                "illegal memory access; see FP32_TRITON_ON_GPU in dino_kernels/rope_attention.py); use bf16/fp16 inputs "
                "(autocast) or impl='reference'"
            )
        return False
    return runs


_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_TWO_PI = tl.constexpr(6.283185307179586)

# Integer arguments Triton must not specialize on (by default it compiles separate variants for values divisible
# by 16 and for 1): with these left generic, every batch, head count and sequence length runs one binary per
# constexpr set, so a compile cache warmed at any shape serves all of them.
_SHAPE_ARGS = ["H", "N", "N_TUNE", "n_prefix"]

# Fixed blocks under the interpreter: small enough to be quick, different for the two loop axes so a
# mix-up between them shows, and smaller than the test sequences so every kernel runs several blocks.
_INTERPRETER_BLOCK_OUTER = 32
_INTERPRETER_BLOCK_INNER = 16


# ----------------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------------


def rope_angles(coords: torch.Tensor, periods: torch.Tensor) -> torch.Tensor:
    """Angles [N, D]: 2*pi*coord/period for [axis-h periods, axis-w periods], tiled twice."""
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # [N, 2, D/4]
    return angles.flatten(1, 2).tile(2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of x ([..., N, D]) by the angles whose sin/cos are given ([N, D])."""
    return x * cos + rotate_half(x) * sin


def rope_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: torch.Tensor | None,
    periods: torch.Tensor | None,
    n_prefix: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch: RoPE on the patch tokens of q and k, then softmax attention, all in float32 or wider.

    Computes in float64 when given float64 (the tests' ground truth), float32 otherwise. Returns a contiguous
    [B, N, H, D] tensor in q's dtype.
    """
    _check_inputs(q, k, v, coords, periods, n_prefix)
    compute = torch.promote_types(q.dtype, torch.float32)
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    qh, kh, vh = (t.transpose(1, 2).to(compute) for t in (q, k, v))  # [B, H, N, D]
    if coords is not None:
        angles = rope_angles(coords.to(compute), periods.to(compute))
        sin, cos = angles.sin(), angles.cos()
        qh = torch.cat([qh[..., :n_prefix, :], apply_rope(qh[..., n_prefix:, :], sin, cos)], dim=-2)
        kh = torch.cat([kh[..., :n_prefix, :], apply_rope(kh[..., n_prefix:, :], sin, cos)], dim=-2)
    attn = torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)
    return (attn @ vh).transpose(1, 2).to(q.dtype).contiguous()


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: torch.Tensor | None,
    periods: torch.Tensor | None,
    n_prefix: int,
) -> None:
    if q.ndim != 4:
        raise ValueError(f"rope_attention: q must be [B, N, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"rope_attention: q, k, v must have the same [B, N, H, D] shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"rope_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"rope_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    n_tokens, head_dim = q.shape[1], q.shape[3]
    if n_tokens < 1:
        raise ValueError("rope_attention: the sequence is empty (N = 0)")
    if not 0 <= n_prefix <= n_tokens:
        raise ValueError(f"rope_attention: n_prefix must be in [0, N={n_tokens}], got {n_prefix}")
    if (coords is None) != (periods is None):
        raise ValueError("rope_attention: pass both coords and periods for RoPE, or neither for plain attention")
    if coords is None:
        return
    if head_dim % 4 != 0:
        raise ValueError(f"rope_attention: RoPE needs a head dim divisible by 4, got {head_dim}")
    if coords.shape != (n_tokens - n_prefix, 2):
        raise ValueError(
            f"rope_attention: coords must be [N - n_prefix, 2] = [{n_tokens - n_prefix}, 2] "
            f"(one (row, col) per patch token), got {tuple(coords.shape)}"
        )
    if periods.shape != (head_dim // 4,):
        raise ValueError(
            f"rope_attention: periods must be [D/4] = [{head_dim // 4}] for head dim {head_dim}, "
            f"got {tuple(periods.shape)}"
        )
    if not (coords.is_floating_point() and periods.is_floating_point()):
        raise ValueError(
            f"rope_attention: coords and periods must be floating point (float32), got {coords.dtype}, {periods.dtype}"
        )
    if coords.device != q.device or periods.device != q.device:
        raise ValueError(
            f"rope_attention: coords ({coords.device}) and periods ({periods.device}) must be on q's device "
            f"({q.device}); move them with .to(q.device)"
        )


# ----------------------------------------------------------------------------------------------------
# Triton building blocks
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _frequencies(Periods, stride_p, HEAD_DIM: tl.constexpr, ACC: tl.constexpr):
    """Per slot of a half head (D/2): 1/period and whether the slot rotates with the row coordinate."""
    HALF: tl.constexpr = HEAD_DIM // 2
    QUARTER: tl.constexpr = HEAD_DIM // 4
    slots = tl.arange(0, HALF)
    inv_periods = 1.0 / tl.load(Periods + (slots % QUARTER) * stride_p).to(ACC)
    return inv_periods, slots < QUARTER


@triton.jit
def _rope_sin_cos(
    Coords, stride_ct, stride_ca, tokens, n_prefix, N, inv_periods, row_axis,
    ACC: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """sin and cos [tokens, D/2] of the RoPE angles; prefix and out-of-range tokens get angle 0 (identity)."""
    patch = tokens - n_prefix
    is_patch = (patch >= 0) & (tokens < N)
    row = tl.load(Coords + patch * stride_ct, mask=is_patch, other=0.0).to(ACC)
    col = tl.load(Coords + patch * stride_ct + stride_ca, mask=is_patch, other=0.0).to(ACC)
    turns = tl.where(row_axis[None, :], row[:, None], col[:, None]) * inv_periods[None, :]
    # Remove whole turns first (subtracting the nearest integer is exact), so the hardware sine and cosine,
    # accurate only on [-pi, pi], get an argument in that range whatever the box jitter did to the coords.
    angle = (turns - tl.floor(turns + 0.5)) * _TWO_PI
    if FAST_TRIG:
        # One special-function-unit op each (abs. error ~5e-7 on [-pi, pi]); libdevice's sinf/cosf cost ~30
        # FMA-pipe instructions, paid for every key element by every query block.
        sin = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [angle], tl.float32, True, 1)
        cos = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [angle], tl.float32, True, 1)
    else:
        sin = tl.sin(angle)
        cos = tl.cos(angle)
    return sin, cos


@triton.jit
def _rotate(x1, x2, sin, cos):
    """Rotate-half RoPE on the two halves of a head; pass -sin to undo it (the transpose rotation)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _load_rows(base, tokens, stride_t, stride_d, N, WIDTH: tl.constexpr, MASKED: tl.constexpr):
    """Rows `tokens` x WIDTH leading dims of one (batch, head); rows past N read as 0 when MASKED."""
    dims = tl.arange(0, WIDTH)
    ptrs = base + tokens[:, None] * stride_t + dims[None, :] * stride_d
    if MASKED:
        return tl.load(ptrs, mask=tokens[:, None] < N, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_rotated(
    base, tokens, stride_t, stride_d, N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis, factor,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    FAST_TRIG: tl.constexpr, MASKED: tl.constexpr,
):
    """The two halves of rot(x) * factor for a block of tokens, rotated in ACC precision, cast for the dots."""
    HALF: tl.constexpr = HEAD_DIM // 2
    x1 = _load_rows(base, tokens, stride_t, stride_d, N, HALF, MASKED).to(ACC)
    x2 = _load_rows(base + HALF * stride_d, tokens, stride_t, stride_d, N, HALF, MASKED).to(ACC)
    if HAS_ROPE:
        sin, cos = _rope_sin_cos(
            Coords, stride_ct, stride_ca, tokens, n_prefix, N, inv_periods, row_axis, ACC, FAST_TRIG
        )
        x1, x2 = _rotate(x1, x2, sin, cos)
    return (x1 * factor).to(DOT), (x2 * factor).to(DOT)


@triton.jit
def _store_rotated_back(
    base, tokens, stride_t, stride_d, N, g1, g2, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, ACC: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """Store a gradient computed in the rotated frame, turned back by the opposite angle."""
    HALF: tl.constexpr = HEAD_DIM // 2
    if HAS_ROPE:
        sin, cos = _rope_sin_cos(
            Coords, stride_ct, stride_ca, tokens, n_prefix, N, inv_periods, row_axis, ACC, FAST_TRIG
        )
        g1, g2 = _rotate(g1, g2, -sin, cos)
    dims = tl.arange(0, HALF)
    ptrs = base + tokens[:, None] * stride_t + dims[None, :] * stride_d
    valid = tokens[:, None] < N
    tl.store(ptrs, g1.to(base.dtype.element_ty), mask=valid)
    tl.store(ptrs + HALF * stride_d, g2.to(base.dtype.element_ty), mask=valid)


@triton.jit
def _scores(a1, a2, b1, b2, PRECISION: tl.constexpr):
    """a . b^T over a full head from its two halves."""
    partial = tl.dot(a1, tl.trans(b1), input_precision=PRECISION)
    return tl.dot(a2, tl.trans(b2), partial, input_precision=PRECISION)


# ----------------------------------------------------------------------------------------------------
# RoPE prologue (rope_mode="prerotate"): rotate q and k once, so the attention loops load them as they are
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_rows_into(
    x_base, r_base, rows, stride_xn, stride_xd, stride_rn, stride_rd, N, Coords, stride_ct, stride_ca, n_prefix,
    inv_periods, row_axis, HEAD_DIM: tl.constexpr, ACC: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    x1, x2 = _load_rotated(
        x_base, rows, stride_xn, stride_xd, N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis, 1.0,
        HEAD_DIM, True, ACC, ACC, FAST_TRIG, True,
    )
    _store_rotated_back(
        r_base, rows, stride_rn, stride_rd, N, x1, x2, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
        HEAD_DIM, False, ACC, FAST_TRIG,
    )


@triton.jit(do_not_specialize=["H", "N", "n_prefix"])
def _rope_prologue_kernel(
    Q, K, QR, KR, Coords, Periods,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_rb, stride_rn, stride_rh, stride_rd,
    stride_ct, stride_ca, stride_p,
    H, N, n_prefix,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """rot(q) and rot(k) for one block of tokens of one (batch, head), into QR and KR (which share strides)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    inv_periods, row_axis = _frequencies(Periods, stride_p, HEAD_DIM, ACC)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_offset = b * stride_rb + h * stride_rh
    _rotate_rows_into(
        Q + b * stride_qb + h * stride_qh, QR + r_offset, rows, stride_qn, stride_qd, stride_rn, stride_rd, N,
        Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis, HEAD_DIM, ACC, FAST_TRIG,
    )
    _rotate_rows_into(
        K + b * stride_kb + h * stride_kh, KR + r_offset, rows, stride_kn, stride_kd, stride_rn, stride_rd, N,
        Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis, HEAD_DIM, ACC, FAST_TRIG,
    )


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_key_block(
    acc, m_i, l_i, q1, q2, k_base, v_base, start_n, stride_kn, stride_kd, stride_vn, stride_vd, N,
    Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):
    """One online-softmax step: fold the key block starting at start_n into (acc, running max, running sum)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k1, k2 = _load_rotated(
        k_base, cols, stride_kn, stride_kd, N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis, 1.0,
        HEAD_DIM, HAS_ROPE, ACC, DOT, FAST_TRIG, MASKED,
    )
    s = _scores(q1, q2, k1, k2, PRECISION)  # log2 units: q carries scale * log2(e)
    if MASKED:
        s = tl.where(cols[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_base, cols, stride_vn, stride_vd, N, HEAD_DIM, MASKED).to(DOT)
    acc = tl.dot(p.to(DOT), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Coords, Periods,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_ct, stride_ca, stride_p,
    H, N, N_TUNE, n_prefix, qk_scale_log2,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = Out + b * stride_ob + h * stride_oh

    inv_periods, row_axis = _frequencies(Periods, stride_p, HEAD_DIM, ACC) if HAS_ROPE else (None, None)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q1, q2 = _load_rotated(
        q_base, rows, stride_qn, stride_qd, N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
        qk_scale_log2, HEAD_DIM, HAS_ROPE, ACC, DOT, FAST_TRIG, True,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    # Full key blocks need no bounds checks; only the last, partial one is masked. The first block always
    # holds a real key, so the running max is finite from then on and exp2(m_i - m_new) never sees inf - inf.
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_key_block(
            acc, m_i, l_i, q1, q2, k_base, v_base, start_n, stride_kn, stride_kd, stride_vn, stride_vd, N,
            Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
            HEAD_DIM, HAS_ROPE, ACC, DOT, PRECISION, FAST_TRIG, BLOCK_N, False,
        )
    if n_full < N:
        acc, m_i, l_i = _fwd_key_block(
            acc, m_i, l_i, q1, q2, k_base, v_base, n_full, stride_kn, stride_kd, stride_vn, stride_vd, N,
            Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
            HEAD_DIM, HAS_ROPE, ACC, DOT, PRECISION, FAST_TRIG, BLOCK_N, True,
        )

    out = acc / l_i[:, None]
    dims = tl.arange(0, HEAD_DIM)
    valid = rows < N
    tl.store(o_base + rows[:, None] * stride_on + dims[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=valid[:, None])
    # Natural-log LSE of the scaled scores: the backward rebuilds P = exp(scale * q.k - lse) from it.
    tl.store(Lse + pid_bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) * _LN2, mask=valid)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["H", "N"])
def _bwd_delta_kernel(
    Out, dOut, Delta,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_gb, stride_gn, stride_gh, stride_gd,
    H, N,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O): the softmax backward's per-query correction term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(Out + b * stride_ob + h * stride_oh, rows, stride_on, stride_od, N, HEAD_DIM, True).to(ACC)
    do = _load_rows(dOut + b * stride_gb + h * stride_gh, rows, stride_gn, stride_gd, N, HEAD_DIM, True).to(ACC)
    tl.store(Delta + pid_bh.to(tl.int64) * N + rows, tl.sum(o * do, 1), mask=rows < N)


@triton.jit
def _dkdv_query_block(
    dk1, dk2, dv, k1, k2, v, q_base, do_base, lse_base, delta_base, start_m,
    stride_qn, stride_qd, stride_gn, stride_gd, N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
    HEAD_DIM: tl.constexpr, ROTATE_LOADS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
):
    """Add one query block's contribution to this key block's dk (rotated frame, unscaled) and dv."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q1, q2 = _load_rotated(
        q_base, rows, stride_qn, stride_qd, N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis, 1.0,
        HEAD_DIM, ROTATE_LOADS, ACC, DOT, FAST_TRIG, MASKED,
    )
    do = _load_rows(do_base, rows, stride_gn, stride_gd, N, HEAD_DIM, MASKED).to(DOT)
    if MASKED:
        # A +inf LSE makes the transposed probabilities of rows past N exactly 0.
        lse = tl.load(lse_base + rows, mask=rows < N, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < N, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    s_t = _scores(k1, k2, q1, q2, PRECISION)  # [BLOCK_N, BLOCK_M], log2 units: k carries scale * log2(e)
    p_t = tl.exp2(s_t - lse[None, :] * _LOG2E)
    dv = tl.dot(p_t.to(DOT), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(DOT)
    dk1 = tl.dot(ds_t, q1, dk1, input_precision=PRECISION)
    dk2 = tl.dot(ds_t, q2, dk2, input_precision=PRECISION)
    return dk1, dk2, dv


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _attn_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, Coords, Periods,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_gb, stride_gn, stride_gh, stride_gd,
    stride_db, stride_dn, stride_dh, stride_dd,
    stride_ct, stride_ca, stride_p,
    H, N, N_TUNE, n_prefix, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, ROTATE_LOADS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key block: loop over all query blocks, write dk and dv once (no atomics, deterministic)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = dOut + b * stride_gb + h * stride_gh
    lse_base = Lse + pid_bh.to(tl.int64) * N
    delta_base = Delta + pid_bh.to(tl.int64) * N

    inv_periods, row_axis = _frequencies(Periods, stride_p, HEAD_DIM, ACC) if HAS_ROPE else (None, None)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k1, k2 = _load_rotated(
        k_base, cols, stride_kn, stride_kd, N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
        qk_scale_log2, HEAD_DIM, ROTATE_LOADS, ACC, DOT, FAST_TRIG, True,
    )
    v = _load_rows(v_base, cols, stride_vn, stride_vd, N, HEAD_DIM, True).to(DOT)
    dk1 = tl.zeros([BLOCK_N, HALF], dtype=ACC)
    dk2 = tl.zeros([BLOCK_N, HALF], dtype=ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk1, dk2, dv = _dkdv_query_block(
            dk1, dk2, dv, k1, k2, v, q_base, do_base, lse_base, delta_base, start_m,
            stride_qn, stride_qd, stride_gn, stride_gd, N, Coords, stride_ct, stride_ca, n_prefix,
            inv_periods, row_axis, HEAD_DIM, ROTATE_LOADS, ACC, DOT, PRECISION, FAST_TRIG, BLOCK_M, False,
        )
    if m_full < N:
        dk1, dk2, dv = _dkdv_query_block(
            dk1, dk2, dv, k1, k2, v, q_base, do_base, lse_base, delta_base, m_full,
            stride_qn, stride_qd, stride_gn, stride_gd, N, Coords, stride_ct, stride_ca, n_prefix,
            inv_periods, row_axis, HEAD_DIM, ROTATE_LOADS, ACC, DOT, PRECISION, FAST_TRIG, BLOCK_M, True,
        )

    dk_base = dK + b * stride_db + h * stride_dh
    _store_rotated_back(
        dk_base, cols, stride_dn, stride_dd, N, dk1 * scale, dk2 * scale, Coords, stride_ct, stride_ca, n_prefix,
        inv_periods, row_axis, HEAD_DIM, HAS_ROPE, ACC, FAST_TRIG,
    )
    dims = tl.arange(0, HEAD_DIM)
    dv_ptrs = dV + b * stride_db + h * stride_dh + cols[:, None] * stride_dn + dims[None, :] * stride_dd
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=cols[:, None] < N)


@triton.jit
def _dq_key_block(
    dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, start_n, stride_kn, stride_kd, stride_vn, stride_vd, N,
    Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
    HEAD_DIM: tl.constexpr, ROTATE_LOADS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):
    """Add one key block's contribution to this query block's dq (rotated frame, unscaled)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k1, k2 = _load_rotated(
        k_base, cols, stride_kn, stride_kd, N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis, 1.0,
        HEAD_DIM, ROTATE_LOADS, ACC, DOT, FAST_TRIG, MASKED,
    )
    v = _load_rows(v_base, cols, stride_vn, stride_vd, N, HEAD_DIM, MASKED).to(DOT)
    s = _scores(q1, q2, k1, k2, PRECISION)  # log2 units: q carries scale * log2(e)
    if MASKED:
        s = tl.where(cols[None, :] < N, s, float("-inf"))
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = (p * (dp - delta[:, None])).to(DOT)
    dq1 = tl.dot(ds, k1, dq1, input_precision=PRECISION)
    dq2 = tl.dot(ds, k2, dq2, input_precision=PRECISION)
    return dq1, dq2


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _attn_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, Coords, Periods,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_gb, stride_gn, stride_gh, stride_gd,
    stride_db, stride_dn, stride_dh, stride_dd,
    stride_ct, stride_ca, stride_p,
    H, N, N_TUNE, n_prefix, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, ROTATE_LOADS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query block: loop over all key blocks, write dq once."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    inv_periods, row_axis = _frequencies(Periods, stride_p, HEAD_DIM, ACC) if HAS_ROPE else (None, None)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q1, q2 = _load_rotated(
        q_base, rows, stride_qn, stride_qd, N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
        qk_scale_log2, HEAD_DIM, ROTATE_LOADS, ACC, DOT, FAST_TRIG, True,
    )
    do = _load_rows(dOut + b * stride_gb + h * stride_gh, rows, stride_gn, stride_gd, N, HEAD_DIM, True).to(DOT)
    valid = rows < N
    lse = tl.load(Lse + pid_bh.to(tl.int64) * N + rows, mask=valid, other=0.0) * _LOG2E
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N + rows, mask=valid, other=0.0)
    dq1 = tl.zeros([BLOCK_M, HALF], dtype=ACC)
    dq2 = tl.zeros([BLOCK_M, HALF], dtype=ACC)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq1, dq2 = _dq_key_block(
            dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, start_n, stride_kn, stride_kd, stride_vn, stride_vd,
            N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
            HEAD_DIM, ROTATE_LOADS, ACC, DOT, PRECISION, FAST_TRIG, BLOCK_N, False,
        )
    if n_full < N:
        dq1, dq2 = _dq_key_block(
            dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, n_full, stride_kn, stride_kd, stride_vn, stride_vd,
            N, Coords, stride_ct, stride_ca, n_prefix, inv_periods, row_axis,
            HEAD_DIM, ROTATE_LOADS, ACC, DOT, PRECISION, FAST_TRIG, BLOCK_N, True,
        )
    dq_base = dQ + b * stride_db + h * stride_dh
    _store_rotated_back(
        dq_base, rows, stride_dn, stride_dd, N, dq1 * scale, dq2 * scale, Coords, stride_ct, stride_ca, n_prefix,
        inv_periods, row_axis, HEAD_DIM, HAS_ROPE, ACC, FAST_TRIG,
    )


# ----------------------------------------------------------------------------------------------------
# Autotuning (GPU only; the interpreter runs the bare kernels with fixed small blocks)
# ----------------------------------------------------------------------------------------------------


# Candidate (outer block, inner block, num_warps) per operand width and head dim, for each kernel. "Outer" is the
# block a program owns (queries for the forward and dq, keys for dk/dv), "inner" the block its loop walks.
# Autotune times num_stages 2/3 of the shapes whose shared memory fits the GPU, per (N bucket, D, dtype, RoPE).
# 16-bit: shapes that compile without register spills for sm_90 in both RoPE placements (bench/compile_sweep.py);
# larger tiles spill, above all at D = 128 where the accumulators alone take half the register file.
# 32-bit: fp32 inputs ask for fp32 accuracy, so the dots run as tf32x3 (each operand split into a high and a low
# TF32 half, three MMAs per product): about twice the registers and shared memory of a 16-bit tile. These are the
# shapes with the fewest spills on sm_90 and sm_80 (compile sweep; the spills per shape in docs/kernels.md; local
# memory, L1/L2-cached).
_FWD_SHAPES = {
    ("16-bit", 32): [(64, 64, 4), (64, 128, 8), (128, 64, 4), (128, 64, 8), (128, 128, 8)],
    ("16-bit", 64): [(64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8)],
    ("16-bit", 128): [(64, 64, 4), (64, 128, 8), (128, 64, 8), (128, 128, 8)],
    ("32-bit", 32): [(64, 16, 8), (32, 32, 8)],
    ("32-bit", 64): [(64, 16, 8), (128, 16, 8), (32, 32, 8)],
    ("32-bit", 128): [(128, 16, 8), (32, 32, 8)],
}
_DKDV_SHAPES = {
    ("16-bit", 32): [(64, 32, 4), (64, 64, 4), (128, 32, 8), (128, 64, 8)],
    ("16-bit", 64): [(64, 32, 4), (64, 64, 8), (128, 16, 8), (128, 32, 8)],
    ("16-bit", 128): [(64, 16, 8), (64, 32, 8)],
    ("32-bit", 32): [(64, 16, 8), (128, 16, 8)],
    ("32-bit", 64): [(64, 16, 8), (128, 16, 8)],
    ("32-bit", 128): [(32, 32, 8), (32, 16, 4)],
}
_DQ_SHAPES = {
    ("16-bit", 32): [(64, 32, 4), (64, 64, 4), (128, 32, 8), (128, 64, 8)],
    ("16-bit", 64): [(64, 32, 4), (64, 64, 4), (128, 32, 8), (128, 64, 8)],
    ("16-bit", 128): [(64, 32, 8), (64, 64, 8), (128, 16, 8), (128, 32, 8)],
    ("32-bit", 32): [(32, 16, 4), (128, 16, 8)],
    ("32-bit", 64): [(32, 16, 4), (128, 16, 8)],
    ("32-bit", 128): [(64, 16, 8), (32, 32, 8)],
}


def _tuning_bucket(n_tokens: int) -> int:
    """The sequence length as the autotune key sees it: the next power of two, so nearby lengths (the five sizes
    of high-resolution adaptation, say) share one tuning instead of each re-timing every config."""
    return max(64, triton.next_power_of_2(n_tokens))


def _operand_width(dot_dtype) -> str:
    return "32-bit" if dot_dtype in (tl.float32, tl.float64) else "16-bit"


def _shared_memory(kernel, named_args: dict, constexprs: dict, config: triton.Config) -> int:
    """Shared memory one program of `config` needs, from compiling it for the target (Triton caches the result,
    so autotuning reuses the compile). 0 when the compile API is not available: autotuning then skips a config
    that does not fit by itself (it catches the launch's out-of-resources error)."""
    args = [named_args[name] for name in kernel.arg_names if name in named_args]
    try:
        compiled = kernel.warmup(*args, grid=(1,), **constexprs, **config.all_kwargs())
    except (TypeError, AttributeError):
        return 0
    return compiled.metadata.shared


def _autotuned(kernel, shapes: dict, outer_name: str, inner_name: str, key: list[str]):
    """The kernel autotuned over its shapes x num_stages 2/3, pruned to its operand width and head dim and to
    the configs whose shared memory fits the GPU (so a config that cannot launch is never tried)."""
    all_shapes = sorted({shape for per_case in shapes.values() for shape in per_case})
    configs = [
        triton.Config({outer_name: outer, inner_name: inner}, num_warps=warps, num_stages=stages)
        for outer, inner, warps in all_shapes
        for stages in (2, 3)
    ]

    def prune(configs, named_args, **constexprs):
        allowed = shapes[(_operand_width(constexprs["DOT"]), constexprs["HEAD_DIM"])]
        candidates = [c for c in configs if (c.kwargs[outer_name], c.kwargs[inner_name], c.num_warps) in allowed]
        limit = shared_memory_limit()
        kept = [c for c in candidates if _shared_memory(kernel, named_args, constexprs, c) <= limit]
        if not kept:
            raise RuntimeError(
                f"rope_attention: none of the {kernel.__name__} tiles for D={constexprs['HEAD_DIM']} and "
                f"{constexprs['DOT']} fits this GPU's {limit} bytes of shared memory; use impl='reference'"
            )
        return kept

    # Every kernel writes each output element exactly once (nothing accumulates into an output across
    # launches), so re-running it for each autotune trial cannot corrupt the result.
    return triton.autotune(
        configs, key=key, prune_configs_by={"early_config_prune": prune}, do_bench=quick_benchmark
    )(kernel)


_attn_fwd_tuned = _autotuned(_attn_fwd_kernel, _FWD_SHAPES, "BLOCK_M", "BLOCK_N", ["N_TUNE", "HEAD_DIM", "HAS_ROPE"])
_attn_bwd_dkdv_tuned = _autotuned(
    _attn_bwd_dkdv_kernel, _DKDV_SHAPES, "BLOCK_N", "BLOCK_M", ["N_TUNE", "HEAD_DIM", "HAS_ROPE", "ROTATE_LOADS"]
)
_attn_bwd_dq_tuned = _autotuned(
    _attn_bwd_dq_kernel, _DQ_SHAPES, "BLOCK_M", "BLOCK_N", ["N_TUNE", "HEAD_DIM", "HAS_ROPE", "ROTATE_LOADS"]
)


# ----------------------------------------------------------------------------------------------------
# Host side: launches and autograd
# ----------------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def _precision_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags for an input dtype: accumulation, dot-operand dtype, dot precision, trig flavour."""
    interp = interpreting()
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # The interpreter multiplies raw bf16 bit patterns in tl.dot, so there bf16 dot operands go up to fp32.
    dot = tl.float32 if (interp and dtype == torch.bfloat16) else _TL_DTYPES[dtype]
    # fp32 inputs ask for fp32 accuracy: three TF32 tensor-core products (error ~1e-6) instead of one (~1e-3);
    # "ieee" fp32 dots run on the FMA units and spill registers heavily. The setting is ignored for fp16/bf16.
    precision = {torch.float64: "ieee", torch.float32: "tf32x3"}.get(dtype, "tf32")
    # MUFU sin/cos (PTX inline asm) on the GPU in fp32; the interpreter and fp64 use the exact functions.
    fast_trig = (not interp) and acc == tl.float32
    return dict(ACC=acc, DOT=dot, PRECISION=precision, FAST_TRIG=fast_trig)


def _rope_args(q: torch.Tensor, coords: torch.Tensor | None, periods: torch.Tensor | None):
    """(coords, periods, their strides); q stands in as an unread pointer when there is no RoPE."""
    if coords is None:
        return q, q, (0, 0, 0)
    return coords, periods, (coords.stride(0), coords.stride(1), periods.stride(0))


def _check_triton_inputs(q: torch.Tensor) -> None:
    head_dim = q.shape[-1]
    if head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"rope_attention: the Triton kernel supports head dims {TRITON_HEAD_DIMS}, got {head_dim}; "
            "use impl='reference' (or attn_impl='sdpa') for other head sizes"
        )
    batch_heads = q.shape[0] * q.shape[2]
    if batch_heads > 65535:
        raise ValueError(
            f"rope_attention: B * H = {batch_heads} exceeds the 65535 programs of the kernel grid's second axis; "
            "split the batch into chunks"
        )
    if q.dtype not in _TL_DTYPES:
        raise ValueError(f"rope_attention: the Triton kernel takes fp16, bf16, fp32 or fp64 inputs, got {q.dtype}")


def _launch(tuned, grid_outer_block: str, n_tokens: int, batch_heads: int, args: tuple, constexprs: dict):
    """An autotuned attention kernel over (token blocks of the outer axis, B * H)."""
    blocks = {"BLOCK_M": _INTERPRETER_BLOCK_OUTER, "BLOCK_N": _INTERPRETER_BLOCK_INNER}
    if grid_outer_block == "BLOCK_N":
        blocks = {"BLOCK_N": _INTERPRETER_BLOCK_OUTER, "BLOCK_M": _INTERPRETER_BLOCK_INNER}
    grid = lambda meta: (triton.cdiv(n_tokens, meta[grid_outer_block]), batch_heads)  # noqa: E731
    launch(tuned, grid, *args, interpreter_blocks=blocks, **constexprs)


def _prerotate(q, k, coords, periods, n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rot(q), rot(k) as [B, N, H, D] views of head-major [B, H, N, D] buffers in q's dtype (one prologue launch)."""
    B, N, H, D = q.shape
    qr = new_buffer((B, H, N, D), q.dtype, q.device).transpose(1, 2)
    kr = new_buffer((B, H, N, D), q.dtype, q.device).transpose(1, 2)
    flags = _precision_flags(q.dtype)
    block = _INTERPRETER_BLOCK_OUTER if interpreting() else 64
    launch(_rope_prologue_kernel, (triton.cdiv(N, block), B * H),
           q, k, qr, kr, coords, periods, *q.stride(), *k.stride(), *qr.stride(),
           coords.stride(0), coords.stride(1), periods.stride(0), H, N, n_prefix,
           HEAD_DIM=D, ACC=flags["ACC"], FAST_TRIG=flags["FAST_TRIG"], BLOCK_M=block)
    return qr, kr


def _forward(q, k, v, coords, periods, n_prefix: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and log-sum-exp; RoPE in the loop when coords are given (pass prerotated q, k with coords=None)."""
    B, N, H, D = q.shape
    out = new_buffer((B, N, H, D), q.dtype, q.device)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = new_buffer((B, H, N), lse_dtype, q.device)
    coords_t, periods_t, rope_strides = _rope_args(q, coords, periods)
    args = (
        q, k, v, out, lse, coords_t, periods_t,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *rope_strides,
        H, N, _tuning_bucket(N), n_prefix, scale * math.log2(math.e),
    )
    flags = dict(HEAD_DIM=D, HAS_ROPE=coords is not None, **_precision_flags(q.dtype))
    _launch(_attn_fwd_tuned, "BLOCK_M", N, B * H, args, flags)
    return out, lse


def _backward(q, k, v, out, lse, grad_out, coords, periods, n_prefix: int, scale: float, rotate_loads: bool):
    """dq, dk, dv. rotate_loads=False: q and k come prerotated and only the gradients are turned back."""
    B, N, H, D = q.shape
    flags = dict(HEAD_DIM=D, HAS_ROPE=coords is not None, ROTATE_LOADS=coords is not None and rotate_loads,
                 **_precision_flags(q.dtype))
    delta = new_buffer((B, H, N), lse.dtype, q.device)
    delta_block = _INTERPRETER_BLOCK_OUTER if interpreting() else 64
    launch(_bwd_delta_kernel, (triton.cdiv(N, delta_block), B * H),
           out, grad_out, delta, *out.stride(), *grad_out.stride(), H, N,
           HEAD_DIM=D, ACC=flags["ACC"], BLOCK_M=delta_block)
    dq = new_buffer((B, N, H, D), q.dtype, q.device)
    dk = new_buffer((B, N, H, D), q.dtype, q.device)
    dv = new_buffer((B, N, H, D), q.dtype, q.device)
    coords_t, periods_t, rope_strides = _rope_args(q, coords, periods)
    shared = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *rope_strides,
              H, N, _tuning_bucket(N), n_prefix, scale * math.log2(math.e), scale)
    _launch(_attn_bwd_dkdv_tuned, "BLOCK_N", N, B * H,
            (q, k, v, grad_out, lse, delta, dk, dv, coords_t, periods_t, *shared), flags)
    _launch(_attn_bwd_dq_tuned, "BLOCK_M", N, B * H,
            (q, k, v, grad_out, lse, delta, dq, coords_t, periods_t, *shared), flags)
    return dq, dk, dv


class RopeAttentionFunction(torch.autograd.Function):
    """Triton forward/backward; gradients flow to q, k, v (coords and periods are data, not parameters)."""

    @staticmethod
    def forward(ctx, q, k, v, coords, periods, n_prefix: int, scale: float, prerotate: bool):
        prerotate = prerotate and coords is not None
        if prerotate:
            q_rot, k_rot = _prerotate(q, k, coords, periods, n_prefix)
            out, lse = _forward(q_rot, k_rot, v, None, None, n_prefix, scale)
        else:
            out, lse = _forward(q, k, v, coords, periods, n_prefix, scale)
        ctx.save_for_backward(q, k, v, out, lse, coords, periods)
        ctx.n_prefix, ctx.scale, ctx.prerotate = n_prefix, scale, prerotate
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, coords, periods = ctx.saved_tensors
        if ctx.prerotate:  # rotated again rather than saved: two [B, N, H, D] tensors less held for the backward
            q, k = _prerotate(q, k, coords, periods, ctx.n_prefix)
        dq, dk, dv = _backward(
            q, k, v, out, lse, grad_out, coords, periods, ctx.n_prefix, ctx.scale, rotate_loads=not ctx.prerotate
        )
        return dq, dk, dv, None, None, None, None, None


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: torch.Tensor | None,
    periods: torch.Tensor | None,
    n_prefix: int,
    scale: float | None = None,
    impl: KernelImpl = "auto",
    rope_mode: RopeMode | None = None,
) -> torch.Tensor:
    """softmax(rot(q) rot(k)^T * scale) v for q, k, v of shape [B, N, H, D] (any strides).

    coords: [N - n_prefix, 2] float32 (row, col) of the patch tokens, already box-jittered; periods: [D/4].
    coords=None (with periods=None) means plain attention. The first n_prefix tokens are not rotated.
    scale defaults to 1/sqrt(D). Returns a contiguous [B, N, H, D] tensor in q's dtype.
    impl: "auto", "triton" or "reference" (`rope_attention_reference`), the kernel dispatch of README.md; see
    `uses_triton` for fp32/fp64 on CUDA.
    rope_mode (Triton only): "inline" computes the angles in the attention loops, "prerotate" rotates q and k once
    in a prologue kernel; None picks "prerotate" from PREROTATE_MIN_TOKENS tokens on, "inline" below.
    """
    _check_inputs(q, k, v, coords, periods, n_prefix)
    if rope_mode is None:
        rope_mode = "prerotate" if q.shape[1] >= PREROTATE_MIN_TOKENS else "inline"
    if rope_mode not in ("inline", "prerotate"):
        raise ValueError(f"rope_attention: rope_mode must be 'inline' or 'prerotate', got {rope_mode!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"rope_attention: scale must be a finite number, got {scale}")
    if not uses_triton(q, impl):
        return rope_attention_reference(q, k, v, coords, periods, n_prefix, scale)
    _check_triton_inputs(q)
    return RopeAttentionFunction.apply(q, k, v, coords, periods, n_prefix, scale, rope_mode == "prerotate")
