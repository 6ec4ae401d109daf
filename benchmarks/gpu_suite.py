"""The GPU suite's machinery (benchmarks/bench_gpu.py): figures, the device timer, the run's
state, its guarded sections and its report (through run.py's ``run_case``, ``case_report`` and
``write_report``)."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from measure import Case, Measurement, device_name, machine, time_function, versions

TIME_BUDGET_S = 450.0  # the H200 run must end within 8 minutes, compilation included
NOT_MEASURED = "not measured: no GPU"
# States of a figure that are no measurement (anything else that is not a number is a failure).
NO_MEASUREMENT = (NOT_MEASURED, "unavailable", "skipped")
# Spin the GPU this long (in clock cycles, ~1 ms on an H200) before each timed call, so that
# the call is queued while the GPU is busy and the events time the GPU, not the launches.
QUEUE_AHEAD_CYCLES = 2_000_000
REPOSITORY = Path(__file__).resolve().parents[1]


def failure(error: BaseException) -> str:
    """'failed: <type>: <first line>' for the report."""
    lines = str(error).strip().splitlines() or [""]
    return f"failed: {type(error).__name__}: {lines[0]}"[:300]


@dataclass
class Figure:
    """One reported value: a number, a string (a version, a backend), or why it is missing.

    ``gpu``: a figure of the GPU, which reads NOT_MEASURED on a machine without one. A target is
    ``at_least`` or ``at_most``; its status is "met" or "missed" (a failure counts as missed).
    """

    section: str
    name: str
    value: object
    unit: str = ""
    at_least: float | None = None
    at_most: float | None = None
    gpu: bool = True

    @property
    def has_target(self) -> bool:
        return self.at_least is not None or self.at_most is not None

    @property
    def status(self) -> str:
        if not self.has_target:
            return ""
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            return self.value if str(self.value).startswith(NO_MEASUREMENT) else "missed"
        if self.at_least is not None and not self.value >= self.at_least:
            return "missed"
        if self.at_most is not None and not self.value <= self.at_most:
            return "missed"
        return "met"

    def value_text(self) -> str:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            return str(self.value)
        if self.unit == "%":
            return f"{self.value:.1%}"
        return f"{self.value:.4g}" + (f" {self.unit}" if self.unit else "")

    def target_text(self) -> str:
        if not self.has_target:
            return ""
        sign, bound = (">=", self.at_least) if self.at_least is not None else ("<=", self.at_most)
        return f"{sign} {bound:.0%}" if self.unit == "%" else f"{sign} {bound:g}"

    def row(self) -> dict:
        return {**dataclasses.asdict(self), "status": self.status}


def time_on_device(fn, device: torch.device, *, setup=None, warmup: int = 2, repeats: int = 10):
    """``measure.time_function``'s contract, timed by CUDA events around each call on a GPU.

    The GPU spins (QUEUE_AHEAD_CYCLES) while each call is queued, so that the events time the
    work rather than the launch latency; host waits inside the call (``.item()``) still count.
    """
    if device.type != "cuda":
        return time_function(fn, device, setup=setup, warmup=warmup, repeats=repeats)
    torch.cuda.reset_peak_memory_stats(device)
    events = []
    for iteration in range(warmup + repeats):
        state = setup() if setup is not None else None
        torch.cuda.synchronize(device)
        torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        if iteration >= warmup:
            events.append((start, end))
        del state
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events], torch.cuda.max_memory_allocated(device)


class SuiteRun:
    """The state of one run: figures, timed cases and section statuses, and the report writer."""

    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.quick = args.quick
        self.compile = not args.no_compile
        # inductor on the GPU; on the CPU dynamo's tracing alone (code generation takes minutes there)
        self.compile_backend = "inductor" if self.on_gpu else "eager"
        self.started = time.perf_counter()
        self.deadline = self.started + args.time_budget
        self.peaks = {"copy_bandwidth": None, "flops": None}  # set by the environment section
        self.section = ""
        self.sections: dict[str, dict] = {}
        self.figures: list[Figure] = []
        self.rows: list[dict] = []
        self.tables: dict[str, list[str]] = {}
        self.measured_cases: list[tuple[Case, dict[str, Measurement]]] = []
        self._scratch = tempfile.TemporaryDirectory(prefix="fastdino-gpu-suite-")
        self._photo_folders: dict[tuple, Path] = {}

    # -- recording -----------------------------------------------------------------------------

    def figure(self, name: str, value, unit: str = "", *, at_least=None, at_most=None, gpu: bool = True):
        if gpu and not self.on_gpu:
            value = NOT_MEASURED
        elif isinstance(value, torch.Tensor):
            value = value.item()
        self.figures.append(Figure(self.section, name, value, unit, at_least, at_most, gpu))

    def unavailable(self, name: str, why: str) -> None:
        """A GPU figure that cannot be measured here (a missing package, a CPU without the op)."""
        self.figure(name, f"unavailable: {why}")

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, seconds: float, what: str) -> bool:
        """Whether about ``seconds`` more fit in the time budget; if not, ``what`` is reported skipped."""
        if self.seconds_left() >= seconds:
            return True
        self.figure(what, f"skipped: {self.seconds_left():.0f} s of the time budget left, needs about "
                          f"{seconds:.0f} s", gpu=False)
        return False

    def provider(self, name: str, build):
        """``build()`` (a Provider), or None with the failure reported under ``name``."""
        try:
            return build()
        except Exception as error:
            traceback.print_exc()
            self.figure(name, failure(error), gpu=False)
            return None

    def measure(self, case: Case, warmup: int = 2, timer=time_on_device):
        """Time each provider of ``case`` on its own (a failing one is reported, the others still
        run) with run.py's ``run_case``; the case's table and rows join the report.
        Returns ({provider: Measurement}, {provider: derived metrics})."""
        import run

        if self.peaks["copy_bandwidth"] is None:
            case = dataclasses.replace(case, bytes_moved=None)  # no roofline without the environment
        timer = functools.partial(timer, warmup=warmup)
        results = {}
        for provider in case.providers:
            try:
                results.update(run.run_case(dataclasses.replace(case, providers=[provider]), self.device, timer))
            except Exception as error:
                print(failure(error), flush=True)
                traceback.print_exc()
                self.figure(f"{case.name} / {provider.name}", failure(error), gpu=False)
        if not results:
            return {}, {}
        case = dataclasses.replace(case, providers=[p for p in case.providers if p.name in results],
                                   baselines=[b for b in case.baselines if b in results])
        rows, lines, _, metrics = run.case_report(case, results, self.peaks)
        self.rows += [{**row, "section": self.section} for row in rows]
        self.tables.setdefault(self.section, []).extend(lines)
        self.measured_cases.append((case, results))
        self.write(final=False)  # a run stopped in the middle of a section keeps its finished cases
        return results, metrics

    def photo_folder(self, n_images: int, image_size: tuple[int, int]) -> Path:
        """JPEGs of real photographs, written once per run (the data and train sections share them)."""
        from fastdino.data import write_sample_photo_folder

        key = (n_images, image_size)
        if key not in self._photo_folders:
            path = Path(self._scratch.name) / f"photos-{n_images}-{image_size[0]}x{image_size[1]}"
            self._photo_folders[key] = write_sample_photo_folder(path, n_images=n_images, image_size=image_size)
        return self._photo_folders[key]

    # -- sections and the report -----------------------------------------------------------------

    def run_section(self, name: str, section) -> None:
        self.section = name
        started = time.perf_counter()
        print(f"\n== {name} ({self.seconds_left():.0f} s of the time budget left)", flush=True)
        try:
            section(self)
            status = "ok"
        except Exception as error:
            traceback.print_exc()
            status = failure(error)
        self.sections[name] = {"status": status, "seconds": round(time.perf_counter() - started, 1)}
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()
        self.write(final=False)

    def title(self) -> str:
        return (f"# fastdino GPU suite: {device_name(self.device)}, {datetime.date.today().isoformat()}"
                f"{' (--quick)' if self.quick else ''}")

    def payload(self, final: bool) -> dict:
        return {"suite": "gpu", "complete": final, "machine": machine(), "device": device_name(self.device),
                "on_gpu": self.on_gpu, "quick": self.quick, "time_budget_s": self.args.time_budget,
                "elapsed_s": round(time.perf_counter() - self.started, 1), "peaks": self.peaks,
                "sections": self.sections, "figures": [figure.row() for figure in self.figures],
                "targets": [figure.row() for figure in self.figures if figure.has_target], "rows": self.rows}

    def markdown(self, final: bool) -> str:
        lines = [self.title(), ""]
        if not self.on_gpu:
            lines += [f"No GPU here: every section ran at tiny sizes on the CPU (the Triton interpreter, "
                      f"DALI's CPU operators, SDPA), its timings are the CPU's, and every GPU figure reads "
                      f"\"{NOT_MEASURED}\".", ""]
        sections = dict(self.sections)
        if not final:
            lines += [f"**Partial report**: the run had got to section \"{self.section}\".", ""]
            sections.setdefault(self.section, {"status": "running when this report was written", "seconds": ""})
        lines += [f"torch {torch.__version__}, fastdino {versions()['fastdino']}; "
                  f"{time.perf_counter() - self.started:.0f} s of a {self.args.time_budget:.0f} s budget.", "",
                  "| section | status | seconds |", "|---|---|---|"]
        lines += [f"| {name} | {_cell(state['status'])} | {state['seconds']} |" for name, state in sections.items()]
        for section in sections:
            lines += ["", f"## {section}", ""]
            figures = [figure for figure in self.figures if figure.section == section]
            if figures:
                lines += ["| figure | value | target | status |", "|---|---|---|---|"]
                lines += [f"| {_cell(f.name)} | {_cell(f.value_text())} | {f.target_text()} | {_cell(f.status)} |"
                          for f in figures]
                lines.append("")
            lines += self.tables.get(section, [])
        targets = [figure for figure in self.figures if figure.has_target]
        if targets:
            lines += ["", "## Targets", "", "| section | figure | target | value | status |", "|---|---|---|---|---|"]
            lines += [f"| {f.section} | {_cell(f.name)} | {f.target_text()} | {_cell(f.value_text())} | "
                      f"{_cell(f.status)} |" for f in targets]
        return "\n".join(lines)

    def write(self, final: bool) -> str:
        import run

        report = self.markdown(final)
        run.write_report(self.args.out, self.payload(final), report, self.measured_cases, self.title(), plot=final)
        return report

    def close(self) -> None:
        self._scratch.cleanup()


def _cell(text) -> str:
    """``text`` as one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
