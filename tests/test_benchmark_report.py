"""benchmarks/run.py end to end: the ops suite at --quick sizes writes valid JSON, Markdown and PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def test_quick_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    completed = subprocess.run(
        [sys.executable, str(REPOSITORY / "benchmarks" / "run.py"), "--suite", "ops", "--quick", "--no-compile",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["quick"] is True and report["machine"]["cpu_count"] >= 1
    rows = report["rows"]
    assert {row["case"] for row in rows} >= {"dino_loss fwd+bwd", "teacher EMA", "per-parameter grad clipping"}
    for row in rows:
        assert row["suite"] == "ops" and row["unit"] == "ms" and row["device"]
        assert 0 < row["p20"] <= row["median"] <= row["p80"]
        assert row["versions"]["torch"] and row["date"]
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("# fastdino benchmarks:") and "## Targets" in markdown
    png = (tmp_path / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
