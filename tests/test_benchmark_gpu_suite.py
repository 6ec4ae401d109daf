"""benchmarks/run.py --suite gpu without a GPU: every section runs at tiny sizes on the CPU, every
GPU figure reads "not measured: no GPU", and a section that fails keeps what it recorded and
hides none of the sections after it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SECTIONS = ["environment", "kernels", "attention", "data", "train", "gpu tests"]
NOT_MEASURED = "not measured: no GPU"
# Sections that time something on the CPU too (rows in results.json)
TIMED_SECTIONS = {"kernels", "attention", "data", "train"}

# The attention section runs, then raises: its figures must stay, the sections after it must run.
RUN_WITH_A_FAILING_SECTION = """
import sys
sys.path.insert(0, {benchmarks!r})
import run  # first: it sets TRITON_INTERPRET before triton is imported
import bench_gpu

real_attention = dict(bench_gpu.SECTIONS)["attention"]

def attention_then_failure(suite):
    real_attention(suite)
    raise RuntimeError("deliberate failure after the section's figures")

bench_gpu.SECTIONS = tuple((name, attention_then_failure if name == "attention" else section)
                           for name, section in bench_gpu.SECTIONS)
sys.exit(run.main(["--suite", "gpu", "--device", "cpu", "--out", {out!r}]))
"""


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    pytest.importorskip("matplotlib")
    pytest.importorskip("skimage")  # the data and train sections read sample photographs
    out = tmp_path_factory.mktemp("gpu-suite")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("FASTDINO_BACKEND", "FASTDINO_ATTENTION", "FASTDINO_DATA_BACKEND")}
    environment.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")  # the CPU variant, GPU or not
    script = RUN_WITH_A_FAILING_SECTION.format(benchmarks=str(REPOSITORY / "benchmarks"), out=str(out))
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                               env=environment, cwd=REPOSITORY)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


def test_every_section_ran_and_the_failure_hid_nothing(cpu_report):
    _, report = cpu_report
    assert report["complete"] is True and report["on_gpu"] is False
    assert list(report["sections"]) == SECTIONS
    statuses = {name: section["status"] for name, section in report["sections"].items()}
    assert statuses.pop("attention").startswith("failed: RuntimeError: deliberate failure")
    assert set(statuses.values()) == {"ok"}, statuses
    figures = report["figures"]
    assert {figure["section"] for figure in figures} == set(SECTIONS)  # the failed section's figures too
    assert {row["section"] for row in report["rows"]} == TIMED_SECTIONS
    # Nothing else failed: no provider or step reported a failure on the CPU.
    failures = [figure for figure in figures if str(figure["value"]).startswith("failed")]
    assert not failures, failures


def test_every_gpu_figure_reads_not_measured(cpu_report):
    _, report = cpu_report
    figures = report["figures"]
    gpu_figures = [figure for figure in figures if figure["gpu"]]
    assert {figure["section"] for figure in gpu_figures} == set(SECTIONS)
    assert all(figure["value"] == NOT_MEASURED for figure in gpu_figures), \
        [figure for figure in gpu_figures if figure["value"] != NOT_MEASURED]
    # The targets of GPU figures are neither met nor missed; those of the accuracy checks, which
    # run on the CPU too (the Triton interpreter, FlexAttention's forward), are met.
    for target in report["targets"]:
        assert target["status"] == (NOT_MEASURED if target["gpu"] else "met"), target
    assert any(not target["gpu"] for target in report["targets"])


def test_report_files(cpu_report):
    out, report = cpu_report
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# fastdino GPU suite:") and NOT_MEASURED in markdown
    for section in SECTIONS:
        assert f"\n## {section}\n" in markdown
    assert "## Targets" in markdown
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    for row in report["rows"]:
        assert 0 < row["p20"] <= row["median"] <= row["p80"] and row["device"]
