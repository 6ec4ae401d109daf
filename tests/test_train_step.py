"""The training step on random crops: loss and center as fastdino.ops.DINOLoss computes them,
gradient accumulation equal to one big batch with one EMA and one center update per optimizer
step, the last-layer freeze, the weight-decay groups, and a teacher without gradients."""

import copy

import pytest
import torch

import fastdino.train.step as step_module
from fastdino.ops import DINOLoss
from fastdino.train import build_schedules, resolve_config
from fastdino.train.collapse import CollapseMonitor
from fastdino.train.networks import build_optimizer, build_student_and_teacher, parameter_groups
from fastdino.train.step import DINOStep

BATCH, N_LOCAL = 3, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(**fields):
    return resolve_config("tiny", dict(out_dim=256, head_hidden_dim=64, head_bottleneck_dim=32,
                                       global_crop_size=32, local_crop_size=16, n_local_crops=N_LOCAL,
                                       drop_path_rate=0.0, epochs=2, warmup_epochs=0, lr=0.01, **fields))


_NETWORKS = {}


def make_setup(config):
    """Fresh copies of one pair of networks (initializing a ViT is the slow part)."""
    key = (config.out_dim, config.head_hidden_dim, config.head_bottleneck_dim)
    if key not in _NETWORKS:
        torch.manual_seed(0)
        _NETWORKS[key] = build_student_and_teacher(config, torch.device("cpu"))
    student, teacher = copy.deepcopy(_NETWORKS[key])
    optimizer = build_optimizer(config, student, torch.device("cpu"))
    center = torch.zeros(1, config.out_dim)
    step = DINOStep(student, teacher, optimizer, center, student_temp=config.student_temp,
                    center_momentum=config.center_momentum, clip_grad=config.clip_grad)
    return student, teacher, optimizer, center, step


def random_crops(generator, batch=BATCH):
    return ([torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2)]
            + [torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(N_LOCAL)])


def test_loss_and_center_are_those_of_dino_loss_module(generator):
    config = small_config()
    student, teacher, _, center, step = make_setup(config)
    crops = random_crops(generator)
    schedules = build_schedules(config, iterations_per_epoch=4, world_size=1)
    with torch.no_grad():
        student_logits, teacher_logits = student(crops), teacher(crops)
    reference = DINOLoss(config.out_dim, 2 + N_LOCAL, 0.04, 0.04, 0, config.epochs)
    expected_loss = reference(student_logits, teacher_logits, 0)

    result = step([crops], schedules.at(0), freeze_last_layer=False, measure=True)
    assert torch.equal(result.loss, expected_loss)
    assert torch.equal(center, reference.center)  # one update, term by term the op's arithmetic
    # the collapse diagnostics: loss = teacher entropy + KL on the same batch
    assert 0 < result.teacher_entropy < torch.log(torch.tensor(float(config.out_dim)))
    torch.testing.assert_close(result.teacher_entropy + result.kl_divergence, result.loss)


def test_teacher_follows_the_student_by_ema_and_gets_no_gradient(generator):
    config = small_config()
    student, teacher, _, _, step = make_setup(config)
    teacher_before = copy.deepcopy(teacher)
    values = build_schedules(config, 4, 1).at(0)
    step([random_crops(generator)], values, freeze_last_layer=False)
    m = values.teacher_momentum
    for (name, t_after), t_before, s_after in zip(teacher.named_parameters(), teacher_before.parameters(),
                                                  student.parameters()):
        assert t_after.grad is None and not t_after.requires_grad, name
        torch.testing.assert_close(t_after, m * t_before + (1 - m) * s_after, rtol=1e-6, atol=1e-7)
    assert not torch.equal(teacher.head.mlp[0].weight, teacher_before.head.mlp[0].weight)


def test_teacher_forward_after_a_step_uses_its_updated_position_embeddings(generator):
    # 32 px crops are not the ViT's native 224 px grid: the teacher interpolates its position
    # embeddings and caches them; the in-place EMA must invalidate that cache.
    config = small_config()
    _, teacher, _, _, step = make_setup(config)
    crops = random_crops(generator)
    with torch.no_grad():
        teacher(crops)  # fills the cache
    step([crops], build_schedules(config, 4, 1).at(0), freeze_last_layer=False)
    with torch.no_grad():
        assert torch.equal(teacher(crops), copy.deepcopy(teacher)(crops))  # the copy recomputes


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_no_grad_forward_after_an_optimizer_step_uses_the_updated_position_embeddings(generator, optimizer):
    # An evaluation inside the training process. The fused optimizers write pos_embed without
    # bumping its version counter, which the student's interpolated-table cache is keyed on.
    config = small_config(optimizer=optimizer)
    student, _, _, _, step = make_setup(config)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        student.backbone(images)  # fills the cache
    step([random_crops(generator)], build_schedules(config, 4, 1).at(1), freeze_last_layer=False)
    fresh, _ = build_student_and_teacher(config, torch.device("cpu"))
    fresh.load_state_dict(student.state_dict())
    with torch.no_grad():
        assert torch.equal(student.backbone(images), fresh.backbone(images))


def test_collapse_monitor_names_both_modes():
    monitor = CollapseMonitor(n_classes=1000, grace_steps=10)
    mode, message = monitor.sign(0.01, step=1)
    assert mode == "dominant" and "near 0" in message
    assert monitor.sign(6.9, step=1) is None  # uniform at initialization is expected
    mode, message = monitor.sign(6.9, step=10)
    assert mode == "uniform" and "near ln K" in message
    assert monitor.sign(3.0, step=10) is None


