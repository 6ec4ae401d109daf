"""ibot_patch_loss / soft_cross_entropy: every backend against the float64 reference and DINOv2's
and lightly's formulas, the float16 gradient under a loss scale, and bad input."""

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params
from fastdino.ops import ibot_masks_weight, ibot_patch_loss, soft_cross_entropy, soft_cross_entropy_reference
from tolerances import assert_close

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
LOSS_SCALE = 2.0**16  # GradScaler's initial scale: float16 training scales the loss by it


def make_rows(generator, student_rows, teacher_rows, n_classes, dtype, probs=False, scale=3.0):
    student = (torch.randn(student_rows, n_classes, generator=generator) * scale).to(dtype)
    teacher = torch.randn(teacher_rows, n_classes, generator=generator) * scale
    if probs:  # probabilities whose rows need not sum to 1 (e.g. a sum of two teachers' targets)
        teacher = F.softmax(teacher, -1) * (0.5 + torch.rand(teacher_rows, 1, generator=generator) * 1.5)
    center = torch.randn(n_classes, generator=generator) * 0.5
    weights = torch.rand(student_rows, generator=generator)
    weights[::3] = 0.0  # zero-weight rows (DINOv2's unmasked patches in forward())
    return student, teacher.to(dtype), center, weights


def check(backend, device, student, teacher, center, weights, probs, grad_scale=1.0):
    dtype = student.dtype
    student_ref = student.double().requires_grad_()
    loss_ref, sum_ref = soft_cross_entropy_reference(
        student_ref, teacher.double(), center.double(), weights.double(), student_temp=STUDENT_TEMP,
        teacher_temp=TEACHER_TEMP, teacher_is_probs=probs)
    (loss_ref * grad_scale).backward()
    student_run = student.to(device, copy=True).requires_grad_()
    loss, teacher_sum = soft_cross_entropy(
        student_run, teacher.to(device), center.to(device), weights.to(device), student_temp=STUDENT_TEMP,
        teacher_temp=TEACHER_TEMP, teacher_is_probs=probs, backend=backend)
    (loss * grad_scale).backward()
    context = f"(backend={backend}, dtype={dtype}, probs={probs}, shape={tuple(student.shape)}/{teacher.shape[0]})"
    assert loss.dtype == torch.float32 and loss.dim() == 0 and teacher_sum.dtype == torch.float32
    assert student_run.grad.dtype == dtype
    # Error model as dino_loss's (tests/tolerances.py): a row loss errs by ~u |x| n_r, so the
    # loss is measured against sum_r w_r n_r mean|x_r|; a gradient row (n_r softmax - Q) w_r /
    # tau_s against its terms' size w_r n_r / tau_s.
    row_mass = (F.softmax(teacher.double(), -1) if not probs else teacher.double()).sum(-1)
    row_mass = row_mass.repeat(student.shape[0] // teacher.shape[0])
    x_size = student.double().abs().mean(-1) / STUDENT_TEMP
    loss_scale = float((weights.double() * row_mass * x_size).sum())
    assert_close(loss.cpu(), loss_ref, dtype, "loss", context, scale=loss_scale)
    grad_scale_terms = float((weights.double() * row_mass).norm()) * abs(grad_scale) / STUDENT_TEMP
    assert_close(student_run.grad.cpu(), student_ref.grad, dtype, "grad", context, scale=grad_scale_terms)
    sum_scale = float(teacher.double().abs().sum(0).norm())
    assert_close(teacher_sum.cpu(), sum_ref, dtype, "teacher_sum", context, scale=sum_scale)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("student_rows, teacher_rows, n_classes",
                         [(1, 1, 3), (7, 7, 1000), (15, 5, 4097), (6, 3, 65536)])
def test_matches_float64_reference(backend, dtype, probs, student_rows, teacher_rows, n_classes, device,
                                   generator):
    check(backend, device, *make_rows(generator, student_rows, teacher_rows, n_classes, dtype, probs), probs)


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("student_rows, teacher_rows, n_classes", [(1, 1, 3), (9, 3, 1000), (2, 2, 65536)])
def test_triton_matches_float64_reference(backend, dtype, probs, student_rows, teacher_rows, n_classes,
                                          device, generator):
    check(backend, device, *make_rows(generator, student_rows, teacher_rows, n_classes, dtype, probs), probs)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp", "triton"))
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
def test_float16_gradient_under_a_loss_scale(backend, probs, device, generator):
    """Head-sized logits (|s| < 1) at K = 4097: many gradient entries lie below float16's normal
    range unscaled; scaled by 2^16 in float32 and rounded once they are within float16's u."""
    n_classes = 4097 if backend != "triton" else 1000
    student, teacher, center, weights = make_rows(generator, 11, 11, n_classes, torch.float16, probs, scale=0.3)
    check(backend, device, student, teacher, center, weights / 100, probs, grad_scale=LOSS_SCALE)


def dinov2_forward_masked(student, teacher_probs, masks):
    """DINOv2's iBOTPatchLoss.forward_masked (torch fallback, masks_weight=None), from its source."""
    loss = torch.sum(teacher_probs * F.log_softmax(student / STUDENT_TEMP, dim=-1), dim=-1)
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return -(loss * masks_weight).sum() / masks.shape[0]


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
def test_ibot_patch_loss_is_dinov2s_masked_patch_loss(backend, generator):
    """4 global crops of a 5 x 5 patch grid, two masked (one with a single patch), two not."""
    masks = torch.zeros(4, 25, dtype=torch.bool)
    masks[0, torch.randperm(25, generator=generator)[:9]] = True
    masks[2, 7] = True
    n_masked, n_classes = int(masks.sum()), 1003
    student = torch.randn(n_masked, n_classes, generator=generator, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(n_masked, n_classes, generator=generator, dtype=torch.float64) * 2
    center = torch.randn(1, n_classes, generator=generator, dtype=torch.float64)
    expected = dinov2_forward_masked(student, F.softmax((teacher - center) / TEACHER_TEMP, -1), masks)
    expected_grad, = torch.autograd.grad(expected, student)

    run = student.detach().float().requires_grad_()
    loss, teacher_sum = ibot_patch_loss(run, teacher.float(), center.float(), ibot_masks_weight(masks),
                                        n_crops=4, student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP,
                                        backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(run.grad.double(), expected_grad, rtol=0, atol=2e-5 * float(expected_grad.abs().max()))
    torch.testing.assert_close(teacher_sum.double(), teacher.sum(0), rtol=1e-5, atol=1e-4)


def test_masks_weight_gives_each_masked_crop_weight_one():
    masks = torch.tensor([[True, False, True, True], [False] * 4, [False, True, False, False]])
    weights = ibot_masks_weight(masks)
    assert weights.tolist() == pytest.approx([1 / 3] * 3 + [1.0])


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
def test_no_masked_patch_gives_zero_loss(backend):
    student = torch.zeros(0, 16, requires_grad=True)
    loss, teacher_sum = ibot_patch_loss(student, torch.zeros(0, 16), torch.zeros(16), torch.zeros(0),
                                        n_crops=4, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and student.grad.shape == (0, 16) and teacher_sum.shape == (16,)


@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_fused_result_is_bitwise_reproducible(backend, generator):
    student, teacher, center, weights = make_rows(generator, 9, 3, 4097, torch.float32)
    results = []
    for _ in range(2):
        run = student.clone().requires_grad_()
        loss, teacher_sum = soft_cross_entropy(run, teacher, center, weights, backend=backend)
        loss.backward()
        results.append((loss, teacher_sum, run.grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_overwrite_student_logits_writes_the_gradient_in_place(backend, generator):
    student, teacher, center, weights = make_rows(generator, 6, 6, 1000, torch.float32)
    expected = student.clone().requires_grad_()
    soft_cross_entropy(expected, teacher, center, weights, backend=backend)[0].backward()
    logits = student.clone().requires_grad_()
    loss, _ = soft_cross_entropy(logits, teacher, center, weights, backend=backend, overwrite_student_logits=True)
    torch.testing.assert_close(logits.detach(), expected.grad, rtol=0, atol=0)  # the storage holds the gradient
    loss.backward()
    torch.testing.assert_close(logits.grad, expected.grad, rtol=0, atol=0)


@pytest.mark.parametrize("arguments, message", [
    (dict(student=(4, 10), teacher=(4, 11)), "K=10 columns"),
    (dict(student=(5, 10), teacher=(2, 10)), "not a multiple"),
    (dict(weights=(3,)), r"shape \(4,\)"),
    (dict(center=(9,)), "center must have K=10"),
    (dict(student_temp=0.0), "student_temp must be > 0"),
])
def test_bad_input_is_named(arguments, message):
    student = torch.zeros(arguments.get("student", (4, 10)))
    teacher = torch.zeros(arguments.get("teacher", (4, 10)))
    center = torch.zeros(arguments.get("center", (10,)))
    weights = torch.ones(arguments.get("weights", (student.shape[0],)))
    with pytest.raises(ValueError, match=message):
        soft_cross_entropy(student, teacher, center, weights, student_temp=arguments.get("student_temp", 0.1))


def test_non_finite_input_names_the_rows():
    student = torch.zeros(4, 10)
    student[2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"student_logits has NaN/inf in rows \[2\]"):
        ibot_patch_loss(student, torch.zeros(4, 10), torch.zeros(10), torch.ones(4), n_crops=2)
