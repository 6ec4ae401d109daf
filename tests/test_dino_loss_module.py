"""DINOLoss / LightlyDINOLoss against independent re-implementations of the originals.

The release's loss is re-written here from ../shared/DINO.md (its double loop over teacher and
student views, the numpy teacher-temperature schedule and the center update), so that a mistake
shared by fastdino's reference and its kernels cannot hide.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params
from fastdino.ops import DINOLoss, LightlyDINOLoss
from fastdino.ops.dino_loss import count_loss_pairs
from tolerances import assert_close

BACKENDS = backend_params("torch", "cpp", "triton")


class ReleaseDINOLoss(torch.nn.Module):
    """The public release's DINOLoss, re-written from the method description."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch):
        student_views = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_probs = F.softmax((teacher_output - self.center) / self.schedule[epoch], dim=-1)
        teacher_views = teacher_probs.detach().chunk(2)
        total, terms = 0, 0
        for i, q in enumerate(teacher_views):
            for v, s in enumerate(student_views):
                if v == i:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        with torch.no_grad():
            batch_center = teacher_output.sum(0, keepdim=True) / len(teacher_output)
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total / terms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_module_matches_the_release_over_epochs(backend, device, n_local, generator):
    out_dim, batch, ncrops, nepochs = 300 if backend == "triton" else 2000, 3, 2 + n_local, 6
    args = dict(out_dim=out_dim, ncrops=ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp_epochs=4, nepochs=nepochs)
    ours, release = DINOLoss(**args, backend=backend).to(device), ReleaseDINOLoss(**args).double()
    assert ours.center.shape == (1, out_dim)
    np.testing.assert_allclose(ours.teacher_temp_schedule, release.schedule, rtol=0, atol=1e-17)

    # Float32 against the float64 release, with the error model of tests/tolerances.py: these
    # logits are test_dino_loss.py's (scale 3, tau_s = 0.1, tau_t = 0.04..0.07), so each
    # probability is exp of a float32 difference of scaled logits of up to ~300, good to ~1e-5
    # of itself. The gradient row n_t * softmax - Q is off by ~1e-5 of its terms, not of its
    # value: where student and teacher pick the same class both are ~1 and the entry cancels to
    # ~1e-8, which float32 cannot resolve (a per-element rtol fails there by luck). So errors
    # are norms against the size of the terms: sqrt(rows) / (tau_s B n_pairs) for the gradient,
    # mean |s| / tau_s for the loss, and for the center (a float32 momentum average of teacher
    # column sums) the same average of |t|. A wrong pair count, temperature or momentum moves
    # these by 1e-3 or more.
    gradient_scale = (ncrops * batch) ** 0.5 / (ours.student_temp * batch * count_loss_pairs(2, ncrops))
    center_terms = torch.zeros(1, out_dim, dtype=torch.float64)
    for epoch in range(nepochs):  # one step per epoch: every warm-up temperature is used
        student = torch.randn(ncrops * batch, out_dim, generator=generator) * 3
        teacher = torch.randn(2 * batch, out_dim, generator=generator) * 3 + 1
        student_ours = student.to(device, copy=True).requires_grad_()
        student_release = student.double().requires_grad_()
        loss = ours(student_ours, teacher.to(device), epoch)
        loss_release = release(student_release, teacher.double(), epoch)
        loss.backward()
        loss_release.backward()
        context = f"(backend={backend}, epoch={epoch})"
        loss_scale = float(student.double().abs().mean()) / ours.student_temp
        assert_close(loss.cpu(), loss_release, torch.float32, "loss", context, scale=loss_scale)
        assert_close(student_ours.grad.cpu(), student_release.grad, torch.float32, "grad", context,
                     scale=gradient_scale)
        center_terms = center_terms * 0.9 + teacher.double().abs().mean(0, keepdim=True) * 0.1
        assert_close(ours.center.cpu(), release.center, torch.float32, "center", context,
                     scale=float(center_terms.norm()))


def test_epoch_outside_the_schedule_is_rejected():
    loss = DINOLoss(10, 4, 0.04, 0.04, 0, 3)
    with pytest.raises(ValueError, match="epoch=3 is outside the teacher temperature schedule"):
        loss(torch.randn(8, 10), torch.randn(4, 10), 3)


def test_wrong_number_of_student_rows_names_ncrops():
    loss = DINOLoss(10, 4, 0.04, 0.04, 0, 3)
    with pytest.raises(ValueError, match="ncrops=4 crops of the batch of 2"):
        loss(torch.randn(10, 10), torch.randn(4, 10), 0)


def test_warmup_longer_than_training_is_rejected():
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs=5 must be between 0 and nepochs=3"):
        DINOLoss(10, 4, 0.04, 0.07, 5, 3)


def lightly_reference_loss(teacher_out, student_out, center, teacher_temp, student_temp=0.1):
    """lightly's computation: stacked views, an einsum over view pairs, the diagonal dropped."""
    t = F.softmax((torch.stack(teacher_out) - center) / teacher_temp, dim=-1)
    s = F.log_softmax(torch.stack(student_out) / student_temp, dim=-1)
    pair_losses = -torch.einsum("tbd,sbd->ts", t, s)
    pair_losses.fill_diagonal_(0)
    n_terms = pair_losses.numel() - pair_losses.diagonal().numel()
    return pair_losses.sum() / (n_terms * t.shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_adapter_matches_lightly(backend, device, generator):
    ours = LightlyDINOLoss(output_dim=257, warmup_teacher_temp_epochs=3, teacher_temp=0.07,
                           backend=backend).to(device)
    center = torch.zeros(1, 1, 257, dtype=torch.float64)
    assert ours.center.shape == center.shape
    schedule = torch.linspace(0.04, 0.07, 3)
    # Errors in norm against the size of the terms, as in the test above (tests/tolerances.py).
    center_terms = torch.zeros_like(center)
    for epoch in range(5):
        teacher = [torch.randn(4, 257, generator=generator) for _ in range(2)]
        student = [torch.randn(4, 257, generator=generator) for _ in range(6)]
        temperature = float(schedule[epoch]) if epoch < 3 else 0.07
        expected = lightly_reference_loss([t.double() for t in teacher], [s.double() for s in student],
                                          center, temperature)
        loss = ours([t.to(device) for t in teacher], [s.to(device) for s in student], epoch=epoch)
        context = f"(backend={backend}, epoch={epoch})"
        loss_scale = float(torch.stack(student).double().abs().mean()) / ours.student_temp
        assert_close(loss.cpu(), expected, torch.float32, "loss", context, scale=loss_scale)
        teacher_rows = torch.stack(teacher).double()
        center = center * 0.9 + teacher_rows.mean(dim=(0, 1), keepdim=True) * 0.1
        center_terms = center_terms * 0.9 + teacher_rows.abs().mean(dim=(0, 1), keepdim=True) * 0.1
        assert_close(ours.center.cpu(), center, torch.float32, "center", context,
                     scale=float(center_terms.norm()))
    # lightly's other calling forms: an explicit temperature, one teacher view.
    loss = ours([teacher[0].to(device)], [s.to(device) for s in student[:3]], teacher_temp=0.05).cpu()
    expected = lightly_reference_loss([teacher[0].double()], [s.double() for s in student[:3]], center, 0.05)
    loss_scale = float(torch.stack(student[:3]).double().abs().mean()) / ours.student_temp
    assert_close(loss, expected, torch.float32, "loss", "(one teacher view)", scale=loss_scale)
