"""Process group set-up from torchrun's environment: NCCL on GPUs, gloo on CPUs.

``torchrun`` (single node, multi-node, or under SLURM's ``srun``) exports RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the run is a single process and
torch.distributed stays uninitialized (every collective in fastdino then skips itself).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # "nccl", "gloo", or None for a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.initialized:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """"auto" is this rank's GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                               f"device(s) are visible: use --nproc_per_node <= the GPU count")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto", timeout_minutes: float = 30) -> DistributedContext:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    if not launched_by_torchrun():
        return DistributedContext(0, 1, 0, resolve_device(requested_device, 0), None)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(requested_device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # Checkpoint writes and slow file systems happen between collectives: be generous.
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return DistributedContext(rank, world_size, local_rank, device, backend)


def shutdown_distributed(context: DistributedContext) -> None:
    if context.initialized and dist.is_initialized():
        dist.destroy_process_group()
