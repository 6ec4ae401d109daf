"""FSDP2 (fastdino.train.sharding) on 2 gloo processes on the CPU, against DDP and unsharded ops.

One spawn of 2 ranks (the ``two_rank_run`` fixture) trains the same ViT-Tiny/16 with a small head
6 steps under DDP, then 6 steps under FSDP2, both through ``DINOStep`` with the clipping and the
EMA of ``fastdino.train.sharding`` (the fused ops on plain tensors, on the local shards of
DTensors); it checks the sharded clip and EMA on the gathered tensors, writes a DCP checkpoint
after step 2 (the head's last layer still frozen, so it has no optimizer state yet) and loads it
back on 2 ranks, and measures the bytes of the shards. The tests read what the ranks wrote.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdino.train.step as step_module
from conftest import base_seed, free_port, mix_seed
from fastdino.models import DINOHead, MultiCropWrapper, check_state_dict, create_backbone, export_backbone_state_dict
from fastdino.ops import clip_grad_per_param_, clip_grad_per_param_reference, ema_update_
from fastdino.train import build_schedules, resolve_config
from fastdino.train.networks import build_optimizer, build_student_and_teacher
from fastdino.train.sharding import (
    EXTRA_FILE_NAME,
    export_full_backbone_state_dict,
    full_state_dict,
    is_sharded,
    load_sharded_checkpoint,
    memory_per_rank,
    save_sharded_checkpoint,
    shard_student_and_teacher,
    sharded_clip_grad_per_param_,
    sharded_ema_update_,
)
from fastdino.train.step import DINOStep
from tolerances import assert_close, relative_error
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

WORLD_SIZE, STEPS, STEPS_PER_EPOCH, CHECKPOINT_STEP, BATCH_PER_RANK = 2, 6, 3, 2, 4
OPS_BACKEND = "auto"  # the C++ kernels where built
# out_dim 257 and the (1, 1, D) tokens do not split evenly over 2 ranks: FSDP2 pads them. A
# small clip_grad clips most gradients, so the sharded norms decide the update.
CONFIG = dict(out_dim=257, head_hidden_dim=64, head_bottleneck_dim=32, global_crop_size=32,
              local_crop_size=16, n_local_crops=2, batch_size_per_gpu=BATCH_PER_RANK, epochs=2,
              warmup_epochs=0, lr=0.01, freeze_last_layer=1, drop_path_rate=0.1, clip_grad=0.05,
              momentum_teacher=0.9, precision="fp32", ops_backend=OPS_BACKEND)


def tiny_config():
    return resolve_config("tiny", CONFIG)


def crops_of(seed: int, step: int, rank: int) -> list[torch.Tensor]:
    """This rank's 2 global + 2 local crops at ``step``: the same in the DDP and the FSDP2 run."""
    generator = torch.Generator().manual_seed(seed + WORLD_SIZE * step + rank)
    return ([torch.randn(BATCH_PER_RANK, 3, 32, 32, generator=generator) for _ in range(2)]
            + [torch.randn(BATCH_PER_RANK, 3, 16, 16, generator=generator) for _ in range(2)])


def allocated_bytes(tensors) -> int:
    """Bytes of the distinct storages under this rank's (local) tensors: FSDP2 pads each shard in
    its own storage and reduce-scatters a unit's gradients into one buffer; DDP's gradients are
    views of its buckets."""
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measured_memory(student, optimizer) -> dict[str, int]:
    parameters = list(student.parameters())
    state = [value for entry in optimizer.state.values() for value in entry.values()]
    return {"student_parameters": allocated_bytes(parameters),
            "student_gradients": allocated_bytes(p.grad for p in parameters if p.grad is not None),
            "optimizer_state": allocated_bytes(state)}


