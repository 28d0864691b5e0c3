"""Fused knowledge-distillation loss: KD (T^2 KL) + class-weighted CE, loss and student gradient in one launch.

Why it is shaped this way
-------------------------
Eager PyTorch spends a dozen kernels and several [N, C] fp32 temporaries (two log-softmaxes, the KL product,
their gradients) on what is a row-wise reduction. Here one program owns ROWS rows (a [ROWS, BLOCK_C] tile):

- small C (next_pow2(C) <= 4096): ONE_PASS. The tile holds whole rows, each logit is read once, and many rows
  share a program so that 256 x 7 is not 256 tiny programs.
- large C (e.g. 32,000): the row is walked in BLOCK_C chunks twice. Pass 1 keeps online-softmax statistics
  (running max, rescaled sums) for three distributions at once: softmax(t/T), softmax(s/T) and softmax(s)
  (CE is at T = 1); the student's max is shared by the two student sums since T > 0. Pass 2 re-reads the chunk
  (mostly from L2: the row was read a moment ago) and writes KL terms and the gradient. A [ROWS, C] row never
  fits in registers at C = 32,000 (2 x 128 KB), so a second read is the price of never materialising anything.

The forward writes the per-row loss ([N] fp32, already scaled for the reduction) and the gradient with respect
to the student logits; the caller sums the rows (a deterministic torch reduction, not float atomics, so two runs
give the same bits) and the backward only multiplies the saved gradient by grad_output. No gradient reaches the
teacher. Launches per step: forward = this kernel + the row sum (+ one gather-sum of w[y] for "mean" with class
weights, since the CE normaliser sum_i w[y_i] spans all rows); backward = one multiply. The kernel never reads out of bounds: the target logit is picked by comparing column indices inside
the chunk loop, never by a gathered load, and the class weight is loaded under a mask of in-range targets.

Math (per row i; z_s = s / T, z_t = t / T, p = softmax(z_t), q = softmax(z_s), r = softmax(s), y = target)
------------------------------------------------------------------------------------------------------
    KL_i   = sum_j p_j (log p_j - log q_j),   log p_j = (t_j - m_t) / T - log S_t,  S_t = sum_j e^{(t_j - m_t)/T}
                                               log q_j = (s_j - m_s) / T - log S_q,  S_q = sum_j e^{(s_j - m_s)/T}
    CE_i   = log S_r - (s_y - m_s),            S_r = sum_j e^{s_j - m_s}
    loss_i = kd_loss_scale * KL_i + coef_i * CE_i,   coef_i = ce_scale * w[y_i] (/ sum_k w[y_k] for "mean")
    d loss_i / d s_ij = kd_grad_scale * (q_j - p_j) + coef_i * (r_j - [j == y_i])
  (d KL_i / d z_s = q - p and d z_s / d s = 1/T, so kd_grad_scale = kd_loss_scale / T.)
Online statistics: when a chunk raises the running max from m to m', the sums are rescaled by e^{m - m'}
(e^{(m - m')/T} for the tempered ones) before the chunk's terms are added.

Non-finite logits (NaN, +inf, -inf) anywhere in row i of either matrix make loss_i and that gradient row NaN:
a documented NaN, never a finite wrong number. A target outside [0, C) does the same (the Python wrapper
raises a ValueError before launching unless told not to check).

Gradient storage: fp32 for fp32 and fp16 logits, bf16 for bf16 logits (the launcher allocates it; see
`grad_dtype_for`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ONE_PASS_MAX_BLOCK = 4096  # rows up to this many (padded) columns are held whole in the tile
CHUNK = 4096  # column chunk for the two-pass path
TILE = 2048  # target elements per tile in the one-pass path: ROWS = TILE // BLOCK_C rows per program
MAX_ROWS = 64


def grad_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the saved gradient for logits of `dtype`.

    bf16 logits: bf16. It has fp32's exponent range, and autograd hands the student a bf16 gradient anyway, so
    an fp32 buffer would double the bytes for at most one extra bf16 rounding (none when grad_output is 1 or a
    power of two). fp16 logits: fp32. Gradients of a mean over N rows are ~1/N, which underflows fp16's range
    (normal min 6e-5) at training batch sizes before a loss scaler's grad_output could lift it; keeping it in
    fp32 until the backward multiplies by grad_output is what eager autocast does too. fp32: fp32.
    """
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


