"""What a run does with what it finds: it never overwrites a checkpoint it did not write, never
starts over silently, and says in one line why a file cannot be resumed from, or why the data
cannot fill a batch, before it builds anything else."""

import json

import pytest
import torch

from fastdino.data import write_synthetic_image_folder
from fastdino.models import read_checkpoint
from fastdino.runtime import atomic_save
from fastdino.train import ConfigError, resolve_config, train
from fastdino.train.checkpointing import LATEST_CHECKPOINT_NAME, checkpoint_path, list_checkpoints
from fastdino.train.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ViT-Tiny/16 on 32 px crops: 32 images in batches of 8 -> 4 steps per epoch
OVERRIDES = {"out_dim": 128, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "global_crop_size": 32,
             "local_crop_size": 16, "n_local_crops": 2, "batch_size_per_gpu": 8, "epochs": 2,
             "data_backend": "torchvision", "data_threads": 1, "log_every_steps": 1}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_synthetic_image_folder(tmp_path_factory.mktemp("data") / "images", n_images=32,
                                        image_size=(40, 40))


def run(run_dir, image_folder, **overrides):
    return train(resolve_config("tiny", {**OVERRIDES, **overrides}, output_dir=str(run_dir),
                                data=str(image_folder)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder):
    """A run of one epoch (4 steps) and its checkpoint."""
    run_dir = tmp_path_factory.mktemp("trained")
    run(run_dir, image_folder, max_steps=4)
    return read_checkpoint(run_dir / LATEST_CHECKPOINT_NAME)


def test_a_lone_checkpoint_pth_of_fastdino_is_resumed_not_overwritten(tmp_path, image_folder, trained):
    atomic_save(trained, tmp_path / LATEST_CHECKPOINT_NAME)
    result = run(tmp_path, image_folder, max_steps=5)
    assert result.steps == 5 and [step for step, _ in list_checkpoints(tmp_path)] == [5]


def test_a_lone_checkpoint_pth_of_the_release_resumes_at_its_epoch(tmp_path, image_folder, trained, capsys):
    # What the public release writes: networks, optimizer, scaler, center and the next epoch.
    release = {key: trained[key] for key in ("student", "teacher", "optimizer", "fp16_scaler", "dino_loss")}
    atomic_save({**release, "epoch": 1}, tmp_path / LATEST_CHECKPOINT_NAME)
    capsys.readouterr()
    result = run(tmp_path, image_folder, max_steps=6)
    said = capsys.readouterr().err
    assert "checkpoint of the public DINO release: resuming at the start of epoch 1" in said
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged if "loss" in entry] == [5, 6] and result.steps == 6


def test_a_checkpoint_pth_that_is_no_checkpoint_is_refused_and_kept(tmp_path, image_folder):
    foreign = tmp_path / LATEST_CHECKPOINT_NAME
    torch.save({"model": torch.zeros(3)}, foreign)
    before = foreign.read_bytes()
    with pytest.raises(ConfigError, match=r"none can be resumed from:\n  .*checkpoint\.pth: neither a fastdino "
                                          r"nor a release DINO checkpoint \(top-level keys \['model'\]\)"):
        run(tmp_path, image_folder, max_steps=1)
    assert foreign.read_bytes() == before
    with pytest.raises(ConfigError, match="resume='never' but .* holds 1 checkpoint"):
        run(tmp_path, image_folder, max_steps=1, resume="never")


def test_when_no_checkpoint_can_be_read_the_run_refuses_and_restart_moves_them_aside(tmp_path, image_folder,
                                                                                   trained):
    for step in (2, 4):
        checkpoint_path(tmp_path, step).write_bytes(b"PK\x03\x04 torn by a full disk")
    with pytest.raises(ConfigError) as refused:
        run(tmp_path, image_folder, max_steps=1)
    lines = str(refused.value).splitlines()
    assert "holds checkpoints but none can be resumed from" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:3]] == [str(checkpoint_path(tmp_path, step))
                                                                   for step in (4, 2)]
    assert "resume=restart" in lines[-1]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]  # untouched

    result = run(tmp_path, image_folder, max_steps=1, resume="restart")
    assert result.steps == 1
    (aside,) = tmp_path.glob("replaced-*")
    assert sorted(path.name for path in aside.iterdir()) == [checkpoint_path(tmp_path, step).name
                                                             for step in (2, 4)]


def test_resume_from_a_corrupt_file_is_one_line_naming_it(tmp_path, image_folder, capsys):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    code = main(["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--data", str(image_folder),
                 "--resume", str(corrupt)] + [f"{key}={value}" for key, value in OVERRIDES.items()])
    said = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert f"error: cannot resume from {corrupt}: not a file of tensors" in said[-1]
    assert "Traceback" not in "\n".join(said) and "weights_only" not in said[-1]


def test_a_batch_larger_than_the_data_is_one_line_naming_the_keys(tmp_path, image_folder, capsys):
    code = main(["--preset", "tiny", "--output-dir", str(tmp_path), "--data", str(image_folder)]
                + [f"{key}={value}" for key, value in {**OVERRIDES, "batch_size_per_gpu": 40}.items()])
    said = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and said[-1].startswith("fastdino.train: error: batch_size_per_gpu=40, grad_accumulation_steps=1")
    assert "32 images" in said[-1] and "Traceback" not in "\n".join(said)