def cloned(state):
    """A copy of a (nested) state dict: the state-dict functions return plain tensors (the
    optimizer's steps) by reference, which the next steps change in place."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {key: cloned(value) for key, value in state.items()}
    if isinstance(state, list):
        return [cloned(value) for value in state]
    return state


def train(config, seed: int, rank: int, parallelism: str, checkpoint_dir=None) -> dict:
    """STEPS DINOSteps from the same initial weights and crops, as the Trainer runs them."""
    torch.manual_seed(config.seed)
    student, teacher = build_student_and_teacher(config, torch.device("cpu"))
    trained = student
    if parallelism == "fsdp":
        shard_student_and_teacher(student, teacher)
    else:
        trained = torch.nn.parallel.DistributedDataParallel(student, gradient_as_bucket_view=True)
    optimizer = build_optimizer(config, student, torch.device("cpu"))
    center = torch.zeros(1, config.out_dim)
    step_fn = DINOStep(trained, teacher, optimizer, center, student_temp=config.student_temp,
                       center_momentum=config.center_momentum, clip_grad=config.clip_grad,
                       ops_backend=OPS_BACKEND)
    schedules = build_schedules(config, STEPS_PER_EPOCH, WORLD_SIZE)
    torch.manual_seed(config.seed + rank)  # drop path: a stream per rank, as the Trainer
    losses, saved = [], {}
    for step in range(STEPS):
        epoch = step // STEPS_PER_EPOCH
        result = step_fn([crops_of(seed, step, rank)], schedules.at(step),
                         freeze_last_layer=epoch < config.freeze_last_layer)
        losses.append(result.loss.detach().clone())
        if checkpoint_dir is not None and step + 1 == CHECKPOINT_STEP:
            save_sharded_checkpoint(checkpoint_dir, student, teacher, optimizer,
                                    extra={"step": CHECKPOINT_STEP, "center": center.clone()})
            saved = cloned({"student": full_state_dict(student), "teacher": full_state_dict(teacher),
                            "optimizer": get_optimizer_state_dict(
                                student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
                            "center": center})
    return {"losses": torch.stack(losses), "center": center, "student": student, "teacher": teacher,
            "optimizer": optimizer, "saved": saved}


def check_clip_and_ema(student, teacher, seed: int) -> dict:
    """The sharded clip and EMA on the gathered tensors against the unsharded ops."""
    parameters = [p for p in student.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    full_grads = [torch.randn(p.shape, generator=generator) * (0.1 + index % 7) for index, p in enumerate(parameters)]
    for parameter, grad in zip(parameters, full_grads):
        parameter.grad = distribute_tensor(grad, parameter.device_mesh, parameter.placements)
    parameters[1].grad = None  # skipped, as by clip_grad_per_param_
    with_grad = [grad for index, grad in enumerate(full_grads) if index != 1]
    norms = sharded_clip_grad_per_param_(parameters, max_norm=2.0)
    clipped = [p.grad.full_tensor() for p in parameters if p.grad is not None]

    teachers_before = [p.full_tensor() for p in teacher.parameters()]
    students = [p.full_tensor() for p in student.parameters()]
    momentum = torch.tensor(0.9, dtype=torch.float64)
    sharded_ema_update_(teacher.parameters(), student.parameters(), momentum, backend=OPS_BACKEND)
    return {"grads": with_grad, "norms": norms, "clipped": clipped, "teachers_before": teachers_before,
            "students": students, "teachers_after": [p.full_tensor() for p in teacher.parameters()],
            "momentum": momentum}


def check_mixed_precision(config, seed: int, rank: int) -> dict:
    """A bf16 FSDP2 student: its forward against a bf16 copy of the unsharded network, and the
    dtypes of one step's shards and gradients."""
    torch.manual_seed(config.seed)
    student, teacher = build_student_and_teacher(config, torch.device("cpu"))
    reference = copy.deepcopy(student).to(torch.bfloat16).eval()
    shard_student_and_teacher(student, teacher, mixed_precision_dtype=torch.bfloat16)
    crops = crops_of(seed, 0, rank)
    with torch.no_grad():
        logits = student.eval()(crops)
        expected = reference([crop.to(torch.bfloat16) for crop in crops])
    student.reset_iter_state()  # a forward without backward: clear what FSDP2 kept for one
    optimizer = build_optimizer(config, student.train(), torch.device("cpu"))
    step_fn = DINOStep(student, teacher, optimizer, torch.zeros(1, config.out_dim),
                       student_temp=config.student_temp, center_momentum=config.center_momentum,
                       clip_grad=config.clip_grad, ops_backend=OPS_BACKEND)
    loss = step_fn([crops], build_schedules(config, STEPS_PER_EPOCH, WORLD_SIZE).at(0),
                   freeze_last_layer=False).loss
    # Not the empty shards of rank 1 (pos_embed and cls_token have one row, held by rank 0).
    grads = [p.grad.to_local() for p in student.parameters() if p.grad is not None and p.grad.to_local().numel()]
    return {"logits": logits, "expected": expected, "loss": loss,
            "dtypes": {p.to_local().dtype for p in [*student.parameters(), *teacher.parameters()]}
                      | {grad.dtype for grad in grads},
            # Reduced in bfloat16, every gradient would be a bfloat16 number.
            "gradients_beyond_bfloat16": sum(bool((g != g.bfloat16().float()).any()) for g in grads),
            "gradients": len(grads)}


