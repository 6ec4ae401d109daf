"""Drop-ins for DINOv2's loss modules (``dinov2/loss``): same names, constructors, methods,
buffers and results, on fastdino's fused ops.

    from fastdino.ops.dinov2 import DINOLoss, iBOTPatchLoss, KoLeoLoss

What is fused: the student side of every cross-entropy (log-softmax, product with the teacher
targets, sum, and the gradient, written during the forward: no (rows x K) log-softmax or
product tensors), and Sinkhorn-Knopp (``fastdino.ops.sinkhorn_knopp_``: the matrix held once).
DINOv2's API hands the teacher targets over as probabilities, so ``softmax_center_teacher``
still materializes them as DINOv2 does; ``fastdino.ops.ibot_patch_loss`` and ``dino_loss`` take
logits and never do. Extra keyword argument of every constructor: ``backend``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .koleo import koleo_loss
from .sinkhorn import sinkhorn_knopp_
from .soft_cross_entropy import soft_cross_entropy


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AsyncCenter(nn.Module):
    """DINOv2's center bookkeeping: ``reduce_center_update`` starts the all-reduce of the batch
    sum, ``apply_center_update`` (called by the next ``softmax_center_teacher``) waits for it and
    moves the center, so the communication overlaps the student's forward. Subclasses say how a
    batch is summed (``_batch_sum``)."""

    def __init__(self, center_shape, center_momentum):
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center = None
        self.n_center_rows = None

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output):
        self.updated = False
        self.n_center_rows = len(teacher_output)
        self.async_batch_center = self._batch_sum(teacher_output)
        if dist.is_available() and dist.is_initialized():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True)

    @torch.no_grad()
    def apply_center_update(self):
        if self.updated is False:
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
                self.reduce_handle = None
            batch_center = self.async_batch_center / (self.n_center_rows * _world_size())
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
            self.updated = True

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        self.apply_center_update()
        self.center = self.center.to(device=teacher_output.device)
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)


class DINOLoss(_AsyncCenter):
    """DINOv2's ``DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)``: ``center`` (1, out_dim).

    ``forward(student_output_list, teacher_out_softmaxed_centered_list)`` is
    -sum over (s, t) pairs of mean_rows sum_k t log_softmax(s / student_temp), every student
    tensor against every teacher tensor (DINOv2's meta-architecture swaps the teacher's global
    crops beforehand so that crops meet their other view). Since the cross-entropy is linear in
    the targets, the teacher tensors are summed once and each student tensor meets the sum: one
    fused pass per student tensor instead of one per pair.
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, backend="auto"):
        super().__init__((1, out_dim), center_momentum)
        self.student_temp = student_temp
        self.backend = backend

    def _batch_sum(self, teacher_output):
        return torch.sum(teacher_output, dim=0, keepdim=True)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        targets = torch.empty(teacher_output.shape, device=teacher_output.device,
                              dtype=torch.promote_types(teacher_output.dtype, torch.float32))
        return sinkhorn_knopp_(teacher_output, teacher_temp, n_iterations, out=targets, backend=self.backend)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        students, teachers = list(student_output_list), list(teacher_out_softmaxed_centered_list)
        if not students or not teachers:
            raise ValueError(f"DINOLoss: needs student and teacher outputs, got {len(students)} student and "
                             f"{len(teachers)} teacher tensors")
        shapes = {tuple(t.shape) for t in students + teachers}
        if len(shapes) != 1:
            raise ValueError(f"DINOLoss: every student and teacher tensor must have one shape (rows, K), "
                             f"got {sorted(shapes)}")
        targets = teachers[0].float() if len(teachers) == 1 else torch.stack(teachers).float().sum(0)
        targets = targets.reshape(-1, targets.shape[-1])
        weights = torch.full((targets.shape[0],), 1.0 / targets.shape[0], device=targets.device)
        total_loss = 0
        for student in students:  # one fused call each: no concatenated copy of the students
            loss, _ = soft_cross_entropy(student.reshape(-1, student.shape[-1]), targets, None, weights,
                                         student_temp=self.student_temp, teacher_is_probs=True,
                                         backend=self.backend, op_name="DINOLoss")
            total_loss = total_loss + loss
        return total_loss


