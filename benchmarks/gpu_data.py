"""GPU suite sections "data" and "gpu tests" (benchmarks/bench_gpu.py).

data: fastdino's DALI pipeline with GPU ("mixed") decoding and augmentations against the same
pipeline on DALI's CPU operators, on the same photographs with the same augmentation draws (a
batch depends only on its seed and position): their difference, img/s of 2 x 224 + 10 x 96
crops at batch 64, and the host's milliseconds per batch (the main thread's CPU time: drawing
the crops, reading the files, feeding DALI).

gpu tests: pytest on the tests of the Triton kernels, xformers and the DALI GPU pipeline
(selected by keyword), compiled: in a subprocess without TRITON_INTERPRET. Pass/fail counts and
the failing tests; the whole log goes next to the report (gpu-tests.log).
"""

from __future__ import annotations

import collections
import gc
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from fastdino.data import build_multicrop_loader, dali_available
from gpu_models import _photo_sizes, train_config
from gpu_suite import REPOSITORY
from measure import Case, Provider, time_function

DATA_TARGET = 3000.0  # img/s per GPU
# nvJPEG and libjpeg-turbo may differ by a level here and there (tests/test_data_loader.py's bound)
DECODER_DIFFERENCE = 0.02
GPU_TEST_SELECTION = "(triton or kernel or xformers or dali or gpu or cuda) and not benchmark"
GPU_TEST_WORKERS = 8  # pytest-xdist processes where it is installed: the tests mostly compile
GPU_TESTS_MIN_S = 60
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
# What the tests must not inherit: the interpreter would run instead of the compiled kernels,
# and the overrides would redirect the backends they choose.
TEST_ENVIRONMENT_DROPPED = ("TRITON_INTERPRET", "FASTDINO_BACKEND", "FASTDINO_ATTENTION", "FASTDINO_DATA_BACKEND")


def data(run) -> None:
    if not dali_available():
        from fastdino.data.dali_pipeline import import_dali

        try:
            import_dali()
        except ImportError as error:
            run.unavailable("DALI", str(error))
            return
    config = train_config(run, "vit_small_p8")
    batch, threads = config.batch_size_per_gpu, len(os.sched_getaffinity(0))
    batches_per_run = (2 if run.quick else 4) if run.on_gpu else 1
    photos = run.photo_folder(*_photo_sizes(run))

    def batches(device):
        loader = build_multicrop_loader(photos, batch, n_local_crops=config.n_local_crops, backend="dali",
                                        device=device, dtype=torch.float32, num_threads=threads,
                                        recipe=config.multicrop_recipe(), seed=config.seed, verbose=False)
        return (crops for _, (crops,) in loader.steps())  # endless, across epochs

    devices = {}
    if run.on_gpu:
        devices["DALI mixed (GPU)"] = run.device
    else:
        run.unavailable("DALI mixed (GPU)", "needs a GPU")
    devices["DALI CPU operators"] = torch.device("cpu")
    streams = {name: batches(device) for name, device in devices.items()}
    first = {name: next(stream) for name, stream in streams.items()}  # the same draws: the same batch
    if len(first) == 2:
        difference = max(float((gpu.cpu() - cpu).abs().mean()) for gpu, cpu in zip(*first.values()))
        run.figure("DALI mixed vs CPU operators: mean |difference| of the first batch", difference,
                   at_most=DECODER_DIFFERENCE)
    del first

    host_ms = collections.defaultdict(list)

    def provider(name):
        def next_batches(_):
            others = [other for other in streams if other != name]
            if others:  # only the timed pipeline runs: another's threads would refill its queue meanwhile
                for other in others:
                    del streams[other]
                gc.collect()
            if name not in streams:
                streams[name] = batches(devices[name])
            for _ in range(batches_per_run):
                started = time.thread_time()
                crops = next(streams[name])
                host_ms[name].append((time.thread_time() - started) * 1e3)
            if crops[0].is_cuda:
                torch.cuda.current_stream().synchronize()
        return Provider(name, next_batches)

    results, metrics = run.measure(Case(
        suite=run.section, name="multi-crop loading, DALI", dtype="float32",
        sizes={"batch": batch, "crops": f"2x{config.global_crop_size}+{config.n_local_crops}x{config.local_crop_size}",
               "images": f"{_photo_sizes(run)[1][0]}x{_photo_sizes(run)[1][1]} JPEG photos", "cpu_threads": threads},
        providers=[provider(name) for name in devices], baselines=["DALI CPU operators"],
        items_per_run=batch * batches_per_run, repeats=(3 if run.quick else 5) if run.on_gpu else 1),
        warmup=1, timer=time_function)  # the host drives the pipeline: its clock, synchronized
    for name in results:
        target = DATA_TARGET if name == "DALI mixed (GPU)" else None
        run.figure(f"{name}: img/s", metrics[name]["images_per_s"], "img/s", at_least=target)
        run.figure(f"{name}: host ms per batch", statistics.median(host_ms[name]), "ms")


