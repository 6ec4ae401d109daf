"""clip_grad_per_param_: every backend against the release's per-parameter clipping in float64."""

import pytest
import torch

from conftest import backend_params
from fastdino.ops import clip_grad_per_param_
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