@triton.jit
def _load_chunk(s_row, t_row, c, cm, row_ok):
    """Load a [ROWS, BLOCK_C] chunk of both matrices as fp32, -inf outside the row, and flag non-finite rows."""
    mask = row_ok[:, None] & cm[None, :]
    s = tl.load(s_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
    inf = float("inf")
    nonfinite = (s != s) | (tl.abs(s) == inf) | (t != t) | (tl.abs(t) == inf)
    bad = tl.max(nonfinite.to(tl.int32), axis=1)
    s = tl.where(cm[None, :], s, -inf)
    t = tl.where(cm[None, :], t, -inf)
    return s, t, bad


@triton.jit
def _chunk_terms(s, t, c, cm, y, m_s, m_t, log_sq, log_st, sum_r, inv_t, kd_grad_scale, coef,
                 HAS_TARGET: tl.constexpr):
    """KL contribution of a chunk ([ROWS]) and its gradient tile ([ROWS, BLOCK_C]), given final row statistics."""
    log_q = (s - m_s[:, None]) * inv_t - log_sq[:, None]
    log_p = (t - m_t[:, None]) * inv_t - log_st[:, None]
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    # outside the row both logs are -inf (p = 0 there): zero them first so no -inf - -inf is ever formed
    diff = tl.where(cm[None, :], log_p, 0.0) - tl.where(cm[None, :], log_q, 0.0)
    kl = tl.sum(p * diff, axis=1)
    g = kd_grad_scale * (q - p)
    if HAS_TARGET:
        r = tl.exp(s - m_s[:, None]) * (1.0 / sum_r)[:, None]
        onehot = tl.where(c[None, :] == y[:, None], 1.0, 0.0)
        g += coef[:, None] * (r - onehot)
    return kl, g


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr, t_ptr, y_ptr, w_ptr, wsum_ptr, loss_ptr, g_ptr,
    N, C, stride_s, stride_t, stride_g,
    inv_t, kd_loss_scale, kd_grad_scale, ce_scale,
    HAS_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, NORM_BY_WSUM: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ONE_PASS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    s_row = s_ptr + rows64[:, None] * stride_s
    t_row = t_ptr + rows64[:, None] * stride_t
    g_row = g_ptr + rows64[:, None] * stride_g

    if HAS_TARGET:
        y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # int32 would wrap 2^32 + k to k
        y_ok = (y >= 0) & (y < C)
    else:
        y = tl.zeros([ROWS], dtype=tl.int64)
        y_ok = row_ok

    # ---- pass 1: online statistics of softmax(s/T), softmax(s), softmax(t/T); the target logit s_y ----
    m_s = tl.full([ROWS], float("-inf"), tl.float32)
    m_t = tl.full([ROWS], float("-inf"), tl.float32)
    sum_q = tl.zeros([ROWS], dtype=tl.float32)
    sum_r = tl.zeros([ROWS], dtype=tl.float32)
    sum_t = tl.zeros([ROWS], dtype=tl.float32)
    s_y = tl.zeros([ROWS], dtype=tl.float32)
    bad = tl.zeros([ROWS], dtype=tl.int32)
    if ONE_PASS:
        cm = cols < C
        s, t, bad = _load_chunk(s_row, t_row, cols, cm, row_ok)
        m_s = tl.max(s, axis=1)
        m_t = tl.max(t, axis=1)
        sum_q = tl.sum(tl.exp((s - m_s[:, None]) * inv_t), axis=1)
        sum_r = tl.sum(tl.exp(s - m_s[:, None]), axis=1)
        sum_t = tl.sum(tl.exp((t - m_t[:, None]) * inv_t), axis=1)
        if HAS_TARGET:
            s_y = tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
    else:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            cm = c < C
            s, t, bad_c = _load_chunk(s_row, t_row, c, cm, row_ok)
            bad = tl.maximum(bad, bad_c)
            # every chunk holds at least one in-row column (c0 < C), so the new maxima are finite on finite rows
            new_m_s = tl.maximum(m_s, tl.max(s, axis=1))
            new_m_t = tl.maximum(m_t, tl.max(t, axis=1))
            sum_q = sum_q * tl.exp((m_s - new_m_s) * inv_t) + tl.sum(tl.exp((s - new_m_s[:, None]) * inv_t), axis=1)
            sum_r = sum_r * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(s - new_m_s[:, None]), axis=1)
            sum_t = sum_t * tl.exp((m_t - new_m_t) * inv_t) + tl.sum(tl.exp((t - new_m_t[:, None]) * inv_t), axis=1)
            m_s = new_m_s
            m_t = new_m_t
            if HAS_TARGET:
                s_y += tl.sum(tl.where(c[None, :] == y[:, None], s, 0.0), axis=1)

    log_sq = tl.log(sum_q)
    log_st = tl.log(sum_t)
    invalid = (bad > 0) | (y_ok == 0)

    coef = tl.zeros([ROWS], dtype=tl.float32)
    ce = tl.zeros([ROWS], dtype=tl.float32)
    if HAS_TARGET:
        ce = tl.log(sum_r) - (s_y - m_s)
        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + y, mask=row_ok & y_ok, other=0.0).to(tl.float32)
            coef = ce_scale * w_y
        else:
            coef = tl.zeros([ROWS], dtype=tl.float32) + ce_scale
        if NORM_BY_WSUM:
            coef = coef / tl.load(wsum_ptr)

    # ---- pass 2: KL terms and the gradient with the final statistics ----
    nan = float("nan")
    kl = tl.zeros([ROWS], dtype=tl.float32)
    if ONE_PASS:
        kl, g = _chunk_terms(s, t, cols, cm, y, m_s, m_t, log_sq, log_st, sum_r, inv_t, kd_grad_scale, coef,
                             HAS_TARGET)
        if WRITE_GRAD:
            g = tl.where(invalid[:, None], nan, g)
            tl.store(g_row + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & cm[None, :])
    else:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            cm = c < C
            s, t, bad_c = _load_chunk(s_row, t_row, c, cm, row_ok)
            kl_c, g = _chunk_terms(s, t, c, cm, y, m_s, m_t, log_sq, log_st, sum_r, inv_t, kd_grad_scale, coef,
                                   HAS_TARGET)
            kl += kl_c
            if WRITE_GRAD:
                g = tl.where(invalid[:, None], nan, g)
                tl.store(g_row + c[None, :], g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & cm[None, :])

    loss = kd_loss_scale * kl + coef * ce
    loss = tl.where(invalid, nan, loss)
    tl.store(loss_ptr + rows, loss, mask=row_ok)