@pytest.mark.parametrize("freeze", [True, False])
def test_last_layer_is_frozen_only_when_asked(generator, freeze):
    config = small_config()
    student, _, _, _, step = make_setup(config)
    last_layer_before = student.head.last_layer.weight_v.detach().clone()
    mlp_before = student.head.mlp[0].weight.detach().clone()
    step([random_crops(generator)], build_schedules(config, 4, 1).at(0), freeze_last_layer=freeze)
    assert torch.equal(student.head.last_layer.weight_v, last_layer_before) == freeze
    assert not torch.equal(student.head.mlp[0].weight, mlp_before)


def test_sgd_through_and_past_the_last_layer_freeze_is_the_release_sgd(generator):
    # The last layer gets its first gradient, and so its momentum buffer, only after the freeze.
    # The release's optimizer: torch's SGD, momentum 0.9, not fused, on the same gradients.
    config = small_config(optimizer="sgd")
    student, _, _, _, step = make_setup(config)
    release_student = copy.deepcopy(student)
    release_optimizer = torch.optim.SGD(parameter_groups(release_student), lr=0.0, momentum=0.9, foreach=False)
    schedules = build_schedules(config, 4, 1)
    last_layer_before = student.head.last_layer.weight_v.detach().clone()
    for it, freeze in enumerate([True, True, False, False]):
        if it == 2:  # resume from the state the freeze left, some momentum buffers missing
            resumed = build_optimizer(config, student, torch.device("cpu"))
            resumed.load_state_dict(step.optimizer.state_dict())
            step.optimizer = resumed
        values = schedules.at(it)
        step([random_crops(generator)], values, freeze_last_layer=freeze)
        for group in release_optimizer.param_groups:
            group["lr"] = values.learning_rate
            if group["apply_weight_decay"]:
                group["weight_decay"] = values.weight_decay
        for reference, parameter in zip(release_student.parameters(), student.parameters()):
            reference.grad = parameter.grad
        release_optimizer.step()
        for (name, reference), parameter in zip(release_student.named_parameters(), student.parameters()):
            assert torch.equal(parameter, reference), f"step {it}: {name}"
    assert not torch.equal(student.head.last_layer.weight_v, last_layer_before)


def test_biases_and_1d_parameters_get_no_weight_decay():
    config = small_config()
    student, _, optimizer, _, step = make_setup(config)
    decayed, not_decayed = parameter_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in decayed["params"])
    assert {names[id(p)] for p in not_decayed["params"]} >= {"backbone.cls_token".replace("cls_token", "norm.bias"),
                                                              "head.mlp.0.bias"}
    assert all(p.ndim == 1 or names[id(p)].endswith(".bias") for p in not_decayed["params"])
    frozen_norm = "head.last_layer.weight_g"  # norm_last_layer: not trained at all
    assert frozen_norm not in {names[id(p)] for group in (decayed, not_decayed) for p in group["params"]}
    values = build_schedules(config, 4, 1).at(3)
    step._set_schedule(values)
    assert optimizer.param_groups[0]["weight_decay"] == values.weight_decay
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all(group["lr"] == values.learning_rate for group in optimizer.param_groups)


def test_gradient_accumulation_equals_one_big_batch_with_one_ema_and_center_update(generator, monkeypatch):
    # SGD: linear in the gradients, so rounding noise in gradients that are 0 in exact arithmetic
    # (the key bias of attention) is not blown up to +-lr as AdamW's normalization would.
    config = small_config(optimizer="sgd")
    micro_batches = [random_crops(generator), random_crops(generator)]
    big_batch = [torch.cat([micro_batches[0][v], micro_batches[1][v]]) for v in range(2 + N_LOCAL)]
    schedules = build_schedules(config, 4, 1)

    ema_calls = []
    real_ema = step_module.sharded_ema_update_
    monkeypatch.setattr(step_module, "sharded_ema_update_", lambda *a, **k: (ema_calls.append(1), real_ema(*a, **k)))

    accumulated = make_setup(config)
    whole = make_setup(config)
    for it in range(2):
        accumulated[4](micro_batches, schedules.at(it), freeze_last_layer=False)
        whole[4]([big_batch], schedules.at(it), freeze_last_layer=False)
    assert len(ema_calls) == 4  # 2 optimizer steps each: once per step, not per micro-batch

    (s_acc, t_acc, _, c_acc, _), (s_big, t_big, _, c_big, _) = accumulated, whole
    torch.testing.assert_close(c_acc, c_big, rtol=1e-5, atol=1e-6)
    assert c_acc.abs().max() > 0
    for p_acc, p_big in zip(list(s_acc.parameters()) + list(t_acc.parameters()),
                            list(s_big.parameters()) + list(t_big.parameters())):
        torch.testing.assert_close(p_acc, p_big, rtol=1e-4, atol=1e-5)


def test_ops_backend_reaches_the_loss_the_clipping_and_the_ema(generator, monkeypatch):
    config = small_config(ops_backend="torch")
    student, teacher, optimizer, center, _ = make_setup(config)
    step = DINOStep(student, teacher, optimizer, center, student_temp=config.student_temp,
                    center_momentum=config.center_momentum, clip_grad=config.clip_grad,
                    ops_backend=config.ops_backend)
    backends = {}
    for name in ("dino_loss", "sharded_clip_grad_per_param_", "sharded_ema_update_"):
        real = getattr(step_module, name)
        monkeypatch.setattr(step_module, name, lambda *a, _real=real, _name=name, **k: (
            backends.setdefault(_name, k.get("backend")), _real(*a, **k))[1])
    step([random_crops(generator)], build_schedules(config, 4, 1).at(0), freeze_last_layer=False)
    assert backends == {"dino_loss": "torch", "sharded_clip_grad_per_param_": "torch", "sharded_ema_update_": "torch"}
