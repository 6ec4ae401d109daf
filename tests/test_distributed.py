"""DINOLoss under torch.distributed (gloo, 2 processes): the center is all-reduced."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import backend_params, free_port
from fastdino.ops import DINOLoss

WORLD_SIZE, BATCH_PER_RANK, NCROPS, OUT_DIM, STEPS = 2, 3, 4, 1000, 3


def make_global_batch(step):
    """Crop-major logits of the whole global batch, identical in every process."""
    generator = torch.Generator().manual_seed(1234 + step)
    batch = WORLD_SIZE * BATCH_PER_RANK
    student = torch.randn(NCROPS, batch, OUT_DIM, generator=generator) * 3
    teacher = torch.randn(2, batch, OUT_DIM, generator=generator) * 3 + 0.5
    return student, teacher


def rank_slice(logits, rank):
    """This rank's samples of every crop, still crop-major."""
    part = logits[:, rank * BATCH_PER_RANK:(rank + 1) * BATCH_PER_RANK]
    return part.reshape(-1, OUT_DIM).contiguous()


def run_rank(rank, port, backend, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        loss_fn = DINOLoss(OUT_DIM, NCROPS, 0.04, 0.04, 0, 10, backend=backend)
        losses = []
        for step in range(STEPS):
            student, teacher = make_global_batch(step)
            losses.append(loss_fn(rank_slice(student, rank), rank_slice(teacher, rank), step))
        torch.save({"center": loss_fn.center, "losses": torch.stack(losses)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
def test_center_is_all_reduced_and_equals_the_single_process_result(backend, tmp_path):
    mp.spawn(run_rank, args=(free_port(), backend, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    assert torch.equal(results[0]["center"], results[1]["center"]), "ranks disagree on the center"

    single = DINOLoss(OUT_DIM, NCROPS, 0.04, 0.04, 0, 10, backend=backend)
    for step in range(STEPS):
        student, teacher = make_global_batch(step)
        loss = single(student.reshape(-1, OUT_DIM), teacher.reshape(-1, OUT_DIM), step)
        # Equal per-rank batches: the global loss is the mean of the ranks' losses.
        mean_rank_loss = (results[0]["losses"][step] + results[1]["losses"][step]) / 2
        torch.testing.assert_close(mean_rank_loss, loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(results[0]["center"], single.center, rtol=1e-5, atol=1e-6)
    assert single.center.abs().max() > 0.1  # the center did move
