"""Multi-tensor EMA: teacher <- m * teacher + (1 - m) * student, in place on the teacher.

One launch per (teacher dtype, student dtype) group covers every tensor of the group (see
tensor_lists.py): one program per chunk of CHUNK elements of one tensor. Math in float32, one
rounding (round to nearest even) to the teacher dtype. The momentum may be a Python float or a
0-d float tensor on the device, which the kernel loads itself (no host synchronisation).

1 - m is formed before m is rounded to float32 (in double on the host, or in the kernel from a
float64 tensor): near m = 1, 1 - float32(m) would carry a relative error of up to
2^-24 m / (1 - m), 2e-5 at m = 0.997, into the student's share of every update.
"""

from __future__ import annotations

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

CHUNK = 32768  # elements per program
BLOCK = 4096  # elements per loop step (16 per thread with 8 warps)
NUM_WARPS = 8


@triton.jit
def _ema_kernel(
    t_addrs,
    s_addrs,
    numel_ptr,
    main_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    mom_ptr,
    mom_value,
    one_minus_mom_value,
    T_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    MOM_IS_PTR: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    tensor = tl.load(chunk_tensor_ptr + tl.program_id(0))
    start, numel, main = chunk_bounds(tensor, numel_ptr, main_ptr, chunk_start_ptr, ALIGNED)
    t_base = tensor_pointer(t_addrs, tensor, T_DTYPE, ALIGNED)
    s_base = tensor_pointer(s_addrs, tensor, S_DTYPE, ALIGNED)
    if MOM_IS_PTR:
        loaded = tl.load(mom_ptr)  # float32 or float64
        m = loaded.to(tl.float32)
        one_minus_m = (1.0 - loaded).to(tl.float32)
    else:
        m = tl.full([], mom_value, tl.float32)
        one_minus_m = tl.full([], one_minus_mom_value, tl.float32)

    offs = tl.arange(0, BLOCK)
    span = tl.minimum(main - start, CHUNK)  # <= 0 for the chunk that only holds the tail
    for off in range(0, span, BLOCK):
        idx = start + off + offs
        mask = idx < main
        t = tl.load(t_base + idx, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_base + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(t_base + idx, cast_rne(m * t + one_minus_m * s, T_DTYPE, INTERPRET), mask=mask)

    tidx, tmask = tail_block(start, numel, main, CHUNK, TAIL)
    t = tl.load(t_base + tidx, mask=tmask, other=0.0).to(tl.float32)
    s = tl.load(s_base + tidx, mask=tmask, other=0.0).to(tl.float32)
    tl.store(t_base + tidx, cast_rne(m * t + one_minus_m * s, T_DTYPE, INTERPRET), mask=tmask)


def ema_update_(teacher_tensors, student_tensors, momentum) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student for every pair, in place."""
    teachers = check_tensor_list(teacher_tensors, "teacher_tensors")
    students = check_tensor_list(student_tensors, "student_tensors")
    if len(teachers) != len(students):
        raise ValueError(
            f"teacher_tensors and student_tensors must have the same length, got "
            f"{len(teachers)} and {len(students)}"
        )
    for i, (t, s) in enumerate(zip(teachers, students)):
        if t.numel() != s.numel():
            raise ValueError(
                f"teacher_tensors[{i}] has {t.numel()} elements but student_tensors[{i}] has "
                f"{s.numel()}"
            )
        if s.device != t.device:
            raise ValueError(
                f"student_tensors[{i}] is on {s.device} but teacher_tensors[{i}] is on {t.device}"
            )
    # A float64 momentum tensor stays float64: the kernel forms 1 - m before rounding m.
    mom_tensor, mom_value = check_scalar(momentum, "momentum",
                                         teachers[0].device if teachers else None,
                                         "teacher_tensors", (torch.float32, torch.float64))

    groups = group_by([(t.dtype, s.dtype) for t, s in zip(teachers, students)])
    with on_device_of(teachers):
        for (t_dtype, s_dtype), idx in groups.items():
            tl_list = [teachers[i] for i in idx]
            sl_list = [students[i] for i in idx]
            table = get_table([tl_list, sl_list], CHUNK)
            _ema_kernel[(table.n_chunks,)](
                table.addrs[0],
                table.addrs[1],
                table.numel,
                table.main,
                table.chunk_tensor,
                table.chunk_start,
                mom_tensor if mom_tensor is not None else table.numel,  # unused when a float
                mom_value,
                1.0 - mom_value,  # in double: see the module doc
                T_DTYPE=triton_dtype(t_dtype),
                S_DTYPE=triton_dtype(s_dtype),
                MOM_IS_PTR=mom_tensor is not None,
                ALIGNED=table.aligned,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                TAIL=TAIL,
                INTERPRET=interpreter_active(),
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
