"""sinkhorn_knopp_: DINOv2's formula, every backend against the float64 reference, in-place and
out semantics, and the distributed version (2 gloo processes) against one process on the
concatenated batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import backend_params, free_port
from fastdino.ops import sinkhorn_knopp_, sinkhorn_knopp_reference
from tolerances import assert_close

TEACHER_TEMP = 0.04


def dinov2_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """DINOv2's DINOLoss.sinkhorn_knopp_teacher on one process, from its source."""
    q = torch.exp(teacher_output / teacher_temp).t()
    n_rows, n_prototypes = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= n_prototypes
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= n_rows
    q *= n_rows
    return q.t()


def head_logits(generator, rows, n_classes, dtype=torch.float32):
    """The DINO head's logits are cosines: |t| <= 1 (its last layer is weight-normalized)."""
    return (torch.rand(rows, n_classes, generator=generator) * 2 - 1).to(dtype)


@pytest.mark.parametrize("n_iterations", [1, 3, 5])
def test_reference_is_dinov2s_formula(n_iterations, generator):
    logits = head_logits(generator, 13, 1001).double()
    expected = dinov2_sinkhorn_knopp(logits.clone(), 0.07, n_iterations)
    torch.testing.assert_close(sinkhorn_knopp_reference(logits, 0.07, n_iterations), expected, rtol=1e-12, atol=0)


def test_reference_stays_finite_where_dinov2s_overflows(generator):
    """Logits / tau > 88 overflow float32's exp in DINOv2's version; the column shift removes
    that without changing a value (compared in float64, where neither overflows)."""
    logits = head_logits(generator, 8, 100) * 5  # |t| / tau up to 125 at tau = 0.04
    assert not torch.isfinite(dinov2_sinkhorn_knopp(logits.clone(), TEACHER_TEMP)).all()
    result = sinkhorn_knopp_reference(logits, TEACHER_TEMP)
    expected = dinov2_sinkhorn_knopp(logits.double(), TEACHER_TEMP)
    assert_close(result, expected, torch.float32, "sinkhorn", scale=0.0, conditioning=5.0)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows, n_classes", [(1, 3), (7, 1000), (128, 4097), (5, 65536)])
def test_matches_float64_reference(backend, dtype, rows, n_classes, device, generator):
    check_against_reference(backend, device, head_logits(generator, rows, n_classes, dtype))


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows, n_classes", [(1, 3), (9, 1000), (2, 65536)])
def test_triton_matches_float64_reference(backend, dtype, rows, n_classes, device, generator):
    check_against_reference(backend, device, head_logits(generator, rows, n_classes, dtype))


def check_against_reference(backend, device, logits, n_iterations=3):
    expected = sinkhorn_knopp_reference(logits.double(), TEACHER_TEMP, n_iterations)
    result = sinkhorn_knopp_(logits.to(device, copy=True), TEACHER_TEMP, n_iterations, backend=backend)
    assert result.dtype == torch.float32 and result.shape == logits.shape
    # Relative in norm: Q's rows sum to 1, so its norm is the size of its terms (no cancellation).
    assert_close(result.cpu(), expected, logits.dtype, "sinkhorn",
                 f"(backend={backend}, dtype={logits.dtype}, shape={tuple(logits.shape)})")
    torch.testing.assert_close(result.cpu().double().sum(1), torch.ones(logits.shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
def test_float32_logits_are_overwritten_and_others_are_kept(backend, generator):
    logits = head_logits(generator, 6, 50)
    result = sinkhorn_knopp_(logits, TEACHER_TEMP, backend=backend)
    assert result.data_ptr() == logits.data_ptr()
    half = head_logits(generator, 6, 50, torch.bfloat16)
    kept = half.clone()
    result = sinkhorn_knopp_(half, TEACHER_TEMP, backend=backend)
    assert torch.equal(half, kept) and result.dtype == torch.float32
    out = torch.empty(6, 50)
    assert sinkhorn_knopp_(half, TEACHER_TEMP, out=out, backend=backend).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("arguments, message", [
    (dict(logits=torch.zeros(3)), "2-D"),
    (dict(teacher_temp=0.0), "teacher_temp must be > 0"),
    (dict(n_iterations=0), "n_iterations must be a positive int"),
    (dict(out=torch.empty(4, 5, dtype=torch.float16)), "out must be a contiguous torch.float32"),
])
def test_bad_input_is_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        sinkhorn_knopp_(arguments.get("logits", torch.zeros(4, 5)), arguments.get("teacher_temp", 0.04),
                        arguments.get("n_iterations", 3), out=arguments.get("out"))


# -- two processes ---------------------------------------------------------------------------

ROWS_PER_RANK = (5, 0, 9)  # unequal, and one rank without rows (no masked patch on that rank)
N_CLASSES = 1003


def global_logits():
    return head_logits(torch.Generator().manual_seed(77), sum(ROWS_PER_RANK), N_CLASSES)


def run_rank(rank, port, backend, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=len(ROWS_PER_RANK))
    try:
        start = sum(ROWS_PER_RANK[:rank])
        mine = global_logits()[start:start + ROWS_PER_RANK[rank]].contiguous()
        torch.save(sinkhorn_knopp_(mine, TEACHER_TEMP, backend=backend), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
def test_distributed_equals_one_process_on_the_concatenated_batch(backend, tmp_path):
    mp.spawn(run_rank, args=(free_port(), backend, str(tmp_path)), nprocs=len(ROWS_PER_RANK), join=True)
    gathered = torch.cat([torch.load(tmp_path / f"rank{rank}.pt") for rank in range(len(ROWS_PER_RANK))])
    expected = sinkhorn_knopp_reference(global_logits().double(), TEACHER_TEMP)
    assert_close(gathered, expected, torch.float32, "sinkhorn", f"(backend={backend}, distributed)")
    # The prototypes' masses are what the all-reduces make equal: not equal on any one rank.
    single_rank_alone = sinkhorn_knopp_reference(global_logits()[:5].double(), TEACHER_TEMP)
    assert (single_rank_alone - expected[:5]).abs().max() > 1e-3
