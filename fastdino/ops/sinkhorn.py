"""Sinkhorn-Knopp centering of teacher logits (DINOv2's ``train.centering: sinkhorn_knopp``).

DINOv2 turns the teacher logits t (R x K on each rank) into targets Q = diag(v) exp(t / tau)
diag(u): it normalizes the whole matrix to sum 1, then ``n_iterations`` times divides each
prototype column by its sum over the GLOBAL batch (all-reduced) and by K, and each sample row
by its sum and by the global row count B; finally it multiplies by B so every row sums to 1.

fastdino computes the same Q with less work, using three exact identities:
- dividing a column by its sum cancels any earlier scaling of that column, so (a) the initial
  division by the total and (b) a per-column shift of the exponent, m_k = max over all ranks of
  t[:, k], change nothing; the shift keeps exp((t - m_k) / tau) <= 1, so no overflow for any
  logits (DINOv2's exp(t / tau) overflows float32 once t / tau > 88);
- the constant factors K and B cancel in the next normalization, and the final one leaves rows
  summing to 1; so only 1 / column sums (u) and 1 / row sums (v) are tracked.
E = exp((t - m) / tau) is written once (in place over float32 logits) and never copied: each
half-iteration is one read pass producing a K- or R-vector, the last one rescales E into Q in
place. Per call: 2 + 2 * n_iterations passes over the matrix and n_iterations + 1 all-reduces of
K floats (one a MAX), no host synchronization. DINOv2's version makes about 5 full-size passes
per iteration, each writing a new (R x K) tensor or updating one in place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backends import cpp_extension, resolve_backend, triton_kernels


def _all_reduce(tensor: torch.Tensor, group, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


def sinkhorn_knopp_reference(logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                             group=None) -> torch.Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher`` step by step, in float32 (float64 for float64 input),
    with the per-column shift of the exponent (see the module doc; it changes no value). The
    "torch" backend, and on float64 input the test reference. Returns Q (R x K), rows sum to 1."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    t = logits.detach().to(compute_dtype)
    n_rows = torch.tensor([t.shape[0]], dtype=compute_dtype, device=t.device)
    shift = _column_max_or_lowest(t)
    _all_reduce(shift, group, dist.ReduceOp.MAX if dist.is_available() else None)
    _all_reduce(n_rows, group)
    q = torch.exp((t - shift) / teacher_temp).t()  # K x R, as DINOv2 writes it
    n_prototypes = q.shape[0]
    q /= _all_reduce(q.sum(), group)
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True), group)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_rows
    q *= n_rows
    return q.t()


def _column_max_or_lowest(t: torch.Tensor) -> torch.Tensor:
    if t.shape[0] == 0:  # a rank without rows still joins the all-reduces
        return torch.full((t.shape[1],), torch.finfo(t.dtype).min, dtype=t.dtype, device=t.device)
    return t.amax(dim=0)


def _validate(logits, teacher_temp, n_iterations, out):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        described = (f"{logits.dtype} of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor)
                     else type(logits).__name__)
        raise ValueError(f"sinkhorn_knopp_: logits must be a 2-D (rows x K) floating tensor, got {described}")
    if not teacher_temp > 0:
        raise ValueError(f"sinkhorn_knopp_: teacher_temp must be > 0, got {teacher_temp!r}")
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp_: n_iterations must be a positive int, got {n_iterations!r}")
    dtype = _result_dtype(logits)
    if out is not None and (out.shape != logits.shape or out.dtype != dtype
                            or not out.is_contiguous() or out.device != logits.device):
        raise ValueError(
            f"sinkhorn_knopp_: out must be a contiguous {dtype} tensor of the logits' shape "
            f"{tuple(logits.shape)} on {logits.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")


def _result_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 logits (which run on the "torch" backend)."""
    return torch.promote_types(logits.dtype, torch.float32)


@torch.no_grad()
def sinkhorn_knopp_(logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3, *,
                    out: torch.Tensor | None = None, group=None, backend: str = "auto") -> torch.Tensor:
    """Sinkhorn-Knopp targets of teacher logits over the global batch: float32 Q (R x K) whose
    rows sum to 1 and whose columns have equal mass over all ranks (after ``n_iterations``).

    Args:
        logits: (R, K) this rank's teacher logits (CLS rows, or masked patch rows; R may differ
            between ranks and may be 0).
        out: where Q goes: a contiguous float32 (R, K) tensor (float64 for float64 logits).
            Default: ``logits`` itself when it is contiguous float32 (in place: the matrix is
            held once), else a new tensor.
        group: the process group whose rows form the batch (default: the world, when
            torch.distributed is initialized; every rank of it must call this).
        backend: "auto", "triton", "cpp" or "torch" (see fastdino.ops.backends).
    """
    _validate(logits, teacher_temp, n_iterations, out)
    if out is None:
        dtype = _result_dtype(logits)
        in_place = logits.dtype == dtype and logits.is_contiguous()
        out = logits if in_place else torch.empty(logits.shape, dtype=dtype, device=logits.device)
    name = resolve_backend("sinkhorn_knopp_", backend, [logits])
    if name == "torch":
        return out.copy_(sinkhorn_knopp_reference(logits, teacher_temp, n_iterations, group))
    kernels = cpp_extension() if name == "cpp" else triton_kernels()
    logits = logits.contiguous()
    has_rows = logits.shape[0] > 0
    n_classes = logits.shape[1]
    max_op = dist.ReduceOp.MAX if dist.is_available() else None
    shift = (kernels.sinkhorn_column_max(logits) if has_rows else
             torch.full((n_classes,), torch.finfo(torch.float32).min, device=logits.device))
    _all_reduce(shift, group, max_op)
    column_sums = (kernels.sinkhorn_exp_(logits, shift, 1.0 / float(teacher_temp), out) if has_rows
                   else torch.zeros(n_classes, device=logits.device))
    # Every column's global maximum contributes exp(0) = 1: the sums are >= 1, never 0.
    column_scale = _all_reduce(column_sums, group).reciprocal_()
    for _ in range(n_iterations - 1):
        if has_rows:
            column_sums = kernels.sinkhorn_column_sums(out, kernels.sinkhorn_row_scales(out, column_scale))
        else:
            column_sums = torch.zeros(n_classes, device=logits.device)
        column_scale = _all_reduce(column_sums, group).reciprocal_()
    if has_rows:
        kernels.sinkhorn_normalize_rows_(out, column_scale)
    return out
