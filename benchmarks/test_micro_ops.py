"""pytest-benchmark micro benchmarks of the ops, beside their baselines (not in the default run:
`python -m pytest benchmarks/test_micro_ops.py`; compare groups with --benchmark-group-by=group)."""

import pytest
import torch

from baselines import foreach_lerp_ema, release_dino_loss, release_ema, vit_dino_parameter_shapes
from fastdino.ops import backend_status, clip_grad_per_param_, dino_loss, ema_update_

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = "triton" if DEVICE.type == "cuda" else "cpp"
# Fixed inputs: every run times the same values, so runs compare and a surprise can be re-run.
SEED = 0
if backend_status()[FUSED] != "available":
    pytest.skip(f"the {FUSED} backend is unavailable: {backend_status()[FUSED]}", allow_module_level=True)


def synchronized(fn):
    def run():
        result = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result
    return run


@pytest.fixture(scope="module")
def logits():
    batch, n_classes, ncrops = 8, 65536, 12
    generator = torch.Generator(DEVICE).manual_seed(SEED)
    student = torch.randn(ncrops * batch, n_classes, device=DEVICE, generator=generator).mul_(3).requires_grad_()
    teacher = torch.randn(2 * batch, n_classes, device=DEVICE, generator=generator).mul_(3)
    return student, teacher, torch.zeros(1, n_classes, device=DEVICE), ncrops


@pytest.mark.parametrize("provider", ["release", FUSED])
def test_dino_loss_forward_backward(benchmark, logits, provider):
    student, teacher, center, ncrops = logits
    benchmark.group = "dino_loss fwd+bwd B=8 K=65536 2+10 crops"
    if provider == "release":
        def step():
            return torch.autograd.grad(release_dino_loss(student, teacher, center, ncrops), student)
    else:
        def step():
            return torch.autograd.grad(dino_loss(student, teacher, center, backend=provider)[0], student)
    (grad,) = benchmark(synchronized(step))
    assert grad.shape == student.shape


@pytest.fixture(scope="module")
def parameter_lists():
    shapes = vit_dino_parameter_shapes(patch_size=16, out_dim=16384)
    generator = torch.Generator(DEVICE).manual_seed(SEED)
    return ([torch.randn(s, device=DEVICE, generator=generator) for s in shapes],
            [torch.randn(s, device=DEVICE, generator=generator) for s in shapes])


@pytest.mark.parametrize("provider", ["per-parameter loop", "foreach_lerp", FUSED])
def test_teacher_ema(benchmark, parameter_lists, provider):
    teacher, student = parameter_lists
    benchmark.group = "teacher EMA, ViT-S/16 + head (K=16384)"
    update = {"per-parameter loop": lambda: release_ema(teacher, student, 0.996),
              "foreach_lerp": lambda: foreach_lerp_ema(teacher, student, 0.996)}.get(
        provider, lambda: ema_update_(teacher, student, 0.996, backend=provider))
    benchmark(synchronized(update))


@pytest.mark.parametrize("provider", ["torch", FUSED])
def test_clip_grad_per_param(benchmark, parameter_lists, provider):
    teacher, _ = parameter_lists
    parameters = [torch.nn.Parameter(t) for t in teacher]
    generator = torch.Generator(DEVICE).manual_seed(SEED + 1)
    for parameter in parameters:
        parameter.grad = torch.randn(parameter.shape, device=DEVICE, generator=generator)
    benchmark.group = "per-parameter clipping, ViT-S/16 + head (K=16384)"
    norms = benchmark(synchronized(lambda: clip_grad_per_param_(parameters, 3.0, backend=provider)))
    assert norms.shape == (len(parameters),)
