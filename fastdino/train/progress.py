"""What rank 0 reports while training: a progress bar on a terminal (a line per log step
elsewhere), and the metrics of every log step in ``metrics.jsonl`` in the run directory, one
JSON object per line, and in TensorBoard when the config asks for it."""

from __future__ import annotations

import json
import numbers
from pathlib import Path

from fastdino.runtime import ProgressBar, get_logger

METRICS_FILE_NAME = "metrics.jsonl"
TENSORBOARD_FOLDER_NAME = "tensorboard"
logger = get_logger("train")


class TrainingProgress:
    """``advance`` after every step (cheap, no device sync), ``log`` on log steps with the
    metrics. Writes nothing when ``enabled`` is False (ranks > 0)."""

    def __init__(self, total_steps: int, start_step: int, run_dir: Path, *, enabled: bool = True,
                 tensorboard: bool = False):
        self.total_steps = total_steps
        self.enabled = enabled
        self.bar = ProgressBar(total_steps, start_step) if enabled else None
        self.metrics_file = open(Path(run_dir) / METRICS_FILE_NAME, "a") if enabled else None
        self.tensorboard = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tensorboard = SummaryWriter(str(Path(run_dir) / TENSORBOARD_FOLDER_NAME))
        self.epoch, self.summary = 0, ""

    def advance(self, step: int, epoch: int) -> None:
        if self.bar is not None:
            self.epoch = epoch
            self.bar.update(step, f"epoch {epoch}", self.summary)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, numbers.Real):
                    self.tensorboard.add_scalar(f"train/{key}", value, global_step=metrics["step"])
            self.tensorboard.flush()
        self.summary = (f"loss {metrics['loss']:.4f} h(Pt) {metrics['teacher_entropy']:.3f} "
                        f"{metrics['images_per_second']:.1f} img/s")
        if self.bar.enabled:
            self.bar.update(metrics["step"], f"epoch {self.epoch}", self.summary, force=True)
        else:
            logger.info(
                f"step {metrics['step']}/{self.total_steps} epoch {metrics['epoch']} "
                f"loss {metrics['loss']:.4f} kl {metrics['kl_divergence']:.4f} "
                f"h(Pt) {metrics['teacher_entropy']:.3f} lr {metrics['lr']:.3g} wd {metrics['weight_decay']:.3g} "
                f"m {metrics['teacher_momentum']:.5f} tau_t {metrics['teacher_temperature']:.4f} "
                f"{metrics['images_per_second']:.1f} img/s data-wait {metrics['data_wait_fraction']:.0%} "
                f"peak {metrics['peak_memory_gib']:.2f} GiB")

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