def gpu_tests(run) -> None:
    counts, failing, how = dict.fromkeys(OUTCOMES), [], None  # no GPU: every figure not measured
    if run.on_gpu:
        if not run.fits(GPU_TESTS_MIN_S + 15, "GPU tests"):
            return
        counts, failing, how = _run_gpu_tests(run)
    run.figure("GPU tests run", how)
    for outcome in OUTCOMES:
        # at least one passed: a run that selected or collected nothing is no success
        run.figure(f"GPU tests {outcome}", counts[outcome], at_least=1 if outcome == "passed" else None,
                   at_most=0 if outcome in ("failed", "error") else None)
    run.figure("GPU tests failing", ", ".join(failing[:10]) + (" ..." if len(failing) > 10 else "") or "none")


def _run_gpu_tests(run) -> tuple[dict[str, int], list[str], str]:
    environment = {key: value for key, value in os.environ.items() if key not in TEST_ENVIRONMENT_DROPPED}
    command = [sys.executable, "-m", "pytest", "tests", "-v", "-rfE", "-p", "no:cacheprovider", "-k", GPU_TEST_SELECTION]
    if importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(GPU_TEST_WORKERS)]
    timeout = run.seconds_left() - 15  # what is left of the budget, less the report's writing
    try:
        completed = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True,
                                   timeout=timeout)
        output, how = completed.stdout + completed.stderr, f"finished, exit status {completed.returncode}"
    except subprocess.TimeoutExpired as expired:
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                         for part in (expired.stdout or "", expired.stderr or ""))
        how = f"stopped after {timeout:.0f} s (the time budget): counts so far"
    run.args.out.mkdir(parents=True, exist_ok=True)
    (run.args.out / "gpu-tests.log").write_text(" ".join(command) + "\n\n" + output)
    return (*pytest_outcomes(output), how)


# "tests/x.py::test PASSED", or with pytest-xdist "[gw0] [ 10%] PASSED tests/x.py::test"
_TEST_LINE = re.compile(r"^(?:(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
                        r"|\[gw\d+\]\s+\[\s*\d+%\]\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+))",
                        re.MULTILINE)
# -rfE's short summary: "FAILED tests/x.py::test - why", "ERROR tests/x.py - why" (collection)
_SHORT_SUMMARY = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
_SUMMARY = re.compile(r"^=+ (.*\d+ \w+.*) in [\d.]+s", re.MULTILINE)
_SUMMARY_NAMES = {"passed": "passed", "failed": "failed", "error": "error", "errors": "error", "skipped": "skipped",
                  "xfailed": "xfailed", "xpassed": "xpassed"}
_LINE_NAMES = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped", "XFAIL": "xfailed",
               "XPASS": "xpassed"}


def pytest_outcomes(output: str) -> tuple[dict[str, int], list[str]]:
    """({outcome: count}, failing test ids) from ``pytest -v`` output; the final summary line's
    counts where pytest got that far, else the per-test lines (a run stopped by the budget)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    failing = []
    for test, outcome, xdist_outcome, xdist_test in _TEST_LINE.findall(output):
        test, outcome = test or xdist_test, outcome or xdist_outcome
        counts[_LINE_NAMES[outcome]] += 1
        if outcome in ("FAILED", "ERROR"):
            failing.append(test)
    failing += _SHORT_SUMMARY.findall(output)
    summaries = _SUMMARY.findall(output)
    if summaries:
        counts = dict.fromkeys(OUTCOMES, 0)
        for number, name in re.findall(r"(\d+) (\w+)", summaries[-1]):
            if name in _SUMMARY_NAMES:
                counts[_SUMMARY_NAMES[name]] += int(number)
    return counts, list(dict.fromkeys(failing))
