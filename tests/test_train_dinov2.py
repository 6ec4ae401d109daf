"""method=dinov2: the step's terms against DINOv2's formulas (written here from its source), the
layer-wise lr decay, resume reproducing the masks and losses, and two gloo processes (DDP with
the mask token and a separate iBOT head)."""

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port
from fastdino.data import IBOTMaskRecipe, sample_ibot_masks, write_synthetic_image_folder
from fastdino.ops import dino_loss_reference
from fastdino.train import ConfigError, resolve_config, train
from fastdino.train.dinov2_step import DINOv2Step
from fastdino.train.networks import build_optimizer, build_student_and_teacher, lr_multiplier
from fastdino.train.schedules import ScheduledValues, scaled_learning_rate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ViT-Tiny/8 on 32 px global crops (a 4 x 4 patch grid, the smallest DINOv2's masks allow) and
# 16 px local crops, a small head.
OVERRIDES = {"method": "dinov2", "arch": "vit_tiny_p8", "out_dim": 256, "head_hidden_dim": 64,
             "head_bottleneck_dim": 32, "global_crop_size": 32, "local_crop_size": 16, "n_local_crops": 2,
             "batch_size_per_gpu": 4, "drop_path_rate": 0.0, "data_backend": "torchvision", "data_threads": 1,
             "log_every_steps": 1, "warmup_epochs": 1}
TEACHER_TEMP = 0.04


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_synthetic_image_folder(tmp_path_factory.mktemp("data") / "images", n_images=32,
                                        image_size=(40, 40))


def dinov2_lr_decay_rate(name, lr_decay_rate, num_layers):
    """dinov2/train/param_groups.py get_vit_lr_decay_rate (plain blocks), from its source."""
    layer_id = num_layers + 1
    if name.startswith("backbone"):
        if (".pos_embed" in name or ".patch_embed" in name or ".mask_token" in name or ".cls_token" in name
                or ".register_tokens" in name):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def test_lr_multipliers_are_dinov2s_layerwise_decay():
    config = resolve_config("tiny", {**OVERRIDES, "arch": "vit_small_p14_reg4", "global_crop_size": 28,
                                     "local_crop_size": 14, "layerwise_decay": 0.9, "patch_embed_lr_mult": 0.2})
    with torch.device("meta"):
        student, _ = build_student_and_teacher(config, torch.device("meta"))
    for name, _ in student.named_parameters():
        expected = dinov2_lr_decay_rate(name, 0.9, 12) * (0.2 if "patch_embed" in name else 1.0)
        assert lr_multiplier(name, 12, 0.9, 0.2) == pytest.approx(expected, rel=1e-12), name
    optimizer = build_optimizer(config, student, torch.device("cpu"))
    multipliers = sorted({group["lr_multiplier"] for group in optimizer.param_groups})
    assert multipliers[-1] == 1.0 and multipliers[0] == pytest.approx(0.9 ** 13 * 0.2)


def test_sqrt_lr_scaling_is_relative_to_a_batch_of_1024():
    config = resolve_config("dinov2_vits14", batch_size_per_gpu=64)
    assert scaled_learning_rate(config, world_size=32) == pytest.approx(0.004 * math.sqrt(2048 / 1024))


def dinov2_koleo(x, eps=1e-8):
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    distances = torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[dots.max(dim=1).indices])
    return -torch.log(distances + eps).mean()


def dinov2_sinkhorn(t, temp, n_iterations=3):
    q = torch.exp(t / temp).t()
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= q.shape[0]
        q /= q.sum(dim=0, keepdim=True)
        q /= q.shape[1]
    return (q * q.shape[1]).t()


