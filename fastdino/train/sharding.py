"""FSDP2 for the DINO student and teacher: sharding, the teacher EMA and per-parameter clipping
over each rank's shards, distributed checkpoints, and the memory a rank holds.

DDP keeps the student, its gradients, AdamW's two moments and the teacher whole on every rank,
20 bytes per parameter; ``shard_student_and_teacher`` splits all of them over the ranks with
torch's ``fully_shard`` (each parameter's dim 0 in equal parts, the last ones padded), one unit
per ViT block, one for the head, and the root for the rest (patch embedding, tokens, final norm):

    mesh = shard_student_and_teacher(student, teacher, mixed_precision_dtype=torch.bfloat16)
    optimizer = build_optimizer(config, student, device)  # after sharding: over the shards
    ...backward...
    sharded_clip_grad_per_param_(student.parameters(), 3.0)
    optimizer.step()
    sharded_ema_update_(teacher.parameters(), student.parameters(), momentum)

The teacher is sharded like the student (same units, same placements), so the i-th local shard
of one pairs with the i-th of the other and the EMA is one fused call over the local shards.
Both functions also take plain tensors (DDP or one process), where they are the fused
``fastdino.ops`` calls themselves.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from fastdino.models import MultiCropWrapper, read_checkpoint
from fastdino.ops import clip_grad_per_param_, ema_update_
from fastdino.ops.clip_grad import CLIP_EPS
from fastdino.runtime import partial_path

from .config import PARALLELISMS

EXTRA_FILE_NAME = "extra.pth"  # beside DCP's files: what the caller adds (step, center, ...)
_REPLACED_SUFFIX = ".replaced"


# -- sharding --------------------------------------------------------------------------------------

def sharding_units(network: MultiCropWrapper) -> list[nn.Module]:
    """The modules that get a ``fully_shard`` of their own, in forward order: each ViT block (a
    convnet backbone has none and stays in the root), then the head. The root unit, the network
    itself, holds the remaining parameters."""
    heads = [network.head] + ([network.ibot_head] if hasattr(network, "ibot_head") else [])  # DINOv2's separate head
    return [*getattr(network.backbone, "blocks", ()), *heads]


def _check_same_layout(student: nn.Module, teacher: nn.Module) -> None:
    student_shapes = [(name, tuple(p.shape)) for name, p in student.named_parameters()]
    teacher_shapes = [(name, tuple(p.shape)) for name, p in teacher.named_parameters()]
    if student_shapes != teacher_shapes:
        first = next(pair for pair in zip_longest(student_shapes, teacher_shapes) if pair[0] != pair[1])
        raise ValueError(f"student and teacher must have the same parameters in the same order to be "
                         f"sharded alike; first difference (student vs teacher): {first[0]} vs {first[1]}")


def shard_student_and_teacher(student: MultiCropWrapper, teacher: MultiCropWrapper,
                              mesh: DeviceMesh | None = None,
                              mixed_precision_dtype: torch.dtype | None = None) -> DeviceMesh:
    """Apply FSDP2 in place to both networks (already on their device, with equal weights on
    every rank); returns the 1-D mesh of the ranks they are sharded over (all of them when
    ``mesh`` is None). Build the optimizer afterwards: sharding replaces the parameters.

    mixed_precision_dtype: torch.bfloat16 gathers the parameters in bf16 for the forward and
    backward (half the all-gather traffic) and reduce-scatters the gradients in float32; the
    shards, their gradients and the optimizer stay float32. None computes in float32.

    The teacher runs forward only, under no_grad: every unit, the root too, frees its gathered
    parameters after the forward (FSDP2 keeps the root's gathered until a backward, which the
    teacher never has: its next forward would run on the gathered root parameters of before the
    EMA), and FSDP2's record of the forward, which a backward clears otherwise, is cleared after
    each forward (it would grow by one entry per unit and step). The backbones' cache of
    interpolated position embeddings is turned off (see ``VisionTransformer.interpolated_pos_embed``).
    """
    _check_same_layout(student, teacher)
    if mesh is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("shard_student_and_teacher: torch.distributed is not initialized; FSDP2 "
                               "shards over the ranks of a process group (launch with torchrun)")
        device = next(student.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"shard_student_and_teacher shards over a 1-D mesh, got {mesh.ndim} dimensions "
                         f"{mesh.mesh_dim_names}: hybrid sharding is not supported")
    policy = MixedPrecisionPolicy(param_dtype=mixed_precision_dtype, reduce_dtype=torch.float32)
    for network, is_teacher in ((student, False), (teacher, True)):
        if hasattr(network.backbone, "cache_pos_embed"):
            network.backbone.cache_pos_embed = False
        for unit in sharding_units(network):
            fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        # The student's root stays gathered from its forward to its backward (FSDP2's default).
        fully_shard(network, mesh=mesh, mp_policy=policy, reshard_after_forward=True if is_teacher else None)
    teacher.register_forward_hook(_end_forward_only_iteration)
    return mesh


def _end_forward_only_iteration(teacher: FSDPModule, inputs, output) -> None:
    # FSDP2 records every unit's forward for the backward's prefetching and clears the record in
    # the backward; the teacher's would grow by one entry per unit at every forward. The units
    # are resharded already: the reset only clears that record.
    teacher.reset_iter_state()


def is_sharded(network: nn.Module) -> bool:
    """Whether ``shard_student_and_teacher`` (FSDP2) sharded ``network``."""
    return isinstance(network, FSDPModule)


# -- teacher EMA and clipping on the shards --------------------------------------------------------

def _local_tensors(tensors: Iterable[torch.Tensor], what: str) -> tuple[list[torch.Tensor], list[DTensor]]:
    """(this rank's part of each tensor, the DTensors among them); all DTensors or none."""
    tensors = list(tensors)
    distributed = [t for t in tensors if isinstance(t, DTensor)]
    if distributed and len(distributed) != len(tensors):
        raise TypeError(f"{what}: {len(distributed)} of {len(tensors)} tensors are DTensors; "
                        f"shard the whole network or none of it")
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors], distributed


