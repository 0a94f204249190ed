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

Accuracy: near float32 rounding for teacher-like logits (figures in docs/kernels.md). The one input-dependent
loss is the shift: fp32 rounds logits - M to u = 6e-8 of its size, so fp32 logits whose samples lie S
temperatures apart agree to ~u * S; bf16 and fp16 logits have few enough mantissa bits that the subtraction is
exact in fp32 over any realistic range.

Two implementations of that one algorithm:
- `sinkhorn_knopp_reference`: PyTorch, vectorized. It materializes F once, in the output buffer, and runs the
  iterations as matrix-vector products; Q is written in place. One B x K float32 buffer in all.
- the Triton path never stores F: per iteration one pass over the logits for the column sums and one for the
  row sums, then a last pass writes Q = F diag(w) / (F @ w) (the row normalization itself). The first column
  pass finds M online (running max, rescaled running sum) and the first row pass finds R online, so the logits
  are read 2 * n_iter + 1 times in all. bf16/fp16 logits are upcast in registers; all sums are fp32. A pass
  whose reduction axis is split over several programs (small batches: the row sums; small K: the column sums)
  merges the partials in the kernel: the last program of each tile to finish (an integer ticket) adds them in
  split order, so the result has the same bits every call. Between passes only the K-vectors' all-reduce runs
  (with a process group). Without one, a batch of at most _SMALL_BATCH_ROWS rows takes one fused kernel per
  iteration (a program holds every row of its columns, so it finishes their sums and goes on to the rows'
  partial sums over them): n_iter + 1 launches instead of 2 * n_iter + 1, which is what bounds such small
  problems. Either way a call runs no other GPU work than a memset (the tickets) and no host sync.

Teacher-side only: runs under no_grad and returns a new float32 tensor with no autograd history.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from dino_kernels.common import KernelImpl, interpreting, launch, new_buffer, reduction_group, use_triton