class iBOTPatchLoss(_AsyncCenter):  # noqa: N801 (DINOv2's name)
    """DINOv2's ``iBOTPatchLoss(patch_out_dim, student_temp=0.1, center_momentum=0.9)``:
    ``center`` (1, 1, patch_out_dim); ``forward`` on all patches with their masks,
    ``forward_masked`` on the masked patches only (what DINOv2 trains with)."""

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9, backend="auto"):
        super().__init__((1, 1, patch_out_dim), center_momentum)
        self.student_temp = student_temp
        self.backend = backend

    def _batch_sum(self, teacher_patch_tokens):
        # DINOv2: the mean over dim 1 (patches), summed over dim 0; update_center is called
        # with (1, M, K) masked patches, or (B, N, K) patch tokens.
        return torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor=None, n_iterations=3):
        """DINOv2 all-reduces ``n_masked_patches_tensor`` and divides by it; the factor cancels in
        the next normalization (see fastdino.ops.sinkhorn), so it is accepted and not needed."""
        targets = torch.empty(teacher_output.shape, device=teacher_output.device,
                              dtype=torch.promote_types(teacher_output.dtype, torch.float32))
        return sinkhorn_knopp_(teacher_output, teacher_temp, n_iterations, out=targets, backend=self.backend)

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        """(B, N, K) student logits and teacher targets, (B, N) bool masks: -mean over crops of
        the masked patches' mean cross-entropy."""
        if student_patch_tokens.dim() != 3 or teacher_patch_tokens.shape != student_patch_tokens.shape:
            raise ValueError(f"iBOTPatchLoss.forward: student and teacher patch tokens must both be (B, N, K), "
                             f"got {tuple(student_patch_tokens.shape)} and {tuple(teacher_patch_tokens.shape)}")
        if student_masks_flat.shape != student_patch_tokens.shape[:2]:
            raise ValueError(f"iBOTPatchLoss.forward: student_masks_flat must be (B, N) = "
                             f"{tuple(student_patch_tokens.shape[:2])}, got {tuple(student_masks_flat.shape)}")
        masks = student_masks_flat.float()
        weights = masks / masks.sum(dim=-1, keepdim=True).clamp(min=1.0) / masks.shape[0]
        n_classes = student_patch_tokens.shape[-1]
        loss, _ = soft_cross_entropy(
            student_patch_tokens.reshape(-1, n_classes), teacher_patch_tokens.reshape(-1, n_classes).float(),
            None, weights.flatten(), student_temp=self.student_temp, teacher_is_probs=True,
            backend=self.backend, op_name="iBOTPatchLoss")
        return loss

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None):
        """(M, K) student logits and teacher targets of the masked patches; (crops, N) masks;
        ``masks_weight`` (M,) 1 / masked patches of each patch's crop (computed from the masks
        when None, which synchronizes a GPU, as in DINOv2)."""
        student, teacher = student_patch_tokens_masked, teacher_patch_tokens_masked
        if teacher.dim() == 3 and teacher.shape[0] == 1:  # (1, M, K), as the (1, 1, K) center broadcasts it
            teacher = teacher[0]
        if masks_weight is None:
            masks_weight = ((1 / student_masks_flat.sum(-1).clamp(min=1.0))
                            .unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat])
        if n_masked_patches is not None:
            n_masked_patches = int(n_masked_patches)
            student, teacher = student[:n_masked_patches], teacher[:n_masked_patches]
            masks_weight = masks_weight[:n_masked_patches]
        loss, _ = soft_cross_entropy(
            student, teacher.float(), None, masks_weight.float() / student_masks_flat.shape[0],
            student_temp=self.student_temp, teacher_is_probs=True, backend=self.backend,
            op_name="iBOTPatchLoss.forward_masked")
        return loss


class KoLeoLoss(nn.Module):
    """DINOv2's ``KoLeoLoss()``: ``forward(student_output, eps=1e-8)``, finite where DINOv2's is
    not (see fastdino.ops.koleo)."""

    def forward(self, student_output, eps=1e-8):
        return koleo_loss(student_output, eps)
