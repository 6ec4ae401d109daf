"""ema_update_: every backend against a float64 reference over mixed shapes and dtypes."""

import pytest
import torch

from conftest import backend_params
from fastdino.ops import ema_update_, ema_update_reference
from tolerances import assert_close

BACKENDS = backend_params("torch", "cpp", "triton")
# Odd sizes on purpose: chunk and block boundaries must not line up with tensor boundaries.
SHAPES = [(384,), (7,), (1, 384), (3, 5, 8, 8), (1000, 13), (65537,), (1,)]


def make_pairs(generator, teacher_dtype, student_dtype, device, shapes=SHAPES):
    teachers = [torch.randn(shape, generator=generator).to(device, teacher_dtype) for shape in shapes]
    students = [torch.randn(shape, generator=generator).to(device, student_dtype) for shape in shapes]
    return teachers, students


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_dtype, student_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
], ids=str)
@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_matches_float64_reference(backend, device, teacher_dtype, student_dtype, momentum_kind, generator):
    teachers, students = make_pairs(generator, teacher_dtype, student_dtype, device)
    # One teacher near 0, so that the student's share (1 - m) * s dominates its update: 1 - m must
    # not be formed from a float32-rounded m (see kernels/ema.py).
    teachers[-1].fill_(1e-4)
    momentum = 0.9961 + 0.003 * float(torch.rand((), generator=generator))
    expected = [t.cpu().double() for t in teachers]
    # A one-element tensor can cancel to ~0: measure errors against the size of the two terms.
    term_sizes = [float((momentum * t.abs() + (1 - momentum) * s.cpu().double().abs()).norm())
                  for t, s in zip(expected, students)]
    ema_update_reference(expected, [s.cpu().double() for s in students], momentum)

    # A float64 tensor: a float32 one would round m itself, which no kernel can undo.
    momentum_value = (torch.tensor(momentum, dtype=torch.float64, device=device)
                      if momentum_kind == "tensor" else momentum)
    ema_update_(teachers, students, momentum_value, backend=backend)
    for teacher, reference, size in zip(teachers, expected, term_sizes):
        assert teacher.dtype == teacher_dtype
        context = f"(backend={backend}, shape={tuple(teacher.shape)})"
        # The result is rounded once to the teacher's dtype, like the rounded float64 reference.
        assert_close(teacher.cpu(), reference.to(teacher_dtype), teacher_dtype, "ema", context, scale=size)
        assert_close(teacher.cpu(), reference, teacher_dtype, "ema", context, scale=size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_updates_module_parameters_and_non_contiguous_teachers(backend, device, generator):
    student = torch.nn.Linear(33, 17).to(device)
    teacher = torch.nn.Linear(33, 17).to(device)
    with torch.no_grad():
        teacher.weight.set_(torch.randn(33, 17, generator=generator).to(device).t())  # non-contiguous view
    assert not teacher.weight.is_contiguous()
    expected = [0.5 * t.detach().double() + 0.5 * s.detach().double()
                for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update_(teacher.parameters(), student.parameters(), 0.5, backend=backend)
    for parameter, reference in zip(teacher.parameters(), expected):
        assert_close(parameter.cpu(), reference.cpu(), torch.float32, "ema")


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_one_keeps_the_teacher_and_zero_copies_the_student(backend, device, generator):
    teachers, students = make_pairs(generator, torch.float32, torch.float32, device, [(100,), (3, 3)])
    before = [t.clone() for t in teachers]
    ema_update_(teachers, students, 1.0, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(teachers, before))
    ema_update_(teachers, students, 0.0, backend=backend)
    assert all(torch.equal(t, s) for t, s in zip(teachers, students))


def test_mismatched_lists_are_rejected():
    with pytest.raises(ValueError, match="2 teacher tensors but 1 student tensors"):
        ema_update_([torch.zeros(3), torch.zeros(2)], [torch.zeros(3)], 0.9)
    with pytest.raises(ValueError, match=r"teacher_params\[1\] has shape \(2,\) but student_params\[1\] has \(3,\)"):
        ema_update_([torch.zeros(3), torch.zeros(2)], [torch.zeros(3), torch.zeros(3)], 0.9)
    with pytest.raises(TypeError, match=r"student_params\[0\] is a float"):
        ema_update_([torch.zeros(3)], [1.0], 0.9)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp", "triton"))
def test_ema_bumps_the_version_counters(backend, device):
    """Caches keyed on tensor versions (the ViT's interpolated position embeddings) must see it."""
    teachers = [torch.zeros(5, device=device), torch.zeros(3, 4, device=device).t()]  # one non-contiguous
    students = [torch.ones(5, device=device), torch.ones(4, 3, device=device)]
    versions = [t._version for t in teachers]
    ema_update_(teachers, students, 0.5, backend=backend)
    assert all(t._version > v for t, v in zip(teachers, versions))