@torch.no_grad()
def sharded_ema_update_(teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor],
                        momentum: float | torch.Tensor, backend: str = "auto") -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student over this rank's shards: one
    ``fastdino.ops.ema_update_`` call (one launch per dtype on CUDA) over the local tensors, no
    communication. Plain tensors are updated as ``ema_update_`` does."""
    teacher_params, student_params = list(teacher_params), list(student_params)
    teachers, teacher_dtensors = _local_tensors(teacher_params, "sharded_ema_update_ teacher_params")
    students, student_dtensors = _local_tensors(student_params, "sharded_ema_update_ student_params")
    if bool(teacher_dtensors) != bool(student_dtensors):
        raise TypeError("sharded_ema_update_: one network is sharded and the other is not; shard both "
                        "with shard_student_and_teacher")
    for index, (teacher, student) in enumerate(zip(teacher_dtensors, student_dtensors)):
        if teacher.placements != student.placements or teacher.device_mesh != student.device_mesh:
            raise ValueError(f"sharded_ema_update_: teacher_params[{index}] is placed {teacher.placements} "
                             f"on {teacher.device_mesh}, student_params[{index}] {student.placements} on "
                             f"{student.device_mesh}: their local shards do not pair up")
    ema_update_(teachers, students, momentum, backend=backend)


@torch.no_grad()
def sharded_clip_grad_per_param_(parameters: Iterable[torch.Tensor], max_norm: float,
                                 backend: str = "auto") -> torch.Tensor:
    """``fastdino.ops.clip_grad_per_param_`` for gradients sharded by FSDP2: the same clip
    (``grad *= max_norm / (norm + 1e-6)`` where that is < 1, each parameter's whole norm) and the
    same return value (the norms before clipping, one per parameter with a gradient, float32
    for float32/bf16/fp16 gradients).

    Each rank squares the norm of its shard of every gradient (``torch._foreach_norm``, float32
    accumulation), ONE all-reduce sums the vector over the shard group, and every rank
    scales its shards by the same coefficients (``torch._foreach_mul_`` with 0-d device tensors):
    no host synchronization. Plain gradients (DDP, one process) go to ``clip_grad_per_param_``
    with ``backend``, unreduced (DDP has all-reduced them already).
    """
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    local, distributed = _local_tensors(grads, "sharded_clip_grad_per_param_ gradients")
    if not distributed:
        return clip_grad_per_param_(parameters, max_norm, backend=backend)
    if not max_norm > 0:
        raise ValueError(f"sharded_clip_grad_per_param_: max_norm must be > 0, got {max_norm!r}")
    mesh = distributed[0].device_mesh
    for index, grad in enumerate(distributed):
        if grad.device_mesh != mesh or len(grad.placements) != 1 or not isinstance(grad.placements[0], Shard):
            raise ValueError(f"sharded_clip_grad_per_param_: gradient {index} is placed {grad.placements} on "
                             f"{grad.device_mesh}; expected one Shard placement on {mesh} (FSDP2 over a 1-D "
                             f"mesh), whose squared norms add up over the ranks")
    norm_dtype = torch.promote_types(local[0].dtype, torch.float32)
    squared_norms = torch.stack(torch._foreach_norm(local, 2, dtype=norm_dtype)).square_()
    dist.all_reduce(squared_norms, group=mesh.get_group())
    norms = squared_norms.sqrt_()
    # clamp(max=1) multiplies by exactly 1 where the release skips the multiplication.
    coefficients = (max_norm / (norms + CLIP_EPS)).clamp_(max=1.0)
    torch._foreach_mul_(local, list(coefficients.unbind()))
    return norms


# -- checkpoints -----------------------------------------------------------------------------------

def _optimizer_fqns_in_checkpoint(path: Path) -> set[str]:
    """The parameter names whose optimizer state the DCP checkpoint at ``path`` holds."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {keys[2] for keys in metadata.planner_data.values()
            if len(keys) > 3 and keys[:2] == ("optimizer", "state")}


