"""The DINO cross-entropy between teacher and student views: reference, fused op, functional API.

With teacher logits t (G*B x K, G global crops), student logits s (ncrops*B x K, crop-major),
center c, student temperature tau_s and teacher temperature tau_t:

    P_i = softmax((t_i - c) / tau_t)        log P_v = log_softmax(s_v / tau_s)
    loss = mean over pairs (i, v), i != v, of mean over the batch of -sum_k P_i(k) log P_v(k)

The fused backends ("cpp", "triton") compute the loss, its gradient with respect to the student
logits (so the backward is only a scale) and the column sum of the teacher logits (for the
center update) in one call; OPS_CONTRACT.md section 1 derives them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import cpp_extension, resolve_backend, triton_kernels


def count_loss_pairs(n_global_crops: int, ncrops: int) -> int:
    """Number of (teacher view, student view) pairs with different views."""
    return n_global_crops * ncrops - min(n_global_crops, ncrops)


def dino_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    *,
    n_global_crops: int = 2,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch DINO loss: the "torch" backend, and, on float64 inputs, the test reference.

    Computes in float32 (float64 for float64 inputs); differentiable through autograd.
    Returns (loss, teacher_sum) with teacher_sum = teacher_logits.sum(0).
    """
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    n_classes = student_logits.shape[-1]
    batch = teacher_logits.shape[0] // n_global_crops
    ncrops = student_logits.shape[0] // batch
    teacher = teacher_logits.detach().to(compute_dtype)
    log_p_student = F.log_softmax(student_logits.to(compute_dtype) / student_temp, dim=-1)
    p_teacher = F.softmax((teacher - center.detach().to(compute_dtype).reshape(1, -1)) / teacher_temp, dim=-1)
    # cross_entropy[i, v] = sum over the batch of -P_i . log P_v
    cross_entropy = -torch.einsum(
        "ibk,vbk->iv",
        p_teacher.view(n_global_crops, batch, n_classes),
        log_p_student.view(ncrops, batch, n_classes),
    )
    different_views = ~torch.eye(n_global_crops, ncrops, dtype=torch.bool, device=cross_entropy.device)
    n_pairs = count_loss_pairs(n_global_crops, ncrops)
    loss = cross_entropy[different_views].sum() / (batch * n_pairs)
    return loss, teacher.sum(0)


class FusedGradientLoss(torch.autograd.Function):
    """A loss whose kernel writes d loss / d student during the forward; the backward only scales
    that gradient. ``kernel(grad)`` fills ``grad`` and returns (loss, teacher_sum). Shared by
    ``dino_loss`` and ``soft_cross_entropy``.

    float16 logits get a float32 gradient buffer. The gradient of a DINO row, (n_t softmax - Q)
    / (tau_s B n_pairs), is ~1e-6 per entry at K = 65536 and B = 64, and many entries fall below
    float16's subnormal range (6e-8): stored in float16 they are lost before the backward sees
    the GradScaler's scale (2^16 and up), and that scale itself is inf in float16. The release
    (fp16 autocast: softmax in float32) forms the scaled gradient in float32 and rounds it once;
    so does this backward. bfloat16 has float32's exponent range, so its gradient keeps the
    logits' dtype (half the memory); the GradScaler's powers of two scale it exactly.
    """

    @staticmethod
    def forward(ctx, student, kernel, overwrite_student_logits, op_name):
        keep_float32 = student.dtype == torch.float16
        if keep_float32:
            grad = torch.empty_like(student, dtype=torch.float32)
        else:
            grad = student if overwrite_student_logits else torch.empty_like(student)
        loss, teacher_sum = kernel(grad)
        ctx.student_grad = grad
        ctx.student_dtype = student.dtype
        ctx.op_name = op_name
        # float16 + overwrite: the backward writes the float16 gradient into the logits' storage.
        ctx.grad_storage = student.detach() if keep_float32 and overwrite_student_logits else None
        ctx.mark_non_differentiable(teacher_sum)
        return loss, teacher_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_teacher_sum):
        grad = ctx.student_grad
        if grad is None:
            raise RuntimeError(
                f"fastdino {ctx.op_name}: backward ran twice through the same graph; the fused loss "
                "hands its precomputed gradient to the first backward (retain_graph=True is not "
                f"supported). Call {ctx.op_name} again, or use backend='torch'."
            )
        ctx.student_grad = None  # free the (rows x K) buffer as soon as autograd has it
        # Reading a CPU scalar is free; on CUDA we scale unconditionally to avoid a host sync.
        # grad_loss stays a float32 tensor: a GradScaler's 2^16 is inf in float16.
        if not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
            grad.mul_(grad_loss)
        if grad.dtype != ctx.student_dtype:  # float16 logits: round the scaled gradient once
            storage, ctx.grad_storage = ctx.grad_storage, None
            if storage is None:
                storage = torch.empty(grad.shape, dtype=ctx.student_dtype, device=grad.device)
            grad = storage.copy_(grad)
        return grad, None, None, None


