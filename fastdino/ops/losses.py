"""Drop-in nn.Module losses: the public DINO release's ``DINOLoss``, and lightly's ``DINOLoss``,
``IBOTPatchLoss`` and ``KoLeoLoss``, on the fused ops (DINOv2's modules: ``fastdino.ops.dinov2``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .center import update_center_
from .dino_loss import dino_loss
from .koleo import koleo_loss
from .soft_cross_entropy import ibot_masks_weight, ibot_patch_loss


def teacher_temperature_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int
) -> tuple[float, ...]:
    """Per-epoch teacher temperatures of the release: a linear warm-up, then constant.

    Same values as the release's ``np.concatenate((np.linspace(warmup, final, n_warmup),
    np.ones(nepochs - n_warmup) * final))``, computed the way np.linspace does.
    """
    if not 0 <= warmup_teacher_temp_epochs <= nepochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} must be between 0 and "
            f"nepochs={nepochs}"
        )
    n = warmup_teacher_temp_epochs
    step = (teacher_temp - warmup_teacher_temp) / (n - 1) if n > 1 else 0.0
    warmup = [i * step + warmup_teacher_temp for i in range(n)]
    if n > 1:
        warmup[-1] = teacher_temp
    return tuple(warmup) + (teacher_temp,) * (nepochs - n)


class DINOLoss(nn.Module):
    """Drop-in replacement for the public DINO release's ``DINOLoss`` (main_dino.py).

    Same constructor arguments, ``forward(student_output, teacher_output, epoch)``, returned
    loss and ``center`` buffer of shape (1, out_dim), updated after the loss with the teacher
    logits of all ranks (all-reduced when torch.distributed is initialized).

    Extra keyword arguments: ``backend`` (see fastdino.ops.backends) and
    ``overwrite_student_logits`` (see ``fastdino.ops.dino_loss``).
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9,
                 backend="auto", overwrite_student_logits=False):
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"ncrops={ncrops}: DINO needs the 2 global crops (ncrops >= 2)")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.backend = backend
        self.overwrite_student_logits = overwrite_student_logits
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )

    def forward(self, student_output, teacher_output, epoch):
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise ValueError(
                f"DINOLoss: epoch={epoch} is outside the teacher temperature schedule, which "
                f"covers epochs 0..{len(self.teacher_temp_schedule) - 1} (nepochs)"
            )
        batch = teacher_output.shape[0] // 2
        if student_output.dim() == 2 and student_output.shape[0] != self.ncrops * batch:
            raise ValueError(
                f"DINOLoss: student_output has {student_output.shape[0]} rows, but ncrops="
                f"{self.ncrops} crops of the batch of {batch} (teacher_output has "
                f"{teacher_output.shape[0]} rows = 2 global crops) need {self.ncrops * batch}"
            )
        loss, teacher_sum = dino_loss(
            student_output, teacher_output, self.center,
            n_global_crops=2, student_temp=self.student_temp,
            teacher_temp=self.teacher_temp_schedule[epoch], backend=self.backend,
            overwrite_student_logits=self.overwrite_student_logits,
        )
        update_center_(self.center, teacher_sum, teacher_output.shape[0], self.center_momentum)
        return loss


class LightlyDINOLoss(nn.Module):
    """Drop-in replacement for ``lightly.loss.DINOLoss``: lightly's constructor (argument names,
    order and defaults), ``forward(teacher_out, student_out, teacher_temp=None, epoch=None)``
    with lists of per-view tensors, and its (1, 1, output_dim) ``center`` buffer.
    """

    def __init__(self, output_dim=65536, warmup_teacher_temp=0.04, teacher_temp=0.04,
                 warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9,
                 center_mode="mean", backend="auto"):
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"center_mode={center_mode!r}: only 'mean' is supported (as in lightly)")
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.backend = backend
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        # lightly keeps this float32 schedule and indexes it during warm-up.
        self.teacher_temp_schedule = torch.linspace(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs
        )
        self.register_buffer("center", torch.zeros(1, 1, output_dim))

    def _temperature(self, teacher_temp, epoch):
        if teacher_temp is not None:
            return float(teacher_temp)
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return float(self.teacher_temp)

    def forward(self, teacher_out, student_out, teacher_temp=None, epoch=None):
        teacher = torch.cat(list(teacher_out))
        loss, teacher_sum = dino_loss(
            torch.cat(list(student_out)), teacher, self.center,
            n_global_crops=len(teacher_out), student_temp=self.student_temp,
            teacher_temp=self._temperature(teacher_temp, epoch), backend=self.backend,
        )
        update_center_(self.center, teacher_sum, teacher.shape[0], self.center_momentum)
        return loss


