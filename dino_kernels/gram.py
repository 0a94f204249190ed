"""Gram anchoring loss (DINOv3 section 4) without ever holding a P x P Gram matrix.

The official loss, per image of P patch features of width d, with Ŝ and Ĝ the L2-normalized student and
Gram-teacher features (P x d):

    L = mean over images and over all P² entries of (ŜŜᵀ - ĜĜᵀ)²

`remove_neg` sets the negative entries of both Gram matrices to 0 before the difference; `img_level=False`
computes one Gram matrix over all B·P tokens. Only the student gets a gradient. `gram_loss_reference` is the
specification (both Gram matrices in full, O(B·P²) memory); `gram_loss` computes the same value with O(B·P·d)
extra memory, or runs the specification itself with impl="reference".

Numerics: work on the sum and the difference of the features. With U = Ŝ + Ĝ and V = Ŝ - Ĝ,

    D = ŜŜᵀ - ĜĜᵀ = (VUᵀ + UVᵀ) / 2,

so every entry of D is computed directly, not as the difference of two nearly equal Gram entries. U and V are
formed in float64 and rounded once to float32, so V is accurate relative to itself even when the student is
close to the teacher. The loss is ill-conditioned in Ŝ exactly there (d(loss)/d(feature) / loss grows like 1/ε
for student = teacher + ε·noise), so computing Ŝ and Ĝ in float32 first, as the official code does, loses ~u/ε
in the gradient, and the textbook identity ‖ŜᵀŜ‖² - 2‖ŜᵀĜ‖² + ‖ĜᵀĜ‖² loses it in the loss too; the algorithms
below keep float32 accuracy for every ε (figures in docs/kernels.md).

Two algorithms (`algorithm`), exact rewritings of the specification that differ only in rounding:

- "tiled": D computed tile by tile, two float32 dots per tile (V_iU_jᵀ + U_iV_jᵀ; with remove_neg a third,
  (U-V)_i(U-V)_jᵀ = 4·Ĝ_iĜ_jᵀ, for the clamp), O(P²·d) work, never more than a tile or slab of D at once. The
  gradient is dL/dŜ_i = (4 / (B·P²)) · Σ_j W_ij Ŝ_j, W = D (with remove_neg: S⁺ - G⁺ where the student entry is
  kept, 0 where it was clamped). D and W are symmetric, so the loss alone needs only the tiles on and right of
  the diagonal, the others counting twice. It has two implementations:
  Triton tiles: one program per (row block, output column block, image). Without a gradient it visits its row's
  tiles from the diagonal on; with one, all of them, accumulating its gradient tile in registers (no atomics) and
  recomputing the Gram tiles once per output column block (ceil(d / BLOCK_DO) times: autotuning weighs that
  against registers). The loss is a deterministic sum of per-row partials. float32 dots run as tf32x3 (three
  TF32 passes, ~float32 accuracy) on NVIDIA GPUs.
  PyTorch slabs: [B, rows, P - r0] slabs of all images at once, right of the diagonal only, also for the
  gradient, which takes each off-diagonal slab twice (W·Ŝ for its rows, Wᵀ·Ŝ for its columns): 2·P²·d MACs with
  the gradient (3 with remove_neg). A slab holds at most B·P·d floats or _SLAB_ENTRIES (but 16 rows at least).
- "dspace" (no remove_neg): the d x d identity ‖D‖²_F = (⟨UᵀU, VᵀV⟩ + tr((UᵀV)²)) / 2 and
  4·D·Ŝ = V(UᵀU + UᵀV) + U(VᵀU + VᵀV), O(P·d²) work in five plain matmuls (BLAS / cuBLAS; no Triton kernel).

Accuracy guard of "dspace": its loss adds t₁ = ⟨UᵀU, VᵀV⟩ ≥ 0 to t₂ = tr(N²), N = UᵀV, which may be negative; they
cancel when the student's Gram matrix matches the teacher's much more closely than its features do (features
rotated in d-space, G = ŜQQᵀŜᵀ). The rounding error is then about u·(|t₁| + |t₂|) (u the unit roundoff of the
current float32 matmul precision), while the tiled algorithm squares each entry's small difference and stays
exact to ~u per entry. Rule: algorithm="auto" keeps the d-space result only if the estimate
u·Σ_images(|t₁| + |t₂|) / |Σ(t₁ + t₂)| is at most DSPACE_MAX_REL_ERROR, else it recomputes with the tiled
algorithm. The estimate is an upper bound in practice (docs/kernels.md). The gradient's terms cancel only like
the square root of the loss's, and where the gradient itself is ill-conditioned (rotation + noise) both
algorithms lose ~u/noise, so the gradient has no rule of its own. With TF32 matmuls enabled u = 2^-11 and the
rule sends nearly everything to the tiles.

algorithm="auto" picks "dspace" when remove_neg is off, P > d (its O(P·d²) beats O(P²·d)) and the guard trusts
it; "tiled" otherwise. The gradient is computed in the forward pass when the student requires grad (the loss is a
scalar, so backward only scales it): one pass over the tiles serves both.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dino_kernels.common import (
    KernelImpl,
    compute_capability,
    interpreting,
    launch,
    new_buffer,
    quick_benchmark,
    use_triton,
)

OP = "gram_loss"
GramAlgorithm = Literal["auto", "tiled", "dspace"]

NORM_EPS = 1e-12  # F.normalize's default: norms are clamped to it before dividing
DSPACE_MAX_REL_ERROR = 1e-4  # the guard's bound on the d-space loss's estimated relative rounding error
# Elements per float64 chunk when forming U and V: cache-sized on the CPU, few large launches on a GPU.
_FLOAT64_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 24}
_SLAB_ENTRIES = 1 << 21  # floats per slab of the PyTorch slabs (8 MiB)
_INTERPRETER_BLOCKS = {"BLOCK_P": 64, "BLOCK_K": 32, "BLOCK_DO": 32}


# ----------------------------------------------------------------------------------------------------------------
# The specification
# ----------------------------------------------------------------------------------------------------------------


def gram_loss_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    normalize: bool = True,
    remove_neg: bool = False,
    img_level: bool = True,
) -> torch.Tensor:
    """The official formula, both Gram matrices in full (O(B·P²) memory). float64 inputs stay float64."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    s = student.to(dtype)
    t = teacher.detach().to(dtype)
    if normalize:
        s = F.normalize(s, dim=-1)
        t = F.normalize(t, dim=-1)
    if not img_level:
        s = s.flatten(0, 1)
        t = t.flatten(0, 1)
    s_gram = s @ s.transpose(-1, -2)
    t_gram = t @ t.transpose(-1, -2)
    if remove_neg:
        s_gram = s_gram.masked_fill(s_gram < 0, 0.0)
        t_gram = t_gram.masked_fill(t_gram < 0, 0.0)
    return F.mse_loss(s_gram, t_gram)