SINKHORN_ITERATIONS = 3  # DINOv3's recipe; train.py's loss.sinkhorn_iterations defaults to it

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
        raise ValueError(f"{OP}: n_iter must be an int >= 1 (the recipe uses {SINKHORN_ITERATIONS}), got {n_iter!r}")
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


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _global_count(n_valid: int, group, device: torch.device) -> int:
    """B_global: the valid rows of all ranks. Known on the host without a group; otherwise one all-reduce and
    a host sync (the only one of a call)."""
    if group is None:
        return n_valid
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

    BLAS adds each product's terms in a few sequential accumulators, so one product over all K prototypes
    loses accuracy growing with K; chunks of _MATVEC_CHUNK bound that (the products are a small part of the
    time; figures in docs/kernels.md).
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
    n_iter: int = SINKHORN_ITERATIONS,
    n_valid: int | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scaling-vector Sinkhorn-Knopp in PyTorch: materializes F once, in the output buffer (arguments as
    `sinkhorn_knopp`'s)."""
    temperature, n_valid = _check_inputs(logits, temperature, n_iter, n_valid)
    group = reduction_group(group, OP)
    b_global = _global_count(n_valid, group, logits.device)
    return _sinkhorn_reference(logits, temperature, n_iter, n_valid, group, b_global)


def _sinkhorn_reference(
    logits: torch.Tensor, temperature: float, n_iter: int, n_valid: int, group, b_global: int
) -> torch.Tensor:
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
#
# The passes exchange four vectors: col_max (M), col_sum (the column sums; w = 1 / col_sum), row_max (R) and
# row_sum (the row sums s_b = sum_k F_bk w_k; u_b = (K / B_global) / s_b). Consumers take the reciprocals in
# registers, so no kernel or PyTorch op sits between the passes, and the distributed path all-reduces the very
# vectors the kernels write.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _online_update(run_max, run_sum, value, weight, valid, scale2):
    """Absorb `value` (with `weight`) into elementwise pairs (running max m, running sum of w exp2((v - m) scale2)).

    One exp2 per element: a value above m becomes the new m, and the same exp2(-|value - m| scale2) rescales the
    old sum instead of weighting the new term. Lanes that are not `valid` leave the pair unchanged (even at
    m = -inf, where value - m could be -inf - -inf).
    """
    delta = tl.where(valid, value - run_max, float("-inf"))
    factor = tl.exp2(-tl.abs(delta) * scale2)
    grows = delta > 0
    return tl.where(grows, value, run_max), tl.where(grows, run_sum * factor + weight, run_sum + factor * weight)


@triton.jit
def _reduce_max_sum(maxes, sums, scale2, AXIS: tl.constexpr):
    """Reduce (max, sum of exp2((x - max) scale2)) pairs along AXIS to one pair per lane of the other axis."""
    new_max = tl.max(maxes, axis=AXIS)
    # an empty pair has max -inf and sum 0; shift by 0 there so that -inf - -inf never appears
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, tl.sum(sums * tl.exp2((maxes - tl.expand_dims(shift, AXIS)) * scale2), axis=AXIS)


@triton.jit
def _combine_max_sum(max_a, sum_a, max_b, sum_b, scale2):
    """Elementwise union of two (max, sum of exp2((x - max) scale2)) pairs."""
    new_max = tl.maximum(max_a, max_b)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, sum_a * tl.exp2((max_a - shift) * scale2) + sum_b * tl.exp2((max_b - shift) * scale2)


@triton.jit
def _merge_splits(part_max_ptr, part_sum_ptr, lanes, lane_ok, n_lanes, n_splits, scale2,
                  FIRST: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """Sum the partials part[split, lane] of all splits, SPLIT_CHUNK splits at a time, in split order.

    FIRST: the partials are (max, sum) pairs, merged into one pair. Loads bypass L1 (.cg): the partials were just
    written by other programs, and an earlier pass may have left stale lines of this buffer in this SM's L1.
    """
    total = tl.zeros(lanes.shape, dtype=tl.float32)
    total_max = tl.full(lanes.shape, float("-inf"), dtype=tl.float32)
    for split0 in range(0, n_splits, SPLIT_CHUNK):
        splits = split0 + tl.arange(0, SPLIT_CHUNK)
        offsets = splits.to(tl.int64)[:, None] * n_lanes + lanes[None, :]
        mask = (splits < n_splits)[:, None] & lane_ok[None, :]
        sums = tl.load(part_sum_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        if FIRST:
            maxes = tl.load(part_max_ptr + offsets, mask=mask, other=float("-inf"), cache_modifier=".cg")
            chunk_max, chunk_sum = _reduce_max_sum(maxes, sums, scale2, 0)
            total_max, total = _combine_max_sum(total_max, total, chunk_max, chunk_sum, scale2)
        else:
            total += tl.sum(sums, axis=0)
    return total_max, total


@triton.jit
def _take_ticket(ticket_ptr, n_programs):
    """True for the last of `n_programs` programs to arrive; it also resets the counter for the next launch.

    An integer ticket is the only atomic: the float partials are then added by that one program in a fixed
    order, so every call gives the same bits. Every thread's stores happen before the (release) ticket, so the
    last program's (acquire) ticket sees all the other programs' partials.
    """
    tl.debug_barrier()
    last = tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == n_programs - 1
    if last:
        tl.store(ticket_ptr, 0)
    return last


@triton.jit
def _store_or_merge(out_max_ptr, out_sum_ptr, part_max_ptr, part_sum_ptr, ticket_ptr, tile_max, tile_sum,
                    lanes, lane_ok, n_lanes, split, n_splits, scale2, FIRST: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """Store this program's sums (and maxima) for its lanes; with several splits, as partials that the last of
    the tile's programs to finish merges into the outputs."""
    if n_splits == 1:
        tl.store(out_sum_ptr + lanes, tile_sum, mask=lane_ok)
        if FIRST:
            tl.store(out_max_ptr + lanes, tile_max, mask=lane_ok)
    else:
        offsets = split.to(tl.int64) * n_lanes + lanes
        tl.store(part_sum_ptr + offsets, tile_sum, mask=lane_ok)
        if FIRST:
            tl.store(part_max_ptr + offsets, tile_max, mask=lane_ok)
        if _take_ticket(ticket_ptr, n_splits):
            merged_max, merged_sum = _merge_splits(
                part_max_ptr, part_sum_ptr, lanes, lane_ok, n_lanes, n_splits, scale2, FIRST, SPLIT_CHUNK
            )
            tl.store(out_sum_ptr + lanes, merged_sum, mask=lane_ok)
            if FIRST:
                tl.store(out_max_ptr + lanes, merged_max, mask=lane_ok)


@triton.jit
def _column_tile_sums(logits_ptr, col_max_ptr, row_max_ptr, row_sum_ptr, cols, col_ok, row_begin, row_end,
                      stride_row, stride_col, scale2, row_factor,
                      FIRST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """(M, sum) over rows [row_begin, row_end) for the columns `cols`: M from col_max and sum_b u_b F_bk with
    u_b = row_factor / row_sum[b]; FIRST: M = max_b x_bk (not known yet) and sum_b exp2((x_bk - M) scale2).

    Each lane of the [BLOCK_B, BLOCK_K] tile accumulates its own sum (FIRST: and max, online) over the loop; the
    reduction across the tile's rows happens once, at the end.
    """
    col_offsets = cols.to(tl.int64)[None, :] * stride_col
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    acc_max = tl.full([BLOCK_B, BLOCK_K], float("-inf"), dtype=tl.float32)
    # columns past the end get M = +inf: F = 0 there (no overflow in lanes never stored). FIRST: replaced below
    col_max = tl.load(col_max_ptr + cols, mask=col_ok, other=float("inf"))
    # num_stages: the loop's loads go through shared memory (cp.async) two tiles ahead of the arithmetic, the bytes
    # in flight a memory-bound loop needs (a plain loop waits for each tile)
    for row0 in tl.range(row_begin, row_end, BLOCK_B, num_stages=3):
        rows = row0 + tl.arange(0, BLOCK_B)
        row_ok = rows < row_end
        ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row + col_offsets
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if FIRST:
            acc_max, acc = _online_update(acc_max, acc, x, 1.0, row_ok[:, None], scale2)
        else:
            # rows past the end get R = +inf, so F = 0 there (and a finite weight: no 0 * inf)
            row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=float("inf"))
            row_scale = row_factor / tl.load(row_sum_ptr + rows, mask=row_ok, other=1.0)
            f = tl.exp2(((x - col_max[None, :]) - row_max[:, None]) * scale2)
            acc += f * row_scale[:, None]
    if FIRST:
        col_max, col_sum = _reduce_max_sum(acc_max, acc, scale2, 0)
    else:
        col_sum = tl.sum(acc, axis=0)
    return col_max, col_sum


# n_rows (n_valid: iBOT's changes every step) and n_splits are not specialized on (divisibility, == 1): one compiled
# kernel serves every batch size, and every compiled variant holds the merge code.
@triton.jit(do_not_specialize=["n_rows", "n_splits"])
def _column_pass_kernel(
    logits_ptr, row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr, part_max_ptr, part_sum_ptr, tickets_ptr,
    n_rows, n_cols, stride_row, stride_col, scale2, row_factor, rows_per_split, n_splits, rows_bucket,
    FIRST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    """Column sums over one split of rows: col_sum[k] = sum_b u_b F_bk, u_b = row_factor / row_sum[b].

    FIRST: M is not known yet; col_max[k] = max_b x_bk and col_sum[k] = sum_b exp2((x_bk - col_max[k]) scale2),
    found online. (`rows_bucket` is only the autotune key.)
    """
    pid_col = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_col * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < n_cols
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, n_rows)
    tile_max, tile_sum = _column_tile_sums(logits_ptr, col_max_ptr, row_max_ptr, row_sum_ptr, cols, col_ok, row_begin,
                                           row_end, stride_row, stride_col, scale2, row_factor,
                                           FIRST, BLOCK_B, BLOCK_K)
    _store_or_merge(col_max_ptr, col_sum_ptr, part_max_ptr, part_sum_ptr, tickets_ptr + pid_col, tile_max, tile_sum,
                    cols, col_ok, n_cols, split, n_splits, scale2, FIRST, SPLIT_CHUNK)


@triton.jit(do_not_specialize=["n_rows", "n_splits"])
def _row_pass_kernel(
    logits_ptr, col_max_ptr, col_sum_ptr, row_max_ptr, row_sum_ptr, part_max_ptr, part_sum_ptr, tickets_ptr,
    n_rows, n_cols, stride_row, stride_col, scale2, cols_per_split, n_splits, rows_bucket,
    FIRST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    """Row sums over one split of columns: row_sum[b] = sum_k F_bk w_k, w_k = 1 / col_sum[k].

    FIRST: R is not known yet; row_max[b] = max_k (x_bk - M_k), and the sum relative to it, found online.
    """
    pid_row = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_row * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    row_offsets = rows.to(tl.int64)[:, None] * stride_row
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_cols)
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    if FIRST:
        acc_max = tl.full([BLOCK_B, BLOCK_K], float("-inf"), dtype=tl.float32)
    else:
        # rows past the end get R = +inf: F = 0 there
        row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=float("inf"))
    for col0 in tl.range(col_begin, col_end, BLOCK_K, num_stages=3):  # pipelined, as in the column pass
        cols = col0 + tl.arange(0, BLOCK_K)
        col_ok = cols < col_end
        ptrs = logits_ptr + row_offsets + cols.to(tl.int64)[None, :] * stride_col
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        # later passes: columns past the end get M = +inf, so F = 0 there (and a finite weight); FIRST masks them
        col_max = tl.load(col_max_ptr + cols, mask=col_ok, other=0.0 if FIRST else float("inf"))
        col_weight = 1.0 / tl.load(col_sum_ptr + cols, mask=col_ok, other=1.0)
        d = x - col_max[None, :]
        if FIRST:
            acc_max, acc = _online_update(acc_max, acc, d, col_weight[None, :], col_ok[None, :], scale2)
        else:
            acc += tl.exp2((d - row_max[:, None]) * scale2) * col_weight[None, :]
    if FIRST:
        tile_max, tile_sum = _reduce_max_sum(acc_max, acc, scale2, 1)
    else:
        tile_sum = tl.sum(acc, axis=1)
        tile_max = tile_sum  # unused
    _store_or_merge(row_max_ptr, row_sum_ptr, part_max_ptr, part_sum_ptr, tickets_ptr + pid_row, tile_max, tile_sum,
                    rows, row_ok, n_rows, split, n_splits, scale2, FIRST, SPLIT_CHUNK)


@triton.jit(do_not_specialize=["n_rows"])
def _small_batch_pass_kernel(
    logits_ptr, col_max_ptr, col_sum_ptr, row_max_ptr, row_sum_ptr, part_max_ptr, part_sum_ptr, ticket_ptr,
    n_rows, n_cols, stride_row, stride_col, scale2, row_factor,
    FIRST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    """A whole iteration (column pass, then row pass) for a batch whose rows one program walks twice.

    A program owns a column tile and every row: its column sums are complete, so it knows w = 1 / col_sum for its
    columns at once and goes on to each row's partial sum over them (FIRST: with the row's max of x - M over
    them). The last program to finish merges the rows' partials over all tiles, as the row pass merges its
    splits. Without a process group only: the column sums need no all-reduce before w.

    The launch reads the row sums it replaces -- safe, since the merge starts after every program's reads, but
    the kernel must not be re-run on its own output, hence no autotuning.
    """
    pid = tl.program_id(0)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < n_cols
    col_max, col_sum = _column_tile_sums(logits_ptr, col_max_ptr, row_max_ptr, row_sum_ptr, cols, col_ok, 0, n_rows,
                                         stride_row, stride_col, scale2, row_factor, FIRST, BLOCK_B, BLOCK_K)
    tl.store(col_sum_ptr + cols, col_sum, mask=col_ok)
    if FIRST:
        tl.store(col_max_ptr + cols, col_max, mask=col_ok)
    col_weight = 1.0 / tl.where(col_ok, col_sum, 1.0)  # columns past the end: F = 0 there below

    # the same rows again, now summed along the columns. A tile of at most _SMALL_BATCH_ROWS rows was just read:
    # these loads hit L2, so the loop is not pipelined (that would cost registers: fp32 tiles spilled)
    col_offsets = cols.to(tl.int64)[None, :] * stride_col
    for row0 in range(0, n_rows, BLOCK_B):
        rows = row0 + tl.arange(0, BLOCK_B)
        row_ok = rows < n_rows
        ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row + col_offsets
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        d = tl.where(col_ok[None, :], x - col_max[None, :], float("-inf"))
        offsets = pid.to(tl.int64) * n_rows + rows
        if FIRST:
            part_max, part_sum = _reduce_max_sum(d, col_weight[None, :], scale2, 1)
            tl.store(part_max_ptr + offsets, part_max, mask=row_ok)
        else:
            row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=float("inf"))
            part_sum = tl.sum(tl.exp2((d - row_max[:, None]) * scale2) * col_weight[None, :], axis=1)
        tl.store(part_sum_ptr + offsets, part_sum, mask=row_ok)

    n_tiles = tl.num_programs(0)
    if _take_ticket(ticket_ptr, n_tiles):
        for row0 in range(0, n_rows, BLOCK_B):
            rows = row0 + tl.arange(0, BLOCK_B)
            row_ok = rows < n_rows
            row_max, row_sum = _merge_splits(
                part_max_ptr, part_sum_ptr, rows, row_ok, n_rows, n_tiles, scale2, FIRST, SPLIT_CHUNK
            )
            tl.store(row_sum_ptr + rows, row_sum, mask=row_ok)
            if FIRST:
                tl.store(row_max_ptr + rows, row_max, mask=row_ok)


@triton.jit(do_not_specialize=["n_valid"])
def _write_kernel(
    logits_ptr, col_max_ptr, col_sum_ptr, row_max_ptr, row_sum_ptr, out_ptr,
    n_valid, n_rows, n_cols, stride_row, stride_col, out_stride_row, scale2, rows_bucket,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Q[b, k] = F_bk w_k / row_sum[b] for valid rows (w = 1 / col_sum), exact 0 for padding rows."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    col_ok = cols < n_cols
    valid = rows < n_valid
    x = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col,
        mask=valid[:, None] & col_ok[None, :], other=0.0,
    ).to(tl.float32)
    col_max = tl.load(col_max_ptr + cols, mask=col_ok, other=float("inf"))
    col_weight = 1.0 / tl.load(col_sum_ptr + cols, mask=col_ok, other=1.0)
    # padding rows get R = +inf: F = 0 and a finite weight, so Q = 0 there
    row_max = tl.load(row_max_ptr + rows, mask=valid, other=float("inf"))
    row_weight = 1.0 / tl.load(row_sum_ptr + rows, mask=valid, other=1.0)
    q = tl.exp2(((x - col_max[None, :]) - row_max[:, None]) * scale2) * col_weight[None, :] * row_weight[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * out_stride_row + cols[None, :]
    tl.store(out_ptrs, q, mask=(rows < n_rows)[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Configs, split sizes and the host side of the Triton path
# ----------------------------------------------------------------------------------------------------------------

# Tiles of 32 fp32 lanes per thread (the FIRST passes keep two accumulators per lane: ~64 registers), rows of
# 256-2048 contiguous bytes per load. The column pass walks rows, the row pass walks columns, the write pass is
# one tile per program. SPLIT_CHUNK: splits merged per step by the last program of a tile (~2-4k lanes).
_COLUMN_CONFIGS = [
    triton.Config({"BLOCK_B": 32, "BLOCK_K": 256, "SPLIT_CHUNK": 8}, num_warps=8),
    triton.Config({"BLOCK_B": 16, "BLOCK_K": 256, "SPLIT_CHUNK": 8}, num_warps=4),
    triton.Config({"BLOCK_B": 64, "BLOCK_K": 128, "SPLIT_CHUNK": 16}, num_warps=8),
]
_ROW_CONFIGS = [
    triton.Config({"BLOCK_B": 16, "BLOCK_K": 512, "SPLIT_CHUNK": 128}, num_warps=8),
    triton.Config({"BLOCK_B": 8, "BLOCK_K": 1024, "SPLIT_CHUNK": 128}, num_warps=8),
    triton.Config({"BLOCK_B": 16, "BLOCK_K": 256, "SPLIT_CHUNK": 128}, num_warps=4),
]
_WRITE_CONFIGS = [
    triton.Config({"BLOCK_B": 16, "BLOCK_K": 512}, num_warps=8),
    triton.Config({"BLOCK_B": 8, "BLOCK_K": 1024}, num_warps=8),
    triton.Config({"BLOCK_B": 32, "BLOCK_K": 256}, num_warps=8),
]
# The small-batch kernel: not autotuned (see the kernel). A batch this small takes microseconds per pass on the
# GPU, less than its launches take on the host, which the fused passes nearly halve (n_iter + 1 launches instead
# of 2 n_iter + 1). At most 128 rows: a program's tile, read twice, is 64 kB of bf16 logits.
_SMALL_BATCH_ROWS = 128
_SMALL_BATCH_CONFIG = {"BLOCK_B": 16, "BLOCK_K": 256, "SPLIT_CHUNK": 256, "num_warps": 4}
# The interpreter runs each program instance in numpy: small tiles, and (below) splits of two tiles merged two
# at a time, so that the tests cover multi-split merges, multi-tile loops and ragged last tiles.
_INTERPRETER_BLOCKS = {"BLOCK_B": 16, "BLOCK_K": 64, "SPLIT_CHUNK": 2}
_INTERPRETER_WRITE_BLOCKS = {"BLOCK_B": 16, "BLOCK_K": 64}

# Autotune keys: shapes, with the number of valid rows rounded up to a power of two (iBOT's count of masked
# patches changes every step). Every launch rewrites its outputs from its inputs (and leaves its tickets at 0), so
# autotuning's repeated launches cannot accumulate twice.
_column_pass = triton.autotune(_COLUMN_CONFIGS, key=["n_cols", "rows_bucket", "FIRST"])(_column_pass_kernel)
_row_pass = triton.autotune(_ROW_CONFIGS, key=["n_cols", "rows_bucket", "FIRST"])(_row_pass_kernel)
_write = triton.autotune(_WRITE_CONFIGS, key=["n_cols", "rows_bucket"])(_write_kernel)

# Split sizes are fixed by the host, not by the config, so the partial buffers are the same for every config.
# They are multiples of every config's tile along the split axis (no tile straddles two splits) and of a minimum
# (>= 64 kB of bf16 logits per program for nominal tiles: a program's fixed costs stay small). They aim at
# _PROGRAMS_PER_SM programs per SM for nominal tiles (the column pass's 256 columns, the row pass's 16 rows), a
# few waves, so that the last one matters little: large problems get few splits or none, small batches split
# their long rows instead.
_ROW_SPLIT_UNIT = 128  # a multiple of every column-pass BLOCK_B
_COL_SPLIT_UNIT = 2048  # a multiple of every row-pass BLOCK_K
_NOMINAL_BLOCK_K, _NOMINAL_BLOCK_B = 256, 16
_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 128  # within one SPLIT_CHUNK of the row configs: the row merges are a single step


# Host arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr functions, whose calls
# from the host cost microseconds each -- and a small problem's time is all host time.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _power_of_2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _split_sizes(n_rows: int, n_cols: int, n_programs: int, row_unit: int, col_unit: int) -> tuple[int, int]:
    """(rows per column-pass split, columns per row-pass split) for about `n_programs` programs per pass."""
    n_row_splits = min(_cdiv(n_programs, _cdiv(n_cols, _NOMINAL_BLOCK_K)), _MAX_SPLITS,
                       _cdiv(n_rows, row_unit))
    rows_per_split = row_unit * max(1, _cdiv(_cdiv(n_rows, max(1, n_row_splits)), row_unit))
    n_col_splits = min(_cdiv(n_programs, max(1, _cdiv(n_rows, _NOMINAL_BLOCK_B))), _MAX_SPLITS,
                       _cdiv(n_cols, col_unit))
    cols_per_split = col_unit * _cdiv(_cdiv(n_cols, max(1, n_col_splits)), col_unit)
    return rows_per_split, cols_per_split


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_split_sizes(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    if interpreting():  # as many splits as fit: two tiles each
        return _split_sizes(n_rows, n_cols, 2**31, 2 * _INTERPRETER_BLOCKS["BLOCK_B"],
                            2 * _INTERPRETER_BLOCKS["BLOCK_K"])
    if device.type == "cuda":
        n_sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:  # compile-only runs (dino_kernels.aot) have CPU tensors: size the grids as for an H100
        n_sms = 132
    return _split_sizes(n_rows, n_cols, _PROGRAMS_PER_SM * n_sms, _ROW_SPLIT_UNIT, _COL_SPLIT_UNIT)


# The smallest tiles any config (or the interpreter) uses along each axis: buffers with a slot per tile are sized
# with them
_SMALLEST_COLUMN_TILE = min([c.kwargs["BLOCK_K"] for c in _COLUMN_CONFIGS] + [_INTERPRETER_BLOCKS["BLOCK_K"]])
_SMALLEST_ROW_TILE = min([c.kwargs["BLOCK_B"] for c in _ROW_CONFIGS] + [_INTERPRETER_BLOCKS["BLOCK_B"]])


# After an autotuned kernel's first launch for a key (the one that tunes), later launches call the bare kernel with
# the config it picked: the autotuner rebuilds its key from every argument at each launch, and that host time is a
# good part of a small problem's time (whose passes take microseconds on the GPU).
_picked_configs: dict[tuple, triton.Config] = {}


def _launch_tuned(tuned, key: tuple, grid, *args, interpreter_blocks: dict, **constexprs) -> None:
    config = _picked_configs.get(key)
    if config is not None:
        launch(tuned.fn, grid, *args, **constexprs, **config.all_kwargs())
        return
    launch(tuned, grid, *args, interpreter_blocks=interpreter_blocks, **constexprs)
    if args[0].is_cuda:  # not the interpreter, nor a compile-only run: the autotuner has picked a config
        _picked_configs[key] = tuned.best_config


def _all_reduce_max_sum(col_max: torch.Tensor, col_sum: torch.Tensor, scale2: float, group) -> None:
    """In place: the global column max, and each rank's column sums re-expressed relative to it, then summed."""
    local_max = col_max.clone()
    dist.all_reduce(col_max, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isinf(col_max), torch.zeros_like(col_max), col_max)  # -inf: no rank has a row
    col_sum.mul_(torch.exp2((local_max - shift) * scale2))
    dist.all_reduce(col_sum, op=dist.ReduceOp.SUM, group=group)


def _sinkhorn_triton(
    logits: torch.Tensor, temperature: float, n_iter: int, n_valid: int, group, b_global: int
) -> torch.Tensor:
    n_rows, n_cols = logits.shape
    device = logits.device
    out = new_buffer((n_rows, n_cols), torch.float32, device)
    if b_global == 0:
        return out.zero_()
    scale2 = math.log2(math.e) / temperature
    row_factor = n_cols / b_global  # u_b = row_factor / row_sum[b]
    rows_per_split, cols_per_split = _launch_split_sizes(n_valid, n_cols, device)
    n_row_splits = max(1, _cdiv(n_valid, rows_per_split))  # a rank without rows still sends its zeros
    n_col_splits = _cdiv(n_cols, cols_per_split)
    rows_bucket = _power_of_2_at_least(n_valid)
    small_batch = group is None and n_valid <= _SMALL_BATCH_ROWS
    small_batch_blocks = _INTERPRETER_BLOCKS if interpreting() else _SMALL_BATCH_CONFIG
    # the rows' partials: per column split, or in a small batch per column tile
    n_row_parts = _cdiv(n_cols, small_batch_blocks["BLOCK_K"]) if small_batch else n_col_splits
    # Every vector and partial buffer in one allocation: the row vectors first, each padded to 32 floats, so that
    # every view starts as aligned as K allows whatever n_valid is (Triton specializes kernels on alignment)
    padded_rows = 32 * _cdiv(n_valid, 32)
    sizes = [padded_rows, padded_rows, n_row_parts * padded_rows, n_row_parts * padded_rows,
             n_cols, n_cols, n_row_splits * n_cols, n_row_splits * n_cols]
    workspace = new_buffer((sum(sizes),), torch.float32, device).split(sizes)
    row_max, row_sum, row_part_max, row_part_sum, col_max, col_sum, col_part_max, col_part_sum = workspace
    ticket_sizes = [_cdiv(n_cols, _SMALLEST_COLUMN_TILE), _cdiv(n_valid, _SMALLEST_ROW_TILE)]
    col_tickets, row_tickets = torch.zeros(sum(ticket_sizes), dtype=torch.int32, device=device).split(ticket_sizes)
    strides = (logits.stride(0), logits.stride(1))
    key = (n_cols, rows_bucket, logits.dtype)  # the autotune key, with the dtypes Triton's autotuner adds

    def column_pass(first: bool) -> None:
        _launch_tuned(_column_pass, ("column", first, *key),
                      lambda meta: (_cdiv(n_cols, meta["BLOCK_K"]), n_row_splits),
                      logits, row_max, row_sum, col_max, col_sum, col_part_max, col_part_sum, col_tickets,
                      n_valid, n_cols, *strides, scale2, row_factor, rows_per_split, n_row_splits, rows_bucket,
                      interpreter_blocks=_INTERPRETER_BLOCKS, FIRST=first)
        if group is not None and first:
            _all_reduce_max_sum(col_max, col_sum, scale2, group)
        elif group is not None:
            dist.all_reduce(col_sum, op=dist.ReduceOp.SUM, group=group)

    def row_pass(first: bool) -> None:
        if n_valid > 0:
            _launch_tuned(_row_pass, ("row", first, *key),
                          lambda meta: (_cdiv(n_valid, meta["BLOCK_B"]), n_col_splits),
                          logits, col_max, col_sum, row_max, row_sum, row_part_max, row_part_sum, row_tickets,
                          n_valid, n_cols, *strides, scale2, cols_per_split, n_col_splits, rows_bucket,
                          interpreter_blocks=_INTERPRETER_BLOCKS, FIRST=first)

    def small_batch_pass(first: bool) -> None:
        launch(_small_batch_pass_kernel, (n_row_parts,),  # a program per column tile
               logits, col_max, col_sum, row_max, row_sum, row_part_max, row_part_sum, col_tickets,
               n_valid, n_cols, *strides, scale2, row_factor, interpreter_blocks=_INTERPRETER_BLOCKS, FIRST=first,
               **_SMALL_BATCH_CONFIG)

    # iteration 1 finds M (column pass) and R (row pass) online; the per-row factor exp(R / T) is already
    # inside the first column sums
    for iteration in range(n_iter):
        if small_batch:
            small_batch_pass(first=iteration == 0)
        else:
            column_pass(first=iteration == 0)
            row_pass(first=iteration == 0)
    if n_rows == 0:  # this rank has no rows (but took part in the all-reduces)
        return out
    write_bucket = _power_of_2_at_least(n_rows)
    _launch_tuned(_write, ("write", n_cols, write_bucket, logits.dtype),
                  lambda meta: (_cdiv(n_cols, meta["BLOCK_K"]), _cdiv(n_rows, meta["BLOCK_B"])),
                  logits, col_max, col_sum, row_max, row_sum, out,
                  n_valid, n_rows, n_cols, *strides, out.stride(0), scale2, write_bucket,
                  interpreter_blocks=_INTERPRETER_WRITE_BLOCKS)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor,
    temperature: float,
    n_iter: int = SINKHORN_ITERATIONS,
    n_valid: int | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    impl: KernelImpl = "auto",
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets: Q [B, K] float32 whose valid rows sum to 1.

    logits: [B, K] teacher head outputs (fp32, bf16 or fp16; any strides; finite), temperature: > 0,
    n_iter: Sinkhorn iterations (default: the recipe's, SINKHORN_ITERATIONS), n_valid: the number of leading
    valid rows on this rank (the rest is padding: excluded from every sum, returned as exact zeros); None means
    all B rows. group: process group whose ranks' samples are centered together (None: the default group when
    torch.distributed is initialized, otherwise none). Every rank of the group must call this, even with
    n_valid = 0. impl: "auto", "triton" or "reference" (`sinkhorn_knopp_reference`), the kernel dispatch of
    README.md. No autograd: the teacher side needs none.
    """
    temperature, n_valid = _check_inputs(logits, temperature, n_iter, n_valid)
    run = _sinkhorn_triton if use_triton(logits, impl, OP) else _sinkhorn_reference
    group = reduction_group(group, OP)
    return run(logits, temperature, n_iter, n_valid, group, _global_count(n_valid, group, logits.device))
