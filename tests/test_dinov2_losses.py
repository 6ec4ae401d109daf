"""The drop-ins of fastdino.ops.dinov2 and lightly's IBOTPatchLoss against their sources'
formulas (written here from the public code), value, gradient and center, step after step."""

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params
from fastdino.ops import LightlyIBOTPatchLoss
from fastdino.ops.dinov2 import DINOLoss, iBOTPatchLoss

BACKENDS = backend_params("torch", "cpp")
K, B, TEACHER_TEMP, MOMENTUM = 1003, 5, 0.07, 0.9


def dinov2_dino_forward(students, teachers, student_temp=0.1):
    total = 0
    for s in students:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teachers:
            total -= torch.sum(t * lsm, dim=-1).mean()
    return total


def check_loss_and_gradient(fused, expected, leaves, rtol=1e-5):
    """Value to float32's accuracy; each gradient relative in norm (it cancels per entry)."""
    torch.testing.assert_close(fused.double(), expected.double(), rtol=rtol, atol=0)
    expected_grads = torch.autograd.grad(expected, [leaf["reference"] for leaf in leaves])
    fused.backward()
    for leaf, expected_grad in zip(leaves, expected_grads):
        error = (leaf["run"].grad.double() - expected_grad).norm() / expected_grad.norm()
        assert error < 2e-5, f"gradient relative error {error:.3g}"


