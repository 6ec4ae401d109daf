"""Checkpoint files: atomic writes that survive interruption, keep-last-K, falling back from a
corrupt newest file, RNG states, and a payload the release's tools and timm read."""

import errno
import random
from types import SimpleNamespace

import pytest
import torch

import fastdino.runtime as runtime
from fastdino.models import load_dino_checkpoint, read_checkpoint, select_state_dict
from fastdino.runtime import atomic_save
from fastdino.train import resolve_config
from fastdino.train.checkpointing import (
    LATEST_CHECKPOINT_NAME,
    build_checkpoint,
    capture_rng_state,
    checkpoint_path,
    list_checkpoints,
    newest_resumable_checkpoint,
    point_latest_to,
    prune_checkpoints,
    remove_partial_files,
    restore_checkpoint,
    restore_rng_state,
)
from fastdino.train.networks import build_optimizer, build_student_and_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_steps(run_dir, steps):
    for step in steps:
        path = checkpoint_path(run_dir, step)
        atomic_save({"student": {}, "teacher": {}, "optimizer": {}, "data": {}, "step": step,
                     "weights": torch.full((4,), float(step))}, path)
        point_latest_to(path)


def test_an_interrupted_write_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    write_steps(tmp_path, [10])

    def torch_save_killed_halfway(payload, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # what a SIGINT/SIGTERM in the middle of torch.save looks like

    monkeypatch.setattr(runtime.torch, "save", torch_save_killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 20}, checkpoint_path(tmp_path, 20))
    monkeypatch.undo()

    assert [step for step, _ in list_checkpoints(tmp_path)] == [10]
    assert not list(tmp_path.glob("*.partial-*")), "the temporary file was left behind"
    path, payload = newest_resumable_checkpoint(tmp_path)
    assert payload["step"] == 10 and path == checkpoint_path(tmp_path, 10)
    assert read_checkpoint(tmp_path / LATEST_CHECKPOINT_NAME)["step"] == 10


def test_a_killed_process_leaves_only_a_visible_partial_file_that_resume_ignores(tmp_path):
    write_steps(tmp_path, [10])
    partial = tmp_path / f"{checkpoint_path(tmp_path, 20).name}.partial-12345"
    partial.write_bytes(b"truncated")  # SIGKILL mid-write: no cleanup ran
    assert newest_resumable_checkpoint(tmp_path)[1]["step"] == 10
    remove_partial_files(tmp_path)
    assert not partial.exists()


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    write_steps(tmp_path, [10, 20])
    newest = checkpoint_path(tmp_path, 20)
    newest.write_bytes(newest.read_bytes()[:100])  # e.g. a disk that lost the tail
    _, payload = newest_resumable_checkpoint(tmp_path)
    assert payload["step"] == 10
    assert f"cannot resume from {newest}: " in capsys.readouterr().err


