"""DINOv2's training step (``method=dinov2``): DINOStep with the iBOT and KoLeo terms.

Per micro-batch, as DINOv2's meta-architecture (dinov2/train/ssl_meta_arch.py) computes it:
- the teacher sees the unmasked global crops: its CLS logits and the patch logits at the masked
  positions (``mask_indices``, from the host: no data-dependent shape on the device);
- the student sees every crop, its global crops masked (mask token before the position embedding);
- DINO term: each global crop against the other global crop's targets, each local crop against
  both, the sum over the n_global (n_global - 1) + n_local n_global pairs divided by their
  number (``dino_loss``'s pairing exactly);
- iBOT term: the masked patches' cross-entropy, each weighted 1 / masked patches of its crop,
  summed and divided by the global crops of the batch (``ibot_patch_loss``);
- KoLeo: on the student's backbone CLS features, per global crop, summed over the crops;
- loss = dino_loss_weight * DINO + ibot_loss_weight * iBOT + koleo_loss_weight * KoLeo.
Targets: ``centering`` moves a (1, K) center per head with the teacher logits (the patch one from
the masked patches, as DINOv2); ``sinkhorn_knopp`` replaces both centers by
``sinkhorn_knopp_`` over the global batch.
"""

from __future__ import annotations

import torch

from fastdino.ops import dino_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp_, soft_cross_entropy
from fastdino.ops.dino_loss import count_loss_pairs

from .collapse import teacher_entropy
from .schedules import ScheduledValues
from .step import N_GLOBAL_CROPS, CenterSum, DINOStep


def _entropy_of(probabilities: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum p log p (Sinkhorn-Knopp targets), 0-d float32."""
    p = probabilities.float()
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean()


class DINOv2Step(DINOStep):
    """``DINOStep`` with DINOv2's terms. ``patch_center``: the (1, K_patch) iBOT center (used
    with centering="centering"), updated in place."""

    def __init__(self, *args, patch_center: torch.Tensor, centering: str, dino_loss_weight: float,
                 ibot_loss_weight: float, koleo_loss_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.patch_center = patch_center
        self.patch_center_sum = CenterSum(patch_center, self.center_sum.update.momentum, mean_of_rank_means=True)
        self.center_sums.append(self.patch_center_sum)
        self.centering = centering
        self.weights = {"dino": dino_loss_weight, "ibot": ibot_loss_weight, "koleo": koleo_loss_weight}

    def _loss(self, crops, masks, values: ScheduledValues, measure: bool):
        use_ibot = masks is not None and self.weights["ibot"] > 0
        mask_indices = masks.mask_indices if use_ibot else None
        with self._autocast():
            with torch.no_grad():
                teacher = self.teacher(crops, dinov2_outputs=True, mask_indices=mask_indices)
            student = self.student(crops, dinov2_outputs=True, masks=masks.masks if use_ibot else None,
                                   mask_indices=mask_indices)
        temperature = values.teacher_temperature
        terms, measured = {}, {}
        if self.weights["dino"] > 0:
            terms["dino"] = self._dino_term(student.cls_logits, teacher.cls_logits, temperature, measure, measured)
        if use_ibot:
            terms["ibot"] = self._ibot_term(student.patch_logits, teacher.patch_logits, masks, temperature,
                                            measure, measured)
        if self.weights["koleo"] > 0:
            terms["koleo"] = sum(koleo_loss(features) for features in student.global_cls_features.chunk(N_GLOBAL_CROPS))
        loss = sum(self.weights[name] * value for name, value in terms.items())
        if measure and "teacher_entropy" in measured and "dino" in terms:
            measured["kl_divergence"] = terms["dino"].detach() - measured["teacher_entropy"]
        return loss, {name: value.detach() for name, value in terms.items()}, measured

    def _dino_term(self, student_logits, teacher_logits, temperature, measure, measured):
        if self.centering == "centering":
            loss, teacher_sum = dino_loss(
                student_logits, teacher_logits, self.center, n_global_crops=N_GLOBAL_CROPS,
                student_temp=self.student_temp, teacher_temp=temperature, backend=self.ops_backend,
                overwrite_student_logits=True, check_finite=False)
            self.center_sum.add(teacher_sum, teacher_logits.shape[0])
            if measure:
                measured["teacher_entropy"] = teacher_entropy(teacher_logits, self.center, temperature)
            return loss
        targets = sinkhorn_knopp_(teacher_logits, temperature, backend=self.ops_backend)
        if measure:
            measured["teacher_entropy"] = _entropy_of(targets)
        batch = teacher_logits.shape[0] // N_GLOBAL_CROPS
        n_crops = student_logits.shape[0] // batch
        weight = 1.0 / (batch * count_loss_pairs(N_GLOBAL_CROPS, n_crops))
        first, second = targets[:batch], targets[batch:]
        pairs = [(student_logits[: 2 * batch], torch.cat((second, first)))]  # each global crop: the other's
        if n_crops > N_GLOBAL_CROPS:
            pairs.append((student_logits[2 * batch:], first + second))  # each local crop: both
        loss = 0.0
        for student, target in pairs:
            weights = torch.full((student.shape[0],), weight, device=student.device)
            term, _ = soft_cross_entropy(student, target, None, weights, student_temp=self.student_temp,
                                         teacher_is_probs=True, backend=self.ops_backend, check_finite=False)
            loss = loss + term
        return loss

    def _ibot_term(self, student_logits, teacher_logits, masks, temperature, measure, measured):
        n_crops = masks.masks.shape[0]
        if self.centering == "centering":
            loss, teacher_sum = ibot_patch_loss(
                student_logits, teacher_logits, self.patch_center, masks.masks_weight, n_crops=n_crops,
                student_temp=self.student_temp, teacher_temp=temperature, backend=self.ops_backend,
                overwrite_student_logits=True, check_finite=False)
            self.patch_center_sum.add(teacher_sum, teacher_logits.shape[0])
            if measure and teacher_logits.shape[0]:
                measured["patch_teacher_entropy"] = teacher_entropy(teacher_logits, self.patch_center, temperature)
            return loss
        targets = sinkhorn_knopp_(teacher_logits, temperature, backend=self.ops_backend)
        if measure and teacher_logits.shape[0]:
            measured["patch_teacher_entropy"] = _entropy_of(targets)
        loss, _ = ibot_patch_loss(student_logits, targets, None, masks.masks_weight, n_crops=n_crops,
                                  student_temp=self.student_temp, teacher_is_probs=True, backend=self.ops_backend,
                                  overwrite_student_logits=True, check_finite=False)
        return loss
