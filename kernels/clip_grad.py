"""Per-parameter gradient clipping: for each g, n = ||g||_2, coef = max_norm / (n + eps),
if coef < 1: g *= coef (in place). Returns the norms before clipping, float32 (len(grads),).

Per grad-dtype group (one table, see tensor_lists.py), three launches and no host sync:
1. ``_sumsq_kernel``: one program per chunk writes the chunk's float32 sum of squares
   (per-lane accumulators, one tree reduction at the end) to ``partials[chunk]``.
2. ``_norm_kernel``: one program per tensor sums its consecutive partials in a fixed order
   (deterministic, no atomics), writes the norm to ``norms[slot]`` and coef to ``coefs``.
3. ``_scale_kernel``: one program per chunk; if its tensor's coef < 1 it scales the chunk in
   float32 and rounds once to the grad dtype; otherwise it touches nothing.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from .tensor_lists import (
    TAIL,
    cast_rne,
    check_scalar,
    check_tensor_list,
    get_table,
    group_by,
    interpreter_active,
    on_device_of,
    chunk_bounds,
    tail_block,
    tensor_pointer,
    triton_dtype,
)

CHUNK = 32768
BLOCK = 4096
NUM_WARPS = 8
PARTIAL_BLOCK = 1024


@triton.jit
def _sumsq_kernel(
    addrs,
    numel_ptr,
    main_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    partials_ptr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    tensor = tl.load(chunk_tensor_ptr + tl.program_id(0))
    start, numel, main = chunk_bounds(tensor, numel_ptr, main_ptr, chunk_start_ptr, ALIGNED)
    base = tensor_pointer(addrs, tensor, DTYPE, ALIGNED)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    span = tl.minimum(main - start, CHUNK)
    for off in range(0, span, BLOCK):
        idx = start + off + offs
        g = tl.load(base + idx, mask=idx < main, other=0.0).to(tl.float32)
        acc += g * g
    tidx, tmask = tail_block(start, numel, main, CHUNK, TAIL)
    g = tl.load(base + tidx, mask=tmask, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0) + tl.sum(g * g, axis=0)
    tl.store(partials_ptr + tl.program_id(0), total)


@triton.jit
def _norm_kernel(
    partials_ptr,
    first_chunk_ptr,
    slot_ptr,
    norms_ptr,
    coefs_ptr,
    max_norm_ptr,
    max_norm_value,
    eps,
    MAX_NORM_IS_PTR: tl.constexpr,
    PBLOCK: tl.constexpr,
):
    ti = tl.program_id(0)
    first = tl.load(first_chunk_ptr + ti)
    last = tl.load(first_chunk_ptr + ti + 1)
    offs = tl.arange(0, PBLOCK)
    acc = tl.zeros([PBLOCK], dtype=tl.float32)
    for j in range(first, last, PBLOCK):
        idx = j + offs
        acc += tl.load(partials_ptr + idx, mask=idx < last, other=0.0)
    norm = tl.sqrt(tl.sum(acc, axis=0))
    if MAX_NORM_IS_PTR:
        max_norm = tl.load(max_norm_ptr).to(tl.float32)
    else:
        max_norm = tl.full([], max_norm_value, tl.float32)
    coef = max_norm / (norm + eps)
    tl.store(norms_ptr + tl.load(slot_ptr + ti), norm)
    tl.store(coefs_ptr + ti, coef)


@triton.jit
def _scale_kernel(
    addrs,
    numel_ptr,
    main_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    coefs_ptr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    tensor = tl.load(chunk_tensor_ptr + tl.program_id(0))
    coef = tl.load(coefs_ptr + tensor)
    if coef < 1.0:  # NaN coef (NaN/inf grads) is not < 1: left untouched, as the contract says
        start, numel, main = chunk_bounds(tensor, numel_ptr, main_ptr, chunk_start_ptr, ALIGNED)
        base = tensor_pointer(addrs, tensor, DTYPE, ALIGNED)
        offs = tl.arange(0, BLOCK)
        span = tl.minimum(main - start, CHUNK)
        for off in range(0, span, BLOCK):
            idx = start + off + offs
            mask = idx < main
            g = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
            tl.store(base + idx, cast_rne(g * coef, DTYPE, INTERPRET), mask=mask)
        tidx, tmask = tail_block(start, numel, main, CHUNK, TAIL)
        g = tl.load(base + tidx, mask=tmask, other=0.0).to(tl.float32)
        tl.store(base + tidx, cast_rne(g * coef, DTYPE, INTERPRET), mask=tmask)


def clip_grad_per_param_(grads, max_norm, eps: float = 1e-6) -> torch.Tensor:
    """Clips every gradient to norm <= max_norm in place; returns the norms before clipping."""
    grads = check_tensor_list(grads, "grads")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps must be a float, got {type(eps).__name__}")
    device = grads[0].device if grads else None
    max_norm_tensor, max_norm_value = check_scalar(max_norm, "max_norm", device, "grads")
    if not grads:
        return torch.empty(0, dtype=torch.float32, device=max_norm_tensor.device
                           if max_norm_tensor is not None else "cpu")

    norms = torch.empty(len(grads), dtype=torch.float32, device=device)
    with on_device_of(grads):
        for dtype, idx in group_by([g.dtype for g in grads]).items():
            table = get_table([[grads[i] for i in idx]], CHUNK, extra=idx)
            partials = torch.empty(table.n_chunks, dtype=torch.float32, device=device)
            coefs = torch.empty(table.n_tensors, dtype=torch.float32, device=device)
            common = dict(
                DTYPE=triton_dtype(dtype),
                ALIGNED=table.aligned,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                TAIL=TAIL,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
            _sumsq_kernel[(table.n_chunks,)](
                table.addrs[0], table.numel, table.main, table.chunk_tensor, table.chunk_start,
                partials, **common,
            )
            _norm_kernel[(table.n_tensors,)](
                partials,
                table.first_chunk,
                table.extra,
                norms,
                coefs,
                max_norm_tensor if max_norm_tensor is not None else partials,  # unused when a float
                max_norm_value,
                float(eps),
                MAX_NORM_IS_PTR=max_norm_tensor is not None,
                PBLOCK=PARTIAL_BLOCK,
                num_warps=4,
                enable_fp_fusion=False,
            )
            _scale_kernel[(table.n_chunks,)](
                table.addrs[0], table.numel, table.main, table.chunk_tensor, table.chunk_start,
                coefs, INTERPRET=interpreter_active(), **common,
            )
    return norms
