"""Teacher EMA over whole parameter lists: teacher <- m * teacher + (1 - m) * student."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .backends import cpp_extension, resolve_backend, triton_kernels


@torch.no_grad()
def ema_update_reference(teacher_params, student_params, momentum) -> None:
    """Plain PyTorch per-tensor EMA (the "torch" backend; float64 inputs make the test reference)."""
    for teacher, student in zip(teacher_params, student_params):
        compute_dtype = torch.promote_types(teacher.dtype, torch.float32)
        updated = momentum * teacher.to(compute_dtype) + (1 - momentum) * student.to(compute_dtype)
        teacher.copy_(updated)


def _as_tensor_list(params, name: str) -> list[torch.Tensor]:
    tensors = [p.detach() if isinstance(p, torch.Tensor) else p for p in params]
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ema_update_: {name}[{index}] is a {type(tensor).__name__}, not a tensor")
    return tensors


@torch.no_grad()
def ema_update_(
    teacher_params: Iterable[torch.Tensor],
    student_params: Iterable[torch.Tensor],
    momentum: float | torch.Tensor,
    backend: str = "auto",
) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student for every pair, in place.

    One kernel launch per dtype group on CUDA, one parallel loop on the CPU. Teachers may be
    float32 or bfloat16 (math in float32, one rounding); students may have another dtype.
    ``momentum`` may be a 0-d tensor on the parameters' device (no host sync on CUDA); a float64
    one keeps 1 - momentum exact near 1, which a float32 one cannot.
    """
    teachers = _as_tensor_list(teacher_params, "teacher_params")
    students = _as_tensor_list(student_params, "student_params")
    if len(teachers) != len(students):
        raise ValueError(
            f"ema_update_: {len(teachers)} teacher tensors but {len(students)} student tensors"
        )
    for index, (teacher, student) in enumerate(zip(teachers, students)):
        if teacher.shape != student.shape:
            raise ValueError(
                f"ema_update_: teacher_params[{index}] has shape {tuple(teacher.shape)} but "
                f"student_params[{index}] has {tuple(student.shape)}"
            )
    if not teachers:
        return
    momentum_tensors = [momentum] if isinstance(momentum, torch.Tensor) else []
    name = resolve_backend("ema_update_", backend, teachers + students, scalars=momentum_tensors)
    if name == "torch":
        ema_update_reference(teachers, students, momentum)
        return
    # The kernels work on flat contiguous storage; a non-contiguous teacher is updated through a
    # contiguous copy that is written back.
    work = [t if t.is_contiguous() else t.contiguous() for t in teachers]
    if name == "cpp":
        value = float(momentum)  # a CPU scalar: no sync to worry about
        cpp_extension().ema_update_(work, [s.contiguous() for s in students], value)
    else:
        triton_kernels().ema_update_(work, [s.contiguous() for s in students], momentum)
    for teacher, updated in zip(teachers, work):
        if updated is not teacher:
            teacher.copy_(updated)
    # The kernels write through raw pointers, which autograd's version counters do not see;
    # caches keyed on them (the ViT's interpolated position embeddings) must see the change.
    torch.autograd.graph.increment_version(teachers)
