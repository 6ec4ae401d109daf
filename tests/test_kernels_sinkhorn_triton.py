"""kernels' Sinkhorn-Knopp passes (OPS_CONTRACT.md section 5) called directly, against float64 torch
on the same (upcast) inputs: interpreted on CPU tensors without a GPU, on CUDA with one.

Tolerances (tests/tolerances.py). Every output is float32 whatever the input dtype, and the
inputs are exact in float64, so the float32 row of the table applies:
- exp: each entry is exp(z) with z = (logit - shift) / tau formed in float32 to about half an
  ulp of |z|, the error model of the DINO loss's probabilities: its "grad" tolerance, for the
  entries and for their column sums (sums of non-negative terms add no cancellation).
- row scales, column sums, normalized rows: products and float32 sums of non-negative terms, a
  few u per step like the teacher's column sum: "teacher_sum". No quantity cancels, so errors
  are relative to the result itself (scale 0).
"""

import pytest
import torch

from fastdino.kernels import (
    sinkhorn_column_max,
    sinkhorn_column_sums,
    sinkhorn_exp_,
    sinkhorn_normalize_rows_,
    sinkhorn_row_scales,
)
from fastdino.kernels.sinkhorn import _column_config, _row_config
from tolerances import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TEACHER_TEMP = 0.04
EXP, SUMS = (torch.float32, "grad"), (torch.float32, "teacher_sum")
# R odd; K = 3, not a power of two, one past a power of two; and K = 65536 with a tiny R. With the
# interpreter's 4 "SMs" these shapes give one and several row groups and row chunks.
SHAPES = [(5, 3), (33, 1000), (7, 4097), (2, 65536)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(generator, rows, n_classes, dtype, scale=3.0):
    return (torch.randn(rows, n_classes, generator=generator) * scale).to(DEVICE, dtype)


def make_E(generator, rows, n_classes):
    """Positive entries over many orders of magnitude, like exp of centered logits, one row of
    zeros (a row that underflowed entirely)."""
    E = torch.exp(torch.randn(rows, n_classes, generator=generator) * 4.0)
    E[rows // 2] = 0.0
    return E.to(DEVICE)


def make_scale(generator, length):
    """Positive scales with some zeros."""
    scale = torch.rand(length, generator=generator) + 0.1
    scale[::5] = 0.0
    return scale.to(DEVICE)


def ids(value):
    return str(value).replace("torch.", "")


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_column_max_is_exact(shape, dtype, generator):
    logits = make_logits(generator, *shape, dtype)
    column_max = sinkhorn_column_max(logits)
    assert column_max.dtype == torch.float32 and column_max.shape == (shape[1],)
    assert torch.equal(column_max.cpu(), logits.cpu().float().amax(dim=0))


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_exp_and_its_column_sums(shape, dtype, generator):
    logits = make_logits(generator, *shape, dtype)
    shift = sinkhorn_column_max(logits)
    out = torch.full(shape, float("nan"), device=DEVICE)
    column_sums = sinkhorn_exp_(logits, shift, 1.0 / TEACHER_TEMP, out)
    expected = torch.exp((logits.cpu().double() - shift.cpu().double()) / TEACHER_TEMP)
    assert column_sums.dtype == torch.float32 and column_sums.shape == (shape[1],)
    assert_close(out.cpu(), expected, *EXP, f"(exp {dtype} {shape})")
    assert_close(column_sums.cpu(), expected.sum(0), *EXP, f"(exp column sums {dtype} {shape})")


@pytest.mark.parametrize("shape", [(33, 1000), (2, 65536)], ids=ids)
def test_exp_in_place_of_float32_logits(shape, generator):
    logits = make_logits(generator, *shape, torch.float32)
    shift = torch.randn(shape[1], generator=generator).to(DEVICE) + logits.amax(0)
    separate = torch.empty_like(logits)
    sums = sinkhorn_exp_(logits, shift, 1.0 / 0.07, separate)
    in_place = logits.clone()
    sums_in_place = sinkhorn_exp_(in_place, shift, 1.0 / 0.07, in_place)
    assert torch.equal(in_place, separate) and torch.equal(sums_in_place, sums)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_row_scales(shape, generator):
    E, column_scale = make_E(generator, *shape), make_scale(generator, shape[1])
    row_scales = sinkhorn_row_scales(E, column_scale)
    sums = (E.cpu().double() * column_scale.cpu().double()).sum(1)
    expected = torch.where(sums == 0, 0.0, 1.0 / sums)
    assert row_scales.dtype == torch.float32 and row_scales.shape == (shape[0],)
    assert float(row_scales[shape[0] // 2]) == 0.0, "a row summing to 0 must get v = 0, not inf"
    assert_close(row_scales.cpu(), expected, *SUMS, f"(row scales {shape})")


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_column_sums(shape, generator):
    E, row_scale = make_E(generator, *shape), make_scale(generator, shape[0])
    column_sums = sinkhorn_column_sums(E, row_scale)
    expected = (E.cpu().double() * row_scale.cpu().double()[:, None]).sum(0)
    assert column_sums.dtype == torch.float32 and column_sums.shape == (shape[1],)
    assert_close(column_sums.cpu(), expected, *SUMS, f"(column sums {shape})")


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_normalize_rows(shape, generator):
    E, column_scale = make_E(generator, *shape), make_scale(generator, shape[1])
    scaled = E.cpu().double() * column_scale.cpu().double()
    sums = scaled.sum(1, keepdim=True)
    expected = torch.where(sums == 0, 0.0, scaled / sums)
    storage = E.data_ptr()
    assert sinkhorn_normalize_rows_(E, column_scale) is None
    assert E.data_ptr() == storage
    assert torch.equal(E[shape[0] // 2].cpu(), torch.zeros(shape[1])), "a zero row must stay 0"
    assert_close(E.cpu(), expected, *SUMS, f"(normalized rows {shape})")


def test_a_row_whose_scaled_entries_are_all_zero_gets_zero(generator):
    """The row sum is 0 through the column scales, not E: E's only nonzero entries meet u = 0."""
    E = make_E(generator, 3, 1000)
    column_scale = make_scale(generator, 1000)
    E[0] = torch.where(column_scale == 0, 1.0, 0.0)
    assert float(sinkhorn_row_scales(E, column_scale)[0]) == 0.0
    sinkhorn_normalize_rows_(E, column_scale)
    assert not E[0].any()


def test_bitwise_deterministic(generator):
    logits = make_logits(generator, 33, 4097, torch.bfloat16)
    E = make_E(generator, 33, 4097)
    column_scale, row_scale = make_scale(generator, 4097), make_scale(generator, 33)
    outs = [torch.empty(33, 4097, device=DEVICE) for _ in range(2)]
    sums = [sinkhorn_exp_(logits, sinkhorn_column_max(logits), 25.0, out) for out in outs]
    assert torch.equal(outs[0], outs[1]) and torch.equal(sums[0], sums[1])
    for run in (lambda: sinkhorn_row_scales(E, column_scale), lambda: sinkhorn_column_sums(E, row_scale)):
        assert torch.equal(run(), run())
    first, second = E.clone(), E.clone()
    sinkhorn_normalize_rows_(first, column_scale)
    sinkhorn_normalize_rows_(second, column_scale)
    assert torch.equal(first, second)


@pytest.mark.parametrize("rows", [128, 2458])
def test_production_sizes_fill_an_h200(rows):
    """K = 65536 at the DINO (128) and iBOT (2458) rows of a rank: every pass launches enough
    programs for 132 SMs, a column pass ~4 per SM, a row pass at least 3 per SM."""
    n_sms, K = 132, 65536
    block, nb, tile_rows, nrg, rows_per_group, _ = _column_config(rows, K, n_sms)
    assert nb * nrg >= 3 * n_sms and (nrg - 1) * rows_per_group < rows <= nrg * rows_per_group
    block, nc, chunk, _ = _row_config(rows, K, n_sms)
    assert rows * nc >= 3 * n_sms and (nc - 1) * chunk < K <= nc * chunk and chunk % block == 0


def test_bad_input_is_refused_naming_the_argument():
    E, u, v = torch.rand(4, 10, device=DEVICE), torch.rand(10, device=DEVICE), torch.rand(4, device=DEVICE)
    cases = [
        (lambda: sinkhorn_column_max(torch.rand(4, 10, dtype=torch.float64, device=DEVICE)),
         "logits must have dtype in"),
        (lambda: sinkhorn_column_max(torch.rand(0, 10, device=DEVICE)), "logits must have at least one row"),
        (lambda: sinkhorn_column_max(torch.rand(10, device=DEVICE)), "logits must be 2-D"),
        (lambda: sinkhorn_exp_(E, torch.rand(9, device=DEVICE), 25.0, E), r"shift must have shape \(10,\)"),
        (lambda: sinkhorn_exp_(E, u, 0.0, E), "inv_temp must be a positive finite float, got 0.0"),
        (lambda: sinkhorn_exp_(E, u, 25.0, E.bfloat16()), "out must have dtype in \\(float32\\)"),
        (lambda: sinkhorn_exp_(E, u, 25.0, torch.empty(4, 9, device=DEVICE)),
         "out must have the logits' shape"),
        (lambda: sinkhorn_row_scales(E.half(), u), "E must have dtype in \\(float32\\)"),
        (lambda: sinkhorn_row_scales(E, v), r"column_scale must have shape \(10,\), got \(4,\)"),
        (lambda: sinkhorn_row_scales(E.t(), u), "E must be contiguous"),
        (lambda: sinkhorn_column_sums(E, u), r"row_scale must have shape \(4,\), got \(10,\)"),
        (lambda: sinkhorn_column_sums(E, v.double()), "row_scale must have dtype in \\(float32\\)"),
        (lambda: sinkhorn_normalize_rows_(E, u[:, None]), "column_scale must be 1-D"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