class LightlyCenter(nn.Module):
    """lightly's ``Center`` (``lightly.models.modules.center``, mode "mean"), so that the lightly
    drop-ins keep its ``center.center`` buffer: the batch center is each rank's mean over its
    rows, averaged over the ranks."""

    def __init__(self, size, momentum=0.9):
        super().__init__()
        self.register_buffer("center", torch.zeros(size))
        self.momentum = momentum

    @property
    def value(self):
        return self.center

    @torch.no_grad()
    def update_from_sum(self, column_sum, n_rows):
        batch_center = (column_sum / max(n_rows, 1)).reshape(self.center.shape)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            batch_center = batch_center / dist.get_world_size()
        self.center = self.center * self.momentum + batch_center * (1 - self.momentum)


class LightlyIBOTPatchLoss(nn.Module):
    """Drop-in replacement for ``lightly.loss.IBOTPatchLoss``: lightly's constructor
    ``(output_dim, teacher_temp=0.04, student_temp=0.1, center_mode="mean", center_momentum=0.9)``
    and ``forward(teacher_out, student_out, mask)``: (M, K) teacher and student logits of the
    masked patches, (B, H, W) bool mask with M entries set. The teacher softmax is never
    materialized (``fastdino.ops.ibot_patch_loss``).
    """

    def __init__(self, output_dim, teacher_temp=0.04, student_temp=0.1, center_mode="mean",
                 center_momentum=0.9, backend="auto"):
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"center_mode={center_mode!r}: only 'mean' is supported (as in lightly)")
        self.teacher_temp = teacher_temp
        self.student_temperature = student_temp
        self.backend = backend
        self.center = LightlyCenter((1, output_dim), center_momentum)

    def forward(self, teacher_out, student_out, mask):
        if mask.dtype != torch.bool or mask.dim() != 3:
            raise ValueError(f"LightlyIBOTPatchLoss: mask must be a (B, H, W) bool tensor, got {mask.dtype} "
                             f"of shape {tuple(mask.shape)}")
        masks = mask.flatten(1)
        loss, teacher_sum = ibot_patch_loss(
            student_out, teacher_out, self.center.value, ibot_masks_weight(masks), n_crops=masks.shape[0],
            student_temp=self.student_temperature, teacher_temp=self.teacher_temp, backend=self.backend)
        self.center.update_from_sum(teacher_sum, teacher_out.shape[0])
        return loss


class LightlyKoLeoLoss(nn.Module):
    """Drop-in replacement for ``lightly.loss.KoLeoLoss``: ``(p=2, eps=1e-8, topk=1,
    group_size=None, gather_distributed=False)``, ``forward(x)``; finite where lightly's is not
    (see fastdino.ops.koleo). ``gather_distributed`` gathers every rank's features first (with
    gradients flowing back to their rank, summed, as lightly's GatherLayer)."""

    def __init__(self, p=2, eps=1e-8, topk=1, group_size=None, gather_distributed=False):
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be positive but is {topk}.")
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be positive but is {group_size}.")
        self.p, self.eps, self.topk = p, eps, topk
        self.group_size, self.gather_distributed = group_size, gather_distributed

    def forward(self, x):
        if self.gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.nn.functional import all_gather  # autograd-aware gather

            x = torch.cat(all_gather(F.normalize(x, p=2, dim=-1, eps=self.eps)))
        return koleo_loss(x, self.eps, topk=self.topk, group_size=self.group_size, p=self.p)
