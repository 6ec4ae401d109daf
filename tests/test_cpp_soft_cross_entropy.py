"""fastdino._C.soft_cross_entropy_forward (OPS_CONTRACT.md section 4) called directly, against a
float64 torch statement of the contract's math written here."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from fastdino.ops import backend_status
from tolerances import assert_close

CPP_STATUS = backend_status()["cpp"]
pytestmark = pytest.mark.skipif(CPP_STATUS != "available", reason=CPP_STATUS)

STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.04


@pytest.fixture
def C():
    return importlib.import_module("fastdino._C")


def make_inputs(generator, student_rows, teacher_rows, n_classes, dtype, teacher_is_probs,
                teacher_dtype=None):
    """Logits of scale 3 (a DINO head's outputs before temperature), as in test_dino_loss.py.
    Probabilities: rows of very different mass (0.5 .. 2, never normalized), the last one all
    zero; weights: any sign, two of them zero."""
    student = torch.randn(student_rows, n_classes, generator=generator) * 3.0
    if teacher_is_probs:
        teacher = torch.rand(teacher_rows, n_classes, generator=generator) ** 4
        mass = 0.5 + 1.5 * torch.rand(teacher_rows, 1, generator=generator)
        teacher = teacher / teacher.sum(1, keepdim=True) * mass
        teacher[-1] = 0.0
    else:
        teacher = torch.randn(teacher_rows, n_classes, generator=generator) * 3.0
    center = torch.randn(n_classes, generator=generator) * 0.5
    weights = torch.randn(student_rows, generator=generator)
    weights[:: max(1, student_rows // 2)] = 0.0
    return student.to(dtype), teacher.to(teacher_dtype or dtype), center, weights


def reference(student, teacher, center, weights, teacher_is_probs, student_temp=STUDENT_TEMP,
              teacher_temp=TEACHER_TEMP):
    """The contract's loss in float64 on the (upcast) inputs; the gradient by autograd, so the
    kernel's closed form w (n_r softmax - Q) / tau_s is checked, not restated."""
    s = student.double().requires_grad_()
    t = teacher.double()
    q = t if teacher_is_probs else F.softmax((t - center.double()) / teacher_temp, dim=-1)
    q = q.repeat(student.shape[0] // teacher.shape[0], 1)  # student row r <-> teacher row r % R_t
    row_loss = -(q * F.log_softmax(s / student_temp, dim=-1)).sum(-1)
    loss = (weights.double() * row_loss).sum()
    loss.backward()
    return loss.detach(), t.sum(0), s.grad, q.sum(-1)


def check(C, student, teacher, center, weights, teacher_is_probs, grad_dtype=None):
    grad = torch.empty_like(student, dtype=grad_dtype or student.dtype)
    loss, teacher_sum = C.soft_cross_entropy_forward(
        student, teacher, center, weights, grad, STUDENT_TEMP, TEACHER_TEMP, teacher_is_probs)
    loss_ref, sum_ref, grad_ref, n_r = reference(student, teacher, center, weights, teacher_is_probs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert teacher_sum.dtype == torch.float32 and teacher_sum.shape == (teacher.shape[1],)
    dtype = student.dtype
    context = (f"(student {dtype}, teacher {teacher.dtype}, grad {grad.dtype}, "
               f"shape {tuple(student.shape)} / {tuple(teacher.shape)}, probs={teacher_is_probs})")
    # Scales (see tolerances.py): a row loss n_r lse(x) - Q.x is good to ~1e-5 of n_r |x|, and
    # the weighted sum can cancel (weights of both signs), so the loss is measured against
    # sum_r |w_r| n_r mean|x_r|; a gradient row w_r (n_r softmax - Q_r) / tau_s cancels where
    # student and teacher agree, so against the size of its terms, ||w_r n_r||_2 / tau_s.
    w = weights.double().abs()
    x_size = student.double().abs().mean(-1) / STUDENT_TEMP
    assert_close(loss, loss_ref, dtype, "loss", context, scale=float((w * n_r * x_size).sum()))
    # The gradient's error is its rounding to grad's dtype (a float32 gradient of float16 logits
    # is a float32 result: the float32 tolerance applies).
    assert_close(grad, grad_ref, grad.dtype, "grad", context,
                 scale=float((w * n_r).norm()) / STUDENT_TEMP)
    assert_close(teacher_sum, sum_ref, dtype, "teacher_sum", context,
                 scale=float(teacher.double().abs().sum(0).norm()))
    return loss, teacher_sum, grad


ROWS = [(7, 7), (15, 5)]  # (R_s, R_t): one teacher row per student row (R odd); R_s = 3 R_t


@pytest.mark.parametrize("teacher_is_probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_classes", [3, 1000, 4097, 65536])
@pytest.mark.parametrize("rows", ROWS, ids=["R_s=R_t", "R_s=3R_t"])
def test_matches_float64_reference(C, rows, n_classes, dtype, teacher_is_probs, generator):
    student_rows, teacher_rows = rows
    inputs = make_inputs(generator, student_rows, teacher_rows, n_classes, dtype, teacher_is_probs)
    # float16 logits get a float32 gradient from the ops layer (their gradient underflows float16).
    check(C, *inputs, teacher_is_probs, grad_dtype=torch.float32 if dtype == torch.float16 else None)


@pytest.mark.parametrize("teacher_is_probs", [False, True], ids=["logits", "probs"])
def test_float16_gradient_and_mixed_dtypes(C, teacher_is_probs, generator):
    inputs = make_inputs(generator, 9, 3, 1031, torch.float16, teacher_is_probs)
    check(C, *inputs, teacher_is_probs)  # float16 gradient: allowed by the contract
    inputs = make_inputs(generator, 9, 3, 1031, torch.bfloat16, teacher_is_probs,
                         teacher_dtype=torch.float32)
    check(C, *inputs, teacher_is_probs)
    inputs = make_inputs(generator, 9, 9, 1031, torch.float32, teacher_is_probs,
                         teacher_dtype=torch.float16)
    check(C, *inputs, teacher_is_probs)


def test_one_teacher_row_for_many_student_rows(C, generator):
    """R_t = 1: more student rows than threads share one teacher row (its Q is rebuilt by every
    task but summed into teacher_sum once)."""
    check(C, *make_inputs(generator, 11, 1, 777, torch.float32, False), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("teacher_is_probs", [False, True], ids=["logits", "probs"])
def test_gradient_may_overwrite_the_student(C, dtype, teacher_is_probs, generator):
    student, teacher, center, weights = make_inputs(generator, 15, 5, 4097, dtype, teacher_is_probs)
    grad = torch.empty_like(student)
    expected = C.soft_cross_entropy_forward(student, teacher, center, weights, grad, STUDENT_TEMP,
                                            TEACHER_TEMP, teacher_is_probs)
    in_place = student.clone()
    result = C.soft_cross_entropy_forward(in_place, teacher, center, weights, in_place, STUDENT_TEMP,
                                          TEACHER_TEMP, teacher_is_probs)
    assert torch.equal(in_place, grad)
    for a, b in zip(result, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("teacher_is_probs", [False, True], ids=["logits", "probs"])
def test_zero_weights_give_zero_loss_and_gradient(C, teacher_is_probs, generator):
    student, teacher, center, weights = make_inputs(generator, 15, 5, 1000, torch.float32,
                                                    teacher_is_probs)
    grad = torch.full_like(student, float("nan"))
    loss, teacher_sum = C.soft_cross_entropy_forward(student, teacher, center, torch.zeros(15), grad,
                                                     STUDENT_TEMP, TEACHER_TEMP, teacher_is_probs)
    assert loss.item() == 0.0 and not grad.any()
    assert_close(teacher_sum, teacher.double().sum(0), torch.float32, "teacher_sum",
                 scale=float(teacher.double().abs().sum(0).norm()))
    # Mixed: the zero-weight rows of make_inputs get an exactly zero gradient, the others not
    # (except, with probabilities, those paired with make_inputs' all-zero teacher row: Q = 0).
    C.soft_cross_entropy_forward(student, teacher, center, weights, grad, STUDENT_TEMP, TEACHER_TEMP,
                                 teacher_is_probs)
    has_teacher_mass = teacher.sum(1).gt(0).repeat(3)
    assert not grad[weights == 0].any()
    assert grad[(weights != 0) & has_teacher_mass].abs().sum(1).gt(0).all()


def test_probs_mode_reads_neither_center_nor_teacher_temp(C, generator):
    student, teacher, center, weights = make_inputs(generator, 6, 3, 100, torch.float32, True)
    grad = torch.empty_like(student)
    expected = C.soft_cross_entropy_forward(student, teacher, center, weights, grad, STUDENT_TEMP,
                                            TEACHER_TEMP, True)
    result = C.soft_cross_entropy_forward(student, teacher, torch.empty(0, dtype=torch.float64),
                                          weights, grad, STUDENT_TEMP, 0.0, True)
    for a, b in zip(result, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("teacher_is_probs", [False, True], ids=["logits", "probs"])
def test_bitwise_deterministic(C, teacher_is_probs, generator):
    """Two calls agree bitwise; the loss and gradient also across thread counts (rows are
    independent and the row losses are summed in row order)."""
    inputs = make_inputs(generator, 21, 7, 2049, torch.float32, teacher_is_probs)

    def run():
        grad = torch.empty_like(inputs[0])
        loss, teacher_sum = C.soft_cross_entropy_forward(*inputs, grad, STUDENT_TEMP, TEACHER_TEMP,
                                                         teacher_is_probs)
        return loss, teacher_sum, grad

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread[0], first[0]) and torch.equal(one_thread[2], first[2])


def call(C, student=None, teacher=None, center=None, weights=None, grad=None, student_temp=0.1,
         teacher_temp=0.04, teacher_is_probs=False):
    student = torch.randn(6, 10) if student is None else student
    teacher = torch.randn(3, 10) if teacher is None else teacher
    center = torch.zeros(10) if center is None else center
    weights = torch.ones(student.shape[0]) if weights is None else weights
    grad = torch.empty_like(student) if grad is None else grad
    return C.soft_cross_entropy_forward(student, teacher, center, weights, grad, student_temp,
                                        teacher_temp, teacher_is_probs)


@pytest.mark.parametrize("arguments, message", [
    (dict(teacher=torch.randn(4, 10)), r"student rows \(6\) must be a positive multiple of teacher rows \(4\)"),
    (dict(teacher=torch.randn(0, 10)), "teacher must have at least one row"),
    (dict(teacher=torch.randn(3, 11)), "teacher has 11 columns but student has K = 10"),
    (dict(student=torch.randn(6, 10).double()), "student must have dtype float32, bfloat16 or float16"),
    (dict(student=torch.randn(10, 6).t()), "student must be contiguous"),
    (dict(teacher=torch.randn(3, 10, 1)), r"teacher must be 2-D \(rows, K\)"),
    (dict(center=torch.zeros(11)), r"center must be a contiguous 1-D tensor of K = 10 elements"),
    (dict(center=torch.zeros(10).double()), "center must be float32, got Double"),
    (dict(weights=torch.ones(5)), "weights must be a contiguous 1-D tensor of student rows = 6"),
    (dict(weights=torch.ones(6).half()), "weights must be float32, got Half"),
    (dict(student=torch.randn(6, 10).bfloat16(), grad=torch.empty(6, 10).half()),
     r"grad must have the dtype of student \(BFloat16\) or float32, got Half"),
    (dict(grad=torch.empty(6, 9)), "grad must have the shape of student"),
    (dict(student_temp=0.0), "student_temp must be > 0, got 0"),
    (dict(teacher_temp=-1.0), "teacher_temp must be > 0, got -1"),
])
def test_bad_input_is_refused_naming_the_argument(C, arguments, message):
    with pytest.raises(RuntimeError, match=message):
        call(C, **arguments)


def test_overlapping_gradient_is_refused(C):
    storage = torch.randn(70)
    student = storage[:60].view(6, 10)
    with pytest.raises(RuntimeError, match="grad must be either student itself"):
        call(C, student=student, grad=storage[5:65].view(6, 10))
    teacher = torch.randn(6, 10)
    with pytest.raises(RuntimeError, match="grad must not overlap teacher"):
        call(C, teacher=teacher, grad=teacher)