def run_rank(rank: int, port: int, seed: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    # DINOStep with the clipping and the EMA that take sharded and plain parameters alike.
    step_module.clip_grad_per_param_ = sharded_clip_grad_per_param_
    step_module.ema_update_ = sharded_ema_update_
    try:
        config = tiny_config()
        ddp = train(config, seed, rank, "ddp")
        ddp_memory = measured_memory(ddp["student"], ddp["optimizer"])
        checkpoint_dir = f"{out_dir}/checkpoint"
        fsdp = train(config, seed, rank, "fsdp", checkpoint_dir)
        fsdp_memory = measured_memory(fsdp["student"], fsdp["optimizer"])
        # Activation checkpointing around each sharded block: FSDP2 gathers it again to recompute.
        recomputed = train(resolve_config("tiny", {**CONFIG, "activation_checkpointing": True}), seed, rank, "fsdp")
        teacher_full = full_state_dict(fsdp["teacher"])
        backbone_export = export_full_backbone_state_dict(fsdp["teacher"])
        # The checkpoint back on 2 ranks, into freshly sharded networks.
        torch.manual_seed(config.seed + 1)
        student, teacher = build_student_and_teacher(config, torch.device("cpu"))
        shard_student_and_teacher(student, teacher)
        optimizer = build_optimizer(config, student, torch.device("cpu"))
        extra = load_sharded_checkpoint(checkpoint_dir, student, teacher, optimizer)
        reloaded = {"student": full_state_dict(student), "teacher": full_state_dict(teacher),
                    "optimizer": get_optimizer_state_dict(
                        student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
                    "extra": extra}
        ops = check_clip_and_ema(fsdp["student"], fsdp["teacher"], seed)
        mixed_precision = check_mixed_precision(config, seed, rank)
        torch.save({
            "ddp_losses": ddp["losses"], "fsdp_losses": fsdp["losses"],
            "checkpointed_losses": recomputed["losses"], "checkpointed_teacher": full_state_dict(recomputed["teacher"]),
            "ddp_center": ddp["center"], "fsdp_center": fsdp["center"],
            "ddp_teacher": ddp["teacher"].state_dict(), "fsdp_teacher": teacher_full,
            "ddp_backbone_export": export_backbone_state_dict(ddp["teacher"]),
            "fsdp_backbone_export": backbone_export,
            "sharded": is_sharded(fsdp["student"]) and is_sharded(fsdp["teacher"]),
            # FSDP2's record of forwards for the backward to come (none for the teacher)
            "teacher_forward_records": len(fsdp["teacher"]._get_fsdp_state()._comm_ctx.post_forward_order),
            "saved": fsdp["saved"], "reloaded": reloaded, "ops": ops,
            "ddp_memory": ddp_memory, "fsdp_memory": fsdp_memory, "mixed_precision": mixed_precision,
        }, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sharding")
    seed = mix_seed(base_seed(), "tests/test_sharding.py")
    mp.spawn(run_rank, args=(free_port(), seed, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    return out_dir, ranks


def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_shards(two_rank_run):
    _, ranks = two_rank_run
    for rank in ranks:
        result = rank["mixed_precision"]
        # The gathered bf16 parameters compute what the unsharded network cast to bf16 computes.
        assert result["logits"].dtype == torch.bfloat16
        assert torch.equal(result["logits"], result["expected"])
        assert result["dtypes"] == {torch.float32}  # shards, teacher and gradients
        assert result["gradients_beyond_bfloat16"] == result["gradients"]  # reduced in float32
        assert torch.isfinite(result["loss"])


def test_fsdp_and_ddp_train_alike_step_by_step(two_rank_run):
    _, ranks = two_rank_run
    assert all(rank["sharded"] for rank in ranks)
    assert all(rank["teacher_forward_records"] == 0 for rank in ranks)  # cleared after every forward
    # Both runs compute the same float32 function on the same values; the gradients are sums of
    # 2 ranks' values halved (exact in any order). Only the clip norms differ in rounding: the
    # fused kernel accumulates in float64, the sharded clip in float32 per shard, then squares,
    # sums and takes the root; both are within the float32 norm tolerance (TOLERANCES "clip",
    # 2e-6) of the exact norm. AdamW's update m / sqrt(v) moves by at most that fraction when a
    # gradient is scaled, so the weights' movement, and with it the whole teacher, differs by
    # less than 2e-6 of itself, and the losses by less than float32's loss tolerance (1e-5).
    # Single small tensors whose gradient is close to its rounding noise (biases; the key part
    # of the qkv bias has a zero gradient in exact arithmetic) differ by more relative to
    # themselves: hence one comparison over the whole network (its last 4 steps move it by ~2e-3
    # of its norm, one 192-value bias by ~1e-5, so a tensor left out of the EMA is still seen).
    for rank in ranks:
        for step in range(STEPS):
            assert_close(rank["fsdp_losses"][step], rank["ddp_losses"][step], torch.float32, "loss",
                         context=f"at step {step}")
    fsdp, ddp = ranks[0]["fsdp_teacher"], ranks[0]["ddp_teacher"]
    assert list(fsdp) == list(ddp)
    assert_close(torch.cat([value.flatten() for value in fsdp.values()]),
                 torch.cat([value.flatten() for value in ddp.values()]), torch.float32, "clip",
                 context="over the whole teacher")
    assert_close(ranks[0]["fsdp_center"], ranks[0]["ddp_center"], torch.float32, "center")
    assert torch.equal(ranks[0]["fsdp_center"], ranks[1]["fsdp_center"])  # all-reduced as under DDP
    # The run moved: every step's loss differs from the first; the teacher after step 2 and now.
    assert (ranks[0]["ddp_losses"][1:] != ranks[0]["ddp_losses"][0]).all()
    assert relative_error(torch.cat([value.flatten() for value in ranks[0]["saved"]["teacher"].values()]),
                          torch.cat([value.flatten() for value in fsdp.values()])) > 1e-4


def test_activation_checkpointing_of_sharded_blocks_changes_nothing(two_rank_run):
    _, ranks = two_rank_run
    for rank in ranks:  # the recomputation repeats the forward exactly, drop path included
        assert torch.equal(rank["checkpointed_losses"], rank["fsdp_losses"])
    assert_states_equal(ranks[0]["checkpointed_teacher"], ranks[0]["fsdp_teacher"])


def test_exported_backbone_is_the_full_teacher_backbone_in_the_release_layout(two_rank_run):
    _, ranks = two_rank_run
    exported = ranks[0]["fsdp_backbone_export"]
    assert ranks[1]["fsdp_backbone_export"] == {}  # gathered on rank 0 only
    assert list(exported) == list(ranks[0]["ddp_backbone_export"])  # the keys of the unsharded export
    with torch.device("meta"):
        check_state_dict(create_backbone("vit_tiny_p16"), exported)  # loads with strict=True
    teacher = ranks[0]["fsdp_teacher"]
    for key, value in exported.items():
        assert not isinstance(value, DTensor) and value.device.type == "cpu"
        assert torch.equal(value, teacher["backbone." + key]), key


def test_sharded_clip_equals_the_unsharded_per_parameter_clip(two_rank_run):
    _, ranks = two_rank_run
    for rank in ranks:
        ops = rank["ops"]
        expected = [grad.double() for grad in ops["grads"]]
        expected_norms = clip_grad_per_param_reference(expected, 2.0)
        fused = [torch.zeros_like(grad, requires_grad=True) for grad in ops["grads"]]
        for parameter, grad in zip(fused, ops["grads"]):
            parameter.grad = grad.clone()
        fused_norms = clip_grad_per_param_(fused, 2.0, backend=OPS_BACKEND)
        assert 0 < int((expected_norms > 2.0).sum()) < len(expected)  # some clipped, some not
        assert_close(ops["norms"], expected_norms, torch.float32, "clip")
        assert_close(ops["norms"], fused_norms, torch.float32, "clip")
        for index, (clipped, reference) in enumerate(zip(ops["clipped"], expected)):
            assert_close(clipped, reference, torch.float32, "clip", context=f"gradient {index}")
    assert torch.equal(ranks[0]["ops"]["norms"], ranks[1]["ops"]["norms"])  # one all-reduce, same result


def test_sharded_ema_equals_the_fused_ema_on_whole_tensors(two_rank_run):
    _, ranks = two_rank_run
    ops = ranks[0]["ops"]
    teachers = [teacher.clone() for teacher in ops["teachers_before"]]
    ema_update_(teachers, ops["students"], ops["momentum"], backend=OPS_BACKEND)
    # Element by element the same float32 multiply-add, on shards or on whole tensors.
    for index, (sharded, whole) in enumerate(zip(ops["teachers_after"], teachers)):
        assert torch.equal(sharded, whole), f"teacher parameter {index}"
    assert any(not torch.equal(a, b) for a, b in zip(ops["teachers_after"], ops["teachers_before"]))


def assert_optimizer_states_equal(actual: dict, expected: dict) -> None:
    assert sorted(actual["state"]) == sorted(expected["state"])
    for fqn, entry in expected["state"].items():
        assert sorted(actual["state"][fqn]) == sorted(entry), fqn
        for name, value in entry.items():
            assert torch.equal(actual["state"][fqn][name].cpu(), value.cpu()), f"{fqn}.{name}"
    assert [sorted(group["params"]) for group in actual["param_groups"]] == \
        [sorted(group["params"]) for group in expected["param_groups"]]


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_checkpoint_of_two_ranks_loads_back_on_two_ranks(two_rank_run):
    _, ranks = two_rank_run
    saved, reloaded = ranks[0]["saved"], ranks[0]["reloaded"]
    assert_states_equal(reloaded["student"], saved["student"])
    assert_states_equal(reloaded["teacher"], saved["teacher"])
    assert_optimizer_states_equal(reloaded["optimizer"], saved["optimizer"])
    assert reloaded["extra"]["step"] == CHECKPOINT_STEP
    assert torch.equal(reloaded["extra"]["center"], saved["center"])


def test_checkpoint_of_two_ranks_loads_on_one_process_into_unsharded_networks(two_rank_run):
    out_dir, ranks = two_rank_run
    saved = ranks[0]["saved"]
    checkpoint_dir = out_dir / "checkpoint"
    assert (checkpoint_dir / EXTRA_FILE_NAME).is_file() and not list(out_dir.glob("*.partial-*"))
    config = tiny_config()
    torch.manual_seed(config.seed + 1)  # other weights than the saved ones
    student, teacher = build_student_and_teacher(config, torch.device("cpu"))
    optimizer = build_optimizer(config, student, torch.device("cpu"))
    extra = load_sharded_checkpoint(checkpoint_dir, student, teacher, optimizer)
    assert not is_sharded(student) and not any(isinstance(p, DTensor) for p in student.parameters())
    assert_states_equal(student.state_dict(), saved["student"])
    assert_states_equal(teacher.state_dict(), saved["teacher"])
    assert_optimizer_states_equal(get_optimizer_state_dict(student, optimizer), saved["optimizer"])
    # Saved while the last layer was frozen: it has no optimizer state, as in the running job.
    assert not any("last_layer" in fqn for fqn in saved["optimizer"]["state"])
    assert not any(optimizer.state[p] for p in student.head.last_layer.parameters())
    assert extra["step"] == CHECKPOINT_STEP and torch.equal(extra["center"], saved["center"])


def test_memory_estimate_is_what_the_ranks_allocate(two_rank_run):
    _, ranks = two_rank_run
    with torch.device("meta"):
        student, _ = build_student_and_teacher(tiny_config(), torch.device("meta"))
    for parallelism in ("ddp", "fsdp"):
        estimate = memory_per_rank(student, WORLD_SIZE, parallelism)
        for name, measured in ranks[0][f"{parallelism}_memory"].items():
            assert measured == getattr(estimate, name), f"{parallelism} {name}"
        # FSDP2 pads every rank's parameter and gradient shards alike; the optimizer's moments
        # follow the unpadded shards, which are the largest on rank 0.
        for name, measured in ranks[1][f"{parallelism}_memory"].items():
            assert measured <= getattr(estimate, name), f"{parallelism} {name} on rank 1"


def test_vit_large_memory_per_rank():
    with torch.device("meta"):
        student = MultiCropWrapper(create_backbone("vit_large_p16"), DINOHead(1024, 65536))
    assert sum(p.numel() for p in student.parameters()) == 326_964_480
    ddp = memory_per_rank(student, 8, "ddp", torch.bfloat16)
    # 20 bytes per parameter (student, its gradient, 2 moments, teacher), but none for the frozen
    # weight norm magnitude g (65536).
    assert ddp.persistent == 20 * 326_964_480 - 12 * 65536 + 4 * (len(list(student.parameters())) - 1)
    for world_size in (8, 16):
        fsdp = memory_per_rank(student, world_size, "fsdp", torch.bfloat16)
        # Above 1/world_size of DDP's by the padding, mostly pos_embed's and cls_token's: of dim 0
        # size 1, every rank holds them whole (0.4% of a rank's bytes at 8 ranks).
        assert ddp.persistent / world_size <= fsdp.persistent <= 1.01 * ddp.persistent / world_size
        assert fsdp.total < ddp.total / 3
    with pytest.raises(ValueError, match="parallelism='zero'"):
        memory_per_rank(student, 8, "zero")


# -- one process -----------------------------------------------------------------------------------

def small_network(out_dim: int) -> MultiCropWrapper:
    backbone = create_backbone("vit_tiny_p16", img_size=32)
    return MultiCropWrapper(backbone, DINOHead(192, out_dim, hidden_dim=16, bottleneck_dim=8))


def test_student_and_teacher_of_different_architectures_are_refused():
    with pytest.raises(ValueError, match=r"first difference.*'head.last_layer.weight_v', \(10, 8\)\) vs .*\(12, 8\)"):
        shard_student_and_teacher(small_network(10), small_network(12))


def test_plain_tensors_are_clipped_and_averaged_by_the_fused_ops(generator):
    grads = [torch.randn(shape, generator=generator) * scale for shape, scale in (((5, 3), 1.0), ((7,), 0.01))]
    parameters = [torch.zeros_like(grad, requires_grad=True) for grad in grads]
    expected = [torch.zeros_like(grad, requires_grad=True) for grad in grads]
    for parameter, reference, grad in zip(parameters, expected, grads):
        parameter.grad, reference.grad = grad.clone(), grad.clone()
    norms = sharded_clip_grad_per_param_(parameters, 0.5, backend=OPS_BACKEND)
    assert torch.equal(norms, clip_grad_per_param_(expected, 0.5, backend=OPS_BACKEND))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(parameters, expected))
    teachers = [torch.randn(4, generator=generator) for _ in range(2)]
    references = [teacher.clone() for teacher in teachers]
    students = [torch.randn(4, generator=generator) for _ in range(2)]
    sharded_ema_update_(teachers, students, 0.9, backend=OPS_BACKEND)
    ema_update_(references, students, 0.9, backend=OPS_BACKEND)
    assert all(torch.equal(t, r) for t, r in zip(teachers, references))


def test_one_process_checkpoint_replaces_an_older_one_at_the_same_path(tmp_path):
    config = tiny_config()
    student, teacher = build_student_and_teacher(config, torch.device("cpu"))
    optimizer = build_optimizer(config, student, torch.device("cpu"))
    path = tmp_path / "checkpoint"
    save_sharded_checkpoint(path, student, teacher, optimizer, extra={"step": 1})
    with torch.no_grad():
        teacher.backbone.pos_embed.add_(1.0)
    expected = cloned(teacher.state_dict())
    save_sharded_checkpoint(path, student, teacher, optimizer, extra={"step": 2})
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["checkpoint"]  # nothing left aside
    with torch.no_grad():
        teacher.backbone.pos_embed.zero_()
    assert load_sharded_checkpoint(path, student, teacher, optimizer) == {"step": 2}
    assert_states_equal(teacher.state_dict(), expected)
    with pytest.raises(FileNotFoundError, match="no .metadata"):
        load_sharded_checkpoint(tmp_path, student, teacher, optimizer)