def _validate(student_logits, teacher_logits, center, n_global_crops, student_temp, teacher_temp):
    for name, tensor in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"dino_loss: {name} must be a 2-D (rows x K) tensor, got {shape}")
        if not tensor.is_floating_point():
            raise ValueError(f"dino_loss: {name} must be floating point, got {tensor.dtype}")
    n_classes = student_logits.shape[1]
    if teacher_logits.shape[1] != n_classes:
        raise ValueError(
            f"dino_loss: student_logits has K={n_classes} columns but teacher_logits has "
            f"K={teacher_logits.shape[1]}"
        )
    if center.numel() != n_classes or center.shape[-1] != n_classes:
        raise ValueError(
            f"dino_loss: center must have shape (1, K) or (K,) with K={n_classes}, got {tuple(center.shape)}"
        )
    devices = {str(t.device) for t in (student_logits, teacher_logits, center)}
    if len(devices) > 1:
        raise ValueError(
            "dino_loss: student_logits, teacher_logits and center must be on one device, got "
            f"{student_logits.device}, {teacher_logits.device} and {center.device}"
        )
    if not isinstance(n_global_crops, int) or n_global_crops < 1:
        raise ValueError(f"dino_loss: n_global_crops must be a positive int, got {n_global_crops!r}")
    teacher_rows, student_rows = teacher_logits.shape[0], student_logits.shape[0]
    if teacher_rows == 0 or teacher_rows % n_global_crops:
        raise ValueError(
            f"dino_loss: teacher_logits has {teacher_rows} rows, which is not n_global_crops="
            f"{n_global_crops} times a positive batch size"
        )
    batch = teacher_rows // n_global_crops
    if student_rows % batch or student_rows // batch < n_global_crops:
        raise ValueError(
            f"dino_loss: student_logits has {student_rows} rows, which is not ncrops x batch with "
            f"ncrops >= n_global_crops={n_global_crops} (batch={batch}, from teacher_logits' "
            f"{teacher_rows} rows / {n_global_crops} global crops)"
        )
    if count_loss_pairs(n_global_crops, student_rows // batch) == 0:
        raise ValueError("dino_loss: one global crop and one crop leave no (teacher, student) pair")
    for name, value in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if not value > 0:
            raise ValueError(f"dino_loss: {name} must be > 0, got {value!r}")


def _raise_non_finite(student_logits, teacher_logits, center, batch):
    problems = []
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        bad_rows = (~torch.isfinite(logits)).any(dim=1).nonzero().flatten().tolist()
        if bad_rows:
            where = ", ".join(f"{row} (crop {row // batch}, sample {row % batch})" for row in bad_rows[:5])
            more = f" and {len(bad_rows) - 5} more" if len(bad_rows) > 5 else ""
            problems.append(f"{name} has NaN/inf in rows {where}{more}")
    n_bad_center = int((~torch.isfinite(center)).sum())
    if n_bad_center:
        problems.append(f"center has {n_bad_center} NaN/inf entries")
    detail = "; ".join(problems) or "the loss overflowed (logits too large for the temperatures?)"
    raise FloatingPointError(f"dino_loss: non-finite result: {detail}")


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    *,
    n_global_crops: int = 2,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    backend: str = "auto",
    overwrite_student_logits: bool = False,
    check_finite: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO loss over all (global teacher view, other student view) pairs.

    Args:
        student_logits: (ncrops * B, K), crops stacked crop-major (all of crop 0, then crop 1...).
        teacher_logits: (n_global_crops * B, K), the teacher's logits of the global crops.
        center: (1, K) or (K,), the running center subtracted from the teacher logits.
        backend: "auto", "triton", "cpp" or "torch" (see fastdino.ops.backends).
        overwrite_student_logits: fused backends only. Write the gradient into
            ``student_logits``' own storage instead of a fresh (rows x K) buffer, as
            Liger-Kernel does: saves the allocation and its page faults. After the call
            ``student_logits`` holds the gradient, not the logits, so use it only when nothing
            else reads them afterwards (the DINO head's last linear layer does not keep its
            output for backward). Needs a contiguous ``student_logits``. float16 logits keep
            their gradient in a float32 buffer until the backward has scaled it (float16
            cannot hold it unscaled); the flag then makes the backward write the rounded
            float16 gradient into ``student_logits`` instead of a new tensor, so the logits
            are intact until the backward.
        check_finite: raise FloatingPointError naming the rows with NaN/inf when the result is
            not finite. Default: on for CPU tensors (free), off on CUDA (it would sync the host).

    Returns:
        (loss, teacher_sum): the scalar loss (float32; differentiable w.r.t. student_logits),
        and the float32 column sum of teacher_logits over this rank's rows, which the center
        update needs (all-reduce it across ranks, then divide by the global row count).
    """
    _validate(student_logits, teacher_logits, center, n_global_crops, student_temp, teacher_temp)
    name = resolve_backend("dino_loss", backend, [student_logits, teacher_logits, center])
    if name == "torch":
        loss, teacher_sum = dino_loss_reference(
            student_logits, teacher_logits, center, n_global_crops=n_global_crops,
            student_temp=student_temp, teacher_temp=teacher_temp,
        )
    else:
        kernels = cpp_extension() if name == "cpp" else triton_kernels()
        teacher = teacher_logits.detach().contiguous()
        center32 = center.detach().reshape(-1).float().contiguous()
        student = student_logits.contiguous()

        def kernel(grad):
            return kernels.dino_loss_forward(student, teacher, center32, grad, n_global_crops,
                                             float(student_temp), float(teacher_temp))

        loss, teacher_sum = FusedGradientLoss.apply(student, kernel, overwrite_student_logits,
                                                    "dino_loss")
    if check_finite is None:
        check_finite = student_logits.device.type == "cpu"
    if check_finite and not (torch.isfinite(loss) and torch.isfinite(center).all()
                             and torch.isfinite(teacher_sum).all()):
        _raise_non_finite(student_logits, teacher_logits, center, teacher_logits.shape[0] // n_global_crops)
    return loss, teacher_sum
