"""Triton kernels of fastdino (installed as ``fastdino.kernels``).

The same three functions as the C++ backend (see OPS_CONTRACT.md):

- ``dino_loss_forward(student, teacher, center, grad, n_global_crops, student_temp,
  teacher_temp) -> (loss, teacher_sum)``: fused DINO cross-entropy, gradient written to ``grad``.
- ``ema_update_(teacher_tensors, student_tensors, momentum)``: multi-tensor EMA, in place.
- ``clip_grad_per_param_(grads, max_norm, eps=1e-6) -> norms``: per-parameter clipping.
- ``soft_cross_entropy_forward(student, teacher, center, weights, grad, student_temp,
  teacher_temp, teacher_is_probs) -> (loss, teacher_sum)``: weighted row-wise cross-entropy
  (iBOT patches, DINO on teacher probabilities), gradient written to ``grad``.
- ``sinkhorn_column_max``, ``sinkhorn_exp_``, ``sinkhorn_row_scales``, ``sinkhorn_column_sums``,
  ``sinkhorn_normalize_rows_``: the single-rank Sinkhorn-Knopp passes.

They need CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton is imported.
"""

from .clip_grad import clip_grad_per_param_
from .dino_loss import dino_loss_forward
from .ema import ema_update_
from .sinkhorn import (
    sinkhorn_column_max,
    sinkhorn_column_sums,
    sinkhorn_exp_,
    sinkhorn_normalize_rows_,
    sinkhorn_row_scales,
)
from .soft_cross_entropy import soft_cross_entropy_forward

__all__ = ["dino_loss_forward", "ema_update_", "clip_grad_per_param_"]
__all__ += ["soft_cross_entropy_forward", "sinkhorn_column_max", "sinkhorn_exp_", "sinkhorn_row_scales",
            "sinkhorn_column_sums", "sinkhorn_normalize_rows_"]
