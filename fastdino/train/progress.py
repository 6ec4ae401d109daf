"""What rank 0 reports while training: a progress bar on a terminal (a line per log step
elsewhere), and the metrics of every log step in ``metrics.jsonl`` in the run directory, one
JSON object per line, and in TensorBoard when the config asks for it."""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

from fastdino.runtime import ProgressBar, get_logger, partial_path

METRICS_FILE_NAME = "metrics.jsonl"
TENSORBOARD_FOLDER_NAME = "tensorboard"
logger = get_logger("train")


TERM_KEYS = ("dino_loss", "ibot_loss", "koleo_loss", "patch_teacher_entropy")  # method=dinov2's terms


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop the lines of ``path`` logged after ``step`` (and a line torn by a kill), atomically.

    A run resumed from its checkpoint at ``step`` logs the later steps again; without this,
    each of them would appear twice.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            kept.append(line + "\n")
    temporary = partial_path(path)
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


class TrainingProgress:
    """``advance`` after every step (cheap, no device sync), ``log`` on log steps with the
    metrics. Writes nothing when ``enabled`` is False (ranks > 0).

    A run that starts at ``start_step`` > 0 (resumed from ``resumed_from``) first drops what
    an earlier process logged after that step, then records the restart as a line
    ``{"step": start_step, "event": "resumed", "checkpoint": ...}``: each step appears once.
    """

    def __init__(self, total_steps: int, start_step: int, run_dir: Path, *, enabled: bool = True,
                 tensorboard: bool = False, resumed_from: Path | None = None):
        self.total_steps = total_steps
        self.enabled = enabled
        self.bar = ProgressBar(total_steps, start_step) if enabled else None
        self.epoch, self.summary = 0, ""
        self.metrics_file = self.tensorboard = None
        if not enabled:
            return
        metrics_path = Path(run_dir) / METRICS_FILE_NAME
        keep_metrics_up_to(metrics_path, start_step)
        self.metrics_file = open(metrics_path, "a")
        if resumed_from is not None:
            self._write({"step": start_step, "event": "resumed", "checkpoint": str(resumed_from)})
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            # purge_step: TensorBoard hides the events an earlier process wrote after start_step
            self.tensorboard = SummaryWriter(str(Path(run_dir) / TENSORBOARD_FOLDER_NAME),
                                             purge_step=start_step + 1 if start_step else None)

    def advance(self, step: int, epoch: int) -> None:
        if self.bar is not None:
            self.epoch = epoch
            self.bar.update(step, f"epoch {epoch}", self.summary)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self._write(metrics)
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
                f"h(Pt) {metrics['teacher_entropy']:.3f} "
                + "".join(f"{name.removesuffix('_loss')} {metrics[name]:.4f} " for name in TERM_KEYS if name in metrics)
                + f"lr {metrics['lr']:.3g} wd {metrics['weight_decay']:.3g} "
                f"m {metrics['teacher_momentum']:.5f} tau_t {metrics['teacher_temperature']:.4f} "
                f"{metrics['images_per_second']:.1f} img/s data-wait {metrics['data_wait_fraction']:.0%} "
                f"peak {metrics['peak_memory_gib']:.2f} GiB")

    def _write(self, entry: dict) -> None:
        self.metrics_file.write(json.dumps(entry) + "\n")
        self.metrics_file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
