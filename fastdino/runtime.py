"""The process a fastdino command runs in: its place in a torchrun job, its device, its log, and
files written whole. ``fastdino.train``, ``fastdino.eval`` and ``fastdino.visualize`` share it.

- ``start_runtime`` / ``runtime``: torchrun (one node, several, or under SLURM's ``srun``)
  exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with them the process joins
  the job's process group (NCCL on GPUs, gloo on CPUs). Without them it is a job of one process
  and torch.distributed stays uninitialized (fastdino's collectives then skip themselves).
- ``select_device``: "auto" is this rank's GPU (LOCAL_RANK) when CUDA is available, else the CPU.
- ``get_logger``: the ``fastdino.*`` loggers. One handler on the ``fastdino`` logger writes
  ``fastdino.train: message`` lines to stderr, on rank 0 only (other ranks print errors only),
  above the one live status line (a progress bar) when stderr is a terminal.
- ``atomic_save``: ``torch.save`` to a hidden temporary file, fsync, rename: a reader never sees
  a half-written file, and a killed write leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEVICES = ("auto", "cpu", "cuda")
PARTIAL_MARKER = ".partial-"  # in the names of atomic_save's temporary files


# -- the job and the device ----------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # "nccl", "gloo", or None for a single process
    owns_process_group: bool = False  # this runtime initialized it, so it destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if not self.initialized:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def device_type(requested: str | None) -> str:
    """"cuda" or "cpu" (or another torch device type) for a ``select_device`` request."""
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested).type


def select_device(requested: str | None = "auto", local_rank: int = 0) -> torch.device:
    """The device this process computes on, made the current CUDA device when it is a GPU.

    requested: "auto" (or None): GPU ``local_rank`` when CUDA is available, else the CPU;
    "cuda": GPU ``local_rank``; "cuda:N": that GPU; "cpu".
    """
    device = torch.device(device_type(requested) if requested in (None, "auto") else requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r}: no CUDA device is available")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {requested!r} with LOCAL_RANK={local_rank}: only "
                               f"{torch.cuda.device_count()} CUDA device(s) are visible; use "
                               f"--nproc_per_node <= the GPU count")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


def start_runtime(device: str | None = "auto", timeout_minutes: float = 30) -> Runtime:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    if not launched_by_torchrun():
        return Runtime(0, 1, 0, select_device(device, 0), None)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    chosen = select_device(device, local_rank)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if dist.is_initialized():  # e.g. a caller's own set-up: use it, leave it to the caller
        return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, chosen, dist.get_backend())
    # Checkpoint writes and slow file systems happen between collectives: be generous.
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=chosen if chosen.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, chosen, backend, owns_process_group=True)


def stop_runtime(runtime: Runtime) -> None:
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def runtime_scope(device: str | None = "auto", timeout_minutes: float = 30) -> Iterator[Runtime]:
    """``start_runtime`` for the block, and the process group torn down after it."""
    current = start_runtime(device, timeout_minutes)
    try:
        yield current
    finally:
        stop_runtime(current)


class CollectiveTimeoutError(RuntimeError):
    """A collective waited ``timeout`` for ranks that never came; the message names them."""


def is_collective_timeout(error: BaseException) -> bool:
    # gloo: "Timed out waiting 6000ms for recv operation"; NCCL's watchdog: "Watchdog caught
    # collective operation timeout"
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in message or "timeout" in message)


def unresponsive_ranks(runtime: Runtime, wait_seconds: float) -> list[int]:
    """After a collective timed out: every rank still running checks in through the process
    group's key-value store (not a collective, so it works while one hangs); the ranks that
    have not checked in after ``wait_seconds`` are returned."""
    store = dist.distributed_c10d._get_default_store()
    store.set(f"fastdino/collective-timeout/{runtime.rank}", "here")
    deadline = time.monotonic() + wait_seconds
    missing = list(range(runtime.world_size))
    while missing and time.monotonic() < deadline:
        missing = [rank for rank in missing if not store.check([f"fastdino/collective-timeout/{rank}"])]
        time.sleep(0.2)
    return missing


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_rank() -> int:
    """torch.distributed's rank once initialized, before that torchrun's RANK (0 when alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def unwrap_parallel(module: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel (they keep it as ``.module``)."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return module.module
    return module


# -- files ------------------------------------------------------------------------------------------

def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories; the rename is still atomic
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def partial_path(path: Path) -> Path:
    """The temporary name this process writes ``path`` under before renaming it: visible (not a
    dot file), so that the space a write killed by SIGKILL leaves behind is seen; the next
    start removes it."""
    return path.with_name(f"{path.name}{PARTIAL_MARKER}{os.getpid()}")


class DiskFullError(OSError):
    """A write ran out of space (errno ENOSPC); the message names the file, its size and the
    free space."""

    def __str__(self) -> str:
        return self.strerror


def payload_nbytes(payload) -> int:
    """The bytes of the tensors in a (nested) payload: about the size of its torch.save file."""
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, dict):
        return sum(payload_nbytes(value) for value in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(payload_nbytes(value) for value in payload)
    return 0


def _out_of_space(error: BaseException, directory: Path, needed: int) -> bool:
    # torch's zip writer loses the errno ("[enforce fail at inline_container.cc] unexpected
    # pos"): fall back to asking the file system whether the payload could have fit.
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(directory).free < needed
    except OSError:
        return False


def atomic_save(payload, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename it to ``path``.

    Interrupted at any moment, it leaves ``path`` as it was; a full disk raises DiskFullError.
    """
    path = Path(path)
    temporary = partial_path(path)
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        needed = payload_nbytes(payload)
        if _out_of_space(error, path.parent, needed):
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(
                errno.ENOSPC, f"the disk holding {path.parent} is full: writing {path.name} "
                f"({needed / 2**20:.1f} MiB) failed with {free / 2**20:.1f} MiB free; what was "
                f"there before is intact. Free some space (or keep fewer checkpoints: "
                f"keep_last_checkpoints) and rerun", str(path)) from error
        raise
    _fsync_directory(path.parent)


# -- the log ----------------------------------------------------------------------------------------

LOGGER_NAME = "fastdino"
REDRAW_SECONDS = 0.2
BAR_WIDTH = 24


class _Console(logging.Handler):
    """``name: message`` lines on stderr (looked up when written, so redirections and pytest's
    capture see them), kept above the status line when stderr is a terminal."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.status = ""

    @staticmethod
    def stream():
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR and process_rank() != 0:
            return
        try:
            prefix = {logging.WARNING: "WARNING: ", logging.ERROR: "error: "}.get(record.levelno, "")
            text = f"{record.name}: {prefix}{record.getMessage()}"
            if record.exc_info and record.levelno >= logging.ERROR:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            stream = self.stream()
            self._erase_status(stream)
            stream.write(text + "\n")
            if self.status:
                stream.write(self.status)
            stream.flush()
        except Exception:
            self.handleError(record)

    def _erase_status(self, stream) -> None:
        if self.status:
            stream.write("\r" + " " * len(self.status) + "\r")

    def show_status(self, text: str) -> None:
        stream = self.stream()
        self._erase_status(stream)
        self.status = text[:200]
        stream.write(self.status)
        stream.flush()

    def end_status(self) -> None:
        if self.status:
            stream = self.stream()
            stream.write("\n")
            stream.flush()
            self.status = ""


def _console() -> _Console:
    root = logging.getLogger(LOGGER_NAME)
    for handler in root.handlers:
        if isinstance(handler, _Console):
            return handler
    handler = _Console()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False  # one copy of each line, even where the root logger has a handler
    return handler


@functools.lru_cache(maxsize=None)
def warn_once(message: str, stacklevel: int = 4) -> None:
    """``warnings.warn(message, RuntimeWarning)`` the first time this message comes up in the
    process: a fallback is said once, not at every call (``stacklevel`` 4 points at the caller
    of the function that called the function that warns)."""
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def get_logger(component: str) -> logging.Logger:
    """``fastdino.<component>``, writing through fastdino's one console handler."""
    _console()
    return logging.getLogger(f"{LOGGER_NAME}.{component}")


def status_line_available() -> bool:
    """A live status line is drawn only on rank 0, and only when stderr is a terminal."""
    return process_rank() == 0 and sys.stderr.isatty()


class ProgressBar:
    """``label |#####.......| done/total rate ETA summary`` as the live status line of a terminal
    (redrawn at most every REDRAW_SECONDS); nothing elsewhere (callers log plain lines there)."""

    def __init__(self, total: int, start: int = 0):
        self.total, self.start = total, start
        self.enabled = status_line_available()
        self.started = time.perf_counter()
        self.last_draw = 0.0

    def update(self, done: int, label: str = "", summary: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or not (force or done == self.total or now - self.last_draw >= REDRAW_SECONDS):
            return
        self.last_draw = now
        fraction = done / self.total if self.total else 1.0
        filled = int(BAR_WIDTH * fraction)
        rate = (done - self.start) / (now - self.started) if done > self.start else 0.0
        eta = str(datetime.timedelta(seconds=round((self.total - done) / rate))) if rate else "?"
        _console().show_status(f"{label} |{'#' * filled}{'.' * (BAR_WIDTH - filled)}| {done}/{self.total} "
                               f"{rate:.2f} it/s ETA {eta} {summary}".strip())

    def close(self) -> None:
        if self.enabled:
            _console().end_status()


TRACK_LINE_SECONDS = 5.0


def track(iterable: Iterable, total: int, description: str, logger: logging.Logger) -> Iterator:
    """The items of ``iterable``, with a progress bar on a terminal, else a line every ~10% but
    at most one per ``TRACK_LINE_SECONDS`` (work that ends sooner prints none)."""
    bar = ProgressBar(total)
    every = max(1, total // 10)
    last_line = started = time.monotonic()
    printed = False
    try:
        for count, item in enumerate(iterable, start=1):
            yield item
            if bar.enabled:
                bar.update(count, description)
            elif (count % every == 0 and time.monotonic() - last_line >= TRACK_LINE_SECONDS) or (
                    count == total and printed):
                logger.info(f"{description}: {count}/{total} ({time.monotonic() - started:.0f} s)")
                last_line, printed = time.monotonic(), True
    finally:
        bar.close()
