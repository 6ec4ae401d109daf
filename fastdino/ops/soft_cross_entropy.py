"""Row-wise weighted cross-entropy against teacher probabilities, and the iBOT masked-patch loss.

With student logits s (R_s x K), teacher rows t (R_t x K, R_s a multiple of R_t; student row r
is paired with teacher row r % R_t), per-row weights w, student temperature tau_s:

    Q_r = softmax((t_j - c) / tau_t)   (teacher logits, center c)   or   Q_r = t_j   (probabilities)
    loss = sum_r w_r * -sum_k Q_r(k) log_softmax(s_r / tau_s)(k)

The iBOT term of DINOv2 is this loss over the masked patch rows, w_r = 1 / (masked patches of
row r's crop) / (crops in the batch); DINOv2's DINO term on precomputed (Sinkhorn-Knopp)
teacher probabilities is it too, with R_t = B. The fused backends compute the loss, its
gradient and the teacher's column sum in one call and never materialize the teacher's softmax;
OPS_CONTRACT.md section 4 states the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import cpp_extension, resolve_backend, triton_kernels
from .dino_loss import FusedGradientLoss


def soft_cross_entropy_reference(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    teacher_is_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch form: the "torch" backend, and, on float64 inputs, the test reference.

    Computes in float32 (float64 for float64 inputs); differentiable through autograd.
    Returns (loss, teacher_sum) with teacher_sum = teacher.sum(0).
    """
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    teacher_rows = teacher.detach().to(compute_dtype)
    if teacher_is_probs:
        q = teacher_rows
    else:
        q = F.softmax((teacher_rows - center.detach().to(compute_dtype).reshape(1, -1)) / teacher_temp, dim=-1)
    repeats = student_logits.shape[0] // max(teacher.shape[0], 1)
    q = q.repeat(repeats, 1)  # student row r with teacher row r % R_t
    log_p_student = F.log_softmax(student_logits.to(compute_dtype) / student_temp, dim=-1)
    row_losses = -(q * log_p_student).sum(-1)
    loss = (row_losses * weights.detach().to(compute_dtype)).sum()
    return loss, teacher_rows.sum(0)


