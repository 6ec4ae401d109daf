"""dino_loss: every backend against the float64 reference, the gradient path, and bad input."""

import pytest
import torch

from conftest import backend_params
from fastdino.ops import BackendUnavailableError, dino_loss, dino_loss_reference
from fastdino.ops.dino_loss import count_loss_pairs
from tolerances import assert_close

ALL_BACKENDS = backend_params("torch", "cpp", "triton")
INTERPRETED = torch.device("cpu")  # triton runs interpreted on CPU tensors in CI: keep it small


def make_logits(generator, batch, n_local, n_classes, dtype, n_global=2, scale=3.0):
    """Random logits with realistic spread: the DINO head's outputs are O(1) before temperature."""
    ncrops = n_global + n_local
    student = torch.randn(ncrops * batch, n_classes, generator=generator) * scale
    teacher = torch.randn(n_global * batch, n_classes, generator=generator) * scale
    center = torch.randn(1, n_classes, generator=generator) * 0.5
    return student.to(dtype), teacher.to(dtype), center


def check_against_reference(backend, device, student, teacher, center, n_global=2, student_temp=0.1,
                            teacher_temp=0.04, grad_scale=1.0, conditioning=1.0):
    """Run ``backend`` on ``device`` and the float64 reference (CPU) on the same values; compare
    loss, gradient and teacher sum."""
    dtype = student.dtype
    student_ref = student.double().requires_grad_()
    loss_ref, sum_ref = dino_loss_reference(
        student_ref, teacher.double(), center.double(), n_global_crops=n_global,
        student_temp=student_temp, teacher_temp=teacher_temp,
    )
    (loss_ref * grad_scale).backward()

    student_run = student.to(device, copy=True).requires_grad_()
    loss, teacher_sum = dino_loss(
        student_run, teacher.to(device), center.to(device), n_global_crops=n_global,
        student_temp=student_temp, teacher_temp=teacher_temp, backend=backend,
    )
    (loss * grad_scale).backward()
    loss, teacher_sum, grad = loss.cpu(), teacher_sum.cpu(), student_run.grad.cpu()
    context = f"(backend={backend}, dtype={dtype}, shape={tuple(student.shape)})"
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert teacher_sum.shape == (teacher.shape[1],) and teacher_sum.dtype == torch.float32
    assert grad.dtype == dtype
    # The loss is a sum of cross-entropies n_t * lse(x) - Q . x with x = s / tau_s: its rounding
    # error scales with |x|, which matters when student and teacher agree and the loss -> 0.
    loss_scale = float(student.double().abs().mean()) / student_temp
    assert_close(loss, loss_ref, dtype, "loss", context, scale=loss_scale, conditioning=conditioning)
    batch = teacher.shape[0] // n_global
    n_pairs = count_loss_pairs(n_global, student.shape[0] // batch)
    gradient_scale = abs(grad_scale) * student.shape[0] ** 0.5 / (student_temp * batch * n_pairs)
    assert_close(grad, student_ref.grad, dtype, "grad", context, scale=gradient_scale,
                 conditioning=conditioning)
    # A column sum cancels to ~0 as easily as the gradient (K=3 draws such columns): its float32
    # error is a few u of the terms, sum |t|, not of the sum.
    sum_scale = float(teacher.double().abs().sum(0).norm())
    assert_close(teacher_sum, sum_ref, dtype, "teacher_sum", context, scale=sum_scale)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_classes", [3, 1000, 4097, 65536])
@pytest.mark.parametrize("n_local", [0, 1, 8, 10])
@pytest.mark.parametrize("batch", [1, 5])
def test_matches_float64_reference(backend, dtype, n_classes, n_local, batch, device, generator):
    if n_classes == 65536 and batch == 1 and n_local in (1, 8):
        pytest.skip("covered by the other K=65536 cases; keeps the run short")
    check_against_reference(backend, device, *make_logits(generator, batch, n_local, n_classes, dtype))


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "batch, n_local, n_classes", [(1, 0, 3), (3, 1, 1000), (1, 8, 4097), (2, 10, 1000), (1, 0, 65536)]
)
def test_triton_matches_float64_reference(backend, dtype, batch, n_local, n_classes, device, generator):
    check_against_reference(backend, device, *make_logits(generator, batch, n_local, n_classes, dtype))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float16_one_global_crop_and_other_temperatures(backend, device, generator):
    student, teacher, center = make_logits(generator, 3, 2, 777, torch.float16, n_global=1)
    check_against_reference(backend, device, student, teacher, center, n_global=1, student_temp=0.2,
                            teacher_temp=0.07)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_extreme_logits_stay_finite(backend, device, generator):
    """Online softmax must subtract the running max: (t - c) / tau_t reaches ~10^4 here, where
    float32 rounds the scaled logits themselves by ~1e-3, so the tolerance widens by the ratio of
    this logit scale to the usual one (100 / 3)."""
    student, teacher, center = make_logits(generator, 3, 2, 1000, torch.float32, scale=100.0)
    check_against_reference(backend, device, student, teacher, center, conditioning=100.0 / 3.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_upstream_gradient_scales_the_gradient(backend, device, generator):
    check_against_reference(backend, device, *make_logits(generator, 3, 2, 513, torch.float32), grad_scale=-2.5)


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
def test_overwrite_student_logits_writes_the_gradient_in_place(backend, device, generator):
    student, teacher, center = (x.to(device) for x in make_logits(generator, 3, 4, 1000, torch.float32))
    expected = student.clone().requires_grad_()
    loss_expected, _ = dino_loss(expected, teacher, center, backend=backend)
    loss_expected.backward()

    leaf = student.clone().requires_grad_()
    logits = leaf * 1.0  # like the head's output: not a leaf
    storage = logits.data_ptr()
    seen_grads = []
    logits.register_hook(seen_grads.append)
    loss, _ = dino_loss(logits, teacher, center, backend=backend, overwrite_student_logits=True)
    loss.backward()
    assert seen_grads[0].data_ptr() == storage, "the gradient must reuse the logits' storage"
    torch.testing.assert_close(leaf.grad, expected.grad, rtol=0, atol=0)
    torch.testing.assert_close(loss, loss_expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
def test_bitwise_deterministic(backend, device, generator):
    student, teacher, center = (x.to(device) for x in make_logits(generator, 5, 3, 2049, torch.float32))
    first = dino_loss(student, teacher, center, backend=backend)
    second = dino_loss(student, teacher, center, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
def test_second_backward_through_the_same_graph_is_refused(backend, device, generator):
    student, teacher, center = (x.to(device) for x in make_logits(generator, 1, 0, 10, torch.float32))
    student.requires_grad_()
    loss, _ = dino_loss(student, teacher, center, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
class TestBadInput:
    def test_mismatched_classes(self, backend):
        with pytest.raises(ValueError, match="K=10 columns but teacher_logits has K=11"):
            dino_loss(torch.randn(8, 10), torch.randn(4, 11), torch.zeros(1, 10), backend=backend)

    def test_center_shape(self, backend):
        with pytest.raises(ValueError, match=r"center must have shape \(1, K\)"):
            dino_loss(torch.randn(8, 10), torch.randn(4, 10), torch.zeros(2, 10), backend=backend)

    def test_rows_not_a_multiple_of_the_batch(self, backend):
        with pytest.raises(ValueError, match="student_logits has 9 rows"):
            dino_loss(torch.randn(9, 10), torch.randn(4, 10), torch.zeros(10), backend=backend)

    def test_teacher_rows_not_a_multiple_of_global_crops(self, backend):
        with pytest.raises(ValueError, match="teacher_logits has 5 rows"):
            dino_loss(torch.randn(10, 10), torch.randn(5, 10), torch.zeros(10), backend=backend)

    def test_fewer_crops_than_global_crops(self, backend):
        with pytest.raises(ValueError, match="ncrops >= n_global_crops=2"):
            dino_loss(torch.randn(2, 10), torch.randn(4, 10), torch.zeros(10), backend=backend)

    def test_non_positive_temperature(self, backend):
        with pytest.raises(ValueError, match="teacher_temp must be > 0"):
            dino_loss(torch.randn(8, 10), torch.randn(4, 10), torch.zeros(10), teacher_temp=0.0,
                      backend=backend)

    @pytest.mark.parametrize("where, bad", [("student", float("nan")), ("student", float("-inf")),
                                            ("teacher", float("inf")), ("teacher", float("-inf")),
                                            ("center", float("nan"))])
    def test_non_finite_values_are_reported_with_their_row(self, backend, device, where, bad):
        student, teacher, center = (torch.randn(8, 10, device=device), torch.randn(4, 10, device=device),
                                    torch.zeros(1, 10, device=device))
        {"student": student, "teacher": teacher, "center": center}[where][-1, 3] = bad
        expected = {"student": "student_logits has NaN/inf in rows 7 \\(crop 3, sample 1\\)",
                    "teacher": "teacher_logits has NaN/inf in rows 3 \\(crop 1, sample 1\\)",
                    "center": "center has 1 NaN/inf entries"}[where]
        with pytest.raises(FloatingPointError, match=expected):
            dino_loss(student, teacher, center, backend=backend, check_finite=True)

    def test_tensors_on_different_devices(self, backend):
        with pytest.raises(ValueError, match="must be on one device"):
            dino_loss(torch.randn(8, 10), torch.randn(4, 10, device="meta"), torch.zeros(10),
                      backend=backend)


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
def test_fused_backends_refuse_float64_with_a_clear_error(backend):
    with pytest.raises(BackendUnavailableError, match=f"backend '{backend}'.*float64"):
        dino_loss(torch.randn(8, 10).double(), torch.randn(4, 10).double(), torch.zeros(10),
                  backend=backend)


def test_auto_uses_the_reference_for_float64():
    loss, _ = dino_loss(torch.randn(8, 10).double(), torch.randn(4, 10).double(), torch.zeros(10))
    assert loss.dtype == torch.float64


def test_triton_without_cuda_or_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes the triton backend runnable")
    with pytest.raises(BackendUnavailableError, match="'triton' backend needs CUDA tensors"):
        dino_loss(torch.randn(8, 10), torch.randn(4, 10), torch.zeros(10), backend="triton")


def test_environment_variable_forces_the_backend(monkeypatch):
    monkeypatch.setenv("FASTDINO_BACKEND", "torch")
    student = torch.randn(8, 10, requires_grad=True)
    loss, _ = dino_loss(student, torch.randn(4, 10), torch.zeros(10), backend="cpp")
    assert "DivBackward" in type(loss.grad_fn).__name__, "the torch reference should have run"
    monkeypatch.setenv("FASTDINO_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTDINO_BACKEND='fastest' is not a backend"):
        dino_loss(student, torch.randn(4, 10), torch.zeros(10))


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match="backend='cuda' is not a backend"):
        dino_loss(torch.randn(8, 10), torch.randn(4, 10), torch.zeros(10), backend="cuda")