def dinov2_cls_loss(student, targets, batch, n_crops):
    """ssl_meta_arch's DINO terms on given targets: each global crop against the other's, each
    local crop against both, over n_global (n_global - 1) + n_local n_global terms."""
    q0, q1 = targets[:batch], targets[batch:]
    lsm = F.log_softmax(student / 0.1, dim=-1).view(n_crops, batch, -1)
    total = -(q1 * lsm[0]).sum(-1).mean() - (q0 * lsm[1]).sum(-1).mean()
    for crop in range(2, n_crops):
        total = total - (q0 * lsm[crop]).sum(-1).mean() - (q1 * lsm[crop]).sum(-1).mean()
    return total / (2 + 2 * (n_crops - 2))


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_step_terms_are_dinov2s_formulas(centering, generator):
    config = resolve_config("tiny", {**OVERRIDES, "centering": centering})
    torch.manual_seed(0)
    student, teacher = build_student_and_teacher(config, torch.device("cpu"))
    center = torch.randn(1, config.out_dim, generator=generator) * 0.1
    patch_center = torch.randn(1, config.out_dim, generator=generator) * 0.1
    step = DINOv2Step(student, teacher, build_optimizer(config, student, torch.device("cpu")), center.clone(),
                      patch_center=patch_center.clone(), centering=centering, dino_loss_weight=1.0,
                      ibot_loss_weight=1.0, koleo_loss_weight=0.1, student_temp=0.1, center_momentum=0.9,
                      clip_grad=0.0, ops_backend="cpp")
    batch = config.batch_size_per_gpu
    crops = [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2)] + \
            [torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(2)]
    masks = sample_ibot_masks(IBOTMaskRecipe(grid_size=4), batch, seed=0, epoch=0, shard_id=0, step=3)
    assert masks.n_masked_patches > 0
    values = ScheduledValues(epoch=0, learning_rate=0.0, weight_decay=0.0, teacher_momentum=0.99,
                             teacher_temperature=TEACHER_TEMP)

    loss, terms, _ = step._loss(crops, masks, values, measure=False)
    with torch.no_grad():
        t = teacher(crops, dinov2_outputs=True, mask_indices=masks.mask_indices)
        s = student(crops, dinov2_outputs=True, masks=masks.masks, mask_indices=masks.mask_indices)
    if centering == "centering":
        expected_dino, _ = dino_loss_reference(s.cls_logits.double(), t.cls_logits.double(), center.double(),
                                               teacher_temp=TEACHER_TEMP)
        patch_targets = F.softmax((t.patch_logits.double() - patch_center.double()) / TEACHER_TEMP, dim=-1)
    else:
        expected_dino = dinov2_cls_loss(s.cls_logits.double(), dinov2_sinkhorn(t.cls_logits.double(), TEACHER_TEMP),
                                        batch, 4)
        patch_targets = dinov2_sinkhorn(t.patch_logits.double(), TEACHER_TEMP)
    masks_weight = (1 / masks.masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks.masks)[masks.masks]
    expected_ibot = -(torch.sum(patch_targets * F.log_softmax(s.patch_logits.double() / 0.1, -1), -1)
                      * masks_weight).sum() / masks.masks.shape[0]
    expected_koleo = sum(dinov2_koleo(f.double()) for f in s.global_cls_features.chunk(2))
    for name, expected in (("dino", expected_dino), ("ibot", expected_ibot), ("koleo", expected_koleo)):
        torch.testing.assert_close(terms[name].double(), expected, rtol=2e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(loss.detach().double(), expected_dino + expected_ibot + 0.1 * expected_koleo,
                               rtol=2e-5, atol=1e-6)


def losses(run_dir):
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {entry["step"]: (entry["loss"], entry["ibot_loss"], entry["koleo_loss"]) for entry in entries if "loss" in entry}


def test_a_resumed_run_gets_the_same_masks_and_losses(tmp_path, image_folder):
    def run(run_dir, max_steps):
        return train(resolve_config("tiny", {**OVERRIDES, "epochs": 2, "max_steps": max_steps},
                                    output_dir=str(run_dir), data=str(image_folder)))

    run(tmp_path / "uninterrupted", 6)
    run(tmp_path / "resumed", 3)
    result = run(tmp_path / "resumed", 6)
    assert result.steps == 6
    assert losses(tmp_path / "resumed") == losses(tmp_path / "uninterrupted")  # bit-identical
    assert all(ibot > 0 for _, ibot, _ in losses(tmp_path / "resumed").values())


def test_dinov2_needs_a_vit_and_whole_patches():
    with pytest.raises(ConfigError, match="arch='resnet50'"):
        resolve_config("tiny", {"method": "dinov2", "arch": "resnet50", "global_crop_size": 64})
    with pytest.raises(ConfigError, match="global_crop_size=60: dinov2 masks whole patches"):
        resolve_config("tiny", {**OVERRIDES, "global_crop_size": 60})


def run_rank(rank, port, run_dir, data_dir, overrides):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(resolve_config("tiny", overrides, output_dir=str(run_dir), data=str(data_dir)))
    torch.save({"teacher": result.teacher.state_dict(), "center": result.center,
                "patch_center": result.patch_center}, run_dir / f"rank{rank}.pt")


def test_two_gloo_processes_with_a_separate_ibot_head(tmp_path, image_folder):
    """DDP over the masked student: the mask token and the iBOT head get gradients on every rank
    (even where a rank masks few patches), both centers agree across ranks."""
    run_dir = tmp_path / "run"
    overrides = {**OVERRIDES, "epochs": 1, "ibot_separate_head": True, "ibot_out_dim": 200,
                 "mask_sample_probability": 0.25}
    mp.spawn(run_rank, args=(free_port(), run_dir, image_folder, overrides), nprocs=2, join=True)
    ranks = [torch.load(run_dir / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert torch.equal(ranks[0]["center"], ranks[1]["center"])
    assert torch.equal(ranks[0]["patch_center"], ranks[1]["patch_center"])
    assert ranks[0]["patch_center"].shape == (1, 200) and ranks[0]["patch_center"].abs().max() > 0
    for key, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][key]), f"teacher {key} differs between ranks"
    assert "backbone.mask_token" in ranks[0]["teacher"]
    assert any(key.startswith("ibot_head.") for key in ranks[0]["teacher"])


def test_fsdp_trains_dinov2_like_ddp(tmp_path, image_folder):
    """Sharded student and teacher (the separate iBOT head a unit of its own): DDP's losses and
    terms, up to the float32 rounding of reductions in another order."""
    from test_train_run import finish, read_metrics, start_ranks

    overrides = {**OVERRIDES, "epochs": 1, "max_steps": 3, "checkpoint_every_steps": 0, "ibot_separate_head": True,
                 "ibot_out_dim": 200}
    ddp = start_ranks(tmp_path / "ddp", image_folder, overrides, free_port())
    fsdp = start_ranks(tmp_path / "fsdp", image_folder, {**overrides, "parallelism": "fsdp"}, free_port())
    finish(*ddp, *fsdp)
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
        expected = {entry["step"]: entry[key] for entry in read_metrics(tmp_path / "ddp") if key in entry}
        sharded = {entry["step"]: entry[key] for entry in read_metrics(tmp_path / "fsdp") if key in entry}
        assert sorted(sharded) == [1, 2, 3]
        assert all(abs(sharded[step] - expected[step]) <= 1e-5 * abs(expected[step]) for step in expected), \
            (key, sharded, expected)