def leaf_pair(tensor):
    return {"reference": tensor.double().requires_grad_(), "run": tensor.float().requires_grad_()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_loss_drop_in(backend, generator):
    loss_fn = DINOLoss(K, backend=backend)
    center = torch.zeros(1, K, dtype=torch.float64)
    for step in range(3):
        teacher_out = torch.randn(2 * B, K, generator=generator, dtype=torch.float64)
        # softmax_center_teacher applies the update started at the previous step
        targets = loss_fn.softmax_center_teacher(teacher_out.float(), TEACHER_TEMP)
        expected_targets = F.softmax((teacher_out - center) / TEACHER_TEMP, dim=-1)
        torch.testing.assert_close(targets.double(), expected_targets, rtol=1e-4, atol=1e-9)
        loss_fn.update_center(teacher_out.float())
        center = center * MOMENTUM + teacher_out.sum(0, keepdim=True) / len(teacher_out) * (1 - MOMENTUM)
        local = [leaf_pair(torch.randn(B, K, generator=generator)) for _ in range(3)]
        teacher_list = list(expected_targets.chunk(2))
        fused = loss_fn([leaf["run"] for leaf in local], [t.float() for t in teacher_list])
        expected = dinov2_dino_forward([leaf["reference"] for leaf in local], teacher_list)
        check_loss_and_gradient(fused, expected, local)
        # the global term: one tensor of 2B rows against the swapped teacher crops
        glob = leaf_pair(torch.randn(2 * B, K, generator=generator))
        swapped = torch.cat(teacher_list[::-1])
        check_loss_and_gradient(loss_fn([glob["run"]], [swapped.float()]),
                                dinov2_dino_forward([glob["reference"]], [swapped]), [glob])
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center.double(), center, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_knopp_teacher_keeps_its_input(backend, generator):
    teacher_out = torch.rand(2 * B, K, generator=generator) * 2 - 1
    kept = teacher_out.clone()
    targets = DINOLoss(K, backend=backend).sinkhorn_knopp_teacher(teacher_out, TEACHER_TEMP)
    assert torch.equal(teacher_out, kept)
    torch.testing.assert_close(targets.sum(1), torch.ones(2 * B), rtol=0, atol=1e-5)
    patch_targets = iBOTPatchLoss(K, backend=backend).sinkhorn_knopp_teacher(
        teacher_out, TEACHER_TEMP, n_masked_patches_tensor=torch.tensor([2 * B]))
    torch.testing.assert_close(patch_targets, targets, rtol=0, atol=0)


def draw_masks(generator, crops=4, patches=16):
    masks = torch.rand(crops, patches, generator=generator) < 0.4
    masks[1] = False  # a crop without masked patches
    masks[0, 3] = True
    return masks


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_patch_loss_drop_in(backend, generator):
    loss_fn = iBOTPatchLoss(K, backend=backend)
    center = torch.zeros(1, 1, K, dtype=torch.float64)
    for _ in range(2):
        masks = draw_masks(generator)
        n_masked = int(masks.sum())
        teacher_patches = torch.randn(1, n_masked, K, generator=generator, dtype=torch.float64)
        targets = loss_fn.softmax_center_teacher(teacher_patches.float(), TEACHER_TEMP).squeeze(0)
        expected_targets = F.softmax((teacher_patches - center) / TEACHER_TEMP, dim=-1).squeeze(0)
        torch.testing.assert_close(targets.double(), expected_targets, rtol=1e-4, atol=1e-9)
        loss_fn.update_center(teacher_patches.float())
        center = center * MOMENTUM + teacher_patches.mean(1).sum(0, keepdim=True) * (1 - MOMENTUM)

        student = leaf_pair(torch.randn(n_masked, K, generator=generator))
        weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
        expected = -(torch.sum(expected_targets * F.log_softmax(student["reference"] / 0.1, -1), -1)
                     * weights).sum() / masks.shape[0]
        fused = loss_fn.forward_masked(student["run"], targets, masks, n_masked_patches=n_masked,
                                       masks_weight=weights)
        check_loss_and_gradient(fused, expected, [student])
        without_weights = loss_fn.forward_masked(student["run"].detach(), targets, masks)
        torch.testing.assert_close(without_weights, fused.detach(), rtol=1e-6, atol=0)
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center.double(), center, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_forward_on_all_patches(backend, generator):
    masks = draw_masks(generator)
    student = leaf_pair(torch.randn(*masks.shape, K, generator=generator))
    teacher = F.softmax(torch.randn(*masks.shape, K, generator=generator, dtype=torch.float64) * 3, -1)
    loss = torch.sum(teacher * F.log_softmax(student["reference"] / 0.1, dim=-1), dim=-1)
    expected = -(torch.sum(loss * masks.double(), dim=-1) / masks.sum(dim=-1).clamp(min=1.0)).mean()
    check_loss_and_gradient(iBOTPatchLoss(K, backend=backend)(student["run"], teacher.float(), masks),
                            expected, [student])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_ibot_patch_loss_drop_in(backend, generator):
    loss_fn = LightlyIBOTPatchLoss(K, teacher_temp=TEACHER_TEMP, backend=backend)
    center = torch.zeros(1, K, dtype=torch.float64)
    for _ in range(2):
        mask = draw_masks(generator).view(4, 4, 4)
        n_masked = int(mask.sum())
        teacher_out = torch.randn(n_masked, K, generator=generator, dtype=torch.float64)
        student = leaf_pair(torch.randn(n_masked, K, generator=generator))
        teacher_softmax = F.softmax((teacher_out - center) / TEACHER_TEMP, dim=-1)
        loss = -torch.sum(teacher_softmax * F.log_softmax(student["reference"] / 0.1, dim=-1), dim=-1)
        weight = (1.0 / mask.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)).expand_as(mask)[mask]
        expected = (loss * weight).sum() / mask.shape[0]
        check_loss_and_gradient(loss_fn(teacher_out.float(), student["run"], mask), expected, [student])
        center = center * MOMENTUM + teacher_out.mean(0, keepdim=True) * (1 - MOMENTUM)
    assert "center.center" in loss_fn.state_dict()
    torch.testing.assert_close(loss_fn.center.value.double(), center, rtol=1e-5, atol=1e-7)


def test_dino_loss_drop_in_names_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        DINOLoss(K)([torch.zeros(4, K)], [torch.zeros(3, K)])