# ----------------------------------------------------------------------------------------------------------------
# Shared by both algorithms: checks, the sum/difference features, the way back through the normalization
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(student, teacher, remove_neg: bool, impl: str, algorithm: str) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{OP}: {name} must be a 3-D tensor [B, P, d] of patch features, got {shape}; "
                             "select the patch tokens and reshape to [images, patches, dim]")
        if not x.is_floating_point():
            raise ValueError(f"{OP}: {name} must be floating point (fp32, bf16, fp16 or fp64), got {x.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(f"{OP}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the "
                         "same shape; resample the teacher's patch grid to the student's and match the widths")
    if student.numel() == 0:
        raise ValueError(f"{OP}: empty features {tuple(student.shape)}; B, P and d must all be at least 1")
    if student.device != teacher.device:
        raise ValueError(f"{OP}: student is on {student.device} but teacher on {teacher.device}; move one of them")
    if algorithm not in get_args(GramAlgorithm):
        raise ValueError(f"{OP}: algorithm must be 'auto', 'tiled' or 'dspace', got {algorithm!r}")
    if algorithm == "dspace" and remove_neg:
        raise ValueError(f"{OP}: algorithm='dspace' has no form with remove_neg=True (clamping is entrywise); "
                         "use algorithm='tiled' or 'auto'")
    if impl == "reference" and algorithm != "auto":
        raise ValueError(f"{OP}: impl='reference' runs gram_loss_reference, which has no algorithm choice, but "
                         f"algorithm={algorithm!r} was given; pick the algorithm with impl='auto' or 'triton'")


