"""fastdino.train: DINO training from one CPU process to multi-node torchrun.

    python -m fastdino.train                                   # tiny CPU run, synthetic images
    torchrun --nproc_per_node=8 -m fastdino.train --preset vit_small_p8 --data DIR --output-dir runs/x

or from Python:

    from fastdino.train import resolve_config, train
    result = train(resolve_config("tiny", ["epochs=2"], output_dir="runs/t"))

Modules: ``config`` (the schema, presets, overrides, the environment, every check before a
run starts), ``schedules``, ``networks`` (student, teacher, optimizer), ``step`` (one optimizer
step), ``checkpointing``, ``progress`` (bar, metrics.jsonl, TensorBoard), ``collapse``, ``cli``
and ``trainer`` (builds the run, then loops). The process itself (ranks, device, log) is
``fastdino.runtime``.
"""

from .config import PRESETS, ConfigError, TrainConfig, parse_overrides, resolve_config
from .schedules import CosineSchedule, TrainingSchedules, build_schedules, cosine_schedule

__all__ = [
    "PRESETS",
    "ConfigError",
    "CosineSchedule",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "TrainingSchedules",
    "build_schedules",
    "cosine_schedule",
    "parse_overrides",
    "resolve_config",
    "train",
]


def __getattr__(name):
    # The trainer pulls in the data pipeline; import it only when it is used.
    if name in ("train", "TrainResult", "NonFiniteLossError"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'fastdino.train' has no attribute {name!r}")
