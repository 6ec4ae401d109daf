"""fastdino throughput report: each fastdino path beside what a user would otherwise run.

    python benchmarks/run.py                  # every suite, full sizes
    python benchmarks/run.py --quick          # about a minute: smaller sizes, fewer repeats
    python benchmarks/run.py --suite ops --out bench-out --check-targets
    python benchmarks/run.py --suite gpu      # the GPU machine's one command (benchmarks/GPU.md)

Writes ``results.json`` (one row per measurement), ``results.md`` (tables with speedups and the
targets) and ``results.png`` (speedups per case, as bars) to ``--out`` and prints the Markdown. Timings are medians of repeated runs after
warm-up, with p20/p80; a wide p20-p80 spread is flagged as noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton reads this when it is imported (fastdino.models imports it, through torch._dynamo):
    # without a GPU, the "triton" backend then runs on CPU tensors in its interpreter (the gpu
    # suite's CPU run). The other suites run the "cpp" backend on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bench_clip_grad  # noqa: E402  (after TRITON_INTERPRET)
import bench_data  # noqa: E402
import bench_dino_loss  # noqa: E402
import bench_dinov2_losses  # noqa: E402
import bench_ema  # noqa: E402
import bench_gpu  # noqa: E402
import bench_models  # noqa: E402
import bench_train  # noqa: E402
from fastdino.ops import backend_status  # noqa: E402
from measure import Measurement, copy_bandwidth, device_name, machine, peak_flops, time_function, versions  # noqa: E402
from plot import plot_report  # noqa: E402

SUITES = {"ops": (bench_dino_loss, bench_dinov2_losses, bench_ema, bench_clip_grad), "models": (bench_models,), "data": (bench_data,), "train": (bench_train,)}
NOISY_SPREAD = 0.2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES) + ["gpu", "all"], default="all",
                        help="all: every suite but gpu, which is a run of its own (benchmarks/GPU.md)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (~1 min)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default: bench-out)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile baseline (compiling takes a minute or more on a CPU)")
    parser.add_argument("--check-targets", action="store_true", help="exit with status 1 if a target is missed")
    parser.add_argument("--time-budget", type=float, default=bench_gpu.TIME_BUDGET_S,
                        help="gpu suite: seconds for the whole run; costly steps that no longer fit are skipped")
    return parser.parse_args(argv)


def build_cases(module, device, args):
    if module in (bench_dino_loss, bench_dinov2_losses):
        return module.cases(device, args.quick, compile_baseline=not args.no_compile)
    return module.cases(device, args.quick)


def run_case(case, device, timer=time_function):
    """Time every provider of ``case`` with ``timer`` (``time_function``'s signature)."""
    results = {}
    for provider in case.providers:
        print(f"[{case.suite}] {case.name} / {provider.name} ...", end=" ", flush=True)
        times, peak = timer(provider.fn, device, setup=provider.setup, repeats=case.repeats)
        results[provider.name] = Measurement(
            suite=case.suite, case=case.name, provider=provider.name, device=device_name(device),
            dtype=case.dtype, sizes=case.sizes, times_ms=times, peak_memory_bytes=peak,
        )
        noisy = " (noisy)" if results[provider.name].spread > NOISY_SPREAD else ""
        print(f"{results[provider.name].median:.2f} ms{noisy}", flush=True)
    return results


def speedup(results, provider, baseline):
    return results[baseline].median / results[provider].median


def derived_metrics(case, measurement, peaks) -> dict:
    """Throughput figures of one measurement: img/s, GB/s and the fraction of the measured copy
    bandwidth (ops that declare the bytes they must move), MFU (cases that declare their FLOPs,
    on devices with a known peak)."""
    seconds = measurement.median / 1e3
    metrics = {}
    if case.items_per_run:
        metrics["images_per_s"] = case.items_per_run / seconds
    if case.bytes_moved:
        metrics["gbytes_per_s"] = case.bytes_moved / seconds / 1e9
        metrics["copy_bandwidth_fraction"] = case.bytes_moved / seconds / peaks["copy_bandwidth"]
    if case.flops_per_run and peaks["flops"]:
        metrics["mfu"] = case.flops_per_run / seconds / peaks["flops"]
    return metrics


METRIC_COLUMNS = {"images_per_s": ("img/s", "{:.1f}"), "gbytes_per_s": ("GB/s", "{:.1f}"),
                  "copy_bandwidth_fraction": ("% of copy BW", "{:.0%}"), "mfu": ("MFU", "{:.1%}")}


def case_markdown(case, results, metrics):
    sizes = ", ".join(f"{key}={value}" for key, value in case.sizes.items())
    columns = [key for key in METRIC_COLUMNS if any(key in m for m in metrics.values())]
    header = ["provider", "median ms", "p20 ms", "p80 ms"] + [METRIC_COLUMNS[key][0] for key in columns]
    header += [f"x vs {baseline}" for baseline in case.baselines]
    lines = [f"### {case.name} ({case.dtype}, {sizes})", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for name, measurement in results.items():
        cells = [name + (" (noisy)" if measurement.spread > NOISY_SPREAD else ""),
                 f"{measurement.median:.2f}", f"{measurement.percentile(0.2):.2f}", f"{measurement.percentile(0.8):.2f}"]
        cells += [METRIC_COLUMNS[key][1].format(metrics[name][key]) if key in metrics[name] else "-" for key in columns]
        cells += [f"{speedup(results, name, baseline):.2f}" for baseline in case.baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def case_report(case, results, peaks):
    """A measured case as the report holds it: (JSON rows, Markdown lines, target rows, each
    provider's derived metrics)."""
    metrics = {name: derived_metrics(case, m, peaks) for name, m in results.items()}
    rows = [{**measurement.row(), **metrics[name]} for name, measurement in results.items()]
    targets = []
    for target in case.targets:
        measured = speedup(results, target.provider, target.baseline)
        targets.append({"case": case.name, **vars(target), "measured": measured, "met": measured >= target.min_speedup})
    return rows, case_markdown(case, results, metrics) + [""], targets, metrics


def write_report(out: Path, payload: dict, report: str, measured_cases, title: str, plot: bool = True):
    """results.json (``payload``), results.md (``report``) and, with ``plot``, results.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "results.md").write_text(report + "\n")
    if plot:
        plot_report(measured_cases, title.lstrip("# "), out / "results.png")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.suite == "gpu":
        return bench_gpu.main(args, device)
    suites = sorted(SUITES) if args.suite == "all" else [args.suite]
    print(f"fastdino benchmarks on {device_name(device)}; backends: "
          + ", ".join(f"{k}={'yes' if v == 'available' else 'no'}" for k, v in backend_status().items()))
    peaks = {"copy_bandwidth": copy_bandwidth(device), "flops": peak_flops(device)}
    print(f"measured copy bandwidth {peaks['copy_bandwidth'] / 1e9:.1f} GB/s; peak FLOP/s "
          + (f"{peaks['flops'] / 1e12:.0f} TFLOP/s" if peaks["flops"] else "unknown here (no MFU)"))
    rows, markdown, target_rows, missed, measured_cases = [], [], [], [], []
    for suite in suites:
        markdown += [f"## Suite: {suite}", ""]
        for module in SUITES[suite]:
            for case in build_cases(module, device, args):
                results = run_case(case, device)
                measured_cases.append((case, results))
                case_rows, case_lines, case_targets, _ = case_report(case, results, peaks)
                rows += case_rows
                markdown += case_lines
                target_rows += case_targets
                missed += [target for target in case_targets if not target["met"]]
    if target_rows:
        markdown += ["## Targets", "", "| case | provider | vs | target | measured | met |", "|---|---|---|---|---|---|"]
        markdown += [f"| {t['case']} | {t['provider']} | {t['baseline']} | >= {t['min_speedup']}x | "
                     f"{t['measured']:.2f}x | {'yes' if t['met'] else 'NO'} |" for t in target_rows]
    title = (f"# fastdino benchmarks: {device_name(device)}, {datetime.date.today().isoformat()}"
             f"{' (--quick)' if args.quick else ''}")
    peak_line = (f"Measured copy bandwidth {peaks['copy_bandwidth'] / 1e9:.1f} GB/s (the ops' roofline); peak "
                 + (f"{peaks['flops'] / 1e12:.0f} TFLOP/s (MFU)" if peaks["flops"] else "FLOP/s unknown (no MFU)"))
    report = "\n".join([title, "", f"torch {torch.__version__}, fastdino {versions()['fastdino']}. {peak_line}.", ""]
                       + markdown)

    write_report(args.out, {"machine": machine(), "quick": args.quick, "peaks": peaks, "rows": rows,
                            "targets": target_rows}, report, measured_cases, title)
    print("\n" + report)
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'results.md'} and {args.out / 'results.png'}")
    if args.check_targets and missed:
        print(f"{len(missed)} target(s) missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("run", sys.modules[__name__])  # the suites' `import run` is this module
    sys.exit(main())
