"""Row-wise weighted soft cross-entropy forward + gradient (Triton): OPS_CONTRACT.md section 4.

Notation of the contract: student row r, teacher row j = r % R_t, x_r = s_r / tau_s, Q_r the
teacher distribution (softmax((t_j - c) / tau_t), or t_j itself when teacher_is_probs),
n_r = sum_k Q_r(k), M_r = max_k x_r(k), S_r = sum_k exp(x_r(k) - M_r), weights w.

Exponentials are base 2 as in dino_loss.py, with every max subtracted BEFORE the scaling:
softmax(x_r)(k) = exp2((s(k) - max s) * log2(e) / tau_s) / S and, with y = t - c,
Q(k) = exp2((y(k) - max y) * log2(e) / tau_t - log2 S_t), dino_loss's teacher softmax (its
docstring says why this order).

Kernels (float32 accumulation whatever the input dtypes; no atomics):

(a) The teacher pass, which reads the teacher from memory once and gives teacher_sum:
    - logits: dino_loss's teacher pass (``_teacher_pass``: NB column blocks x NRG row groups,
      [ROWS, BLOCK] tiles): per (teacher row, column block) the max of y and
      sum_k exp2((y - max) * log2(e) / tau_t), to an (R_t, NB) pair of buffers, and the
      teacher's column sums.
    - probabilities: sinkhorn's column-sum pass (nothing else is needed from the teacher before
      the row programs).
(b) ``_soft_ce_row_kernel``, one program per student row, programs ordered teacher-row-major
    (pid -> j = pid // (R_s / R_t)): the programs of one teacher row run together and share it
    through L2. Prologue (logits): max y and log2 S_t of teacher row j from its NB partials
    (dino_loss's ``_teacher_row_stats``, as the DINO loss's student kernel combines them).
    Loop 1 over K in BLOCK steps: the online max m and sum-exp2 d of the student row, and per lane
    n = sum Q and a = sum Q (m - s), the contract's cancellation-free loss terms: when the running
    max grows by delta, a grows by n * delta, so a stays a sum of non-negative terms and no large
    n * lse - Q.x difference is ever formed. The max is taken on s itself
    (tau_s > 0 keeps the arg max), so m - s is exact for 16-bit inputs and the scaling by 1 / tau_s
    comes after: L_r = n_r ln S_r + a_r / tau_s. w_r L_r -> loss_rows[r].
    Loop 2 re-reads s and t and writes grad = w_r (n_r softmax(x_r) - Q_r) / tau_s in grad's dtype;
    each block of the row is read before the same block is written, so grad may alias student.

Memory traffic per student element: 2 reads of s (the second often an L2 hit), 2 reads of the
teacher row (L2 hits after the first of its R_s / R_t programs), 1 write of grad.
loss = torch sum of loss_rows (R_s,) (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dino_loss, sinkhorn
from .tensor_lists import cast_rne, check_float_tensor, interpreter_active, on_device_of

LOG2E = 1.4426950408889634

# BLOCK elements per loop step, 8 per thread (16-byte loads for 16-bit types, two for float32).
MAX_BLOCK = 4096
NUM_STAGES = 1  # a plain loop; see dino_loss.STUDENT_NUM_STAGES


@triton.jit
def _teacher_probs(t_row, c_ptr, cols, cmask, t_scale, y_max, log2_sum, PROBS: tl.constexpr):
    """Q over the columns ``cols`` of one teacher row (0 on masked columns)."""
    t = tl.load(t_row + cols, mask=cmask, other=0.0).to(tl.float32)
    if PROBS:
        return t
    else:
        # other=+inf: masked columns get y = -inf, Q = 0
        c = tl.load(c_ptr + cols, mask=cmask, other=float("inf"))
        return dino_loss._teacher_softmax(t - c, y_max, log2_sum, t_scale)


@triton.jit
def _soft_ce_row_kernel(
    s_ptr,
    t_ptr,
    c_ptr,
    w_ptr,
    g_ptr,
    m_part_ptr,
    s_part_ptr,
    loss_rows_ptr,
    R_t,
    K,
    NB,
    repeats,
    s_scale,
    t_scale,
    inv_tau_s,
    PROBS: tl.constexpr,
    NB_P2: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    j = pid // repeats  # teacher-row-major: the programs sharing teacher row j run together (L2)
    row = (pid % repeats) * R_t + j
    s_row = s_ptr + row.to(tl.int64) * K
    g_row = g_ptr + row.to(tl.int64) * K
    t_row = t_ptr + j.to(tl.int64) * K
    offs = tl.arange(0, BLOCK)

    if PROBS:
        y_max = 0.0
        log2_sum = 0.0
    else:
        # max y and log2 S_t of teacher row j from the teacher pass's per-column-block partials,
        # a [1, NB_P2] tile (the shapes [1] broadcast over the blocks of the row)
        nb = tl.arange(0, NB_P2)[None, :]
        pmask = nb < NB
        pm = tl.load(m_part_ptr + j * NB + nb, mask=pmask, other=float("-inf"))
        ps = tl.load(s_part_ptr + j * NB + nb, mask=pmask, other=0.0)
        y_max, log2_sum = dino_loss._teacher_row_stats(pm, ps, t_scale)

    # Loop 1. m starts at s[0], a finite lower bound of the row max: the rescaling by m_new - m
    # never meets -inf - (-inf).
    m = tl.load(s_row).to(tl.float32)
    d = tl.full([], 0.0, dtype=tl.float32)
    n_acc = tl.zeros([BLOCK], dtype=tl.float32)
    a_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK, num_stages=NUM_STAGES):
        cols = k0 + offs
        cmask = cols < K
        s = tl.load(s_row + cols, mask=cmask, other=float("-inf")).to(tl.float32)
        q = _teacher_probs(t_row, c_ptr, cols, cmask, t_scale, y_max, log2_sum, PROBS)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        d = d * tl.exp2((m - m_new) * s_scale) + tl.sum(tl.exp2((s - m_new) * s_scale), axis=0)
        a_acc += n_acc * (m_new - m) + q * tl.where(cmask, m_new - s, 0.0)
        n_acc += q
        m = m_new
    n = tl.sum(n_acc, axis=0)
    log2_d = tl.log2(d)
    w = tl.load(w_ptr + row)
    row_loss = n * log2_d * 0.6931471805599453 + tl.sum(a_acc, axis=0) * inv_tau_s  # ln S = ln 2 log2 S
    tl.store(loss_rows_ptr + row, w * row_loss)

    # Loop 2: grad = w (n softmax(x) - Q) / tau_s; each block read before it is written.
    g_scale = w * inv_tau_s
    for k0 in tl.range(0, K, BLOCK, num_stages=NUM_STAGES):
        cols = k0 + offs
        cmask = cols < K
        s = tl.load(s_row + cols, mask=cmask, other=0.0).to(tl.float32)
        q = _teacher_probs(t_row, c_ptr, cols, cmask, t_scale, y_max, log2_sum, PROBS)
        g = (n * tl.exp2((s - m) * s_scale - log2_d) - q) * g_scale
        tl.store(g_row + cols, cast_rne(g, g_ptr.dtype.element_ty, INTERPRET), mask=cmask)


def _row_config(K: int):
    block = min(MAX_BLOCK, dino_loss._next_pow2(K))
    num_warps = max(1, min(16, block // 256))
    return block, num_warps


def soft_cross_entropy_forward(student, teacher, center, weights, grad, student_temp, teacher_temp,
                               teacher_is_probs):
    """Returns (loss: 0-d float32, teacher_sum: (K,) float32) and writes d loss / d student to grad."""
    R_s, R_t, K = dino_loss._check_student_teacher(student, teacher, center, grad)
    check_float_tensor(weights, "weights", (torch.float32,), dim=1)
    if tuple(weights.shape) != (R_s,):
        raise ValueError(f"weights must have shape ({R_s},), one per student row, got {tuple(weights.shape)}")
    if weights.device != student.device:
        raise ValueError(f"weights is on {weights.device} but student is on {student.device}")
    if not isinstance(teacher_is_probs, bool):
        raise ValueError(f"teacher_is_probs must be a bool, got {type(teacher_is_probs).__name__}")
    tau_s = dino_loss._check_positive(student_temp, "student_temp")
    # teacher_temp is read only for teacher logits
    tau_t = 1.0 if teacher_is_probs else dino_loss._check_positive(teacher_temp, "teacher_temp")
    if R_t < 1 or R_s % R_t != 0:
        raise ValueError(f"student rows ({R_s}) must be a multiple of the teacher rows ({R_t} >= 1): "
                         f"student row r pairs with teacher row r % R_t")

    device = student.device
    with on_device_of([student]):  # the launches run on the tensors' device, not the current one
        # (a) teacher pass
        t_scale = LOG2E / tau_t
        if teacher_is_probs:
            teacher_sum = sinkhorn._column_sums(teacher)
            nb = 1
            m_part = s_part = weights  # placeholders: the row kernel does not read them
        else:
            m_part, s_part, teacher_sum = dino_loss._teacher_pass(teacher, center, t_scale,
                                                                  sinkhorn._n_sms(device))
            nb = m_part.shape[1]

        # (b) row pass
        loss_rows = torch.empty(R_s, dtype=torch.float32, device=device)
        if R_s > 0:
            block, num_warps = _row_config(K)
            _soft_ce_row_kernel[(R_s,)](
                student, teacher, center, weights, grad, m_part, s_part, loss_rows,
                R_t, K, nb, R_s // R_t, LOG2E / tau_s, t_scale, 1.0 / tau_s,
                PROBS=teacher_is_probs, NB_P2=dino_loss._next_pow2(nb), BLOCK=block,
                INTERPRET=interpreter_active(), NUM_STAGES=NUM_STAGES,
                num_warps=num_warps, enable_fp_fusion=True,
            )
        loss = loss_rows.sum()
    return loss, teacher_sum
