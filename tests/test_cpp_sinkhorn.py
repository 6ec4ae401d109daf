"""The Sinkhorn-Knopp passes of fastdino._C (OPS_CONTRACT.md section 5) called directly, against
float64 torch statements of the contract's formulas written here.

Tolerance: the table's "sinkhorn" entry. Every output is float32 whatever the input dtype, and
the reference runs on the same (upcast) inputs, so the errors are float32 ones (u = 6e-8): an
exp(z) is good to half an ulp of |z| (3e-6 at the |z| <= 50 of head logits at tau = 0.04), and
the kernels' sums of positive terms take at most 256 terms per float32 accumulator (a column
sum: 64 rows per chunk plus one merge per chunk, (64 + R / 64) u), at most ~260 u = 1.6e-5
relative in the worst case for these shapes; products and divisions by those sums add a few u.
Positive terms do not cancel: no scale is needed.
"""

import importlib

import pytest
import torch

from fastdino.ops import backend_status
from tolerances import assert_close

CPP_STATUS = backend_status()["cpp"]
pytestmark = pytest.mark.skipif(CPP_STATUS != "available", reason=CPP_STATUS)

INV_TEMP = 1.0 / 0.04
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# R odd, K not a power of two; the kernels' column reductions go over tiles of 64-row chunks x
# column blocks (one block up to K = 16383, two for (300, 20001), eight for (133, 65536)).
SHAPES = [(1, 3), (7, 1000), (517, 1000), (37, 4097), (300, 20001), (5, 65536), (133, 65536)]


@pytest.fixture
def C():
    return importlib.import_module("fastdino._C")


def head_logits(generator, rows, n_classes, dtype=torch.float32):
    """Cosine logits, |t| <= 1, as a weight-normalized DINO head produces."""
    return (torch.rand(rows, n_classes, generator=generator) * 2 - 1).to(dtype)


