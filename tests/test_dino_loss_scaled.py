"""dino_loss under a loss scale, as fp16 training with a GradScaler runs it.

The release computes the loss under fp16 autocast, where log_softmax and softmax run in float32:
the gradient of ``loss * S`` w.r.t. the float16 logits is formed in float32, the scale S applied
in float32, and rounded to float16 once. The fused backends must give that gradient: S times the
float64 reference's gradient, rounded to the logits' dtype, within one rounding of the dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params
from fastdino.ops import dino_loss, dino_loss_reference
from fastdino.ops.backends import cpp_extension, triton_kernels
from fastdino.ops.dino_loss import count_loss_pairs
from tolerances import assert_close

SCALE = 2.0**16  # torch.amp.GradScaler's initial scale
STUDENT_TEMP = 0.1
N_GLOBAL = 2
FUSED_AND_TORCH = backend_params("torch", "cpp", "triton")


def head_logits(generator, batch, n_local, n_classes, dtype):
    """Logits of a DINO head's size: its last layer multiplies L2-normalized features by unit-norm
    weight rows, so the logits are cosines, |s| < 1. At K = 65536, tau_s = 0.1 and B = 64, 5% of
    the gradient entries then lie below float16's subnormal range (median |g|: 4e-7)."""
    ncrops = N_GLOBAL + n_local
    student = torch.randn(ncrops * batch, n_classes, generator=generator) * 0.15
    teacher = torch.randn(N_GLOBAL * batch, n_classes, generator=generator) * 0.15
    center = torch.randn(1, n_classes, generator=generator) * 0.05
    return student.to(dtype), teacher.to(dtype), center


def reference_gradient(student, teacher, center):
    """d loss / d student of the float64 reference on the same (upcast) values."""
    student_ref = student.double().requires_grad_()
    loss_ref, _ = dino_loss_reference(student_ref, teacher.double(), center.double(),
                                      n_global_crops=N_GLOBAL, student_temp=STUDENT_TEMP)
    loss_ref.backward()
    return student_ref.grad


