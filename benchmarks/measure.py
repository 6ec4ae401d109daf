"""Timing harness shared by the benchmark suites: warm-up, repeats, percentiles, peak memory."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

import fastdino


@dataclass
class Measurement:
    suite: str
    case: str
    provider: str
    device: str
    dtype: str
    sizes: dict
    times_ms: list[float] = field(repr=False)
    peak_memory_bytes: int | None = None
    unit: str = "ms"

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: above ~0.2 the machine was noisy during this measurement."""
        return (self.percentile(0.8) - self.percentile(0.2)) / self.median

    def row(self) -> dict:
        row = asdict(self)
        row.update(median=self.median, p20=self.percentile(0.2), p80=self.percentile(0.8),
                   versions=versions(), date=datetime.date.today().isoformat())
        return row


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_function(fn, device: torch.device, *, setup=None, warmup: int = 2, repeats: int = 10):
    """Run ``setup()`` (untimed) then ``fn(setup_result)`` (timed) ``warmup + repeats`` times.

    Returns (times in ms of the timed runs, peak CUDA memory in bytes or None on the CPU, where
    the allocator does not track peaks).
    """
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for iteration in range(warmup + repeats):
        state = setup() if setup is not None else None
        synchronize(device)
        start = time.perf_counter()
        fn(state)
        synchronize(device)
        if iteration >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        del state
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return times, peak


# Dense bfloat16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched in order
# against torch.cuda.get_device_name(); FASTDINO_PEAK_TFLOPS overrides for other devices.
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12))


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s for the benchmark's dtype, or None where unknown (the CPU)."""
    if os.environ.get("FASTDINO_PEAK_TFLOPS"):
        return float(os.environ["FASTDINO_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Measured bytes/s of a large tensor copy (read + write): the memory roofline the ops are
    held against (a practical peak, below the data sheet's)."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    times, _ = time_function(lambda _: target.copy_(source), device, warmup=2, repeats=5)
    return 2 * source.numel() * 4 / (sorted(times)[len(times) // 2] / 1e3)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    return {"fastdino": fastdino.__version__, "torch": torch.__version__, "python": platform.python_version()}


def machine() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


@dataclass
class Provider:
    """One implementation of a case: ``fn(setup())`` is timed, ``setup()`` is not."""

    name: str
    fn: object
    setup: object = None


@dataclass
class Target:
    """A speed target: ``provider`` must be at least ``min_speedup`` x faster than ``baseline``."""

    provider: str
    baseline: str
    min_speedup: float


@dataclass
class Case:
    suite: str
    name: str
    dtype: str
    sizes: dict
    providers: list[Provider]
    baselines: list[str]  # providers that speedups are reported against
    targets: list[Target] = field(default_factory=list)
    bytes_moved: int | None = None  # the fewest bytes the op must move (for GB/s)
    items_per_run: int | None = None  # images one timed run processes (for img/s)
    flops_per_run: int | None = None  # model FLOPs of one timed run (for MFU on GPUs)
    repeats: int = 10


def fastdino_backend(device: torch.device) -> str:
    """The fused backend the benchmarks run: FASTDINO_BACKEND if set, else the device's own."""
    return os.environ.get("FASTDINO_BACKEND") or ("triton" if device.type == "cuda" else "cpp")
