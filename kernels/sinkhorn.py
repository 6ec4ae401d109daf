"""Single-rank Sinkhorn-Knopp passes over a float32 matrix E (R x K) held once (Triton).

OPS_CONTRACT.md section 5 states what each pass computes; fastdino/ops/sinkhorn.py runs them and
the all-reduces between them. Notation: E = exp((logits - shift) / tau), u the column
(prototype) scales, v the row (sample) scales, Q = diag(v) E diag(u).

Two kinds of kernels, everything accumulated in float32 and no atomics:

- Column passes (``_column_max_kernel``, ``_exp_kernel``, ``_column_sums_kernel``), grid
  (NB column blocks, NRG row groups). A program owns BLOCK columns and a range of rows, which it
  walks ROWS rows at a time ([ROWS, BLOCK] tiles, 16-byte loads along K), keeping a [ROWS, BLOCK]
  accumulator that it reduces over its ROWS once at the end (no cross-warp reduction per step).
  It writes its rows' partial (max or sum) of every column to row ``pid_r`` of an (NRG, K)
  buffer; torch reduces the NRG partials (a fixed-order reduction). NRG > 1 only where the
  column blocks alone give too few programs to fill the GPU (~4 per SM). Consecutive programs
  read adjacent column blocks of the same rows.
- Row passes (``_row_sums_kernel``, ``_scale_entries_kernel``), grid (R rows, NC column chunks).
  A program walks one chunk of one row in BLOCK steps (8 floats per thread: two 16-byte loads).
  NC > 1 only where the rows alone give too few programs (R = 128 at K = 65536: 4 chunks of
  16384); the row sums' NC partials are then summed by torch in a fixed order.
  sinkhorn_normalize_rows_ is the row scales followed by E <- E u v in place.

Exponentials are base 2: exp(z) = exp2(z * log2(e)) with the factor folded into the scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dino_loss
from .tensor_lists import check_float_tensor, on_device_of

LOG2E = 1.4426950408889634

# Column passes: [ROWS, BLOCK] tiles of COLUMN_TILE elements, 8 per thread ([2, 1024] at large K).
# 16 per thread ([8, 512]) took the bf16 exp pass to 80 registers on sm_90, 3 of 8 programs per SM.
COLUMN_TILE = 2048
COLUMN_BLOCK = 1024
# Row passes: BLOCK floats per step, 8 per thread.
ROW_BLOCK = 4096
# Rows (column passes) or columns (row passes) are split until there are this many programs per SM.
PROGRAMS_PER_SM = 4


@triton.jit
def _column_max_kernel(x_ptr, part_ptr, R, K, rows_per_group,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < K
    acc = tl.full([ROWS, BLOCK], float("-inf"), dtype=tl.float32)
    r_begin = pid_r * rows_per_group
    r_end = tl.minimum(r_begin + rows_per_group, R)
    for r0 in range(r_begin, r_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask,
                    other=float("-inf"))
        acc = tl.maximum(acc, x.to(tl.float32))
    tl.store(part_ptr + pid_r.to(tl.int64) * K + cols, tl.max(acc, axis=0), mask=cmask)


@triton.jit
def _exp_kernel(x_ptr, shift_ptr, out_ptr, part_ptr, R, K, rows_per_group, scale,
                ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """out = exp2((x - shift) * scale) and the partial column sums of out. Each tile is read
    before the same tile is written, so out may be x."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < K
    shift = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    r_begin = pid_r * rows_per_group
    r_end = tl.minimum(r_begin + rows_per_group, R)
    for r0 in range(r_begin, r_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
        # other=-inf: masked entries are exp2(-inf) = 0 and add nothing to the sums
        x = tl.load(x_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
        e = tl.exp2((x - shift[None, :]) * scale)
        tl.store(out_ptr + offsets, e, mask=mask)
        acc += e
    tl.store(part_ptr + pid_r.to(tl.int64) * K + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _column_sums_kernel(x_ptr, v_ptr, part_ptr, R, K, rows_per_group,
                        ROW_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Partial column sums of x (any float dtype), each row scaled by v[r] if ROW_SCALE."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < K
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    r_begin = pid_r * rows_per_group
    r_end = tl.minimum(r_begin + rows_per_group, R)
    for r0 in range(r_begin, r_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < r_end
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if ROW_SCALE:
            x = x * tl.load(v_ptr + rows, mask=rmask, other=0.0)[:, None]
        acc += x
    tl.store(part_ptr + pid_r.to(tl.int64) * K + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _column_scaled_entries(e_row, u_ptr, cols, cmask):
    """E[r, k] u_k over the columns ``cols`` of one row (0 where masked): the products that the
    row sums add up and that the normalization scales by 1 / their sum."""
    e = tl.load(e_row + cols, mask=cmask, other=0.0)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
    return e * u


@triton.jit
def _row_sums_kernel(e_ptr, u_ptr, part_ptr, K, chunk, NC, BLOCK: tl.constexpr):
    """part[r, c] = sum over chunk c of row r of E[r, k] u_k."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    e_row = e_ptr + row.to(tl.int64) * K
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    k_begin = c * chunk
    k_end = tl.minimum(k_begin + chunk, K)
    for k0 in range(k_begin, k_end, BLOCK):
        cols = k0 + offs
        acc += _column_scaled_entries(e_row, u_ptr, cols, cols < K)
    tl.store(part_ptr + row * NC + c, tl.sum(acc, axis=0))


@triton.jit
def _scale_entries_kernel(e_ptr, u_ptr, v_ptr, K, chunk, BLOCK: tl.constexpr):
    """E[r, k] <- E[r, k] u_k v_r over chunk program_id(1) of row program_id(0)."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    e_row = e_ptr + row.to(tl.int64) * K
    v = tl.load(v_ptr + row)
    offs = tl.arange(0, BLOCK)
    k_begin = c * chunk
    k_end = tl.minimum(k_begin + chunk, K)
    for k0 in range(k_begin, k_end, BLOCK):
        cols = k0 + offs
        cmask = cols < K
        tl.store(e_row + cols, _column_scaled_entries(e_row, u_ptr, cols, cmask) * v, mask=cmask)


def _n_sms(device: torch.device) -> int:
    # through the dino_loss module: the sm_90 report replaces it there by the H200's count
    if device.type != "cuda":
        return dino_loss._num_sms(None)
    return dino_loss._num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _column_config(R: int, K: int, n_sms: int):
    """(BLOCK, NB, ROWS, NRG, rows_per_group, num_warps) of a column pass."""
    block = min(COLUMN_BLOCK, dino_loss._next_pow2(K))
    nb = triton.cdiv(K, block)
    rows = min(COLUMN_TILE // block, dino_loss._next_pow2(R))
    row_tiles = triton.cdiv(R, rows)
    nrg = max(1, min(row_tiles, triton.cdiv(PROGRAMS_PER_SM * n_sms, nb)))
    rows_per_group = triton.cdiv(row_tiles, nrg) * rows
    nrg = triton.cdiv(R, rows_per_group)
    num_warps = max(1, min(8, rows * block // 256))
    return block, nb, rows, nrg, rows_per_group, num_warps


def _row_config(R: int, K: int, n_sms: int):
    """(BLOCK, NC, chunk, num_warps) of a row pass: NC chunks of ``chunk`` columns per row."""
    block = min(ROW_BLOCK, dino_loss._next_pow2(K))
    n_blocks = triton.cdiv(K, block)
    nc = max(1, min(n_blocks, triton.cdiv(PROGRAMS_PER_SM * n_sms, R)))
    chunk = triton.cdiv(n_blocks, nc) * block
    nc = triton.cdiv(K, chunk)
    num_warps = max(1, min(16, block // 256))
    return block, nc, chunk, num_warps


def _check_matrix(x, name, dtypes=(torch.float32,)):
    check_float_tensor(x, name, dtypes, dim=2)
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")


def _check_vector(x, name, length, device, matrix_name):
    check_float_tensor(x, name, (torch.float32,), dim=1)
    if x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {matrix_name} is on {device}")


def _column_pass(kernel, x, pointers=(), scalars=(), reduce="sum", **constexprs):
    """Launches the column pass ``kernel(x, *pointers, partials, R, K, rows_per_group, *scalars)``
    over x (R, K) and reduces its (NRG, K) partials by ``reduce`` ("sum" or "max")."""
    R, K = x.shape
    block, nb, rows, nrg, rows_per_group, num_warps = _column_config(R, K, _n_sms(x.device))
    partials = torch.empty((nrg, K), dtype=torch.float32, device=x.device)
    with on_device_of([x]):
        kernel[(nb, nrg)](x, *pointers, partials, R, K, rows_per_group, *scalars, **constexprs,
                          ROWS=rows, BLOCK=block, num_warps=num_warps)
        if nrg == 1:
            return partials[0]
        return partials.sum(dim=0) if reduce == "sum" else partials.amax(dim=0)


def _column_sums(x, row_scale=None):
    """(K,) float32 column sums of x (R >= 1, any float dtype), rows scaled by row_scale if given."""
    # without a row scale the kernel gets x as a placeholder pointer, which it does not read
    return _column_pass(_column_sums_kernel, x, (x if row_scale is None else row_scale,),
                        ROW_SCALE=row_scale is not None)


def sinkhorn_column_max(logits):
    """m_k = max_r logits[r, k]: (K,) float32."""
    _check_matrix(logits, "logits", (torch.float32, torch.bfloat16, torch.float16))
    return _column_pass(_column_max_kernel, logits, reduce="max")


def sinkhorn_exp_(logits, shift, inv_temp, out):
    """out[r, k] = exp((logits[r, k] - shift[k]) * inv_temp) (float32; out may be logits).
    Returns the (K,) float32 column sums of out."""
    _check_matrix(logits, "logits", (torch.float32, torch.bfloat16, torch.float16))
    R, K = logits.shape
    _check_vector(shift, "shift", K, logits.device, "logits")
    inv_temp = dino_loss._check_positive(inv_temp, "inv_temp")
    check_float_tensor(out, "out", (torch.float32,), dim=2)
    if tuple(out.shape) != (R, K):
        raise ValueError(f"out must have the logits' shape {(R, K)}, got {tuple(out.shape)}")
    if out.device != logits.device:
        raise ValueError(f"out is on {out.device} but logits is on {logits.device}")
    return _column_pass(_exp_kernel, logits, (shift, out), (inv_temp * LOG2E,))


def _row_scales(E, column_scale):
    """(R,) float32 v_r = 1 / sum_k E[r, k] u_k, 0 where that sum is 0."""
    R, K = E.shape
    block, nc, chunk, num_warps = _row_config(R, K, _n_sms(E.device))
    partials = torch.empty((R, nc), dtype=torch.float32, device=E.device)
    with on_device_of([E]):
        _row_sums_kernel[(R, nc)](E, column_scale, partials, K, chunk, nc, BLOCK=block,
                                  num_warps=num_warps)
        sums = partials[:, 0] if nc == 1 else partials.sum(dim=1)
        # A row that underflowed entirely (sum 0) gets v = 0: it contributes nothing, no NaN.
        return torch.where(sums == 0, 0.0, sums.reciprocal())


def _check_E_and_scale(E, scale, scale_name, length_axis):
    _check_matrix(E, "E")
    _check_vector(scale, scale_name, E.shape[length_axis], E.device, "E")


def sinkhorn_row_scales(E, column_scale):
    """v_r = 1 / sum_k E[r, k] u_k, 0 where that sum is 0: (R,) float32."""
    _check_E_and_scale(E, column_scale, "column_scale", 1)
    return _row_scales(E, column_scale)


def sinkhorn_column_sums(E, row_scale):
    """c_k = sum_r E[r, k] v_r: (K,) float32."""
    _check_E_and_scale(E, row_scale, "row_scale", 0)
    return _column_sums(E, row_scale)


def sinkhorn_normalize_rows_(E, column_scale):
    """In place: E[r, k] <- E[r, k] u_k / sum_j E[r, j] u_j; a row whose sum is 0 becomes 0."""
    _check_E_and_scale(E, column_scale, "column_scale", 1)
    row_scale = _row_scales(E, column_scale)
    R, K = E.shape
    block, nc, chunk, num_warps = _row_config(R, K, _n_sms(E.device))
    with on_device_of([E]):
        _scale_entries_kernel[(R, nc)](E, column_scale, row_scale, K, chunk, BLOCK=block,
                                       num_warps=num_warps)