def positive_matrix(generator, rows, n_classes):
    """An E as the passes see it: exp of scaled logits, entries spread over ~20 orders of
    magnitude, and one row that underflowed entirely."""
    logits = head_logits(generator, rows, n_classes).double()
    e = torch.exp((logits - logits.amax(0)) * INV_TEMP).float()
    e[rows // 2] = 0.0
    return e


def scales(generator, n):
    """Positive scales of very different sizes, like the reciprocals of column / row sums."""
    return torch.exp(torch.randn(n, generator=generator) * 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_column_max_is_exact(C, shape, dtype, generator):
    logits = head_logits(generator, *shape, dtype) * 7
    m = C.sinkhorn_column_max(logits)
    assert m.dtype == torch.float32 and m.shape == (shape[1],)
    assert torch.equal(m, logits.float().amax(0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_exp_matches_float64(C, shape, dtype, generator):
    logits = head_logits(generator, *shape, dtype)
    # The global column max of all ranks: here this rank's max plus a bit (other ranks' rows).
    shift = logits.float().amax(0) + torch.rand(shape[1], generator=generator) * 0.1
    out = torch.full(shape, float("nan"))
    column_sums = C.sinkhorn_exp_(logits, shift, INV_TEMP, out)
    expected = torch.exp((logits.double() - shift.double()) * INV_TEMP)
    assert column_sums.dtype == torch.float32 and column_sums.shape == (shape[1],)
    assert_close(out, expected, dtype, "sinkhorn", f"(E, {dtype}, {shape})")
    assert_close(column_sums, expected.sum(0), dtype, "sinkhorn", f"(column sums, {dtype}, {shape})")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_exp_in_place_equals_out_of_place(C, shape, generator):
    logits = head_logits(generator, *shape)
    shift = logits.amax(0)
    out = torch.empty(shape)
    expected_sums = C.sinkhorn_exp_(logits, shift, INV_TEMP, out)
    in_place = logits.clone()
    sums = C.sinkhorn_exp_(in_place, shift, INV_TEMP, in_place)
    assert torch.equal(in_place, out) and torch.equal(sums, expected_sums)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_row_scales_match_float64(C, shape, generator):
    e, u = positive_matrix(generator, *shape), scales(generator, shape[1])
    v = C.sinkhorn_row_scales(e, u)
    sums = e.double() @ u.double()
    expected = torch.where(sums == 0, 0.0, 1.0 / sums)
    assert v.dtype == torch.float32 and v.shape == (shape[0],)
    assert v[shape[0] // 2] == 0.0  # the underflowed row contributes nothing, not inf
    assert_close(v, expected, torch.float32, "sinkhorn", f"(row scales, {shape})")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_column_sums_match_float64(C, shape, generator):
    e, v = positive_matrix(generator, *shape), scales(generator, shape[0])
    c = C.sinkhorn_column_sums(e, v)
    assert c.dtype == torch.float32 and c.shape == (shape[1],)
    assert_close(c, (e.double() * v.double()[:, None]).sum(0), torch.float32, "sinkhorn",
                 f"(column sums, {shape})")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normalize_rows_matches_float64(C, shape, generator):
    e, u = positive_matrix(generator, *shape), scales(generator, shape[1])
    expected = e.double() * u.double()
    expected = expected / expected.sum(1, keepdim=True).clamp_min(1e-300)
    C.sinkhorn_normalize_rows_(e, u)
    assert not e[shape[0] // 2].any()  # a zero row stays zero, not NaN
    assert_close(e, expected, torch.float32, "sinkhorn", f"(normalized rows, {shape})")


def test_passes_are_bitwise_deterministic_for_any_thread_count(C, generator):
    """Column reductions go in a fixed order of row chunks, rows are independent: the same bits
    on every call and for every thread count."""
    logits = head_logits(generator, 301, 20001)
    u, v = scales(generator, 20001), scales(generator, 301)

    def run():
        m = C.sinkhorn_column_max(logits)
        e = torch.empty(logits.shape)
        sums = C.sinkhorn_exp_(logits, m, INV_TEMP, e)
        results = [m, sums, e.clone(), C.sinkhorn_row_scales(e, u), C.sinkhorn_column_sums(e, v)]
        C.sinkhorn_normalize_rows_(e, u)
        return results + [e]

    first, second = run(), run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, one_thread):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_rank_without_rows(C):
    """R = 0 (a rank with no masked patch): zero column sums, no row scales, nothing to
    normalize; only the column max needs a row."""
    empty = torch.empty(0, 10)
    assert torch.equal(C.sinkhorn_exp_(empty, torch.zeros(10), INV_TEMP, empty), torch.zeros(10))
    assert C.sinkhorn_row_scales(empty, torch.ones(10)).shape == (0,)
    assert torch.equal(C.sinkhorn_column_sums(empty, torch.ones(0)), torch.zeros(10))
    C.sinkhorn_normalize_rows_(empty, torch.ones(10))
    with pytest.raises(RuntimeError, match="logits must have at least one row"):
        C.sinkhorn_column_max(empty)


E = torch.rand(6, 10)


@pytest.mark.parametrize("call, message", [
    (lambda C: C.sinkhorn_column_max(torch.rand(6, 10).double()),
     "logits must have dtype float32, bfloat16 or float16, got Double"),
    (lambda C: C.sinkhorn_column_max(torch.rand(6)), r"logits must be 2-D \(R, K\)"),
    (lambda C: C.sinkhorn_column_max(torch.rand(10, 6).t()), "logits must be contiguous"),
    (lambda C: C.sinkhorn_exp_(E, torch.zeros(9), INV_TEMP, torch.empty(6, 10)),
     r"shift must be a contiguous 1-D tensor of K = 10 elements"),
    (lambda C: C.sinkhorn_exp_(E, torch.zeros(10).half(), INV_TEMP, torch.empty(6, 10)),
     "shift must be float32, got Half"),
    (lambda C: C.sinkhorn_exp_(E, torch.zeros(10), 0.0, torch.empty(6, 10)),
     "inv_temp must be a positive finite number, got 0"),
    (lambda C: C.sinkhorn_exp_(E, torch.zeros(10), INV_TEMP, torch.empty(6, 10).bfloat16()),
     "out must be float32, got BFloat16"),
    (lambda C: C.sinkhorn_exp_(E, torch.zeros(10), INV_TEMP, torch.empty(5, 10)),
     "out must have the shape of logits"),
    (lambda C: C.sinkhorn_exp_(E.view(-1)[:50].view(5, 10), torch.zeros(10), INV_TEMP,
                               E.view(-1)[10:].view(5, 10)),
     "out must be either logits itself"),
    (lambda C: C.sinkhorn_row_scales(E, torch.ones(6)),
     r"column_scale must be a contiguous 1-D tensor of K = 10 elements"),
    (lambda C: C.sinkhorn_row_scales(E.half(), torch.ones(10)), "E must be float32, got Half"),
    (lambda C: C.sinkhorn_column_sums(E, torch.ones(10)),
     r"row_scale must be a contiguous 1-D tensor of R = 6 elements"),
    (lambda C: C.sinkhorn_column_sums(E, torch.ones(6).double()), "row_scale must be float32"),
    (lambda C: C.sinkhorn_normalize_rows_(E.clone(), torch.ones(10, 1)),
     "column_scale must be a contiguous 1-D tensor"),
    (lambda C: C.sinkhorn_normalize_rows_(E.bfloat16(), torch.ones(10)),
     "E must be float32, got BFloat16"),
])
def test_bad_input_is_refused_naming_the_argument(C, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(C)
