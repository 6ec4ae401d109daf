"""fastdino.runtime: the one log (its lines, ranks and the status line), the device choice, and
atomic saves."""

import io
import logging

import pytest
import torch

import fastdino.runtime as runtime
from fastdino.runtime import ProgressBar, atomic_save, get_logger, select_device, track


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def stderr(capsys, monkeypatch):
    """What the log wrote to stderr (pytest's capture of it), as a process on its own."""
    monkeypatch.delenv("RANK", raising=False)
    return lambda: capsys.readouterr().err


def test_lines_name_their_component_and_level(stderr):
    logger = get_logger("train")
    logger.info("checkpoint x")
    logger.warning("cannot read y")
    logger.error("no such file z")
    logger.debug("not shown")
    assert stderr().splitlines() == [
        "fastdino.train: checkpoint x", "fastdino.train: WARNING: cannot read y", "fastdino.train: error: no such file z"]
    assert not logging.getLogger("fastdino").propagate  # one copy, whatever the root logger has


def test_only_rank_0_reports_but_every_rank_reports_errors(stderr, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    get_logger("data").info("dali-cpu backend")
    get_logger("data").warning("skipped 2 bad files")
    get_logger("data").error("rank 3 cannot see /shared/x")
    assert stderr() == "fastdino.data: error: rank 3 cannot see /shared/x\n"


def test_messages_print_above_the_status_line_of_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.delenv("RANK", raising=False)
    bar = ProgressBar(10)
    bar.update(4, "epoch 0", force=True)
    status = terminal.getvalue()
    assert status.startswith("epoch 0 |#########...............| 4/10 ")
    get_logger("train").info("checkpoint x")
    after = terminal.getvalue()[len(status):]
    # erase the bar, print the line, draw the bar again below it
    assert after == "\r" + " " * len(status) + "\r" + "fastdino.train: checkpoint x\n" + status
    bar.close()
    assert terminal.getvalue().endswith(status + "\n")


def test_track_logs_a_line_every_tenth_off_a_terminal_but_not_more_often_than_every_few_seconds(
        stderr, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])

    def two_seconds_each(count):
        for item in range(count):
            now[0] = 2.0 * (item + 1)
            yield item

    assert list(track(two_seconds_each(20), 20, "train features", get_logger("eval"))) == list(range(20))
    lines = stderr().splitlines()
    # a tenth is 2 items (4 s): a line at every other tenth, 5 s or more after the last one
    assert lines == [f"fastdino.eval: train features: {count}/20 ({2 * count} s)" for count in (4, 8, 12, 16, 20)]

    now[0] = 0.0
    assert list(track(range(20), 20, "quick work", get_logger("eval"))) == list(range(20))
    assert "quick work" not in stderr()  # ended within a few seconds: no lines


def test_select_device_names_the_device_and_what_is_wrong():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda': no CUDA device is available"):
            select_device("cuda")


def test_atomic_save_leaves_no_partial_file(tmp_path):
    atomic_save({"x": torch.arange(3)}, tmp_path / "a.pt")
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["x"], torch.arange(3))
    assert [path.name for path in tmp_path.iterdir()] == ["a.pt"]
