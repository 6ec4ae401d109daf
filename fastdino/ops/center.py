"""The teacher center: its momentum update from the (all-reduced) column sum of teacher logits."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def update_center_(center: torch.Tensor, teacher_sum: torch.Tensor, n_rows: int, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * mean of the teacher logits, in place.

    ``teacher_sum`` is this rank's column sum over ``n_rows`` teacher rows (as returned by
    ``dino_loss``). When torch.distributed is initialized it is summed over all ranks first
    (in place), so every rank ends with the same center; rows are assumed equal per rank, as
    in the public release. The arithmetic follows the release's update_center term by term.
    """
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(teacher_sum)
        world_size = dist.get_world_size()
    batch_center = teacher_sum.reshape(center.shape) / (n_rows * world_size)
    center.mul_(momentum).add_(batch_center * (1 - momentum))