def check_scaled_backward(backend, device, student, teacher, center, loss_scale=SCALE, grad_ref=None):
    """The gradient of ``loss * loss_scale`` against the float64 reference's, and the same
    gradient unscaled in float32, as GradScaler.unscale_ treats the float32 parameters' grads.
    Returns the scaled gradient and the reference's (unscaled)."""
    dtype = student.dtype
    if grad_ref is None:
        grad_ref = reference_gradient(student, teacher, center)
    # |g| <= n_t / (tau_s B n_pairs) with n_t <= 2: B n_pairs >= 21 keeps 2^16 g in float16.
    assert float((grad_ref * loss_scale).abs().max()) < torch.finfo(dtype).max, \
        "the test's inputs: the exact scaled gradient overflows float16"
    student_run = student.to(device, copy=True).requires_grad_()
    loss, _ = dino_loss(student_run, teacher.to(device), center.to(device), n_global_crops=N_GLOBAL,
                        student_temp=STUDENT_TEMP, backend=backend)
    (loss * loss_scale).backward()
    grad = student_run.grad.cpu()
    context = f"(backend={backend}, dtype={dtype}, shape={tuple(student.shape)}, scale={loss_scale:g})"
    assert grad.dtype == dtype
    n_bad = int((~torch.isfinite(grad)).sum())
    assert n_bad == 0, f"{n_bad} of {grad.numel()} gradient entries are inf/NaN {context}"
    batch = teacher.shape[0] // N_GLOBAL
    n_pairs = count_loss_pairs(N_GLOBAL, student.shape[0] // batch)
    term_size = student.shape[0] ** 0.5 / (STUDENT_TEMP * batch * n_pairs)  # see tests/tolerances.py
    assert_close(grad, (grad_ref * loss_scale).to(dtype), dtype, "grad", context,
                 scale=loss_scale * term_size)
    unscaled = grad.float() * (1.0 / loss_scale)
    assert_close(unscaled, grad_ref, dtype, "grad", context + " unscaled", scale=term_size)
    return grad, grad_ref


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, n_local, n_classes", [(4, 2, 1000), (5, 3, 4097), (3, 3, 65536)])
def test_scaled_backward_matches_the_scaled_reference(backend, dtype, batch, n_local, n_classes,
                                                      device, generator):
    check_scaled_backward(backend, device, *head_logits(generator, batch, n_local, n_classes, dtype))


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, n_local, n_classes", [(7, 1, 777), (3, 3, 4097)])
def test_triton_scaled_backward_matches_the_scaled_reference(backend, dtype, batch, n_local,
                                                             n_classes, device, generator):
    check_scaled_backward(backend, device, *head_logits(generator, batch, n_local, n_classes, dtype))


@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_float16_gradient_below_float16_range_survives_the_scale(backend, device, generator):
    """The size of the filed defect (K = 65536, B = 64). At 2^15 (the GradScaler's scale after
    one backoff) the entries float16 cannot hold unscaled came back 0; 2^16 overflowed float16
    outright. Those entries, |g| in [2^-30, 2^-25), are normal float16 numbers once scaled and
    must keep float16's precision (against their own norm: they are small because the student's
    and the teacher's probabilities are both small, not by cancellation)."""
    logits = head_logits(generator, 64, 0, 65536, torch.float16)
    grad_ref = reference_gradient(*logits)
    lost_unscaled = (grad_ref.abs() < 2.0**-25) & (grad_ref.abs() >= 2.0**-30)
    assert lost_unscaled.double().mean() > 0.01, "the inputs should reproduce the underflow"
    for loss_scale in (SCALE / 2, SCALE):
        grad, _ = check_scaled_backward(backend, device, *logits, loss_scale, grad_ref)
        assert_close(grad[lost_unscaled], (grad_ref[lost_unscaled] * loss_scale).half(), torch.float16,
                     "grad", f"(scale {loss_scale:g}: the entries float16 cannot hold unscaled)")


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
def test_float16_overwrite_writes_the_scaled_gradient_into_the_logits(backend, device, generator):
    """float16 logits keep a float32 gradient until the backward, which writes the float16
    result into the logits' storage: the same values as without overwriting."""
    student, teacher, center = (x.to(device) for x in head_logits(generator, 4, 2, 1000, torch.float16))
    expected = student.clone().requires_grad_()
    loss_expected, _ = dino_loss(expected, teacher, center, backend=backend)
    (loss_expected * SCALE).backward()

    leaf = student.clone().requires_grad_()
    logits = leaf * 1.0  # like the head's output: not a leaf
    storage = logits.data_ptr()
    seen_grads = []
    logits.register_hook(seen_grads.append)
    loss, _ = dino_loss(logits, teacher, center, backend=backend, overwrite_student_logits=True)
    intact = torch.equal(logits.detach(), student)
    assert intact, "float16 logits must be intact until the backward"
    (loss * SCALE).backward()
    assert seen_grads[0].data_ptr() == storage, "the gradient must reuse the logits' storage"
    assert seen_grads[0].dtype == torch.float16
    torch.testing.assert_close(leaf.grad, expected.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED_AND_TORCH)
def test_grad_scaler_steps_at_its_initial_scale_with_float16_logits(backend, device, generator):
    """A float32 last layer whose logits are cast to float16, as under fp16 autocast: GradScaler
    must find the unscaled gradients finite, take the step and keep its scale (an inf or NaN
    gradient makes it skip the step and halve the scale)."""
    batch, ncrops, dim, n_classes = 4, N_GLOBAL + 2, 16, 1000
    features = F.normalize(torch.randn(ncrops * batch, dim, generator=generator), dim=1).to(device)
    weight = F.normalize(torch.randn(n_classes, dim, generator=generator), dim=1)
    weight = torch.nn.Parameter(weight.to(device))
    teacher = (torch.randn(N_GLOBAL * batch, n_classes, generator=generator) * 0.15).half().to(device)
    center = torch.zeros(n_classes, device=device)
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scaler = torch.amp.GradScaler(device.type, init_scale=SCALE)
    before = weight.detach().clone()

    logits = (features @ weight.t()).half()
    loss, _ = dino_loss(logits, teacher, center, backend=backend)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    n_bad = int((~torch.isfinite(weight.grad)).sum())
    assert n_bad == 0, f"{n_bad} of {weight.numel()} unscaled weight gradients are inf/NaN"
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == SCALE, "GradScaler saw inf/NaN gradients and backed off"
    assert not torch.equal(weight.detach(), before), "GradScaler skipped the optimizer step"


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
def test_kernels_take_a_float32_grad_and_refuse_other_grad_dtypes(backend):
    kernels = cpp_extension() if backend == "cpp" else triton_kernels()
    student, teacher, center = torch.randn(8, 10).half(), torch.randn(4, 10).half(), torch.zeros(10)
    grad = torch.empty(8, 10, dtype=torch.float32)
    kernels.dino_loss_forward(student, teacher, center, grad, N_GLOBAL, STUDENT_TEMP, 0.04)
    assert torch.isfinite(grad).all()
    with pytest.raises((ValueError, RuntimeError), match="grad must have the .* or float32, got"):
        kernels.dino_loss_forward(student, teacher, center, grad.bfloat16(), N_GLOBAL, STUDENT_TEMP, 0.04)
