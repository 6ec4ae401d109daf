"""koleo_loss against DINOv2's and lightly's formulas, finite where they are not."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from fastdino.ops import LightlyKoLeoLoss, koleo_loss, koleo_loss_with_counts
from fastdino.ops.dinov2 import KoLeoLoss


def dinov2_koleo(student_output, eps=1e-8):
    """DINOv2's KoLeoLoss.forward, from its source (nn.PairwiseDistance adds eps to x - y)."""
    x = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    nearest = torch.max(dots, dim=1).indices
    distances = torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[nearest])
    return -torch.log(distances + eps).mean()


def lightly_koleo(x, topk, group_size, eps=1e-8):
    """lightly's KoLeoLoss.forward (p = 2), from its source."""
    x = F.normalize(x, p=2, dim=-1, eps=eps)
    grouped = x.view(-1, group_size, x.shape[1])
    similarity = torch.bmm(grouped, grouped.transpose(1, 2))
    similarity.diagonal(dim1=-2, dim2=-1).fill_(-2)
    nearest = similarity.topk(k=topk, dim=-1).indices
    nearest = (nearest + (torch.arange(grouped.shape[0]) * group_size).view(-1, 1, 1)).flatten()
    distances = torch.nn.PairwiseDistance(p=2, eps=eps)(x.repeat_interleave(topk, dim=0), x[nearest])
    return -(distances + eps).log().mean()


@pytest.mark.parametrize("batch, dim", [(2, 3), (7, 384), (64, 384)])
def test_matches_dinov2_value_and_gradient(batch, dim, generator):
    """DINOv2 adds eps = 1e-8 inside the distance, which moves a distance of size ~1 by ~1e-8:
    far below float32's u of the float64 comparison."""
    features = torch.randn(batch, dim, generator=generator, dtype=torch.float64).requires_grad_()
    expected = dinov2_koleo(features)
    expected_grad, = torch.autograd.grad(expected, features)
    run = features.detach().float().requires_grad_()
    loss = koleo_loss(run)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.grad.double(), expected_grad, rtol=1e-4, atol=1e-5 * float(expected_grad.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_features_are_computed_in_float32(dtype, generator):
    features = torch.randn(16, 64, generator=generator).to(dtype)
    torch.testing.assert_close(koleo_loss(features), koleo_loss(features.float()), rtol=0, atol=0)


def test_coincident_features_are_finite_and_said():
    features = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    features[4] = features[1] * 2.0  # the same direction: identical once normalized
    features.requires_grad_()
    with pytest.warns(RuntimeWarning, match="2 feature pairs coincide"):
        loss = koleo_loss(features)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
    _, coincident, without = koleo_loss_with_counts(features.detach())
    assert int(coincident) == 2 and int(without) == 0
    # The coincident pair pulls on nobody: rows 1 and 4 get no gradient from their own terms.
    assert float(features.grad[[1, 4]].abs().max()) < float(features.grad.abs().max())


def test_a_batch_of_one_gives_zero_and_says_so():
    features = torch.randn(1, 8, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="no other feature"):
        loss = koleo_loss(features)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(features.grad, torch.zeros(1, 8))


@pytest.mark.parametrize("topk, group_size", [(1, None), (2, None), (1, 4), (3, 8)])
def test_lightly_drop_in_matches_lightlys_formula(topk, group_size, generator):
    features = torch.randn(16, 24, generator=generator, dtype=torch.float64)
    expected = lightly_koleo(features, topk, group_size or 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = LightlyKoLeoLoss(topk=topk, group_size=group_size)(features.float())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_dinov2_drop_in_is_the_op(generator):
    features = torch.randn(9, 40, generator=generator)
    assert torch.equal(KoLeoLoss()(features), koleo_loss(features))


@pytest.mark.parametrize("arguments, message", [
    (dict(features=torch.zeros(0, 4)), "empty"),
    (dict(features=torch.zeros(4)), "2-D"),
    (dict(group_size=3), "dividing the batch of 8"),
    (dict(topk=4, group_size=4), "topk=4 needs groups"),
])
def test_bad_input_is_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        koleo_loss(arguments.get("features", torch.randn(8, 4)), topk=arguments.get("topk", 1),
                   group_size=arguments.get("group_size"))