def test_a_full_disk_says_so_naming_the_file_and_sizes_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    write_steps(tmp_path, [10])

    def torch_save_on_a_full_disk(payload, handle):
        handle.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(runtime.torch, "save", torch_save_on_a_full_disk)
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: SimpleNamespace(free=3 * 2**20))
    payload = {"weights": torch.zeros(2**21)}  # 8 MiB
    with pytest.raises(runtime.DiskFullError) as error:
        atomic_save(payload, checkpoint_path(tmp_path, 20))
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert f"the disk holding {tmp_path} is full: writing {checkpoint_path(tmp_path, 20).name} (8.0 MiB)" in message
    assert "3.0 MiB free" in message
    monkeypatch.undo()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [10] and not list(tmp_path.glob("*.partial-*"))
    assert read_checkpoint(tmp_path / LATEST_CHECKPOINT_NAME)["step"] == 10

    # Another failure with room to spare is not called a full disk.
    monkeypatch.setattr(runtime.torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(RuntimeError, match="unexpected pos") as error:
        atomic_save(payload, checkpoint_path(tmp_path, 20))
    assert not isinstance(error.value, runtime.DiskFullError)


def test_only_the_last_k_checkpoints_are_kept_and_latest_points_to_the_newest(tmp_path):
    write_steps(tmp_path, [5, 10, 15, 20])
    prune_checkpoints(tmp_path, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [15, 20]
    assert read_checkpoint(tmp_path / LATEST_CHECKPOINT_NAME)["step"] == 20
    assert newest_resumable_checkpoint(tmp_path / "empty") is None


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    state = capture_rng_state(torch.device("cpu"))
    expected = (torch.rand(5), random.random())
    atomic_save({"rng": [state]}, tmp_path / "rng.pth")
    torch.manual_seed(99)
    random.seed(99)
    restore_rng_state(read_checkpoint(tmp_path / "rng.pth")["rng"][0], torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected[0]) and random.random() == expected[1]


def test_training_checkpoint_restores_everything_and_matches_the_release_layout(tmp_path):
    config = resolve_config("tiny", dict(out_dim=128, head_hidden_dim=32, head_bottleneck_dim=16))
    torch.manual_seed(0)
    student, teacher = build_student_and_teacher(config, torch.device("cpu"))
    optimizer = build_optimizer(config, student, torch.device("cpu"))
    for parameter in student.parameters():
        parameter.grad = torch.ones_like(parameter) if parameter.requires_grad else None
    optimizer.param_groups[0]["lr"] = 0.1
    optimizer.step()  # creates the AdamW state
    center = torch.randn(1, 128)
    payload = build_checkpoint(student=student, teacher=teacher, optimizer=optimizer, scaler=None,
                               center=center, epoch=2, step=17, config=config.to_dict(), backends={},
                               data_state={"epoch": 2, "step": 3},
                               rng_states=[capture_rng_state(torch.device("cpu"))])
    path = tmp_path / "checkpoint.pth"
    atomic_save(payload, path)

    loaded = torch.load(path, weights_only=True)  # plain types only
    assert set(loaded) >= {"student", "teacher", "optimizer", "epoch", "step", "config", "dino_loss", "data", "rng"}
    assert all(key.startswith("module.") for key in loaded["student"])  # the release's DDP student keys
    assert "head.last_layer.weight_g" in loaded["teacher"] and "backbone.cls_token" in loaded["teacher"]
    assert loaded["config"]["arch"] == "vit_tiny_p16" and loaded["dino_loss"]["center"].shape == (1, 128)

    torch.manual_seed(1)
    student2, teacher2 = build_student_and_teacher(config, torch.device("cpu"))
    optimizer2 = build_optimizer(config, student2, torch.device("cpu"))
    center2 = torch.zeros(1, 128)
    restore_checkpoint(loaded, student=student2, teacher=teacher2, optimizer=optimizer2, scaler=None, center=center2)
    assert torch.equal(center2, center)
    for a, b in zip(list(student.state_dict().values()) + list(teacher.state_dict().values()),
                    list(student2.state_dict().values()) + list(teacher2.state_dict().values())):
        assert torch.equal(a, b)
    state, state2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert state.keys() == state2.keys() and all(torch.equal(state[k]["exp_avg"], state2[k]["exp_avg"]) for k in state)
    # the release's evaluation path: the teacher backbone from the full checkpoint
    backbone = select_state_dict(loaded, "teacher", "backbone")
    assert torch.equal(backbone["cls_token"], teacher.backbone.cls_token)
    load_dino_checkpoint(teacher2.backbone, path)


def test_exported_teacher_backbone_loads_strictly_into_timm(tmp_path):
    timm = pytest.importorskip("timm", exc_type=ImportError)
    from fastdino.models import export_backbone_state_dict

    config = resolve_config("tiny", dict(out_dim=128, head_hidden_dim=32, head_bottleneck_dim=16))
    _, teacher = build_student_and_teacher(config, torch.device("cpu"))
    atomic_save(export_backbone_state_dict(teacher), tmp_path / "teacher_backbone.pth")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(tmp_path / "teacher_backbone.pth", weights_only=True), strict=True)
    assert torch.equal(model.cls_token, teacher.backbone.cls_token)
