"""Fused DINO cross-entropy loss forward + gradient (Triton).

Math and its derivation: OPS_CONTRACT.md section 1, whose notation this file uses (student row
r = v*B + b is crop v of sample b, teacher row i*B + b global crop i, G = n_global_crops,
x = s / tau_s, P_i, Q_v, n_t(v), n_pairs).

All exponentials are base 2 (``exp2`` is the native instruction): with z2 = z * log2(e),
softmax(z) = exp2(z2 - lse2(z2)) and lse(z) = lse2(z2) * ln(2). The student side works on
x2 = s * (log2(e) / tau_s); the row loss is taken in the direct form
L = ln(2) * (n_t * lse2(x2) - sum_k Q(k) x2(k)), not the contract's cancellation-free one.

The teacher softmax subtracts its max BEFORE the scaling by t_scale = log2(e) / tau_t: with
y = t - c, P(k) = exp2((y(k) - max y) * t_scale - log2 S_t) and
S_t = sum_k exp2((y(k) - max y) * t_scale).
The top entry's exponent is then -log2 S_t (|.| <= log2 K = 16) and no exponent passes through a
float32 number of size |y| t_scale (~430 for |y| = 12 at tau_t = 0.04), whose half ulp 1.5e-5
would scale every P of the row by up to 1e-5. The teacher pass (``_teacher_kernel``,
``_teacher_row_stats``, ``_teacher_softmax``, launched by ``_teacher_pass``) serves the soft
cross-entropy's logits mode too (soft_cross_entropy.py).

Kernels (everything accumulated in float32, whatever the input dtypes):

(a) ``_teacher_kernel``, grid (NB column blocks, NRG row groups). A program owns BLOCK_T columns
    and a range of teacher rows, which it walks ROWS_T rows at a time ([ROWS_T, BLOCK_T] tile
    loads). For each (teacher row, column block) it writes the partial softmax statistics
    (max of y over the block, sum of exp2((y - max) * t_scale)) to a small (R_t, NB) pair of
    float32 buffers, and it accumulates the column sums of t over its rows in a fixed order, to
    an (NRG, K) buffer that torch sums over dim 0 when NRG > 1 (few column blocks: small K; a
    fixed-order reduction). This is the ONLY read of the teacher from memory besides the
    L2-friendly re-reads of (b). No atomics.
(b) ``_student_kernel``, one program per student row. Programs are ordered sample-major
    (pid -> b = pid // NV), so the programs running together share the same teacher rows, which
    then come from L2. Prologue: combine the (max, sumexp) partials of this row's NT teacher rows
    into their (max y, log2 S_t) (``_teacher_row_stats`` on a [NT_P2, NB_P2] tile). Loop 1 over K
    in BLOCK_S blocks: online max / sum-exp2 of x2 (one block reduction per step, ONE exp2 per
    student element) and the per-lane accumulated dot Q.x2, with Q = sum_i P_i recomputed from
    the teacher tile [NT_P2, BLOCK_S]. Row loss -> loss_rows[row]. Loop 2: re-read s, recompute
    Q, write grad = (NT exp2(x2 - lse2) - Q) * 1 / (tau_s B n_pairs) in grad's dtype (the
    student's, or float32: the op's choice for float16 students). Each block of the row is read
    before the same block is written, so grad may alias student.
    NT = n_t(v) is a constexpr: global crops (v < G, NT = G - 1) and local crops (v >= G,
    NT = G) are two launches of the same kernel. NT == 0 (G == 1, v == 0): zero grad and loss.

Memory traffic per student element: 2 reads of s (the second often an L2 hit) + 1 write of grad;
teacher rows and the center are re-read from L2. The teacher is read from memory once.
loss = sum(loss_rows) / (B n_pairs) (torch sum of an (R_s,) vector: deterministic).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import triton
import triton.language as tl

from .tensor_lists import cast_rne, check_float_tensor, interpreter_active, on_device_of

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Student kernel: BLOCK_S elements per loop step, 8 per thread (16-byte loads for 16-bit types,
# two for fp32). Teacher kernel: [ROWS_T, BLOCK_T] tiles.
MAX_BLOCK_S = 4096
MIN_BLOCK_T = 256
MAX_BLOCK_T = 4096
MAX_COL_BLOCKS = 1024
ROWS_T = 8
# Software pipelining of the student loops (tl.range num_stages). 1 = plain loop: 64 registers
# per thread and no shared memory at BLOCK_S = 4096 / 16 warps on sm_90 (2 programs per SM).
# 2 prefetches the next block through shared memory (cp.async) at ~105 registers; worth
# benchmarking on the target GPU before changing.
STUDENT_NUM_STAGES = 1


@triton.jit
def _teacher_kernel(
    t_ptr,
    c_ptr,
    m_part_ptr,
    s_part_ptr,
    tsum_ptr,
    R_t,
    K,
    NB,
    rows_per_group,
    t_scale,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < K
    # other=+inf: masked columns get z2 = -inf, i.e. exp2 = 0
    c = tl.load(c_ptr + cols, mask=cmask, other=float("inf"))
    csum = tl.zeros([BLOCK], dtype=tl.float32)
    r_begin = pid_r * rows_per_group
    r_end = tl.minimum(r_begin + rows_per_group, R_t)
    for r0 in range(r_begin, r_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < r_end
        mask = rmask[:, None] & cmask[None, :]
        t = tl.load(
            t_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        csum += tl.sum(t, axis=0)
        y = t - c[None, :]
        m = tl.max(y, axis=1)
        se = tl.sum(_teacher_softmax(y, m[:, None], 0.0, t_scale), axis=1)  # P's numerators
        tl.store(m_part_ptr + rows * NB + pid_k, m, mask=rmask)
        tl.store(s_part_ptr + rows * NB + pid_k, se, mask=rmask)
    tl.store(tsum_ptr + pid_r.to(tl.int64) * K + cols, csum, mask=cmask)


@triton.jit
def _teacher_row_stats(pm, ps, t_scale):
    """(max y, log2 S_t) of each row of a [rows, NB_P2] tile of _teacher_kernel's partials (pm:
    block maxima, -inf where masked; ps: block sums, 0 where masked). A row without partials
    (padding) gets max y = 0 and log2 S_t = +inf: _teacher_softmax gives it P = 0, and no
    -inf - -inf is formed."""
    y_max = tl.max(pm, axis=1)
    present = y_max > float("-inf")
    y_max = tl.where(present, y_max, 0.0)
    log2_sum = tl.log2(tl.sum(ps * tl.exp2((pm - y_max[:, None]) * t_scale), axis=1))
    return y_max, tl.where(present, log2_sum, float("inf"))


@triton.jit
def _teacher_softmax(y, y_max, log2_sum, t_scale):
    """P = exp2((y - max y) * t_scale - log2 S_t) of y = t - c: the max subtracted before the
    scaling."""
    return tl.exp2((y - y_max) * t_scale - log2_sum)


@triton.jit
def _student_kernel(
    s_ptr,
    t_ptr,
    c_ptr,
    g_ptr,
    m_part_ptr,
    s_part_ptr,
    loss_rows_ptr,
    K,
    B,
    NB,
    V0,
    NV,
    s_scale,
    t_scale,
    g_scale,
    NT: tl.constexpr,
    NT_P2: tl.constexpr,
    NB_P2: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NV  # sample-major order: neighbouring programs share teacher rows (L2)
    v = V0 + pid % NV
    row = v * B + b
    s_row = s_ptr + row.to(tl.int64) * K
    g_row = g_ptr + row.to(tl.int64) * K
    offs = tl.arange(0, BLOCK)

    if NT == 0:
        # G == 1 and v == 0: no teacher view to compare with; Q = 0 and n_t = 0.
        for k0 in range(0, K, BLOCK):
            cols = k0 + offs
            tl.store(g_row + cols, tl.zeros([BLOCK], dtype=tl.float32).to(g_ptr.dtype.element_ty),
                     mask=cols < K)
        tl.store(loss_rows_ptr + row, 0.0)
    else:
        # Teacher rows of this student row: j-th is i = j + (j >= v), j < NT (skips i == v).
        j = tl.arange(0, NT_P2)
        jmask = j < NT
        t_rows = (j + (j >= v).to(tl.int32)) * B + b
        # Prologue: (max y, log2 S_t) of each teacher row from the teacher kernel's partials;
        # the padded rows j >= NT have none and get P = 0.
        nb = tl.arange(0, NB_P2)
        pmask = jmask[:, None] & (nb < NB)[None, :]
        part_off = t_rows[:, None] * NB + nb[None, :]
        pm = tl.load(m_part_ptr + part_off, mask=pmask, other=float("-inf"))
        ps = tl.load(s_part_ptr + part_off, mask=pmask, other=0.0)
        y_max, log2_sum = _teacher_row_stats(pm, ps, t_scale)
        y_max = y_max[:, None]
        log2_sum = log2_sum[:, None]
        t_base = t_ptr + t_rows.to(tl.int64)[:, None] * K

        # Loop 1: online max / sum-exp2 of x2 and the dot Q.x2.
        m_i = tl.full([], float("-inf"), dtype=tl.float32)
        d_i = tl.full([], 0.0, dtype=tl.float32)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK, num_stages=NUM_STAGES):
            cols = k0 + offs
            cmask = cols < K
            x = tl.load(s_row + cols, mask=cmask, other=float("-inf")).to(tl.float32) * s_scale
            c = tl.load(c_ptr + cols, mask=cmask, other=float("inf"))
            t = tl.load(t_base + cols[None, :], mask=jmask[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            q = tl.sum(_teacher_softmax(t - c[None, :], y_max, log2_sum, t_scale), axis=0)
            m_new = tl.maximum(m_i, tl.max(x, axis=0))
            d_i = d_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x - m_new), axis=0)
            m_i = m_new
            dot += q * tl.where(cmask, x, 0.0)
        lse = m_i + tl.log2(d_i)
        tl.store(loss_rows_ptr + row, (NT * lse - tl.sum(dot, axis=0)) * 0.6931471805599453)

        # Loop 2: grad = (NT softmax(x) - Q) * g_scale; each block read before it is written.
        for k0 in tl.range(0, K, BLOCK, num_stages=NUM_STAGES):
            cols = k0 + offs
            cmask = cols < K
            x = tl.load(s_row + cols, mask=cmask, other=0.0).to(tl.float32) * s_scale
            c = tl.load(c_ptr + cols, mask=cmask, other=float("inf"))
            t = tl.load(t_base + cols[None, :], mask=jmask[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            q = tl.sum(_teacher_softmax(t - c[None, :], y_max, log2_sum, t_scale), axis=0)
            g = (NT * tl.exp2(x - lse) - q) * g_scale
            tl.store(g_row + cols, cast_rne(g, g_ptr.dtype.element_ty, INTERPRET), mask=cmask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index) -> int:
    if device_index is None:
        return 4  # interpreter on CPU: few programs keep it fast; the logic is the same
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _teacher_config(R_t: int, K: int, n_sms: int):
    block_t = min(max(MIN_BLOCK_T, _next_pow2(triton.cdiv(K, MAX_COL_BLOCKS))), MAX_BLOCK_T)
    block_t = min(block_t, _next_pow2(K))
    nb = triton.cdiv(K, block_t)
    rows = min(ROWS_T, _next_pow2(R_t))
    # Enough programs to fill the GPU (~4 per SM): split the rows when there are few column blocks.
    row_tiles = triton.cdiv(R_t, rows)
    nrg = max(1, min(row_tiles, (4 * n_sms) // nb))
    rows_per_group = triton.cdiv(row_tiles, nrg) * rows
    nrg = triton.cdiv(R_t, rows_per_group)
    num_warps = 4 if rows * block_t <= 2048 else 8
    return block_t, nb, rows, nrg, rows_per_group, num_warps


def _teacher_pass(teacher, center, t_scale, n_sms):
    """Launches the teacher pass (a) over teacher (R_t >= 1, K) and center (K,), checked by the
    caller, on the current device. Returns (m_part, s_part, teacher_sum): the (R_t, NB) float32
    partials that ``_teacher_row_stats`` combines and the teacher's (K,) float32 column sums."""
    R_t, K = teacher.shape
    block_t, nb, rows_t, nrg, rows_per_group, warps_t = _teacher_config(R_t, K, n_sms)
    m_part = torch.empty((R_t, nb), dtype=torch.float32, device=teacher.device)
    s_part = torch.empty((R_t, nb), dtype=torch.float32, device=teacher.device)
    tsum_out = torch.empty((nrg, K), dtype=torch.float32, device=teacher.device)
    _teacher_kernel[(nb, nrg)](
        teacher, center, m_part, s_part, tsum_out,
        R_t, K, nb, rows_per_group, t_scale,
        ROWS=rows_t, BLOCK=block_t,
        num_warps=warps_t, enable_fp_fusion=True,
    )
    return m_part, s_part, tsum_out[0] if nrg == 1 else tsum_out.sum(dim=0)