def save_sharded_checkpoint(path: str | os.PathLike, student: nn.Module, teacher: nn.Module,
                            optimizer: torch.optim.Optimizer, extra: dict) -> None:
    """Write a ``torch.distributed.checkpoint`` directory at ``path``: every rank writes its own
    shards of the student, the teacher and the optimizer (collective: call on every rank), and
    rank 0 writes ``extra`` (plain values and CPU tensors: step, center, config, RNG states, ...)
    to ``extra.pth`` inside it. ``load_sharded_checkpoint`` reads it on any number of ranks,
    sharded or not.

    All of it goes to a temporary directory first (``<name>.partial-<pid of rank 0>``), renamed
    to ``path`` once every rank has written, so an interrupted save leaves ``path`` as it was.
    """
    path = Path(path)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    temporary = [str(partial_path(path))]
    if distributed:
        dist.broadcast_object_list(temporary, src=0)
    temporary = Path(temporary[0])
    state = {"student": get_model_state_dict(student), "teacher": get_model_state_dict(teacher),
             "optimizer": get_optimizer_state_dict(student, optimizer)}
    # dcp.save returns on every rank once rank 0 has written the metadata, i.e. all is written.
    dcp.save(state, checkpoint_id=str(temporary))
    if rank == 0:
        with open(temporary / EXTRA_FILE_NAME, "wb") as handle:  # DCP syncs its own files
            torch.save(extra, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _replace_directory(temporary, path)
    if distributed:
        dist.barrier()


def _replace_directory(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` is moved aside, then deleted."""
    replaced = None
    if target.exists():
        replaced = target.with_name(target.name + _REPLACED_SUFFIX)
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(target, replaced)
    os.replace(source, target)
    if replaced is not None:
        shutil.rmtree(replaced)


def load_sharded_checkpoint(path: str | os.PathLike, student: nn.Module, teacher: nn.Module,
                            optimizer: torch.optim.Optimizer) -> dict:
    """Load a ``save_sharded_checkpoint`` directory into the networks and the optimizer, in
    place, on any number of ranks: sharded networks (any world size) or plain ones in one
    process. Returns the ``extra`` dict it was saved with. Collective when distributed.

    Parameters that had no optimizer state when it was saved (the head's last layer while it is
    frozen) have none after loading either, as in the uninterrupted run.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint of save_sharded_checkpoint (no .metadata)")
    optimizer_state = get_optimizer_state_dict(student, optimizer)  # creates every entry to load into
    saved = _optimizer_fqns_in_checkpoint(path)
    optimizer_state["state"] = {fqn: entry for fqn, entry in optimizer_state["state"].items() if fqn in saved}
    state = {"student": get_model_state_dict(student), "teacher": get_model_state_dict(teacher),
             "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(student, state["student"])
    set_model_state_dict(teacher, state["teacher"])
    # strict=False lets the parameters without saved state (filtered above) stay without any.
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    return read_checkpoint(path / EXTRA_FILE_NAME)


def full_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a (sharded) network as CPU tensors on rank 0, {} on the others
    (collective: call on every rank). Keys as unsharded: ``backbone.*``, ``head.*``."""
    return get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_full_backbone_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """What ``fastdino.models.export_backbone_state_dict`` gives for the unsharded network (the
    teacher backbone in the release/timm layout), gathered on rank 0; {} on the other ranks."""
    return {key.removeprefix("backbone."): value for key, value in full_state_dict(network).items()
            if key.startswith("backbone.")}


# -- memory ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPerRank:
    """Bytes one rank holds for a DINO run under ``parallelism``, besides the activations (the
    same under DDP and FSDP2 for one batch per rank). ``persistent`` is exact for AdamW (two
    float32 moments and a 0-d float32 step per trainable tensor): student, gradients, moments,
    teacher. ``transient`` is an estimate of the largest short-lived working set:
    - DDP with mixed precision: the student's low-precision weight copies, held from the forward
      to the backward by autocast's saved inputs;
    - FSDP2: the root unit gathered through the student's forward and backward, plus two other
      units (the one computing and the one prefetched), each with its gathered parameters and
      unsharded gradients in the compute dtype and its float32 reduce-scatter input.
    """

    parallelism: str
    world_size: int
    student_parameters: int
    student_gradients: int
    optimizer_state: int
    teacher_parameters: int
    transient: int

    @property
    def persistent(self) -> int:
        return self.student_parameters + self.student_gradients + self.optimizer_state + self.teacher_parameters

    @property
    def total(self) -> int:
        return self.persistent + self.transient


def _elements_per_rank(parameter: torch.Tensor, world_size: int, sharded: bool) -> int:
    """FSDP2 splits dim 0 into ``world_size`` chunks of ceil(rows / world_size) rows (torch.chunk)
    and allocates that size on every rank, the last chunks padded."""
    if not sharded:
        return parameter.numel()
    rows = parameter.shape[0]
    return math.ceil(rows / world_size) * (parameter.numel() // rows)


def memory_per_rank(student: MultiCropWrapper, world_size: int, parallelism: str,
                    mixed_precision_dtype: torch.dtype | None = None) -> MemoryPerRank:
    """The memory of one rank (see ``MemoryPerRank``) for ``student`` and a teacher of the same
    architecture, float32 parameters and AdamW. ``mixed_precision_dtype``: the compute dtype
    (autocast's under DDP, FSDP2's parameter dtype), None for float32. Only shapes are read:
    build the student on the meta device (``with torch.device("meta"):``) to size a ViT-L
    without allocating it."""
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism={parallelism!r}: choose one of {PARALLELISMS}")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    sharded = parallelism == "fsdp"
    float32 = 4
    compute = torch.empty((), dtype=mixed_precision_dtype or torch.float32).element_size()
    parameters = list(student.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    shard = {id(p): _elements_per_rank(p, world_size, sharded) for p in parameters}
    weights = float32 * sum(shard[id(p)] for p in parameters)
    gradients = float32 * sum(shard[id(p)] for p in trainable)
    moments = 2 * gradients + float32 * len(trainable)
    if sharded:
        unit_numels = [sum(p.numel() for p in unit.parameters()) for unit in sharding_units(student)]
        in_units = {id(p) for unit in sharding_units(student) for p in unit.parameters()}
        root_numel = sum(p.numel() for p in parameters if id(p) not in in_units)
        transient = (root_numel + sum(sorted(unit_numels)[-2:])) * (2 * compute + float32)
    else:
        transient = compute * sum(p.numel() for p in trainable) if mixed_precision_dtype else 0
    return MemoryPerRank(parallelism, world_size, weights, gradients, moments, weights, transient)
