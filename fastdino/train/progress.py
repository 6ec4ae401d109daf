"""What rank 0 tells the user: a progress bar on a terminal, plain lines otherwise, and a JSON
lines file of metrics (``metrics.jsonl`` in the run directory, one object per log step)."""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import TextIO

BAR_WIDTH = 24
REDRAW_SECONDS = 0.2


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class ProgressReporter:
    """``advance`` after every step (cheap, no device sync), ``log`` on log steps with the
    metrics, ``message`` for anything else. Silent when ``enabled`` is False (ranks > 0)."""

    def __init__(self, total_steps: int, start_step: int, metrics_path: Path | None, *,
                 enabled: bool = True, stream: TextIO | None = None):
        self.total_steps = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.is_terminal = enabled and self.stream.isatty()
        self.metrics_file = open(metrics_path, "a") if enabled and metrics_path is not None else None
        self.started = time.perf_counter()
        self.last_draw = 0.0
        self.bar_width = 0
        self.step, self.epoch, self.summary = start_step, 0, ""

    def advance(self, step: int, epoch: int) -> None:
        self.step, self.epoch = step, epoch
        now = time.perf_counter()
        if self.is_terminal and (now - self.last_draw >= REDRAW_SECONDS or step == self.total_steps):
            self._draw_bar(now)

    def _draw_bar(self, now: float) -> None:
        self.last_draw = now
        done = self.step - self.start_step
        fraction = self.step / self.total_steps if self.total_steps else 1.0
        filled = int(BAR_WIDTH * fraction)
        rate = done / (now - self.started) if done else 0.0
        eta = _duration((self.total_steps - self.step) / rate) if rate else "?"
        line = (f"\repoch {self.epoch} |{'#' * filled}{'.' * (BAR_WIDTH - filled)}| "
                f"{self.step}/{self.total_steps} {rate:.2f} it/s ETA {eta} {self.summary}")
        line = line[:200].ljust(80)
        self.bar_width = len(line)
        self.stream.write(line)
        self.stream.flush()

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(metrics) + "\n")
            self.metrics_file.flush()
        self.summary = (f"loss {metrics['loss']:.4f} h(Pt) {metrics['teacher_entropy']:.3f} "
                        f"{metrics['images_per_second']:.1f} img/s")
        if self.is_terminal:
            self._draw_bar(time.perf_counter())
        else:
            self.stream.write(
                f"step {metrics['step']}/{self.total_steps} epoch {metrics['epoch']} "
                f"loss {metrics['loss']:.4f} kl {metrics['kl_divergence']:.4f} "
                f"h(Pt) {metrics['teacher_entropy']:.3f} lr {metrics['lr']:.3g} wd {metrics['weight_decay']:.3g} "
                f"m {metrics['teacher_momentum']:.5f} tau_t {metrics['teacher_temperature']:.4f} "
                f"{metrics['images_per_second']:.1f} img/s data-wait {metrics['data_wait_fraction']:.0%} "
                f"peak {metrics['peak_memory_gib']:.2f} GiB\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.is_terminal:
            self.stream.write("\r" + " " * self.bar_width + "\r")
        self.stream.write(f"fastdino.train: {text}\n")
        self.stream.flush()
        if self.is_terminal and self.step > self.start_step:
            self._draw_bar(time.perf_counter())

    def close(self) -> None:
        if self.is_terminal:
            self.stream.write("\n")
            self.stream.flush()
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