def _student_config(K: int):
    block_s = min(MAX_BLOCK_S, _next_pow2(K))
    num_warps = max(1, min(16, block_s // 256))
    return block_s, num_warps


def _check_positive(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return value


def _check_student_teacher(student, teacher, center, grad):
    """The checks of (student, teacher, center, grad) that this op and the soft cross-entropy
    share: dtypes, K >= 1 columns everywhere, grad's shape and dtype, one device. Returns
    (R_s, R_t, K)."""
    check_float_tensor(student, "student", dim=2)
    check_float_tensor(teacher, "teacher", dim=2)
    check_float_tensor(center, "center", (torch.float32,), dim=1)
    check_float_tensor(grad, "grad", dim=2)
    R_s, K = student.shape
    R_t = teacher.shape[0]
    if K < 1:
        raise ValueError(f"student must have at least one column, got shape {tuple(student.shape)}")
    if teacher.shape[1] != K:
        raise ValueError(f"teacher has {teacher.shape[1]} columns but student has {K}")
    if center.shape[0] != K:
        raise ValueError(f"center must have shape ({K},), got {tuple(center.shape)}")
    if tuple(grad.shape) != (R_s, K):
        raise ValueError(f"grad must have the student's shape {(R_s, K)}, got {tuple(grad.shape)}")
    if grad.dtype not in (student.dtype, torch.float32):
        raise ValueError(
            f"grad must have the student's dtype {student.dtype} or float32, got {grad.dtype}"
        )
    for name, x in (("teacher", teacher), ("center", center), ("grad", grad)):
        if x.device != student.device:
            raise ValueError(f"{name} is on {x.device} but student is on {student.device}")
    return R_s, R_t, K


def dino_loss_forward(student, teacher, center, grad, n_global_crops, student_temp, teacher_temp):
    """Returns (loss: 0-d float32, teacher_sum: (K,) float32) and writes d loss / d student to grad."""
    R_s, R_t, K = _check_student_teacher(student, teacher, center, grad)
    if isinstance(n_global_crops, bool) or not isinstance(n_global_crops, numbers.Integral):
        raise ValueError(f"n_global_crops must be an int, got {type(n_global_crops).__name__}")
    G = int(n_global_crops)
    tau_s = _check_positive(student_temp, "student_temp")
    tau_t = _check_positive(teacher_temp, "teacher_temp")
    if G < 1:
        raise ValueError(f"n_global_crops must be >= 1, got {G}")
    if R_t < G or R_t % G != 0:
        raise ValueError(f"teacher rows ({R_t}) must be a positive multiple of n_global_crops ({G})")
    B = R_t // G
    if R_s % B != 0:
        raise ValueError(f"student rows ({R_s}) must be a multiple of the batch size B = {B}")
    ncrops = R_s // B
    if ncrops < G:
        raise ValueError(f"student has {ncrops} crops per sample, fewer than n_global_crops ({G})")
    n_pairs = G * ncrops - G
    if n_pairs == 0:
        raise ValueError(
            "no (teacher, student) crop pairs: n_global_crops == 1 and a single student crop"
        )

    device = student.device
    n_sms = _num_sms(device.index if device.type == "cuda" else None)
    if device.type == "cuda" and device.index is None:  # pragma: no cover
        n_sms = _num_sms(torch.cuda.current_device())

    with on_device_of([student]):  # the launches run on the tensors' device, not the current one
        # (a) teacher pass
        t_scale = LOG2E / tau_t
        m_part, s_part, teacher_sum = _teacher_pass(teacher, center, t_scale, n_sms)
        nb = m_part.shape[1]

        # (b) student pass: global crops (NT = G - 1), then local crops (NT = G)
        loss_rows = torch.empty(R_s, dtype=torch.float32, device=device)
        block_s, warps_s = _student_config(K)
        s_scale = LOG2E / tau_s
        g_scale = 1.0 / (tau_s * B * n_pairs)
        for v0, nv, nt in ((0, G, G - 1), (G, ncrops - G, G)):
            if nv == 0:
                continue
            _student_kernel[(B * nv,)](
                student, teacher, center, grad, m_part, s_part, loss_rows,
                K, B, nb, v0, nv, s_scale, t_scale, g_scale,
                NT=nt, NT_P2=_next_pow2(max(nt, 1)), NB_P2=_next_pow2(nb), BLOCK=block_s,
                INTERPRET=interpreter_active(),
                NUM_STAGES=STUDENT_NUM_STAGES,
                num_warps=warps_s, enable_fp_fusion=True,
            )
    loss = loss_rows.sum() / float(B * n_pairs)
    return loss, teacher_sum