def _validate(student_logits, teacher, center, weights, student_temp, teacher_temp, teacher_is_probs,
              op_name):
    for name, tensor in (("student_logits", student_logits), ("teacher", teacher)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{op_name}: {name} must be a 2-D (rows x K) tensor, got {shape}")
        if not tensor.is_floating_point():
            raise ValueError(f"{op_name}: {name} must be floating point, got {tensor.dtype}")
    (student_rows, n_classes), teacher_rows = student_logits.shape, teacher.shape[0]
    if teacher.shape[1] != n_classes:
        raise ValueError(f"{op_name}: student_logits has K={n_classes} columns but the teacher has "
                         f"K={teacher.shape[1]}")
    if teacher_rows == 0 and student_rows or teacher_rows and student_rows % teacher_rows:
        raise ValueError(f"{op_name}: student_logits has {student_rows} rows, which is not a multiple "
                         f"of the teacher's {teacher_rows} rows (student row r pairs with teacher "
                         f"row r % {teacher_rows})")
    if not teacher_is_probs:
        if not isinstance(center, torch.Tensor) or center.numel() != n_classes or center.shape[-1] != n_classes:
            shape = tuple(center.shape) if isinstance(center, torch.Tensor) else center
            raise ValueError(f"{op_name}: center must have K={n_classes} entries ((K,), (1, K) or "
                             f"(1, 1, K)), got {shape}")
        if not teacher_temp > 0:
            raise ValueError(f"{op_name}: teacher_temp must be > 0, got {teacher_temp!r}")
    if not isinstance(weights, torch.Tensor) or weights.shape != (student_rows,):
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"{op_name}: the weights must have one entry per student row, shape "
                         f"({student_rows},), got {shape}")
    tensors = [student_logits, teacher, weights] + ([] if teacher_is_probs else [center])
    devices = {str(t.device) for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op_name}: all tensors must be on one device, got {sorted(devices)}")
    if not student_temp > 0:
        raise ValueError(f"{op_name}: student_temp must be > 0, got {student_temp!r}")


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    teacher_is_probs: bool = False,
    backend: str = "auto",
    overwrite_student_logits: bool = False,
    check_finite: bool | None = None,
    op_name: str = "soft_cross_entropy",
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_r weights[r] * H(Q_r, softmax(student_logits[r] / student_temp)) (see the module doc).

    Args:
        student_logits: (R_s, K).
        teacher: (R_t, K) teacher logits (centered and sharpened here with ``center`` and
            ``teacher_temp``), or probabilities when ``teacher_is_probs``; R_s % R_t == 0.
        center: (K,), (1, K) or (1, 1, K); ignored (may be None) when ``teacher_is_probs``.
        weights: (R_s,) per-row weights (any float dtype; used in float32).
        backend, overwrite_student_logits, check_finite: as for ``fastdino.ops.dino_loss``.

    Returns:
        (loss, teacher_sum): the scalar float32 loss, differentiable w.r.t. student_logits, and
        the float32 (K,) column sum of ``teacher`` (for a center update).
    """
    _validate(student_logits, teacher, center, weights, student_temp, teacher_temp, teacher_is_probs,
              op_name)
    if student_logits.shape[0] == 0:  # no masked patch in this batch: nothing to learn from
        zero_sum = torch.zeros(teacher.shape[1], dtype=torch.float32, device=teacher.device)
        return student_logits.float().sum() * 0.0, zero_sum
    tensors = [student_logits, teacher] + ([] if teacher_is_probs else [center])
    name = resolve_backend(op_name, backend, tensors)
    if name == "torch":
        loss, teacher_sum = soft_cross_entropy_reference(
            student_logits, teacher, center, weights, student_temp=student_temp,
            teacher_temp=teacher_temp, teacher_is_probs=teacher_is_probs,
        )
    else:
        kernels = cpp_extension() if name == "cpp" else triton_kernels()
        student = student_logits.contiguous()
        teacher_rows = teacher.detach().contiguous()
        n_classes = student.shape[1]
        center32 = (torch.zeros(n_classes, dtype=torch.float32, device=student.device) if teacher_is_probs
                    else center.detach().reshape(-1).float().contiguous())
        weights32 = weights.detach().float().contiguous()

        def kernel(grad):
            return kernels.soft_cross_entropy_forward(
                student, teacher_rows, center32, weights32, grad, float(student_temp),
                float(teacher_temp), bool(teacher_is_probs))

        loss, teacher_sum = FusedGradientLoss.apply(student, kernel, overwrite_student_logits, op_name)
    if check_finite is None:
        check_finite = student_logits.device.type == "cpu"
    if check_finite and not (torch.isfinite(loss) and torch.isfinite(teacher_sum).all()):
        _raise_non_finite(op_name, student_logits, teacher, center, weights, teacher_is_probs)
    return loss, teacher_sum


def _raise_non_finite(op_name, student_logits, teacher, center, weights, teacher_is_probs):
    problems = []
    named = [("student_logits", student_logits), ("teacher", teacher), ("weights", weights.reshape(-1, 1))]
    if not teacher_is_probs:
        named.append(("center", center.reshape(1, -1)))
    for name, tensor in named:
        bad_rows = (~torch.isfinite(tensor)).any(dim=1).nonzero().flatten().tolist()
        if bad_rows:
            more = f" and {len(bad_rows) - 5} more" if len(bad_rows) > 5 else ""
            problems.append(f"{name} has NaN/inf in rows {bad_rows[:5]}{more}")
    if teacher_is_probs and (teacher < 0).any():
        problems.append("the teacher probabilities have negative entries")
    detail = "; ".join(problems) or "the loss overflowed (logits too large for the temperatures?)"
    raise FloatingPointError(f"{op_name}: non-finite result: {detail}")


def ibot_masks_weight(masks: torch.Tensor) -> torch.Tensor:
    """DINOv2's per-masked-patch weights: 1 / (masked patches of the patch's crop), in the order
    of ``masks.flatten().nonzero()`` (row-major over (crop, patch)). ``masks``: (crops, patches)
    bool. Boolean indexing synchronizes a CUDA device: compute this on the host, with the masks,
    as DINOv2's collate does."""
    if masks.dtype != torch.bool or masks.dim() != 2:
        raise ValueError(f"ibot_masks_weight: masks must be a 2-D (crops x patches) bool tensor, got "
                         f"{masks.dtype} of shape {tuple(masks.shape)}")
    per_crop = 1.0 / masks.sum(-1).clamp(min=1.0)
    return per_crop.unsqueeze(-1).expand_as(masks)[masks]


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_logits: torch.Tensor,
    center: torch.Tensor | None,
    masks_weight: torch.Tensor,
    *,
    n_crops: int,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    teacher_is_probs: bool = False,
    backend: str = "auto",
    overwrite_student_logits: bool = False,
    check_finite: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2's iBOT masked-patch loss, fused.

    -sum over the masked patches m of masks_weight[m] * sum_k P_t(m, k) log P_s(m, k), divided
    by ``n_crops`` (the global crops of the batch, masked or not: DINOv2's
    ``student_masks_flat.shape[0]``), with P_t = softmax((t - center) / teacher_temp) (or the
    given probabilities when ``teacher_is_probs``, e.g. from ``sinkhorn_knopp_``) and
    P_s = softmax(s / student_temp).

    Args:
        student_patch_logits, teacher_patch_logits: (M, K), the head's outputs for the M masked
            patches only (student: of the masked crop; teacher: of the unmasked crop).
        masks_weight: (M,), 1 / (masked patches of the patch's crop) (``ibot_masks_weight``).

    Returns:
        (loss, teacher_sum): teacher_sum is the (K,) column sum of the teacher's patch logits,
        for the patch center (``fastdino.ops.update_center_`` with n_rows = M).
    """
    if isinstance(n_crops, bool) or not isinstance(n_crops, int) or n_crops < 1:
        raise ValueError(f"ibot_patch_loss: n_crops must be a positive int, got {n_crops!r}")
    if not isinstance(masks_weight, torch.Tensor):
        raise ValueError(f"ibot_patch_loss: masks_weight must be a tensor, got {type(masks_weight).__name__}")
    return soft_cross_entropy(
        student_patch_logits, teacher_patch_logits, center, masks_weight.float() / n_crops,
        student_temp=student_temp, teacher_temp=teacher_temp, teacher_is_probs=teacher_is_probs,
        backend=backend, overwrite_student_logits=overwrite_student_logits,
        check_finite=check_finite, op_name="ibot_patch_loss",
    )
