"""fastdino.train with parallelism=fsdp: two gloo ranks give DDP's losses, write sharded (DCP)
checkpoints and the full teacher backbone, and a one-process run resumes their checkpoint."""

import pytest
import torch

from conftest import free_port
from fastdino.models import create_backbone
from fastdino.train.checkpointing import list_checkpoints
from test_train_run import RUN_OVERRIDES, finish, read_losses, start_cli, start_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from fastdino.data import write_synthetic_image_folder
    return write_synthetic_image_folder(tmp_path_factory.mktemp("data") / "images", n_images=32,
                                        image_size=(48, 40))


def test_fsdp_trains_like_ddp_and_its_checkpoint_resumes_on_one_process(tmp_path, image_folder):
    overrides = {**RUN_OVERRIDES, "epochs": 2, "max_steps": 4, "checkpoint_every_steps": 0}  # 4 steps per epoch
    ddp = start_ranks(tmp_path / "ddp", image_folder, overrides, free_port())
    fsdp = start_ranks(tmp_path / "fsdp", image_folder, {**overrides, "parallelism": "fsdp"}, free_port())
    finish(*ddp, *fsdp)
    expected, sharded = read_losses(tmp_path / "ddp"), read_losses(tmp_path / "fsdp")
    assert sorted(sharded) == [1, 2, 3, 4]
    # Same gradients (a mean of two), norms reduced in another order: float32 rounding, ~1e-6.
    assert all(abs(sharded[step] - expected[step]) <= 1e-5 * abs(expected[step]) for step in expected), (sharded, expected)

    run_dir = tmp_path / "fsdp"
    (step, checkpoint), = list_checkpoints(run_dir)
    assert step == 4 and checkpoint.is_dir() and checkpoint.name.endswith(".dcp")
    backbone = torch.load(run_dir / "teacher_backbone.pth", weights_only=True)
    create_backbone("vit_tiny_p16").load_state_dict(backbone, strict=True)  # the release/timm layout

    # One process continues the two ranks' epoch-end checkpoint: 8 steps per epoch now.
    output = finish(start_cli(run_dir, image_folder, {**overrides, "max_steps": 10, "parallelism": "fsdp"},
                              log_name="resumed-on-one"))
    assert "written by 2 rank(s), this run has 1: continuing at the start of epoch 1, step 8" in output
    assert "nothing to shard" in output
    assert sorted(read_losses(run_dir)) == [1, 2, 3, 4, 9, 10]
