"""Sinkhorn-Knopp teacher centering (DINOv2/DINOv3), fused into scaling vectors.

The official algorithm takes Q = exp(logits / T) (B samples x K prototypes), divides it by its total mass,
then `n_iter` times divides every prototype column by its sum over the samples of all ranks and by K, and
every sample row by its own sum and by B_global (the global sample count); it finally multiplies by B_global,
so each row is a distribution over the prototypes.

Every one of those steps multiplies Q by a diagonal matrix, so the result is

    Q = B_global * diag(u) @ F @ diag(c),        F[b, k] = exp((logits[b, k] - M[k] - R[b]) / T)

with M[k] the global maximum of prototype k (all ranks), R[b] = max_k (logits[b, k] - M[k]), a sample scale u
and a prototype scale c. Why the shifts are free: the first column normalization divides each column by its
sum, so any global scalar (the mass normalization, exp(max / T)) and any per-column factor (exp(M[k] / T))
cancel exactly; the per-row factor exp(R[b] / T) does not, so it becomes the starting sample scale. Then:

    u = exp(R / T);  repeat n_iter times:  c = 1 / (K * all_reduce(u @ F));  u = 1 / (B_global * (F @ c))

Why the shifts matter: F lies in [0, 1] with a 1 in every row and in every column (R[b] = 0 for the row holding a
column's maximum), so no column or row sum can underflow to 0 and the scales stay bounded for any logits / T;
an entry of F that underflows is < 1e-38 times an entry of the same sum and changes nothing at fp32 precision.
Subtracting only the global maximum would leave samples whose entries all underflow, and 0 / 0.

In the code the prototype vector kept is w = K * c (one reciprocal per prototype), the 1 / K moves into the
sample-side factors, and Q = (B_global / K) * diag(u) @ F @ diag(w). K and B_global cancel in Q -- they only set
the scale of intermediate vectors -- and are kept so that u is the official algorithm's per-sample factor.

Accuracy: ~1e-7 relative to float64 for teacher-like logits. fp32 rounds logits - M to 6e-8 of its size, so
fp32 logits whose samples lie S temperatures apart agree to ~6e-8 * S (1e-4 at S = 3000); bf16 and fp16 logits
have few enough mantissa bits that the subtraction is exact in fp32 over any realistic range.

Two implementations of that one algorithm:
- `sinkhorn_knopp_reference`: PyTorch, vectorized. It materializes F once, in the output buffer, and runs the
  iterations as matrix-vector products; Q is written in place. One B x K float32 buffer in all.
- the Triton path never stores F: per iteration one pass over the logits for the column sums (a deterministic
  two-stage reduction: per-row-split partial sums, then a sum over splits; the K-vector all-reduce follows)
  and one for the row sums (per-column-split partials), then a last pass writes Q. The first column pass finds
  M online (running max, rescaled running sum) and the first row pass finds R online, so the logits are read
  2 * n_iter + 1 times in all. bf16/fp16 logits are upcast in registers; all sums are fp32.

Teacher-side only: runs under no_grad and returns a new float32 tensor with no autograd history.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels.common import KernelImpl, interpreting, use_triton

OP = "sinkhorn_knopp"


# ----------------------------------------------------------------------------------------------------------------
# Input checks and the collectives both paths share
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(logits: torch.Tensor, temperature: float, n_iter: int, n_valid) -> tuple[float, int]:
    """Validate the arguments; return (temperature as a float, number of valid leading rows)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{OP}: logits must be a 2-D tensor [samples, prototypes], got {shape}; flatten leading dims")
    if not logits.is_floating_point():
        raise ValueError(f"{OP}: logits must be floating point (fp32, bf16 or fp16), got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError(f"{OP}: logits have 0 prototypes (shape {tuple(logits.shape)}); K must be at least 1")
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{OP}: temperature must be a finite number > 0, got {temperature}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"{OP}: n_iter must be an int >= 1 (the official recipe uses 3), got {n_iter!r}")
    n_rows = logits.shape[0]
    if n_valid is None:
        return temperature, n_rows
    if isinstance(n_valid, torch.Tensor):
        if n_valid.numel() != 1 or n_valid.is_floating_point() or n_valid.is_complex():
            raise ValueError(f"{OP}: n_valid must be an int or a 1-element integer tensor, got {n_valid!r}")
        n_valid = int(n_valid.item())
    elif isinstance(n_valid, bool) or not isinstance(n_valid, int):
        raise ValueError(f"{OP}: n_valid must be an int or a 1-element integer tensor, got {n_valid!r}")
    if not 0 <= n_valid <= n_rows:
        raise ValueError(f"{OP}: n_valid must lie in [0, {n_rows}] (the number of rows of logits), got {n_valid}")
    return temperature, n_valid