def launch(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None,
           class_weight: torch.Tensor | None, weight_sum: torch.Tensor | None, *, inv_t: float,
           kd_loss_scale: float, kd_grad_scale: float, ce_scale: float, write_grad: bool,
           block_c: int | None = None, rows: int | None = None, loss: torch.Tensor | None = None,
           grad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel. Inputs are validated by dermfast.ops.kd_loss_op; here only layout is assumed.

    student, teacher: [N, C] fp32 / fp16 / bf16, unit column stride (any row stride).
    target: [N] int32 / int64 or None. class_weight: [C] float or None (only with a target).
    weight_sum: 0-dim fp32 tensor, divides the CE coefficient ("mean" with class weights), or None.
    block_c / rows: force a tile (tests use them to exercise the two-pass path on small C).
    loss / grad: optional preallocated outputs ([N] fp32; [N, C] with unit column stride in
    grad_dtype_for(student.dtype)); tests pass poisoned buffers to catch unwritten or overwritten elements.
    Returns (row_loss [N] fp32, grad [N, C] in grad_dtype_for(student.dtype), or an empty tensor).
    """
    N, C = student.shape
    dev = student.device
    if loss is None:
        loss = torch.empty(N, device=dev, dtype=torch.float32)
    if grad is None:
        grad = torch.empty((N, C) if write_grad else (0, 0), device=dev, dtype=grad_dtype_for(student.dtype))
    if block_c is None:
        block_c = max(16, triton.next_power_of_2(C))
        one_pass = block_c <= ONE_PASS_MAX_BLOCK
        if not one_pass:
            block_c = CHUNK
    else:
        one_pass = block_c >= C
    if rows is None:
        rows = max(1, min(MAX_ROWS, TILE // block_c)) if one_pass else 1
    num_warps = 4 if rows * block_c < 2048 else 8  # a full 2048-element tile at 4 warps spilled 8 B (sm_80, --resources)
    dummy = loss  # never dereferenced when the matching constexpr flag is off
    grid = (triton.cdiv(N, rows),)
    _kd_loss_fwd_kernel[grid](
        student, teacher,
        target if target is not None else dummy,
        class_weight if class_weight is not None else dummy,
        weight_sum if weight_sum is not None else dummy,
        loss, grad if write_grad else dummy,
        N, C, student.stride(0), teacher.stride(0), grad.stride(0) if write_grad else 0,
        inv_t, kd_loss_scale, kd_grad_scale, ce_scale,
        HAS_TARGET=target is not None, HAS_WEIGHT=class_weight is not None,
        NORM_BY_WSUM=weight_sum is not None, WRITE_GRAD=write_grad,
        ONE_PASS=one_pass, ROWS=rows, BLOCK_C=block_c, num_warps=num_warps,
    )
    return loss, grad
