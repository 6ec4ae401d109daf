"""One DINO optimizer step: forward, loss, backward, clipping, update, teacher EMA, center.

Per micro-batch (``grad_accumulation_steps`` of them): the teacher's logits of the 2 global
crops (no gradient), the student's of every crop, under autocast; the fused ``dino_loss``
(outside autocast: it accumulates in float32 itself); backward of loss / n_micro. DDP
all-reduces the gradients on the last micro-batch only. Then, once per optimizer step: the
head's last layer is frozen during its first epochs, every gradient is clipped to its own norm
(``clip_grad_per_param_``), the optimizer steps, the teacher follows by EMA (``ema_update_``)
and the center moves with the teacher logits of all micro-batches of all ranks.

Nothing here waits for the device: the loss stays a device tensor, the schedules' values are
Python floats, and the center's all-reduce is started before the last backward and waited for
after the teacher update, so it overlaps with that compute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from fastdino.ops import CenterUpdate, dino_loss
from fastdino.runtime import unwrap_parallel

from .collapse import teacher_entropy
from .networks import last_layer_parameters
from .schedules import ScheduledValues
# the fused ops themselves on plain tensors (DDP, one process), over the local shards with FSDP2
from .sharding import sharded_clip_grad_per_param_, sharded_ema_update_

N_GLOBAL_CROPS = 2


@dataclass
class StepResult:
    loss: torch.Tensor  # 0-d float32 on the device: mean over the micro-batches of this rank
    teacher_entropy: torch.Tensor | None  # of the last micro-batch, when measured
    kl_divergence: torch.Tensor | None  # loss - teacher entropy on the last micro-batch
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # DINOv2: each weighted term's value
    patch_teacher_entropy: torch.Tensor | None = None  # DINOv2: of the iBOT head's targets


class CenterSum:
    """A center's teacher column sums over the micro-batches of a step, then its update: ``start``
    launches the all-reduce, ``finish`` moves the center. ``mean_of_rank_means``: the batch center
    is the mean of the ranks' means (DINOv2's and lightly's patch center, whose row counts differ
    between ranks), else the mean over all rows."""

    def __init__(self, center: torch.Tensor, momentum: float, mean_of_rank_means: bool = False):
        self.update = CenterUpdate(center, momentum)
        self.mean_of_rank_means = mean_of_rank_means
        self.reset()

    def reset(self) -> None:
        self.sum, self.rows = None, 0

    def add(self, teacher_sum: torch.Tensor, rows: int) -> None:
        self.sum = teacher_sum if self.sum is None else self.sum + teacher_sum
        self.rows += rows

    def start(self) -> None:
        if self.sum is None:
            return
        if self.mean_of_rank_means:
            self.update.start(self.sum / max(self.rows, 1), 1)
        else:
            self.update.start(self.sum, self.rows)

    def finish(self) -> None:
        if self.sum is not None:
            self.update.finish()


class DINOStep:
    """Callable training step over the student (possibly DDP-wrapped) and its teacher.

    optimizer: over the student's parameters; groups with ``apply_weight_decay=True`` follow the
    weight-decay schedule, the others keep theirs (0).
    center: the (1, K) float32 center, updated in place.
    autocast_dtype: torch.bfloat16 / torch.float16, or None for full precision.
    scaler: a GradScaler for float16, else None.
    ops_backend: the ``fastdino.ops`` backend of the loss, the clipping and the EMA.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                 center: torch.Tensor, *, student_temp: float, center_momentum: float,
                 clip_grad: float, autocast_dtype: torch.dtype | None = None, scaler=None,
                 ops_backend: str = "auto"):
        self.student = student
        self.teacher = teacher
        self.optimizer = optimizer
        self.center = center
        self.student_temp = student_temp
        self.clip_grad = clip_grad
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self.ops_backend = ops_backend
        self.center_sum = CenterSum(center, center_momentum)
        self.center_sums = [self.center_sum]  # every center this step moves (DINOv2: two)
        network = unwrap_parallel(student)
        self.student_params = list(network.parameters())
        self.teacher_params = list(teacher.parameters())
        if len(self.student_params) != len(self.teacher_params):
            raise ValueError(f"student has {len(self.student_params)} parameter tensors, teacher "
                             f"{len(self.teacher_params)}: they must share one architecture")
        self.last_layer_params = last_layer_parameters(network)
        self.device = center.device

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _set_schedule(self, values: ScheduledValues) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = values.learning_rate * group.get("lr_multiplier", 1.0)
            if group.get("apply_weight_decay"):
                group["weight_decay"] = values.weight_decay

    def _gradient_sync(self, last: bool):
        """Reduce the accumulated gradients once, in the last micro-batch's backward."""
        if isinstance(self.student, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if last else self.student.no_sync()
        if isinstance(self.student, FSDPModule):
            self.student.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def __call__(self, micro_batches: Sequence[Sequence[torch.Tensor]], values: ScheduledValues,
                 freeze_last_layer: bool, measure: bool = False, masks: Sequence | None = None) -> StepResult:
        """One optimizer step over ``micro_batches`` (lists of crops, global crops first).
        ``measure`` also computes the teacher entropy and KL of the last micro-batch. ``masks``:
        one ``fastdino.data.masking.IBOTMasks`` per micro-batch (DINOv2's step only)."""
        self._set_schedule(values)
        self.optimizer.zero_grad(set_to_none=True)
        n_micro = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        terms_sum: dict[str, torch.Tensor] = {}
        for center_sum in self.center_sums:
            center_sum.reset()
        measured = {}
        for index, crops in enumerate(micro_batches):
            last = index == n_micro - 1
            with self._gradient_sync(last):
                loss, terms, measured = self._loss(crops, None if masks is None else masks[index], values,
                                                   measure and last)
                if last:  # before the last backward: the all-reduces overlap with it
                    for center_sum in self.center_sums:
                        center_sum.start()
                scaled_loss = loss / n_micro if n_micro > 1 else loss
                if self.scaler is not None:
                    scaled_loss = self.scaler.scale(scaled_loss)
                scaled_loss.backward()
            loss_sum += loss.detach()
            for name, value in terms.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + value.detach()

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if freeze_last_layer:
            for parameter in self.last_layer_params:
                parameter.grad = None
        if self.clip_grad:
            sharded_clip_grad_per_param_(self.student_params, self.clip_grad, backend=self.ops_backend)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        sharded_ema_update_(self.teacher_params, self.student_params, values.teacher_momentum, backend=self.ops_backend)
        for center_sum in self.center_sums:
            center_sum.finish()
        mean = (lambda value: value / n_micro) if n_micro > 1 else (lambda value: value)
        return StepResult(mean(loss_sum), measured.get("teacher_entropy"), measured.get("kl_divergence"),
                          {name: mean(value) for name, value in terms_sum.items()},
                          measured.get("patch_teacher_entropy"))

    # -- the loss of one micro-batch -------------------------------------------------------------

    def _loss(self, crops, masks, values: ScheduledValues, measure: bool):
        """(loss, {term: value}, {measured quantity: value}) of one micro-batch."""
        with self._autocast():
            with torch.no_grad():
                teacher_logits = self.teacher(crops)
            student_logits = self.student(crops)
        loss, teacher_sum = dino_loss(
            student_logits, teacher_logits, self.center, n_global_crops=N_GLOBAL_CROPS,
            student_temp=self.student_temp, teacher_temp=values.teacher_temperature,
            backend=self.ops_backend, overwrite_student_logits=True, check_finite=False)
        self.center_sum.add(teacher_sum, teacher_logits.shape[0])
        measured = {}
        if measure:
            entropy = teacher_entropy(teacher_logits, self.center, values.teacher_temperature)
            measured = {"teacher_entropy": entropy, "kl_divergence": loss.detach() - entropy}
        return loss, {}, measured
