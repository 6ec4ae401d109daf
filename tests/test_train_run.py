"""fastdino.train end to end on generated images: two gloo processes, kill-and-resume, a torchrun
rendezvous of two "nodes", and a NaN loss stopping the run with its last good checkpoint kept.

Every process runs one thread (OMP_NUM_THREADS=1): on a shared 2-core machine two-thread
OpenMP regions mostly wait for each other.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
import fastdino.train.step as step_module
from fastdino.data import write_synthetic_image_folder
from fastdino.models import read_checkpoint
from fastdino.runtime import runtime_scope
from fastdino.train import NonFiniteLossError, resolve_config, train
from fastdino.train.checkpointing import list_checkpoints
from fastdino.train.trainer import Trainer

# A ViT-Tiny/16 on 32 px global / 16 px local crops with a small head: ~0.2 s per step.
RUN_OVERRIDES = {
    "out_dim": 256, "head_hidden_dim": 64, "head_bottleneck_dim": 32, "global_crop_size": 32,
    "local_crop_size": 16, "n_local_crops": 2, "batch_size_per_gpu": 4, "warmup_epochs": 1,
    "lr": 0.05, "momentum_teacher": 0.99, "data_backend": "torchvision", "data_threads": 1,
    "log_every_steps": 1, "checkpoint_every_steps": 2, "keep_last_checkpoints": 2,
}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_synthetic_image_folder(tmp_path_factory.mktemp("data") / "images", n_images=32,
                                        image_size=(48, 40))


def cli_arguments(overrides: dict) -> list[str]:
    return [f"{key}={value}" for key, value in overrides.items()]


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_losses(run_dir) -> dict[int, float]:
    """step -> loss of the logged steps, each of which must appear once (resumed runs too)."""
    steps = [entry for entry in read_metrics(run_dir) if "loss" in entry]
    losses = {entry["step"]: entry["loss"] for entry in steps}
    assert len(losses) == len(steps), f"steps logged twice: {[entry['step'] for entry in steps]}"
    return losses



def run_rank(rank, port, run_dir, data_dir, overrides):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(resolve_config("tiny", overrides, output_dir=str(run_dir), data=str(data_dir)))
    torch.save({"teacher": result.teacher.state_dict(), "center": result.center, "steps": result.steps},
               run_dir / f"rank{rank}.pt")


def test_two_gloo_processes_train_with_identical_teachers_and_centers(tmp_path, image_folder):
    run_dir = tmp_path / "run"
    overrides = {**RUN_OVERRIDES, "epochs": 4}  # 16 images per rank: 4 steps per epoch
    mp.spawn(run_rank, args=(free_port(), run_dir, image_folder, overrides), nprocs=2, join=True)
    ranks = [torch.load(run_dir / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 16
    assert torch.equal(ranks[0]["center"], ranks[1]["center"])
    assert ranks[0]["teacher"].keys() == ranks[1]["teacher"].keys()
    for key, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][key]), f"teacher {key} differs between ranks"

    losses = list(read_losses(run_dir).values())
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, f"the loss did not go down: {losses}"
    assert [step for step, _ in list_checkpoints(run_dir)] == [14, 16]  # keep_last_checkpoints=2
    checkpoint = read_checkpoint(run_dir / "checkpoint.pth")
    assert checkpoint["step"] == 16 and len(checkpoint["rng"]) == 2
    assert torch.equal(checkpoint["dino_loss"]["center"], ranks[0]["center"])
    backbone = torch.load(run_dir / "teacher_backbone.pth", weights_only=True)
    assert torch.equal(backbone["cls_token"], ranks[0]["teacher"]["backbone.cls_token"])
    assert json.loads((run_dir / "config.json").read_text())["batch_size_per_gpu"] == 4


def start_cli(run_dir, data_dir, overrides, extra_environment=None, launcher=None, log_name=None):
    """``fastdino.train`` in a child process whose output goes to a log file beside ``run_dir``.

    A file, not a pipe: a child writing into a pipe that the test does not read yet (the second
    node's, while the first is waited on) blocks once the pipe is full, and so does every rank
    waiting for it.
    """
    command = (launcher or [sys.executable, "-m"]) + ["fastdino.train", "--preset", "tiny", "--output-dir",
                                                     str(run_dir), "--data", str(data_dir)]
    environment = {**os.environ, **ONE_THREAD, **(extra_environment or {})}
    log_path = run_dir.parent / f"{log_name or run_dir.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        process = subprocess.Popen(command + cli_arguments(overrides), env=environment, stdout=log,
                                   stderr=subprocess.STDOUT, text=True)
    process.log_path = log_path
    return process


def finish(*processes, timeout=300) -> str:
    """Wait for every process to exit 0, and return their logs joined.

    One failing process ends the wait: the others are killed rather than left waiting for it
    (torchrun's agents wait 300 s for each other at exit). The failure shows every log.
    """
    deadline = time.monotonic() + timeout
    while any(process.poll() is None for process in processes):
        failed = any(process.poll() not in (None, 0) for process in processes)
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
    logs = [process.log_path.read_text() for process in processes]
    report = "\n".join(f"--- {process.log_path.name}: exit {process.returncode}\n{log[-3000:]}"
                       for process, log in zip(processes, logs))
    assert all(process.returncode == 0 for process in processes), report
    return "".join(logs)


def test_a_killed_run_resumes_and_reproduces_the_uninterrupted_losses_exactly(tmp_path, image_folder):
    overrides = {**RUN_OVERRIDES, "epochs": 2}  # 8 steps per epoch on one process
    uninterrupted = start_cli(tmp_path / "uninterrupted", image_folder, overrides)  # runs alongside
    killed_dir = tmp_path / "killed"
    process = start_cli(killed_dir, image_folder, overrides)
    first_checkpoint = killed_dir / "checkpoint-step000000002.pth"
    while not first_checkpoint.exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert max(read_losses(killed_dir)) < 16

    logged_before_the_kill = max(read_losses(killed_dir))
    output = finish(start_cli(killed_dir, image_folder, overrides, log_name="resumed"))
    assert "resumed from" in output
    restarts = [entry for entry in read_metrics(killed_dir) if entry.get("event") == "resumed"]
    assert len(restarts) == 1 and 2 <= restarts[0]["step"] <= logged_before_the_kill
    finish(uninterrupted)
    expected = read_losses(tmp_path / "uninterrupted")
    assert sorted(expected) == list(range(1, 17))
    assert read_losses(killed_dir) == expected  # bit-identical, step by step
    assert not list(killed_dir.glob("*.partial-*"))


def wait_for_logged_step(run_dir, step, processes):
    while all(process.poll() is None for process in processes):
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and max(read_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError("a run ended before it could be signalled:\n" + "".join(
        process.log_path.read_text()[-2000:] for process in processes))


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_after_its_step_with_a_checkpoint_and_the_rerun_continues_it(
        tmp_path, image_folder, signal_number, exit_code):
    # Checkpoints at epoch ends only (steps 8 and 16): the one a stop writes is its own.
    overrides = {**RUN_OVERRIDES, "epochs": 2, "checkpoint_every_steps": 0}
    uninterrupted = start_cli(tmp_path / "uninterrupted", image_folder, overrides)
    run_dir = tmp_path / "signalled"
    process = start_cli(run_dir, image_folder, overrides)
    wait_for_logged_step(run_dir, 3, [process])
    process.send_signal(signal_number)
    process.wait(timeout=300)
    output = process.log_path.read_text()
    assert process.returncode == exit_code, output[-3000:]
    assert "Traceback" not in output
    stopped_at = max(read_losses(run_dir))
    assert f"stopped by {signal.Signals(signal_number).name} after step {stopped_at} of 16" in output
    assert [step for step, _ in list_checkpoints(run_dir)][-1] == stopped_at < 16
    marker = json.loads((run_dir / "STOPPED_BY_SIGNAL").read_text())  # for requeue scripts under torchrun
    assert marker["signal"] == signal.Signals(signal_number).name and marker["step"] == stopped_at

    finish(start_cli(run_dir, image_folder, overrides, log_name="rerun"))
    assert not (run_dir / "STOPPED_BY_SIGNAL").exists()
    finish(uninterrupted)
    assert read_losses(run_dir) == read_losses(tmp_path / "uninterrupted")  # bit-identical, step by step


def start_ranks(run_dir, data_dir, overrides, port, world_size=2, log_name=None):
    """One process per rank with the variables torchrun (or srun and a launch script) sets."""
    return [start_cli(run_dir, data_dir, overrides, log_name=f"{log_name or run_dir.name}-rank{rank}",
                      extra_environment=dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                                             LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                                             MASTER_PORT=str(port)))
            for rank in range(world_size)]


def test_two_ranks_stop_after_the_same_step_when_one_of_them_is_signalled(tmp_path, image_folder):
    overrides = {**RUN_OVERRIDES, "epochs": 2, "checkpoint_every_steps": 0}  # 4 steps per epoch
    uninterrupted = start_ranks(tmp_path / "uninterrupted", image_folder, overrides, free_port())
    run_dir = tmp_path / "signalled"
    ranks = start_ranks(run_dir, image_folder, overrides, free_port())
    wait_for_logged_step(run_dir, 2, ranks)
    ranks[1].send_signal(signal.SIGUSR1)  # rank 0 is told by rank 1, through the flag all-reduce
    for process in ranks:
        process.wait(timeout=300)
    output = "".join(process.log_path.read_text() for process in ranks)
    assert [process.returncode for process in ranks] == [75, 75], output[-3000:]
    stopped_at = [step for step, _ in list_checkpoints(run_dir)][-1]
    assert f"stopped by SIGUSR1 after step {stopped_at} of 8" in output and stopped_at < 8
    assert len(read_checkpoint(run_dir / f"checkpoint-step{stopped_at:09d}.pth")["rng"]) == 2

    finish(*start_ranks(run_dir, image_folder, overrides, free_port(), log_name="rerun"))
    finish(*uninterrupted)
    assert read_losses(run_dir) == read_losses(tmp_path / "uninterrupted")


def test_torchrun_rendezvous_of_two_nodes_with_one_process_each(tmp_path, image_folder):
    overrides = {**RUN_OVERRIDES, "epochs": 1}
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        start_cli(tmp_path / "run", image_folder, overrides, log_name=f"node{node}", launcher=[
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=test", "-m"])
        for node in range(2)
    ]
    assert "2 rank(s)" in finish(*nodes)
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pth")["step"] == 4
    assert len(read_checkpoint(tmp_path / "run" / "checkpoint.pth")["rng"]) == 2


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, image_folder,
                                                                                       monkeypatch):
    real_loss, calls = step_module.dino_loss, []

    def loss_turning_nan_at_step_5(*args, **kwargs):
        calls.append(1)
        loss, teacher_sum = real_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) >= 5 else loss), teacher_sum

    monkeypatch.setattr(step_module, "dino_loss", loss_turning_nan_at_step_5)
    config = resolve_config("tiny", {**RUN_OVERRIDES, "epochs": 2, "log_every_steps": 3},
                            output_dir=str(tmp_path / "run"), data=str(image_folder))
    with pytest.raises(NonFiniteLossError, match=r"NaN or infinite at optimizer step 5 .*checkpoint-step000000004"):
        train(config)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
    kept = read_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert kept["step"] == 4 and all(torch.isfinite(value).all() for value in kept["teacher"].values())


def test_the_run_is_built_before_it_starts_and_records_what_ran(tmp_path, image_folder, monkeypatch, capsys):
    config = resolve_config("tiny", {**RUN_OVERRIDES, "epochs": 1, "max_steps": 2},
                            output_dir=str(tmp_path / "run"), data=str(image_folder))
    with runtime_scope(config.device) as runtime:
        trainer = Trainer(config, runtime)
        built = dict(vars(trainer))
        result = trainer.run()
    assert vars(trainer).keys() == built.keys(), "run() added attributes: build them in __init__"
    assert result.steps == 2 and trainer.loader.steps_done == 2
    backends = json.loads((tmp_path / "run" / "config.json").read_text())["resolved_backends"]
    assert backends == trainer.backends and backends["data"] == "torchvision" and backends["attention"] == "sdpa"
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pth")["backends"] == backends

    # Resumed with another attention backend forced by the environment: the change is recorded
    # in the config and said, key and backend both.
    monkeypatch.setenv("FASTDINO_ATTENTION", "explicit")
    capsys.readouterr()
    resumed = train(resolve_config("tiny", {**RUN_OVERRIDES, "epochs": 1, "max_steps": 3},
                                   output_dir=str(tmp_path / "run"), data=str(image_folder)))
    said = capsys.readouterr().err
    assert resumed.steps == 3
    assert "changed config keys: attn_backend" in said and "attention sdpa -> explicit" in said
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["attn_backend"] == saved["resolved_backends"]["attention"] == "explicit"


def test_metrics_go_to_tensorboard_when_asked(tmp_path, image_folder):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train(resolve_config("tiny", {**RUN_OVERRIDES, "epochs": 1, "max_steps": 3, "tensorboard": True},
                         output_dir=str(tmp_path / "run"), data=str(image_folder)))
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = read_losses(tmp_path / "run")
    scalars = {event.step: event.value for event in events.Scalars("train/loss")}
    assert sorted(scalars) == sorted(logged) == [1, 2, 3]
    assert all(scalars[step] == pytest.approx(logged[step], rel=1e-6) for step in logged)  # float32 in events
    assert {"train/teacher_entropy", "train/lr", "train/images_per_second"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_the_default_command_trains_the_tiny_preset(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastdino.train"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "tiny" / "teacher_backbone.pth").is_file()
    assert "done:" in result.stderr


def test_a_stalled_rank_stops_the_others_naming_the_collective_and_the_rank(tmp_path, image_folder):
    overrides = {**RUN_OVERRIDES, "epochs": 20, "distributed_timeout_minutes": 0.1}  # 6 s
    run_dir = tmp_path / "run"
    ranks = start_ranks(run_dir, image_folder, overrides, free_port())
    try:
        wait_for_logged_step(run_dir, 2, ranks)
        ranks[1].send_signal(signal.SIGSTOP)
        ranks[0].wait(timeout=120)
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    output = ranks[0].log_path.read_text()
    assert ranks[0].returncode == 1, output[-3000:]
    said = [line for line in output.splitlines() if line.startswith("fastdino.train: error: rank 0: ")]
    assert len(said) == 1, output[-3000:]
    assert "waited distributed_timeout_minutes=0.1 for the other ranks; rank(s) [1] did not answer" in said[0]
    assert "Traceback" not in output