def sum_and_difference(
    student: torch.Tensor, teacher: torch.Tensor, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """U = Ŝ + Ĝ and V = Ŝ - Ĝ as float32 [B, P, d], and the student's row norms (float32 [B, P], or None).

    Formed in float64 (chunks of rows, so the float64 transients stay small) and rounded once: V then carries
    a relative error of one float32 rounding of itself, not of Ŝ.
    """
    B, P, d = student.shape
    s_rows = student.detach().flatten(0, 1)
    t_rows = teacher.detach().flatten(0, 1)
    u = torch.empty((B * P, d), dtype=torch.float32, device=student.device)
    v = torch.empty_like(u)
    s_norms = torch.empty(B * P, dtype=torch.float32, device=student.device) if normalize else None
    rows = max(1, _FLOAT64_CHUNK.get(student.device.type, 1 << 18) // d)
    for r0 in range(0, B * P, rows):
        # Copies even of float64 inputs: the normalization below works in place.
        s = s_rows[r0:r0 + rows].to(torch.float64, copy=True)
        t = t_rows[r0:r0 + rows].to(torch.float64, copy=True)
        if normalize:
            s_len = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
            s.div_(s_len.clamp_min(NORM_EPS))
            t.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min_(NORM_EPS))
            s_norms[r0:r0 + rows] = s_len.squeeze(-1)
        torch.add(s, t, out=u[r0:r0 + rows])
        torch.sub(s, t, out=v[r0:r0 + rows])
    return u.view(B, P, d), v.view(B, P, d), None if s_norms is None else s_norms.view(B, P)


def _through_normalization(
    grad_hat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, s_norms: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """scale · d/dx of <grad_hat, F.normalize(x)>: (g - x̂(x̂·g)) / ‖x‖, or g / eps where ‖x‖ < eps.

    Works in place on grad_hat (float32 [B, P, d]) and returns it; x̂ = (U + V) / 2 is formed over u's storage.
    """
    if s_norms is None:
        return grad_hat.mul_(scale)
    s_hat = u.add_(v).mul_(0.5)
    radial = (s_hat.unsqueeze(-2) @ grad_hat.unsqueeze(-1)).squeeze(-1)  # x̂·g per row, no [B, P, d] temporary
    # Below eps F.normalize divides by the constant eps: no projection there.
    radial.mul_((s_norms > NORM_EPS).unsqueeze(-1))
    grad_hat.sub_(s_hat.mul_(radial))
    return grad_hat.mul_((scale / s_norms.clamp_min(NORM_EPS)).unsqueeze(-1))


# ----------------------------------------------------------------------------------------------------------------
# The d-space identity (plain matmuls on every device)
# ----------------------------------------------------------------------------------------------------------------


def _matmul_unit_roundoff() -> float:
    """Unit roundoff of float32 matmuls at torch's current precision setting (TF32 / bf16 when allowed)."""
    return {"highest": 2.0**-24, "high": 2.0**-11, "medium": 2.0**-8}[torch.get_float32_matmul_precision()]


def dspace_loss_sum(
    u: torch.Tensor, v: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Σ_images ‖D‖²_F (float64, 0-d), its gradient w.r.t. Ŝ (float32, or None), and the guard's error estimate.

    The estimate is (unit roundoff)·Σ(|t₁| + |t₂|) / |Σ(t₁ + t₂)|: the relative rounding error of the loss when
    the two terms cancel (0 when both are exactly 0, as for student == teacher).
    """
    uu = u.mT @ u
    vv = v.mT @ v
    n = u.mT @ v
    sym = (uu.double() * vv.double()).sum((1, 2))  # ⟨UᵀU, VᵀV⟩ per image, >= 0
    cross = (n.double() * n.double().mT).sum((1, 2))  # tr(N²) per image, either sign
    loss_sum = 0.5 * (sym + cross).sum()
    magnitude = 0.5 * (sym.abs() + cross.abs()).sum().item()
    total = abs(loss_sum.item())
    if magnitude == 0.0:
        rel_error = 0.0
    else:
        rel_error = _matmul_unit_roundoff() * magnitude / total if total else float("inf")
    if not want_grad:
        return loss_sum, None, rel_error
    grad = v @ (uu + n)
    grad.baddbmm_(u, n.mT + vv)
    return loss_sum, grad, rel_error


# ----------------------------------------------------------------------------------------------------------------
# The tiled algorithm: PyTorch slabs
# ----------------------------------------------------------------------------------------------------------------


def _clamped_differences(d_tile: torch.Tensor, t_tile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """remove_neg on a slab: S⁺ - G⁺ (written over d_tile) and where the student entry was clamped.

    G comes from its own product, S = G + D; where both entries survive the clamp the result is D itself,
    which is accurate even where S and G nearly agree.
    """
    s_tile = t_tile + d_tile
    s_dropped = s_tile < 0
    both_kept = (t_tile >= 0).logical_and_(~s_dropped)
    s_tile.clamp_(min=0).sub_(t_tile.clamp_(min=0))
    return torch.where(both_kept, d_tile, s_tile, out=d_tile), s_dropped


def tiled_loss_sum_torch(
    u: torch.Tensor, v: torch.Tensor, remove_neg: bool, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_images ‖S⁽⁺⁾ - G⁽⁺⁾‖²_F (float64, 0-d) and its gradient w.r.t. Ŝ, one [B, rows, P - r0] slab at a time.

    D and W are symmetric, so only slabs on and right of the diagonal are computed: their off-diagonal part
    counts twice in the loss and feeds the gradient of both its rows (W·Ŝ) and its columns (Wᵀ·Ŝ).
    A slab has min(d, 2^21 / (B·P)) rows (at least 16): at most B·P·d floats or 8 MiB; about four are alive.
    """
    B, P, d = u.shape
    rows = max(16, min(d, _SLAB_ENTRIES // (B * P)))
    loss_sum = torch.zeros((), dtype=torch.float64, device=u.device)
    grad = torch.zeros_like(u) if want_grad else None  # accumulated from both sides of the diagonal
    s_hat = (u + v).mul_(0.5) if want_grad else None
    t_twice = u - v if remove_neg else None
    for r0 in range(0, P, rows):
        r1 = min(r0 + rows, P)
        diff = torch.bmm(v[:, r0:r1], u[:, r0:].mT).baddbmm_(u[:, r0:r1], v[:, r0:].mT).mul_(0.5)
        if remove_neg:
            diff, s_dropped = _clamped_differences(diff, torch.bmm(t_twice[:, r0:r1], t_twice[:, r0:].mT).mul_(0.25))
        squares = diff.square()
        loss_sum += squares[:, :, : r1 - r0].sum(dtype=torch.float64)
        loss_sum += 2 * squares[:, :, r1 - r0:].sum(dtype=torch.float64)
        del squares
        if want_grad:
            if remove_neg:
                diff.masked_fill_(s_dropped, 0.0)  # the clamp passes no gradient to clamped student entries
            # (Fresh products then +=: baddbmm_ into a strided slice of grad falls back to one addmm per image.)
            grad[:, r0:r1] += torch.bmm(diff, s_hat[:, r0:])
            grad[:, r1:] += torch.bmm(diff[:, :, r1 - r0:].mT, s_hat[:, r0:r1])
    return loss_sum, None if grad is None else grad.mul_(4.0)


# ----------------------------------------------------------------------------------------------------------------
# The tiled algorithm: Triton
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _gram_rows_kernel(
    U, V, RowLoss, Grad,
    P, D, stride_b, stride_p, stride_d,
    REMOVE_NEG: tl.constexpr, WITH_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """Rows [i·BLOCK_P, +BLOCK_P) of one image: their share of Σ(S - G)² and, with WITH_GRAD, the gradient
    w.r.t. Ŝ of those rows in columns [o·BLOCK_DO, +BLOCK_DO). U, V and Grad share one [B, P, D] layout."""
    pid_i = tl.program_id(0)
    pid_o = tl.program_id(1)
    image = tl.program_id(2).to(tl.int64)
    U += image * stride_b
    V += image * stride_b
    offs = tl.arange(0, BLOCK_P)
    rows_i = pid_i * BLOCK_P + offs
    in_i = rows_i < P
    cols_o = pid_o * BLOCK_DO + tl.arange(0, BLOCK_DO)
    in_o = cols_o < D

    row_loss = tl.zeros([BLOCK_P], dtype=tl.float32)
    grad = tl.zeros([BLOCK_P, BLOCK_DO], dtype=tl.float32)
    if WITH_GRAD:
        j_first = 0
    else:
        j_first = pid_i  # D is symmetric: tiles left of the diagonal mirror the ones visited
    for jb in range(j_first, tl.cdiv(P, BLOCK_P)):
        rows_j = jb * BLOCK_P + offs
        in_j = rows_j < P
        # Padded rows and columns load 0, so their entries of D (and of G) are 0 and add nothing.
        twice_d = tl.zeros([BLOCK_P, BLOCK_P], dtype=tl.float32)
        four_g = tl.zeros([BLOCK_P, BLOCK_P], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            in_k = cols < D
            at_i = rows_i[:, None] * stride_p + cols[None, :] * stride_d
            at_j = rows_j[:, None] * stride_p + cols[None, :] * stride_d
            mask_i = in_i[:, None] & in_k[None, :]
            mask_j = in_j[:, None] & in_k[None, :]
            u_i = tl.load(U + at_i, mask=mask_i, other=0.0)
            v_i = tl.load(V + at_i, mask=mask_i, other=0.0)
            u_jt = tl.trans(tl.load(U + at_j, mask=mask_j, other=0.0))
            v_jt = tl.trans(tl.load(V + at_j, mask=mask_j, other=0.0))
            twice_d = tl.dot(v_i, u_jt, twice_d, input_precision=PRECISION)
            twice_d = tl.dot(u_i, v_jt, twice_d, input_precision=PRECISION)
            if REMOVE_NEG:
                four_g = tl.dot(u_i - v_i, u_jt - v_jt, four_g, input_precision=PRECISION)
        diff = 0.5 * twice_d
        if REMOVE_NEG:
            t_gram = 0.25 * four_g
            s_gram = t_gram + diff
            s_kept = s_gram >= 0
            t_kept = t_gram >= 0
            # Where both entries survive the clamp, S⁺ - G⁺ is the accurately computed difference itself.
            diff = tl.where(s_kept & t_kept, diff, tl.where(s_kept, s_gram, 0.0) - tl.where(t_kept, t_gram, 0.0))
            weights = tl.where(s_kept, diff, 0.0)
        else:
            weights = diff
        if WITH_GRAD:
            row_loss += tl.sum(diff * diff, axis=1)
            at_o = rows_j[:, None] * stride_p + cols_o[None, :] * stride_d
            mask_o = in_j[:, None] & in_o[None, :]
            s_j = 0.5 * (tl.load(U + at_o, mask=mask_o, other=0.0) + tl.load(V + at_o, mask=mask_o, other=0.0))
            grad = tl.dot(weights, s_j, grad, input_precision=PRECISION)
        else:
            row_loss += tl.sum(diff * diff, axis=1) * tl.where(jb == pid_i, 1.0, 2.0)

    tl.store(RowLoss + image * P + rows_i, row_loss, mask=in_i & (pid_o == 0))
    if WITH_GRAD:
        at_out = image * stride_b + rows_i[:, None] * stride_p + cols_o[None, :] * stride_d
        tl.store(Grad + at_out, 4.0 * grad, mask=in_i[:, None] & in_o[None, :])


def _gpu_configs() -> list[triton.Config]:
    """A small set. tf32x3 dots split each operand in two, so register pressure, not shared memory, bounds the
    tiles: with 8 warps these compile for sm_90 (checked with ptxas) with at most 40 bytes of register spills.
    BLOCK_DO trades registers for the gradient tile against recomputing the Gram tiles d / BLOCK_DO times."""
    shapes = [(64, 16, 32, 2), (64, 16, 64, 2), (64, 16, 128, 2), (32, 16, 256, 2)]
    return [
        triton.Config({"BLOCK_P": p, "BLOCK_K": k, "BLOCK_DO": o}, num_warps=8, num_stages=stages)
        for p, k, o, stages in shapes
    ]


def _distinct_for_the_loss(configs: list[triton.Config], named_args: dict, **constexprs) -> list[triton.Config]:
    """Without a gradient BLOCK_DO is unused: configs differing only there are one kernel, timed once."""
    if constexprs.get("WITH_GRAD", True):
        return configs
    seen, kept = set(), []
    for config in configs:
        key = (config.kwargs["BLOCK_P"], config.kwargs["BLOCK_K"], config.num_warps, config.num_stages)
        if key not in seen:
            seen.add(key)
            kept.append(config)
    return kept


# Each launch writes every output element once (no accumulation), so autotune trials cannot corrupt them.
_gram_rows_tuned = triton.autotune(
    _gpu_configs(), key=["P", "D", "REMOVE_NEG", "WITH_GRAD"],
    prune_configs_by={"early_config_prune": _distinct_for_the_loss}, do_bench=quick_benchmark,
)(_gram_rows_kernel)


def _dot_precision(device: torch.device) -> str:
    """float32 dots: three TF32 passes (~float32 accuracy) on NVIDIA tensor cores, plain FMA elsewhere."""
    if interpreting() or torch.version.hip or compute_capability(device) < 80:
        return "ieee"
    return "tf32x3"


def tiled_loss_sum_triton(
    u: torch.Tensor, v: torch.Tensor, remove_neg: bool, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton version of `tiled_loss_sum_torch` (same outputs)."""
    B, P, d = u.shape
    row_loss = new_buffer((B, P), torch.float32, u.device)
    grad = new_buffer((B, P, d), torch.float32, u.device) if want_grad else row_loss  # row_loss: an unread stand-in
    args = (u, v, row_loss, grad, P, d, u.stride(0), u.stride(1), u.stride(2))
    flags = dict(REMOVE_NEG=remove_neg, WITH_GRAD=want_grad, PRECISION=_dot_precision(u.device))

    def grid(meta):
        return triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(d, meta["BLOCK_DO"]) if want_grad else 1, B

    launch(_gram_rows_tuned, grid, *args, interpreter_blocks=_INTERPRETER_BLOCKS, **flags)
    return row_loss.sum(dtype=torch.float64), grad if want_grad else None


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------------------------


class _GramLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, normalize: bool, remove_neg: bool, want_grad: bool, triton_tiles: bool,
                algorithm: str):
        B, P, d = student.shape
        u, v, s_norms = sum_and_difference(student, teacher, normalize)
        loss_sum, grad_hat = None, None
        if algorithm == "dspace" or (algorithm == "auto" and not remove_neg and P > d):
            loss_sum, grad_hat, rel_error = dspace_loss_sum(u, v, want_grad)
            if algorithm == "auto" and rel_error > DSPACE_MAX_REL_ERROR:
                loss_sum, grad_hat = None, None
        if loss_sum is None:
            tiled = tiled_loss_sum_triton if triton_tiles else tiled_loss_sum_torch
            loss_sum, grad_hat = tiled(u, v, remove_neg, want_grad)
        entries = B * P * P
        ctx.student_dtype = student.dtype
        if want_grad:
            ctx.save_for_backward(_through_normalization(grad_hat, u, v, s_norms, 1.0 / entries))
        return (loss_sum / entries).to(torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.student_dtype), None, None, None, None, None, None


def gram_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    normalize: bool = True,
    remove_neg: bool = False,
    img_level: bool = True,
    impl: KernelImpl = "auto",
    algorithm: GramAlgorithm = "auto",
) -> torch.Tensor:
    """DINOv3's Gram anchoring loss of student [B, P, d] against teacher [B, P, d]: a 0-d float32 tensor.

    Same value as `gram_loss_reference` (the official formula) with O(B·P·d) extra memory. The gradient flows
    to the student only (returned in its dtype; it may be a non-contiguous view); the teacher is detached.
    normalize: L2-normalize every patch feature first (F.normalize semantics, eps 1e-12).
    remove_neg: zero the negative entries of both Gram matrices. img_level=False: one Gram over all B·P tokens.
    impl: "reference" runs `gram_loss_reference` (O(B·P²) memory; autograd gives its gradient). "triton" runs
    the tiled algorithm as the Triton tiles. "auto" never materializes: it runs the tiled algorithm as the Triton
    tiles under TRITON_INTERPRET=1 and as the PyTorch slabs otherwise, on GPUs too.
    algorithm (impl "auto" or "triton"): "auto" takes the d-space identity when remove_neg is off, P > d and its
    accuracy guard trusts the result, the tiled algorithm otherwise; "tiled" / "dspace" force one (no guard).
    The d-space identity is plain matmuls under either impl.
    """
    _check_inputs(student, teacher, remove_neg, impl, algorithm)
    runs_triton = use_triton(student, impl, OP)
    if impl == "reference":
        return gram_loss_reference(student, teacher, normalize, remove_neg, img_level).to(torch.float32)
    # On a GPU "auto" keeps the tiled algorithm in PyTorch: there the cuBLAS slabs beat the Triton tiles at the same
    # memory (docs/kernels.md).
    triton_tiles = runs_triton and (impl == "triton" or not student.is_cuda)
    if not img_level:
        student = student.flatten(0, 1).unsqueeze(0)
        teacher = teacher.flatten(0, 1).unsqueeze(0)
    want_grad = student.requires_grad and torch.is_grad_enabled()
    return _GramLoss.apply(student, teacher.detach(), normalize, remove_neg, want_grad, triton_tiles, algorithm)
