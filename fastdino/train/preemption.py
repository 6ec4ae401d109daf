"""Stopping on a signal without losing work: SLURM's SIGTERM (or SIGUSR1 with ``--signal``)
before a preemption or requeue, and Ctrl-C.

The first signal only raises a flag; the training loop finishes the optimizer step it is in,
and every rank stops after the same step, writes a checkpoint and exits with
``PREEMPTED_EXIT_CODE`` (SIGTERM, SIGUSR1) or 130 (Ctrl-C). Ranks receive signals at different
moments, so they agree through a tiny all-reduce of their flags on the CPU (gloo), started
after each step and read one step later: no device synchronization, no added latency.
A second Ctrl-C stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from fastdino.runtime import Runtime, get_logger

# EX_TEMPFAIL (sysexits.h): "a temporary failure; retry later": what a requeue script checks
PREEMPTED_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C
# torchrun exits 1 whatever its workers exit with: a requeue script under torchrun checks for
# this file in the output directory instead (written on a signal stop, removed at the next start)
STOPPED_MARKER_NAME = "STOPPED_BY_SIGNAL"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_SIGNAL_NAMES = tuple(signal.Signals(number).name for number in STOP_SIGNALS)
logger = get_logger("train")


def exit_code_for(signal_name: str) -> int:
    return INTERRUPTED_EXIT_CODE if signal_name == "SIGINT" else PREEMPTED_EXIT_CODE


class StopSignals:
    """Catches ``STOP_SIGNALS`` while installed (main thread only) and tells every rank, at the
    same optimizer step, whether any of them was asked to stop."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.received: str | None = None  # the first signal's name, on this rank
        self._previous: dict[int, object] = {}
        self._pending = None  # (work, flag tensor) of the all-reduce started after the last step
        self._group = None
        if runtime.initialized:
            # the default group when it is gloo already; else (NCCL) a CPU group for this flag
            self._group = None if runtime.backend == "gloo" else dist.new_group(backend="gloo")

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (train() in a thread)
        for number in STOP_SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.received is None:
            self.received = name
            how = " (Ctrl-C again to quit at once)" if name == "SIGINT" else ""
            logger.warning(f"{name} received: stopping after this optimizer step with a checkpoint{how}")

    def stop_now(self) -> str | None:
        """Called after every optimizer step, on every rank: the signal to stop on, or None.

        With several ranks: the flags all-reduced after the previous step decide, so that
        every rank stops after the same step; then this step's flags are sent.
        """
        if not self.runtime.initialized:
            return self.received
        decided = None
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            if flags.any():  # the same flags on every rank: the same signal named everywhere
                decided = _SIGNAL_NAMES[int(flags.nonzero()[0])]
        flags = torch.tensor([name == self.received for name in _SIGNAL_NAMES], dtype=torch.int32)
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flags)
        return decided

    def drain(self) -> None:
        """Complete the all-reduce in flight (every rank started one after its last step)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
