"""The teacher center: its momentum update from the (all-reduced) column sum of teacher logits."""

from __future__ import annotations

import torch
import torch.distributed as dist


class CenterUpdate:
    """center <- momentum * center + (1 - momentum) * mean teacher logits over all ranks, in two
    halves: ``start`` launches the all-reduce of the teacher column sum, ``finish`` waits for it
    and moves the center, so the communication overlaps with whatever runs in between (as
    DINOv2 does). Rows are assumed equal per rank, as in the public release; the arithmetic
    follows the release's update_center term by term.
    """

    def __init__(self, center: torch.Tensor, momentum: float):
        self.center = center
        self.momentum = momentum
        self._pending: tuple | None = None

    def start(self, teacher_sum: torch.Tensor, n_rows: int) -> None:
        """teacher_sum: this rank's column sum over ``n_rows`` teacher rows (``dino_loss``'s
        second output); summed over the ranks in place."""
        work, world_size = None, 1
        if dist.is_available() and dist.is_initialized():
            work = dist.all_reduce(teacher_sum, async_op=True)
            world_size = dist.get_world_size()
        self._pending = (work, teacher_sum, n_rows * world_size)

    @torch.no_grad()
    def finish(self) -> None:
        if self._pending is None:
            raise RuntimeError("CenterUpdate.finish() without a start()")
        work, teacher_sum, total_rows = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        batch_center = teacher_sum.reshape(self.center.shape) / total_rows
        self.center.mul_(self.momentum).add_(batch_center * (1 - self.momentum))


def update_center_(center: torch.Tensor, teacher_sum: torch.Tensor, n_rows: int, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * mean of the teacher logits, in place and at
    once (``CenterUpdate`` overlaps the all-reduce instead).

    ``teacher_sum`` is this rank's column sum over ``n_rows`` teacher rows (as returned by
    ``dino_loss``). When torch.distributed is initialized it is summed over all ranks first
    (in place), so every rank ends with the same center.
    """
    update = CenterUpdate(center, momentum)
    update.start(teacher_sum, n_rows)
    update.finish()
