"""kernels.soft_cross_entropy_forward (OPS_CONTRACT.md section 4) called directly, against float64
torch on the same (upcast) inputs: interpreted on CPU tensors without a GPU, on CUDA with one."""

import pytest
import torch

from fastdino.kernels import soft_cross_entropy_forward
from tolerances import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def reference(student, teacher, center, weights, student_temp, teacher_temp, teacher_is_probs):
    """(loss, d loss / d student, teacher_sum, n) in float64 by autograd; n: (R_s,) sum_k Q_r(k)."""
    s = student.cpu().double().requires_grad_()
    t = teacher.cpu().double()
    if teacher_is_probs:
        q = t
    else:
        q = torch.softmax((t - center.cpu().double()) / teacher_temp, dim=-1)
    q = q.repeat(s.shape[0] // t.shape[0], 1)  # student row r with teacher row r % R_t
    row_losses = -(q * torch.log_softmax(s / student_temp, dim=-1)).sum(-1)
    loss = (weights.cpu().double() * row_losses).sum()
    loss.backward()
    return loss.detach(), s.grad, t.sum(0), q.sum(-1)


def make_inputs(generator, teacher_rows, repeats, n_classes, dtype, teacher_dtype, teacher_is_probs,
                scale=3.0):
    """Logits of a DINO head's spread (O(1) before temperature); probabilities whose rows sum to
    0.5 .. 1.5, not 1, and one all-zero teacher row where there are several; weights of both
    signs with zeros."""
    student = torch.randn(teacher_rows * repeats, n_classes, generator=generator) * scale
    if teacher_is_probs:
        teacher = torch.rand(teacher_rows, n_classes, generator=generator) ** 4
        row_sums = 0.5 + torch.rand(teacher_rows, 1, generator=generator)
        teacher = teacher / teacher.sum(1, keepdim=True) * row_sums
        if teacher_rows > 1:
            teacher[1] = 0.0
    else:
        teacher = torch.randn(teacher_rows, n_classes, generator=generator) * scale
    center = torch.randn(n_classes, generator=generator) * 0.5
    weights = torch.randn(teacher_rows * repeats, generator=generator)
    weights[::4] = 0.0
    return (student.to(DEVICE, dtype), teacher.to(DEVICE, teacher_dtype), center.to(DEVICE),
            weights.to(DEVICE))


def check(student, teacher, center, weights, grad, teacher_is_probs, student_temp=STUDENT_TEMP,
          teacher_temp=TEACHER_TEMP, loss_scale=None):
    expected_loss, expected_grad, expected_sum, n = reference(
        student, teacher, center, weights, student_temp, teacher_temp, teacher_is_probs)
    abs_student = student.cpu().double().abs()
    abs_weights = weights.cpu().double().abs()
    loss, teacher_sum = soft_cross_entropy_forward(student, teacher, center, weights, grad, student_temp,
                                                   teacher_temp, teacher_is_probs)
    context = (f"(student {student.dtype} {tuple(student.shape)}, teacher {teacher.dtype} "
               f"{tuple(teacher.shape)}, grad {grad.dtype}, probs={teacher_is_probs})")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert teacher_sum.dtype == torch.float32 and teacher_sum.shape == (student.shape[1],)
    # The row losses are n_r lse(x_r) - Q_r . x_r, with rounding errors of the size of |x| = |s| / tau_s
    # per unit of n_r; with weights of both signs the weighted sum can cancel to ~0.
    if loss_scale is None:
        loss_scale = float((abs_weights * n * abs_student.mean(1)).sum()) / student_temp
    assert_close(loss.cpu(), expected_loss, student.dtype, "loss", context, scale=loss_scale)
    # A row's gradient w_r (n_r softmax - Q_r) / tau_s vanishes when student and teacher agree:
    # errors against the size of its terms, |w_r| n_r / tau_s per row. float32 gradients (of float16
    # students) carry only float32 arithmetic: the float32 tolerance.
    gradient_scale = float((abs_weights * n).norm()) / student_temp
    assert_close(grad.cpu(), expected_grad, grad.dtype, "grad", context, scale=gradient_scale)
    # Column sums cancel as easily (teacher logits of both signs): against the sums of |t|.
    sum_scale = float(teacher.cpu().double().abs().sum(0).norm())
    assert_close(teacher_sum.cpu(), expected_sum, teacher.dtype, "teacher_sum", context, scale=sum_scale)
    return loss, teacher_sum


CASES = [
    # teacher rows R_t, R_s / R_t, K, student dtype, teacher dtype, grad dtype, teacher_is_probs
    (3, 1, 3, torch.float32, torch.float32, torch.float32, False),
    (5, 3, 1000, torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
    (3, 3, 4097, torch.float16, torch.float16, torch.float32, False),
    (1, 3, 1000, torch.float16, torch.bfloat16, torch.float16, False),
    (17, 1, 1000, torch.bfloat16, torch.float32, torch.float32, False),  # several teacher row groups
    (7, 1, 1000, torch.bfloat16, torch.float32, torch.bfloat16, True),
    (2, 3, 4097, torch.float32, torch.bfloat16, torch.float32, True),
    (3, 1, 3, torch.float16, torch.float16, torch.float32, True),
    (1, 1, 65536, torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
    (1, 2, 65536, torch.float32, torch.float32, torch.float32, True),
]


@pytest.mark.parametrize("teacher_rows, repeats, n_classes, dtype, teacher_dtype, grad_dtype, probs", CASES,
                         ids=lambda value: str(value).replace("torch.", ""))
def test_matches_float64(teacher_rows, repeats, n_classes, dtype, teacher_dtype, grad_dtype, probs,
                         generator):
    student, teacher, center, weights = make_inputs(generator, teacher_rows, repeats, n_classes, dtype,
                                                    teacher_dtype, probs)
    grad = torch.empty(student.shape, dtype=grad_dtype, device=DEVICE)
    check(student, teacher, center, weights, grad, probs)


@pytest.mark.parametrize("probs", [False, True])
def test_gradient_in_place_of_the_student_equals_a_separate_buffer(probs, generator):
    student, teacher, center, weights = make_inputs(generator, 3, 3, 4097, torch.bfloat16, torch.bfloat16,
                                                    probs)
    separate = torch.empty_like(student)
    loss, teacher_sum = soft_cross_entropy_forward(student, teacher, center, weights, separate,
                                                   STUDENT_TEMP, TEACHER_TEMP, probs)
    in_place = student.clone()
    loss_in_place, sum_in_place = soft_cross_entropy_forward(in_place, teacher, center, weights, in_place,
                                                             STUDENT_TEMP, TEACHER_TEMP, probs)
    assert torch.equal(in_place, separate)
    assert torch.equal(loss_in_place, loss) and torch.equal(sum_in_place, teacher_sum)


def test_zero_weights_give_zero_rows_and_no_loss(generator):
    student, teacher, center, weights = make_inputs(generator, 3, 3, 1000, torch.float32, torch.float32,
                                                    False)
    weights[3:6] = 0.0
    grad = torch.full_like(student, float("nan"))
    loss, _ = soft_cross_entropy_forward(student, teacher, center, weights, grad, STUDENT_TEMP,
                                         TEACHER_TEMP, False)
    assert torch.equal(grad[3:6], torch.zeros_like(grad[3:6]))
    assert (grad[weights != 0] != 0).any(dim=1).all()
    # The loss does not see the zero-weight rows: the same as without them (fixed, other rows).
    kept = weights != 0
    expected, _, _, _ = reference(student[kept], teacher.repeat(3, 1)[kept], center, weights[kept],
                                  STUDENT_TEMP, TEACHER_TEMP, False)
    assert_close(loss.cpu(), expected, torch.float32, "loss",
                 scale=float(student.double().abs().mean() * weights.abs().sum()) / STUDENT_TEMP)
    all_zero = torch.zeros_like(weights)
    loss, _ = soft_cross_entropy_forward(student, teacher, center, all_zero, grad, STUDENT_TEMP,
                                         TEACHER_TEMP, False)
    assert float(loss) == 0.0 and not grad.any()


@pytest.mark.parametrize("probs", [False, True])
def test_loss_is_free_of_cancellation_under_a_large_logit_offset(probs, generator):
    """Contract: L = n log S + sum Q (M - x), a sum of non-negative terms. A common offset of 2^15
    on every student logit (x ~ 3e5 at tau_s = 0.1) leaves the loss and the softmax unchanged;
    the direct form n lse(x) - Q . x would subtract float32 numbers of size ~3e5 and lose
    ~u 3e5 = 2e-2 per row, ~10 times the tolerance below, which is that of offset-free logits."""
    student, teacher, center, weights = make_inputs(generator, 3, 3, 1000, torch.float32, torch.float32,
                                                    probs)
    _, _, _, n = reference(student, teacher, center, weights, STUDENT_TEMP, TEACHER_TEMP, probs)
    offset_free_scale = float((weights.cpu().double().abs() * n * student.cpu().double().abs().mean(1)).sum()
                              ) / STUDENT_TEMP
    shifted = student + 2.0 ** 15  # s in [2^14, 2^16): M - x is exact in float32
    assert (shifted > 2.0 ** 14).all() and (shifted < 2.0 ** 16).all()
    grad = torch.empty_like(shifted)
    check(shifted, teacher, center, weights, grad, probs, loss_scale=offset_free_scale)


def test_other_temperatures_and_teacher_temperature_ignored_for_probabilities(generator):
    student, teacher, center, weights = make_inputs(generator, 5, 1, 777, torch.float32, torch.float32,
                                                    False)
    check(student, teacher, center, weights, torch.empty_like(student), False, student_temp=0.2,
          teacher_temp=0.07)
    student, teacher, center, weights = make_inputs(generator, 5, 1, 777, torch.float32, torch.float32, True)
    check(student, teacher, center, weights, torch.empty_like(student), True, teacher_temp=0.0)


def test_bitwise_deterministic(generator):
    for probs in (False, True):
        student, teacher, center, weights = make_inputs(generator, 5, 3, 2049, torch.bfloat16,
                                                        torch.bfloat16, probs)
        grads = [torch.empty(student.shape, dtype=torch.float32, device=DEVICE) for _ in range(2)]
        first, second = (soft_cross_entropy_forward(student, teacher, center, weights, grad, STUDENT_TEMP,
                                                    TEACHER_TEMP, probs) for grad in grads)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        assert torch.equal(grads[0], grads[1])


def test_no_student_rows_gives_zero_loss_and_the_teacher_sum(generator):
    teacher = torch.randn(3, 10, generator=generator).to(DEVICE)
    student = torch.empty(0, 10, device=DEVICE)
    loss, teacher_sum = soft_cross_entropy_forward(student, teacher, torch.zeros(10, device=DEVICE),
                                                   torch.empty(0, device=DEVICE), student, STUDENT_TEMP,
                                                   TEACHER_TEMP, False)
    assert float(loss) == 0.0
    assert_close(teacher_sum.cpu(), teacher.cpu().double().sum(0), torch.float32, "teacher_sum",
                 scale=float(teacher.cpu().double().abs().sum(0).norm()))


def good_inputs():
    return dict(student=torch.randn(6, 10, device=DEVICE), teacher=torch.randn(3, 10, device=DEVICE),
                center=torch.zeros(10, device=DEVICE), weights=torch.ones(6, device=DEVICE),
                grad=torch.empty(6, 10, device=DEVICE), student_temp=0.1, teacher_temp=0.04,
                teacher_is_probs=False)


@pytest.mark.parametrize("change, message", [
    (dict(teacher=torch.randn(4, 10)), r"student rows \(6\) must be a multiple of the teacher rows \(4"),
    (dict(teacher=torch.randn(0, 10)), r"student rows \(6\) must be a multiple of the teacher rows \(0"),
    (dict(teacher=torch.randn(3, 11)), "teacher has 11 columns but student has 10"),
    (dict(center=torch.zeros(11)), r"center must have shape \(10,\), got \(11,\)"),
    (dict(center=torch.zeros(10, dtype=torch.float64)), "center must have dtype in \\(float32\\)"),
    (dict(weights=torch.ones(3)), r"weights must have shape \(6,\)"),
    (dict(weights=torch.ones(6, dtype=torch.bfloat16)), "weights must have dtype in \\(float32\\)"),
    (dict(grad=torch.empty(6, 10, dtype=torch.bfloat16)), "grad must have the student's dtype"),
    (dict(grad=torch.empty(6, 9)), r"grad must have the student's shape \(6, 10\)"),
    (dict(student=torch.randn(10, 6).t()), "student must be contiguous"),
    (dict(student=torch.randn(6, 10, dtype=torch.float64)), "student must have dtype in"),
    (dict(teacher=torch.randn(3, 10, 1)), "teacher must be 2-D"),
    (dict(student_temp=0.0), "student_temp must be a positive finite float, got 0.0"),
    (dict(teacher_temp=-1.0), "teacher_temp must be a positive finite float, got -1.0"),
    (dict(teacher_is_probs=1), "teacher_is_probs must be a bool, got int"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_bad_input_is_refused_naming_the_argument(change, message):
    arguments = good_inputs()
    arguments.update({name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
                      for name, value in change.items()})
    with pytest.raises(ValueError, match=message):
        soft_cross_entropy_forward(**arguments)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and a CPU tensor")
def test_tensors_on_two_devices_are_refused():
    arguments = good_inputs()
    arguments["weights"] = arguments["weights"].cpu()
    with pytest.raises(ValueError, match="weights is on cpu but student is on cuda"):
        soft_cross_entropy_forward(**arguments)
