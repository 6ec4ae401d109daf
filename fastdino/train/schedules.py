"""Per-iteration schedules of the release: learning rate, weight decay, teacher momentum, and the
per-epoch teacher temperature (``fastdino.ops.teacher_temperature_schedule``).

The release precomputes NumPy arrays of ``epochs * iterations_per_epoch`` values; a
``CosineSchedule`` computes the same value for one iteration on demand (the same float64
arithmetic: ``np.linspace``'s ``start + i * step`` for the warm-up, then the cosine), so a run of
a million iterations keeps no million-entry arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastdino.ops import teacher_temperature_schedule

LR_REFERENCE_BATCH = 256  # lr is given for a global batch of 256 and scaled linearly
SQRT_LR_REFERENCE_BATCH = 1024  # DINOv2: lr for a global batch of 1024, scaled by the square root


@dataclass(frozen=True)
class CosineSchedule:
    """The release's ``cosine_scheduler`` as a sequence: ``schedule[it]`` for it in [0, len).

    ``warmup_iterations`` values rise linearly from ``start_warmup_value`` to ``base_value``
    (both included, as ``np.linspace``; a single one is the start value), then a half cosine
    falls from ``base_value`` towards ``final_value`` over the remaining iterations.
    """

    base_value: float
    final_value: float
    total_iterations: int
    warmup_iterations: int = 0
    start_warmup_value: float = 0.0

    def __post_init__(self):
        if not 0 <= self.warmup_iterations <= self.total_iterations:
            raise ValueError(f"warmup_iterations={self.warmup_iterations} must be between 0 and "
                             f"total_iterations={self.total_iterations}")

    def __len__(self) -> int:
        return self.total_iterations

    def __getitem__(self, iteration: int) -> float:
        if not 0 <= iteration < self.total_iterations:
            raise IndexError(f"iteration {iteration} is outside the schedule's "
                             f"{self.total_iterations} iterations")
        warmup = self.warmup_iterations
        if iteration < warmup:
            if warmup == 1:
                return float(self.start_warmup_value)  # np.linspace(start, stop, 1) is [start]
            if iteration == warmup - 1:
                return float(self.base_value)  # np.linspace ends exactly on its stop value
            step = (self.base_value - self.start_warmup_value) / (warmup - 1)
            return iteration * step + self.start_warmup_value
        cosine_iterations = self.total_iterations - warmup
        position = iteration - warmup
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (
            1 + math.cos(math.pi * position / cosine_iterations))


def cosine_schedule(base_value: float, final_value: float, epochs: int, iterations_per_epoch: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> CosineSchedule:
    """Same arguments and values as the release's ``utils.cosine_scheduler``."""
    return CosineSchedule(base_value, final_value, epochs * iterations_per_epoch,
                          warmup_epochs * iterations_per_epoch, start_warmup_value)


@dataclass(frozen=True)
class ScheduledValues:
    """What the step needs at one iteration."""

    epoch: int
    learning_rate: float
    weight_decay: float
    teacher_momentum: float
    teacher_temperature: float


@dataclass(frozen=True)
class TrainingSchedules:
    learning_rate: CosineSchedule
    weight_decay: CosineSchedule
    teacher_momentum: CosineSchedule
    teacher_temperature: tuple[float, ...]  # per epoch
    iterations_per_epoch: int

    @property
    def total_iterations(self) -> int:
        return len(self.learning_rate)

    def at(self, iteration: int) -> ScheduledValues:
        return ScheduledValues(
            epoch=iteration // self.iterations_per_epoch,
            learning_rate=self.learning_rate[iteration],
            weight_decay=self.weight_decay[iteration],
            teacher_momentum=self.teacher_momentum[iteration],
            teacher_temperature=self.teacher_temperature[iteration // self.iterations_per_epoch],
        )


def global_batch_size(config, world_size: int) -> int:
    """Images per optimizer step over all ranks."""
    return config.batch_size_per_gpu * config.grad_accumulation_steps * world_size


def scaled_learning_rate(config, world_size: int) -> float:
    """The peak lr: DINO's linear rule (lr x batch / 256) or DINOv2's square root (lr x
    sqrt(batch / 1024))."""
    batch = global_batch_size(config, world_size)
    if config.lr_scaling == "sqrt":
        return config.lr * math.sqrt(batch / SQRT_LR_REFERENCE_BATCH)
    return config.lr * batch / LR_REFERENCE_BATCH


def build_schedules(config, iterations_per_epoch: int, world_size: int) -> TrainingSchedules:
    """The release's schedules for ``config`` (a TrainConfig): lr scaled by the global batch."""
    peak_lr = scaled_learning_rate(config, world_size)
    return TrainingSchedules(
        learning_rate=cosine_schedule(peak_lr, config.min_lr, config.epochs, iterations_per_epoch,
                                      warmup_epochs=config.warmup_epochs),
        weight_decay=cosine_schedule(config.weight_decay, config.weight_decay_end, config.epochs,
                                     iterations_per_epoch),
        teacher_momentum=cosine_schedule(config.momentum_teacher, 1.0, config.epochs, iterations_per_epoch),
        teacher_temperature=teacher_temperature_schedule(
            config.warmup_teacher_temp, config.teacher_temp, config.warmup_teacher_temp_epochs, config.epochs),
        iterations_per_epoch=iterations_per_epoch,
    )
