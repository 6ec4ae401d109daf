"""clip_grad_per_param_: every backend against the release's per-parameter clipping in float64."""

import warnings

import pytest
import torch

from conftest import backend_params
from fastdino.ops import BackendUnavailableError, backend_status, clip_grad_per_param_
from fastdino.runtime import warn_once
from tolerances import assert_close

BACKENDS = backend_params("torch", "cpp", "triton")


def release_clip(grads, clip):
    """The release's clip_gradients, on float64 copies: norm, then scale where the factor < 1."""
    norms = []
    for grad in grads:
        norm = grad.norm(2)
        norms.append(norm)
        clip_coef = clip / (norm + 1e-6)
        if clip_coef < 1:
            grad.mul_(clip_coef)
    return torch.stack(norms)


def make_parameters(generator, dtype, device):
    # Gradient norms straddle max_norm=3: scales 0.01 .. 10 over odd shapes.
    shapes = [(384,), (7,), (3, 5, 8, 8), (1000, 13), (65537,), (1,)]
    scales = [0.01, 10.0, 0.05, 1.0, 0.3, 5.0]
    parameters = []
    for shape, scale in zip(shapes, scales):
        parameter = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        parameter.grad = (torch.randn(shape, generator=generator) * scale).to(device, dtype)
        parameters.append(parameter)
    parameters.append(torch.nn.Parameter(torch.zeros(4, device=device)))  # no gradient: skipped
    return parameters


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_the_release_in_float64(backend, device, dtype, generator):
    parameters = make_parameters(generator, dtype, device)
    expected_grads = [p.grad.cpu().double() for p in parameters if p.grad is not None]
    expected_norms = release_clip(expected_grads, 3.0)
    assert any(n > 3 for n in expected_norms) and any(n < 3 for n in expected_norms)

    norms = clip_grad_per_param_(parameters, 3.0, backend=backend)
    assert norms.dtype == torch.float32 and norms.shape == (len(expected_grads),)
    assert_close(norms.cpu(), expected_norms, dtype, "clip", f"(backend={backend})")
    grads = [p.grad for p in parameters if p.grad is not None]
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == dtype
        assert_close(grad.cpu(), expected, dtype, "clip", f"(backend={backend})")


def test_no_gradients_and_bad_max_norm():
    assert clip_grad_per_param_([torch.nn.Parameter(torch.zeros(3))], 3.0).numel() == 0
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.ones(3)
    with pytest.raises(ValueError, match="max_norm must be > 0, got 0"):
        clip_grad_per_param_([parameter], 0)


def parameters_with_a_transposed_gradient(generator, device):
    """Parameter 2 (parameter 0, without a gradient, still counts) has a non-contiguous grad."""
    parameters = [torch.nn.Parameter(torch.zeros(shape, device=device)) for shape in (3, 3, (3, 7))]
    parameters[1].grad = torch.randn(3, generator=generator).to(device) * 10
    parameters[2].grad = (torch.randn(7, 3, generator=generator) * 10).to(device).t()
    return parameters


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
@pytest.mark.parametrize("forced_by", ["argument", "environment"])
def test_fused_backends_refuse_a_non_contiguous_gradient(backend, forced_by, device, generator,
                                                         monkeypatch):
    parameters = parameters_with_a_transposed_gradient(generator, device)
    before = [p.grad.clone() for p in parameters[1:]]
    if forced_by == "environment":
        monkeypatch.setenv("FASTDINO_BACKEND", backend)
    requested = backend if forced_by == "argument" else "auto"
    with pytest.raises(BackendUnavailableError, match=rf"'{backend}'.*parameter 2 .*not contiguous"):
        clip_grad_per_param_(parameters, 3.0, backend=requested)
    for parameter, grad in zip(parameters[1:], before):
        assert torch.equal(parameter.grad, grad)


@pytest.mark.skipif(backend_status()["cpp"] != "available", reason="auto falls back for want of cpp")
def test_auto_clips_a_non_contiguous_gradient_on_the_reference_with_one_warning(generator):
    warn_once.cache_clear()
    parameters = parameters_with_a_transposed_gradient(generator, torch.device("cpu"))
    expected_grads = [p.grad.double() for p in parameters[1:]]
    expected_norms = release_clip(expected_grads, 3.0)
    fallback = r"falling back to the plain PyTorch reference.*parameter 2 .*not contiguous"
    with pytest.warns(RuntimeWarning, match=fallback):
        norms = clip_grad_per_param_(parameters, 3.0)
    assert_close(norms, expected_norms, torch.float32, "clip", "(auto, non-contiguous)")
    for parameter, expected in zip(parameters[1:], expected_grads):
        assert_close(parameter.grad, expected, torch.float32, "clip", "(auto, non-contiguous)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_grad_per_param_(parameters, 3.0)