def _resolve_group(group):
    """The process group to all-reduce over, or None when there is nobody to talk to."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(f"{OP}: a process group was given but torch.distributed is not initialized")
        return None
    group = dist.group.WORLD if group is None else group
    return group if dist.get_world_size(group) > 1 else None


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _global_count(n_valid: int, group, device: torch.device) -> int:
    count = torch.tensor([n_valid], dtype=torch.int64, device=device)
    return int(_all_reduce(count, dist.ReduceOp.SUM, group).item())


def _zero_padding_rows(out: torch.Tensor, n_valid: int) -> torch.Tensor:
    out[n_valid:].zero_()
    return out


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference (the specification; also the CPU path)
# ----------------------------------------------------------------------------------------------------------------


_MATVEC_CHUNK = 1024


def _weighted_sums(matrix: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """sum over `dim` of matrix * weights (weights along `dim`), as fp32 matrix-vector products on chunks.

    BLAS adds each product's terms in a few sequential accumulators: over K = 65536 prototypes that loses
    ~1e-5 of relative accuracy; chunks of 1024 keep it near 1e-7 (the products are a small part of the time).
    """
    total = None
    for start in range(0, matrix.shape[dim], _MATVEC_CHUNK):
        block = matrix.narrow(dim, start, min(_MATVEC_CHUNK, matrix.shape[dim] - start))
        part_weights = weights[start:start + block.shape[dim]]
        part = part_weights @ block if dim == 0 else block @ part_weights
        total = part if total is None else total.add_(part)
    if total is None:  # nothing to sum over (no valid rows here)
        total = matrix.new_zeros(matrix.shape[1 - dim])
    return total


@torch.no_grad()
def sinkhorn_knopp_reference(
    logits: torch.Tensor,
    temperature: float,
    n_iter: int = 3,
    n_valid: int | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scaling-vector Sinkhorn-Knopp in PyTorch: materializes F once, in the output buffer."""
    temperature, n_valid = _check_inputs(logits, temperature, n_iter, n_valid)
    group = _resolve_group(group)
    b_global = _global_count(n_valid, group, logits.device)
    n_protos = logits.shape[1]
    out = _zero_padding_rows(torch.empty(logits.shape, dtype=torch.float32, device=logits.device), n_valid)
    if b_global == 0:
        return out
    valid = logits[:n_valid]
    if n_valid > 0:
        col_max = valid.amax(dim=0).float()
    else:
        col_max = torch.full((n_protos,), -math.inf, device=logits.device)
    _all_reduce(col_max, dist.ReduceOp.MAX, group)

    f = torch.sub(valid, col_max, out=out[:n_valid])  # exact near each maximum: the entries that matter
    row_max = f.amax(dim=1) if n_valid > 0 else col_max.new_empty(0)
    row_max_scaled = row_max / temperature
    torch.add(-row_max_scaled[:, None], f, alpha=1.0 / temperature, out=f).exp_()  # F, in place

    row_scale = torch.exp(row_max_scaled)
    for _ in range(n_iter):
        col_sum = _all_reduce(_weighted_sums(f, row_scale, dim=0), dist.ReduceOp.SUM, group)
        col_weight = col_sum.reciprocal_()  # K * c: the factor 1 / K moves to the (shorter) sample vectors
        row_scale = n_protos / (b_global * _weighted_sums(f, col_weight, dim=1))
    f.mul_(col_weight).mul_((b_global / n_protos * row_scale)[:, None])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. Exponentials are base 2: exp(x / T) = exp2(x * scale2) with scale2 = log2(e) / T.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _column_pass_kernel(
    logits_ptr, col_max_ptr, row_max_ptr, row_scale_ptr, part_max_ptr, part_sum_ptr,
    n_rows, n_cols, stride_row, stride_col, scale2, rows_per_split,
    FIRST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial column sums over one split of rows: part_sum[split, k] = sum_b u_b F_bk.

    FIRST: M is not known yet; keep a running column max of the logits and a running sum of exp((x - max) / T)
    rescaled whenever the max grows, and store both (the host merges the splits and the ranks).
    """
    pid_col = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_col * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < n_cols
    col_offsets = cols.to(tl.int64)[None, :] * stride_col
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, n_rows)
    run_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    if FIRST:
        run_max = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    else:
        col_max = tl.load(col_max_ptr + cols, mask=col_ok, other=0.0)
    for row0 in range(row_begin, row_end, BLOCK_B):
        rows = row0 + tl.arange(0, BLOCK_B)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row + col_offsets
        if FIRST:
            x = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            # a column with no entry yet has max -inf; shift by 0 there so that -inf - -inf never appears
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            tile_sum = tl.sum(tl.exp2((x - shift[None, :]) * scale2), axis=0)
            run_sum = run_sum * tl.exp2((run_max - shift) * scale2) + tile_sum
            run_max = new_max
        else:
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
            row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
            # masked lanes get exponent -inf (f = 0) rather than whatever their placeholder values would give
            z = tl.where(mask, ((x - col_max[None, :]) - row_max[:, None]) * scale2, float("-inf"))
            run_sum += tl.sum(tl.exp2(z) * row_scale[:, None], axis=0)
    out_offsets = split.to(tl.int64) * n_cols + cols
    tl.store(part_sum_ptr + out_offsets, run_sum, mask=col_ok)
    if FIRST:
        tl.store(part_max_ptr + out_offsets, run_max, mask=col_ok)


@triton.jit
def _row_pass_kernel(
    logits_ptr, col_max_ptr, col_weight_ptr, row_max_ptr, part_max_ptr, part_sum_ptr,
    n_rows, n_cols, stride_row, stride_col, scale2, cols_per_split, n_splits,
    FIRST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial row sums over one split of columns: part_sum[b, split] = sum_k F_bk w_k (w = K * c).

    FIRST: R is not known yet; keep a running row max of (logits - M) and a rescaled running sum, store both.
    """
    pid_row = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_row * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    row_offsets = rows.to(tl.int64)[:, None] * stride_row
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_cols)
    run_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
    if FIRST:
        run_max = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    else:
        row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    for col0 in range(col_begin, col_end, BLOCK_K):
        cols = col0 + tl.arange(0, BLOCK_K)
        col_ok = cols < col_end
        mask = row_ok[:, None] & col_ok[None, :]
        ptrs = logits_ptr + row_offsets + cols.to(tl.int64)[None, :] * stride_col
        col_max = tl.load(col_max_ptr + cols, mask=col_ok, other=0.0)
        col_weight = tl.load(col_weight_ptr + cols, mask=col_ok, other=0.0)
        if FIRST:
            x = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
            d = x - col_max[None, :]
            new_max = tl.maximum(run_max, tl.max(d, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            tile_sum = tl.sum(tl.exp2((d - shift[:, None]) * scale2) * col_weight[None, :], axis=1)
            run_sum = run_sum * tl.exp2((run_max - shift) * scale2) + tile_sum
            run_max = new_max
        else:
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            z = tl.where(mask, ((x - col_max[None, :]) - row_max[:, None]) * scale2, float("-inf"))
            run_sum += tl.sum(tl.exp2(z) * col_weight[None, :], axis=1)
    out_offsets = rows.to(tl.int64) * n_splits + split
    tl.store(part_sum_ptr + out_offsets, run_sum, mask=row_ok)
    if FIRST:
        tl.store(part_max_ptr + out_offsets, run_max, mask=row_ok)


@triton.jit
def _write_kernel(
    logits_ptr, col_max_ptr, col_weight_ptr, row_max_ptr, row_factor_ptr, out_ptr,
    n_valid, n_rows, n_cols, stride_row, stride_col, out_stride_row, scale2,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Q[b, k] = row_factor_b * F_bk * w_k for valid rows (w = K * c), exact 0 for padding rows."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    col_ok = cols < n_cols
    valid = rows < n_valid
    load_mask = valid[:, None] & col_ok[None, :]
    x = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col,
        mask=load_mask, other=0.0,
    ).to(tl.float32)
    col_max = tl.load(col_max_ptr + cols, mask=col_ok, other=0.0)
    col_weight = tl.load(col_weight_ptr + cols, mask=col_ok, other=0.0)
    row_max = tl.load(row_max_ptr + rows, mask=valid, other=0.0)
    row_factor = tl.load(row_factor_ptr + rows, mask=valid, other=0.0)
    z = tl.where(load_mask, ((x - col_max[None, :]) - row_max[:, None]) * scale2, float("-inf"))
    q = tl.exp2(z) * col_weight[None, :] * row_factor[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * out_stride_row + cols[None, :]
    tl.store(out_ptrs, q, mask=(rows < n_rows)[:, None] & col_ok[None, :])


# The host fixes the split sizes, not the config, so the partial-sum buffers are the same for every config and
# each program only writes its own slots: autotuning's repeated launches cannot accumulate twice. Splits are
# multiples of every config's tile (BLOCK_B | 64, BLOCK_K | 512), so no tile straddles two splits.
_GPU_ROWS_PER_SPLIT = 64
_GPU_COLS_PER_SPLIT_UNIT = 512
_GPU_MAX_SPLITS = 128
_PASS_CONFIGS = [
    triton.Config({"BLOCK_B": 16, "BLOCK_K": 256}, num_warps=4),
    triton.Config({"BLOCK_B": 32, "BLOCK_K": 256}, num_warps=8),
    triton.Config({"BLOCK_B": 16, "BLOCK_K": 512}, num_warps=8),
    triton.Config({"BLOCK_B": 32, "BLOCK_K": 128}, num_warps=4),
]
# The interpreter runs each program instance in numpy: small tiles, and splits of two tiles so that the tests
# cover multi-split reductions, multi-tile loops and ragged last tiles.
_INTERPRETER_BLOCKS = {"BLOCK_B": 16, "BLOCK_K": 64}


def _tuned(kernel, key: list[str]):
    return kernel if interpreting() else triton.autotune(configs=_PASS_CONFIGS, key=key)(kernel)


_column_pass = _tuned(_column_pass_kernel, key=["n_cols", "rows_per_split", "FIRST"])
_row_pass = _tuned(_row_pass_kernel, key=["n_cols", "cols_per_split", "FIRST"])
_write = _tuned(_write_kernel, key=["n_cols"])


def _launch(kernel, grid, *args, **constexprs) -> None:
    blocks = _INTERPRETER_BLOCKS if interpreting() else {}
    kernel[grid](*args, **constexprs, **blocks)


def _split_sizes(n_rows: int, n_cols: int) -> tuple[int, int]:
    """Rows per column-pass split and columns per row-pass split (host-fixed, independent of the config)."""
    if interpreting():
        return 2 * _INTERPRETER_BLOCKS["BLOCK_B"], 2 * _INTERPRETER_BLOCKS["BLOCK_K"]
    # at most ~32 row splits: the partial buffers stay a few percent of the logits' bytes
    unit = _GPU_ROWS_PER_SPLIT
    rows_per_split = unit * max(1, triton.cdiv(triton.cdiv(n_rows, 32), unit))
    # enough column splits to fill the GPU when the batch is small, at most _GPU_MAX_SPLITS of them
    unit = _GPU_COLS_PER_SPLIT_UNIT
    n_col_splits = min(_GPU_MAX_SPLITS, triton.cdiv(n_cols, 2 * unit))
    cols_per_split = unit * triton.cdiv(triton.cdiv(n_cols, n_col_splits), unit)
    return rows_per_split, cols_per_split


def _merge_max_sum(maxes: torch.Tensor, sums: torch.Tensor, dim: int, scale2: float):
    """Combine (running max, sum of exp2((x - max) * scale2)) pairs along `dim` into one pair."""
    merged_max = maxes.amax(dim=dim)
    shift = torch.where(torch.isinf(merged_max), torch.zeros_like(merged_max), merged_max)
    merged_sum = (sums * torch.exp2((maxes - shift.unsqueeze(dim)) * scale2)).sum(dim=dim)
    return merged_max, merged_sum


def _rescale_sum(sums: torch.Tensor, old_max: torch.Tensor, new_max: torch.Tensor, scale2: float) -> torch.Tensor:
    """Express sums of exp2((x - old_max) * scale2) relative to new_max >= old_max (-inf entries hold 0)."""
    shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
    return sums * torch.exp2((old_max - shift) * scale2)


def _sinkhorn_triton(
    logits: torch.Tensor, temperature: float, n_iter: int, n_valid: int, group, b_global: int
) -> torch.Tensor:
    n_rows, n_cols = logits.shape
    device = logits.device
    out = torch.empty(n_rows, n_cols, dtype=torch.float32, device=device)
    if b_global == 0:
        return out.zero_()
    scale2 = math.log2(math.e) / temperature
    rows_per_split, cols_per_split = _split_sizes(n_valid, n_cols)
    n_row_splits = triton.cdiv(n_valid, rows_per_split)
    n_col_splits = triton.cdiv(n_cols, cols_per_split)
    strides = (logits.stride(0), logits.stride(1))
    f32 = dict(dtype=torch.float32, device=device)
    col_grid = lambda meta: (triton.cdiv(n_cols, meta["BLOCK_K"]), n_row_splits)  # noqa: E731
    row_grid = lambda meta: (triton.cdiv(n_valid, meta["BLOCK_B"]), n_col_splits)  # noqa: E731

    def column_sums(col_max, row_max, row_scale, first):
        part_sum = torch.empty(n_row_splits, n_cols, **f32)
        part_max = torch.empty(n_row_splits, n_cols, **f32) if first else part_sum
        if n_valid > 0:
            _launch(_column_pass, col_grid, logits, col_max, row_max, row_scale, part_max, part_sum,
                    n_valid, n_cols, *strides, scale2, rows_per_split, FIRST=first)
        if first:
            return _merge_max_sum(part_max, part_sum, 0, scale2) if n_valid > 0 else (
                torch.full((n_cols,), -math.inf, **f32), torch.zeros(n_cols, **f32))
        return part_sum.sum(dim=0)

    def row_sums(col_max, col_weight, row_max, first):
        part_sum = torch.empty(n_valid, n_col_splits, **f32)
        part_max = torch.empty(n_valid, n_col_splits, **f32) if first else part_sum
        if n_valid > 0:
            _launch(_row_pass, row_grid, logits, col_max, col_weight, row_max, part_max, part_sum,
                    n_valid, n_cols, *strides, scale2, cols_per_split, n_col_splits, FIRST=first)
        return _merge_max_sum(part_max, part_sum, 1, scale2) if first else part_sum.sum(dim=1)

    # iteration 1: M and R come out of the passes themselves (running maxima); the per-row factor exp(R / T)
    # is already inside these column sums
    unused = torch.empty(1, **f32)  # stands in for the vectors a FIRST pass computes itself
    local_max, local_sum = column_sums(unused, unused, unused, first=True)
    col_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
    col_sum = _all_reduce(_rescale_sum(local_sum, local_max, col_max, scale2), dist.ReduceOp.SUM, group)
    col_weight = col_sum.reciprocal_()  # K * c, as in the reference
    row_max, row_sum = row_sums(col_max, col_weight, unused, first=True)
    row_scale = n_cols / (b_global * row_sum)
    for _ in range(n_iter - 1):
        col_sum = _all_reduce(column_sums(col_max, row_max, row_scale, first=False), dist.ReduceOp.SUM, group)
        col_weight = col_sum.reciprocal_()
        row_scale = n_cols / (b_global * row_sums(col_max, col_weight, row_max, first=False))

    row_factor = b_global / n_cols * row_scale
    write_grid = lambda meta: (triton.cdiv(n_cols, meta["BLOCK_K"]), triton.cdiv(n_rows, meta["BLOCK_B"]))  # noqa: E731
    if n_rows > 0:
        _launch(_write, write_grid, logits, col_max, col_weight, row_max, row_factor, out,
                n_valid, n_rows, n_cols, *strides, out.stride(0), scale2)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor,
    temperature: float,
    n_iter: int = 3,
    n_valid: int | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    impl: KernelImpl = "auto",
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets: Q [B, K] float32 whose valid rows sum to 1.

    logits: [B, K] teacher head outputs (fp32, bf16 or fp16; any strides; finite), temperature: > 0,
    n_iter: Sinkhorn iterations (3 in the recipe), n_valid: the number of leading valid rows on this rank (the
    rest is padding: excluded from every sum, returned as exact zeros); None means all B rows.
    group: process group whose ranks' samples are centered together (None: the default group when
    torch.distributed is initialized, otherwise none). Every rank of the group must call this, even with
    n_valid = 0. impl: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, PyTorch otherwise), "triton"
    or "reference". No autograd: the teacher side needs none.
    """
    temperature, n_valid = _check_inputs(logits, temperature, n_iter, n_valid)
    if not use_triton(logits, impl, OP):
        return sinkhorn_knopp_reference(logits, temperature, n_iter, n_valid, group)
    group = _resolve_group(group)
    b_global = _global_count(n_valid, group, logits.device)
    return _sinkhorn_triton(logits, temperature, n_iter, n_valid, group, b_global)
