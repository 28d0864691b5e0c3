"""Triton masked-patch attention: forward (online softmax, saves log-sum-exp) and backward (dq, dk, dv).

Why the kernels are shaped this way
-----------------------------------
* Two layouts, one kernel body. Packed varlen: q, k, v [T, H, Dh] with cu_seqlens [B+1] (a token attends only
  to the tokens of its own segment). Padded: [B, H, N, Dh] with lengths [B] (dense = every length is N).
  Tensors are addressed through (batch, token, head) strides, so timm's strided q / k / v views of the qkv
  projection are read in place (the last dim must have unit stride: the launchers copy a tensor whose last dim
  is strided, which the kernels would otherwise mis-read as contiguous columns).
* Packing short segments into one program (PACKED schedule, the packed layout). A program owns BLOCK_M
  consecutive *packed* rows, whatever segments they belong to, and sweeps the keys of the union of those
  segments, [cu[seg(first row)], cu[seg(last row) + 1]), under a block-diagonal mask: key j is visible to row i
  iff cu[seg(i)] <= j < cu[seg(i) + 1]. The per-row bounds are gathered once per program; the inner loop does
  two integer compares per score. Why: one-program-per-(segment, row block), as in flash-attention's varlen
  kernels, wastes a whole tile on every segment tail (L 65 = 64 + 1 rows: two row blocks, the second with one
  live row) and a whole program on every segment shorter than the tile; packed tiles cost at most one straddling
  tile per segment, no max_seqlen is needed (no host sync to size the grid: grid = cdiv(T, BLOCK_M) x H), and
  segments of 1..16 tokens share a program. The segment id of each token (int32 [T]) is one searchsorted on the
  device. The padded layout keeps one program per (row block, head, sample), keys [0, length).
* Head dim without rounding up: Dh = D0 + D1 with D0 the largest power of two <= Dh and D1 = Dh - D0 a power
  of two (or 0). 80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16; 32, 64, 128 have D1 = 0 (that tile is compiled out by
  a constexpr branch). Every q / k / v / o / do / dq / dk / dv row is loaded as two tiles, QK^T is
  dot(q0, k0^T) + dot(q1, k1^T) (reductions over 64 and 16 columns) and PV / dS K / ... are two dots with 64 and
  16 output columns. Nothing is computed or loaded on the 48 zero columns a BLOCK_D = 128 tile would carry
  (flash kernels round 80 up to 96 / 128; here the MMA work is exactly 80 / 80).
* Numerics: fp32 accumulation everywhere; scores in the log2 domain (exp2, scale * log2(e) folded into one
  multiply); P is cast to the input dtype before the PV dot as flash-attention does. Masked scores are -inf and
  the running max is replaced by 0 while it is still -inf, so a row whose first key blocks are all masked (other
  segments in a packed tile) never produces inf - inf. The forward saves the natural-log LSE per row (-inf for
  rows with no key: padded rows >= length); their output rows are written as 0.
* Backward (math, S = scale Q K^T, P = softmax(S)):
      dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q,
  with delta = rowsum(dO * O) - dLSE (the preprocessing kernel; dLSE, the gradient of the saved LSE, is folded
  in so LSE is differentiable for free). One kernel, one program per block of BLOCK_MAJOR positions: as keys it
  sweeps the query rows of its segments (dK, dV, no atomics), as queries it sweeps their keys (dQ); P is
  recomputed from LSE both times. No atomics: the backward is deterministic.
* fp32 inputs use tf32 dots only when torch.backends.cuda.matmul.allow_tf32 is set (else exact fp32 "ieee").
* GPU configs are autotuned over a short list per (head dim, layout, length bucket); under the interpreter
  (TRITON_INTERPRET=1, CPU tests) one small config is used. The configs are untuned guesses until measured
  on a GPU (benchmarks/bench_masked_attention.py).
* Safety: program bounds come from cu_seqlens / lengths clamped to [0, T] / [0, N] and every load and store is
  masked by them, so even unvalidated indices cannot read or write out of bounds (Python validates first).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def split_head_dim(d: int) -> tuple[int, int] | None:
    """(D0, D1) with D0 the largest power of two <= d, D1 = d - D0 a power of two or 0, both >= 16; else None."""
    if d < 16 or d > 256:
        return None
    d0 = 1 << (d.bit_length() - 1)
    d1 = d - d0
    if d1 and (d1 < 16 or d1 & (d1 - 1)):
        return None
    return d0, d1


@triton.jit
def _ranges(CU, SEG, LENS, b, start, offs, n_pos, BLOCK: tl.constexpr, PACKED: tl.constexpr,
            HAS_LENS: tl.constexpr):
    """Per position of this program: (ok, seg_lo, seg_hi) and the program's key / query range [lo, hi)."""
    if PACKED:
        ok = offs < n_pos
        seg = tl.load(SEG + offs, mask=ok, other=0)
        p_lo = tl.load(CU + seg, mask=ok, other=0)
        p_hi = tl.load(CU + seg + 1, mask=ok, other=0)
        p_lo = tl.minimum(tl.maximum(p_lo, 0), n_pos)
        p_hi = tl.minimum(tl.maximum(p_hi, 0), n_pos)
        p_lo = tl.where(ok, p_lo, 0)
        p_hi = tl.where(ok, p_hi, 0)
        lo = tl.min(tl.where(ok, p_lo, n_pos), axis=0)
        hi = tl.max(p_hi, axis=0)
    else:
        if HAS_LENS:
            n = tl.load(LENS + b)
            n = tl.minimum(tl.maximum(n, 0), n_pos)
        else:
            n = n_pos
        ok = offs < n
        p_lo = tl.zeros([BLOCK], dtype=tl.int32)
        p_hi = p_lo + n
        lo = tl.full([], 0, dtype=tl.int32)
        hi = tl.where(start < n, n, 0)
    return ok, p_lo, p_hi, lo, hi


@triton.jit
def _pair_mask(ok, p_lo, p_hi, offs_other, hi, PACKED: tl.constexpr):
    """[BLOCK, BLOCK_OTHER] visibility: position i of this program sees position j of the swept range."""
    if PACKED:
        m = (offs_other[None, :] >= p_lo[:, None]) & (offs_other[None, :] < p_hi[:, None])
    else:
        m = ok[:, None] & (offs_other[None, :] < hi)
    return m


@triton.jit
def _load_rows(base, offs, stride_t, ok, D_OFF: tl.constexpr, DW: tl.constexpr):
    """[BLOCK, DW] tile: columns D_OFF .. D_OFF + DW of rows `offs` (rows not ok read as 0)."""
    cols = D_OFF + tl.arange(0, DW)
    return tl.load(base + offs.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _load_cols(base, offs, stride_t, ok, D_OFF: tl.constexpr, DW: tl.constexpr):
    """[DW, BLOCK] tile (transposed load) of rows `offs`."""
    cols = D_OFF + tl.arange(0, DW)
    return tl.load(base + offs.to(tl.int64)[None, :] * stride_t + cols[:, None], mask=ok[None, :], other=0.0)


@triton.jit
def _store_rows(base, offs, stride_t, ok, x, D_OFF: tl.constexpr, DW: tl.constexpr):
    cols = D_OFF + tl.arange(0, DW)
    tl.store(base + offs.to(tl.int64)[:, None] * stride_t + cols[None, :], x, mask=ok[:, None])


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, SEG, LENS,
                sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h, sl_b, sl_t, sl_h,
                n_pos, qk_scale, len_hint,
                D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PACKED: tl.constexpr, HAS_LENS: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    start = pid * BLOCK_M
    offs_m = start + tl.arange(0, BLOCK_M)
    ok, p_lo, p_hi, lo, hi = _ranges(CU, SEG, LENS, b, start, offs_m, n_pos, BLOCK_M, PACKED, HAS_LENS)
    b64 = b.to(tl.int64)
    q_base = Q + b64 * sq_b + h * sq_h
    k_base = K + b64 * sk_b + h * sk_h
    v_base = V + b64 * sv_b + h * sv_h

    q0 = _load_rows(q_base, offs_m, sq_t, ok, 0, D0)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        q1 = _load_rows(q_base, offs_m, sq_t, ok, D0, D1)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        # s = Q K^T over the two head-dim tiles (log2 units after the scale)
        s = tl.dot(q0, _load_cols(k_base, offs_n, sk_t, n_ok, 0, D0), input_precision=PREC)
        if D1 > 0:
            s += tl.dot(q1, _load_cols(k_base, offs_n, sk_t, n_ok, D0, D1), input_precision=PREC)
        vis = _pair_mask(ok, p_lo, p_hi, offs_n, hi, PACKED)
        s = tl.where(vis, s * qk_scale, float("-inf"))
        # online softmax: m_new = max(m_i, rowmax s); acc, l rescaled by 2^(m_i - m_new)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_rows(v_base, offs_n, sv_t, n_ok, 0, D0)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PREC)
        if D1 > 0:
            v1 = _load_rows(v_base, offs_n, sv_t, n_ok, D0, D1)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PREC)
        m_i = m_new

    live = l_i > 0.0
    inv_l = tl.where(live, 1.0 / tl.where(live, l_i, 1.0), 0.0)
    in_range = offs_m < n_pos  # every row of the layout is written (rows without keys as 0)
    o_base = O + b64 * so_b + h * so_h
    _store_rows(o_base, offs_m, so_t, in_range, (acc0 * inv_l[:, None]).to(O.dtype.element_ty), 0, D0)
    if D1 > 0:
        _store_rows(o_base, offs_m, so_t, in_range, (acc1 * inv_l[:, None]).to(O.dtype.element_ty), D0, D1)
    lse = tl.where(live, (m_i + tl.math.log2(tl.where(live, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(LSE + b64 * sl_b + h * sl_h + offs_m.to(tl.int64) * sl_t, lse, mask=in_range)


@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, so_b, so_t, so_h, sd_b, sd_t, sd_h, sl_b, sl_t, sl_h, n_pos,
                  D0: tl.constexpr, D1: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE (fp32), the backward's preprocessing."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_pos
    o_base = O + b * so_b + h * so_h
    d_base = DO + b * sd_b + h * sd_h
    o0 = _load_rows(o_base, offs, so_t, ok, 0, D0).to(tl.float32)
    delta = tl.sum(o0 * _load_rows(d_base, offs, sd_t, ok, 0, D0).to(tl.float32), 1)
    if D1 > 0:
        o1 = _load_rows(o_base, offs, so_t, ok, D0, D1).to(tl.float32)
        delta += tl.sum(o1 * _load_rows(d_base, offs, sd_t, ok, D0, D1).to(tl.float32), 1)
    l_off = b * sl_b + h * sl_h + offs.to(tl.int64) * sl_t
    if HAS_DLSE:
        delta -= tl.load(DLSE + l_off, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + l_off, delta, mask=ok)


@triton.jit
def _bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU, SEG, LENS,
                sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sd_b, sd_t, sd_h,
                sg_b, sg_t, sg_h, sl_b, sl_t, sl_h,
                n_pos, qk_scale, scale, len_hint,
                D0: tl.constexpr, D1: tl.constexpr, BLOCK_MAJOR: tl.constexpr, BLOCK_MINOR: tl.constexpr,
                PACKED: tl.constexpr, HAS_LENS: tl.constexpr, PREC: tl.constexpr):
    """One program = BLOCK_MAJOR positions: as keys -> dK, dV (sweep queries); as queries -> dQ (sweep keys).

    dq / dk / dv are contiguous tensors in q's layout and share the strides (sg_*)."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    start = pid * BLOCK_MAJOR
    offs = start + tl.arange(0, BLOCK_MAJOR)
    ok, p_lo, p_hi, lo, hi = _ranges(CU, SEG, LENS, b, start, offs, n_pos, BLOCK_MAJOR, PACKED, HAS_LENS)
    b64 = b.to(tl.int64)
    q_base = Q + b64 * sq_b + h * sq_h
    k_base = K + b64 * sk_b + h * sk_h
    v_base = V + b64 * sv_b + h * sv_h
    do_base = DO + b64 * sd_b + h * sd_h
    l_base = b64 * sl_b + h * sl_h
    in_range = offs < n_pos

    # ---- part 1: these positions as keys. dV = P^T dO, dK = scale dS^T Q, dS^T = P^T * (dP^T - delta)
    k0 = _load_rows(k_base, offs, sk_t, ok, 0, D0)
    v0 = _load_rows(v_base, offs, sv_t, ok, 0, D0)
    dk0 = tl.zeros([BLOCK_MAJOR, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_MAJOR, D0], dtype=tl.float32)
    if D1 > 0:
        k1 = _load_rows(k_base, offs, sk_t, ok, D0, D1)
        v1 = _load_rows(v_base, offs, sv_t, ok, D0, D1)
        dk1 = tl.zeros([BLOCK_MAJOR, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_MAJOR, D1], dtype=tl.float32)
    for start_m in range(lo, hi, BLOCK_MINOR):
        offs_m = start_m + tl.arange(0, BLOCK_MINOR)
        m_ok = offs_m < hi
        q0 = _load_rows(q_base, offs_m, sq_t, m_ok, 0, D0)
        do0 = _load_rows(do_base, offs_m, sd_t, m_ok, 0, D0)
        sT = tl.dot(k0, tl.trans(q0), input_precision=PREC)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=PREC)
        if D1 > 0:
            q1 = _load_rows(q_base, offs_m, sq_t, m_ok, D0, D1)
            do1 = _load_rows(do_base, offs_m, sd_t, m_ok, D0, D1)
            sT += tl.dot(k1, tl.trans(q1), input_precision=PREC)
            dpT += tl.dot(v1, tl.trans(do1), input_precision=PREC)
        lse2 = tl.load(LSE + l_base + offs_m.to(tl.int64) * sl_t, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_base + offs_m.to(tl.int64) * sl_t, mask=m_ok, other=0.0)
        vis = _pair_mask(ok, p_lo, p_hi, offs_m, hi, PACKED)
        pT = tl.where(vis, tl.math.exp2(sT * qk_scale - lse2[None, :]), 0.0)
        dsT = pT * (dpT - delta[None, :])
        dv0 += tl.dot(pT.to(do0.dtype), do0, input_precision=PREC)
        dk0 += tl.dot(dsT.to(q0.dtype), q0, input_precision=PREC)
        if D1 > 0:
            dv1 += tl.dot(pT.to(do1.dtype), do1, input_precision=PREC)
            dk1 += tl.dot(dsT.to(q1.dtype), q1, input_precision=PREC)
    dk_base = DK + b64 * sg_b + h * sg_h
    dv_base = DV + b64 * sg_b + h * sg_h
    _store_rows(dk_base, offs, sg_t, in_range, (dk0 * scale).to(DK.dtype.element_ty), 0, D0)
    _store_rows(dv_base, offs, sg_t, in_range, dv0.to(DV.dtype.element_ty), 0, D0)
    if D1 > 0:
        _store_rows(dk_base, offs, sg_t, in_range, (dk1 * scale).to(DK.dtype.element_ty), D0, D1)
        _store_rows(dv_base, offs, sg_t, in_range, dv1.to(DV.dtype.element_ty), D0, D1)

    # ---- part 2: these positions as queries. dQ = scale dS K, dS = P * (dO V^T - delta)
    q0 = _load_rows(q_base, offs, sq_t, ok, 0, D0)
    do0 = _load_rows(do_base, offs, sd_t, ok, 0, D0)
    dq0 = tl.zeros([BLOCK_MAJOR, D0], dtype=tl.float32)
    if D1 > 0:
        q1 = _load_rows(q_base, offs, sq_t, ok, D0, D1)
        do1 = _load_rows(do_base, offs, sd_t, ok, D0, D1)
        dq1 = tl.zeros([BLOCK_MAJOR, D1], dtype=tl.float32)
    lse2 = tl.load(LSE + l_base + offs.to(tl.int64) * sl_t, mask=ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + l_base + offs.to(tl.int64) * sl_t, mask=ok, other=0.0)
    for start_n in range(lo, hi, BLOCK_MINOR):
        offs_n = start_n + tl.arange(0, BLOCK_MINOR)
        n_ok = offs_n < hi
        kT0 = _load_cols(k_base, offs_n, sk_t, n_ok, 0, D0)
        s = tl.dot(q0, kT0, input_precision=PREC)
        dp = tl.dot(do0, _load_cols(v_base, offs_n, sv_t, n_ok, 0, D0), input_precision=PREC)
        if D1 > 0:
            kT1 = _load_cols(k_base, offs_n, sk_t, n_ok, D0, D1)
            s += tl.dot(q1, kT1, input_precision=PREC)
            dp += tl.dot(do1, _load_cols(v_base, offs_n, sv_t, n_ok, D0, D1), input_precision=PREC)
        vis = _pair_mask(ok, p_lo, p_hi, offs_n, hi, PACKED)
        p = tl.where(vis, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(kT0.dtype)
        dq0 += tl.dot(ds, tl.trans(kT0), input_precision=PREC)
        if D1 > 0:
            dq1 += tl.dot(ds, tl.trans(kT1), input_precision=PREC)
    dq_base = DQ + b64 * sg_b + h * sg_h
    _store_rows(dq_base, offs, sg_t, in_range, (dq0 * scale).to(DQ.dtype.element_ty), 0, D0)
    if D1 > 0:
        _store_rows(dq_base, offs, sg_t, in_range, (dq1 * scale).to(DQ.dtype.element_ty), D0, D1)


# ---------------------------------------------------------------------------------------------- launchers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Under the interpreter one small config (about 10 ms per program per loop step on a CPU core).
_INTERP_FWD = {"BLOCK_M": 32, "BLOCK_N": 32}
_INTERP_BWD = {"BLOCK_MAJOR": 32, "BLOCK_MINOR": 32}
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
]
# Backward configs: only those that compile without register spills for sm_80 and sm_90 at head dims 64 and 80
# in bf16 (`python -m dermfast.info --resources`, 2026-12-05; tests/test_resources.py keeps it so). Dropped then:
# BLOCK_MINOR 64 (28-492 B spilled on sm_80 at 4 and 8 warps), 32 x 32 (spills on sm_90 at 2 and 4 warps) and
# 64 x 32 at 4 warps with 2 stages (8 B on sm_80); one stage keeps 64 x 32 at 4 warps spill-free.
_BWD_CONFIGS = [
    triton.Config({"BLOCK_MAJOR": 64, "BLOCK_MINOR": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_MAJOR": 128, "BLOCK_MINOR": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_MAJOR": 64, "BLOCK_MINOR": 32}, num_warps=4, num_stages=1),
]
_TUNED: dict[str, object] = {}


def _tuned(name: str):
    """Autotuned wrappers, built on first GPU use (never under the interpreter, where autotune fails)."""
    if name not in _TUNED:
        kernel, configs = {"fwd": (_fwd_kernel, _FWD_CONFIGS), "bwd": (_bwd_kernel, _BWD_CONFIGS)}[name]
        _TUNED[name] = triton.autotune(configs, key=["D0", "D1", "PACKED", "HAS_LENS", "len_hint"])(kernel)
    return _TUNED[name]


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels address columns as base + col (unit stride): copy a tensor whose last dim is strided."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _grid_ok(lay: "_Layout") -> None:
    if lay.heads > 65535 or lay.batch > 65535:
        raise ValueError(f"masked_attention kernel: grid y = heads ({lay.heads}) and z = batch ({lay.batch}) "
                         f"must be <= 65535 (pack the batch with cu_seqlens instead)")


def _bth(x: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [T, H, ...] (packed) or [B, H, N, ...] (padded) tensor."""
    if packed:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(2), x.stride(1)


class _Layout:
    """Grid and index tensors shared by the forward and backward launches."""

    def __init__(self, q: torch.Tensor, cu_seqlens: torch.Tensor | None, lengths: torch.Tensor | None):
        self.packed = cu_seqlens is not None
        self.dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        if self.packed:
            T, H = q.shape[0], q.shape[1]
            nseg = cu_seqlens.numel() - 1
            self.n_pos, self.heads, self.batch = T, H, 1
            self.cu = cu_seqlens.to(torch.int32).contiguous()
            pos = torch.arange(T, device=q.device, dtype=torch.int32)
            seg = torch.searchsorted(self.cu, pos, right=True, out_int32=True) - 1
            self.seg = seg.clamp_(0, max(nseg - 1, 0))
            self.lens = self.dummy
            self.len_hint = triton.next_power_of_2(max(1, -(-T // max(nseg, 1))))
            self.empty = T == 0 or nseg == 0
        else:
            B, H, N = q.shape[0], q.shape[1], q.shape[2]
            self.n_pos, self.heads, self.batch = N, H, B
            self.cu = self.seg = self.dummy
            self.lens = lengths.to(torch.int32).contiguous() if lengths is not None else self.dummy
            self.len_hint = triton.next_power_of_2(max(1, N))
            self.empty = N == 0 or B == 0
        self.has_lens = lengths is not None

    def grid(self, block_key: str):
        return lambda meta: (triton.cdiv(self.n_pos, meta[block_key]), self.heads, self.batch)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
            lengths: torch.Tensor | None, scale: float, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (contiguous, q's shape and dtype) and lse (fp32, q.shape[:-1]); inputs already validated.

    `out` / `lse` may be passed in (contiguous, right shape and dtype; tests pass them poisoned)."""
    packed = cu_seqlens is not None
    d0, d1 = split_head_dim(q.shape[-1])
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device) if lse is None else lse
    lay = _Layout(q, cu_seqlens, lengths)
    if lay.empty:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    _grid_ok(lay)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    args = (q, k, v, out, lse, lay.cu, lay.seg, lay.lens, *_bth(q, packed), *_bth(k, packed), *_bth(v, packed),
            *_bth(out, packed), *_bth(lse, packed), lay.n_pos, scale * LOG2E, lay.len_hint)
    consts = dict(D0=d0, D1=d1, PACKED=packed, HAS_LENS=lay.has_lens, PREC=_precision(q.dtype))
    if _interpreting():
        _fwd_kernel[lay.grid("BLOCK_M")(_INTERP_FWD)](*args, **consts, **_INTERP_FWD)
    else:
        _tuned("fwd")[lay.grid("BLOCK_M")](*args, **consts)
    return out, lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
             lengths: torch.Tensor | None, scale: float,
             grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous in q's shape and dtype. `dlse` is the gradient of the saved LSE (or None).

    `grads` may be passed in (three contiguous tensors like q; tests pass them poisoned)."""
    packed = cu_seqlens is not None
    d0, d1 = split_head_dim(q.shape[-1])
    dq, dk, dv = grads if grads is not None else (torch.empty(q.shape, dtype=q.dtype, device=q.device)
                                                 for _ in range(3))
    lay = _Layout(q, cu_seqlens, lengths)
    if lay.empty:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _grid_ok(lay)
    q, k, v, out, do = (_unit_last(x) for x in (q, k, v, out, do))
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    dlse = dlse.to(torch.float32).contiguous() if has_dlse else lse
    blk = 16 if _interpreting() else 64
    _delta_kernel[(triton.cdiv(lay.n_pos, blk), lay.heads, lay.batch)](
        out, do, dlse, delta, *_bth(out, packed), *_bth(do, packed), *_bth(lse, packed), lay.n_pos,
        D0=d0, D1=d1, BLOCK=blk, HAS_DLSE=has_dlse)
    args = (q, k, v, do, lse, delta, dq, dk, dv, lay.cu, lay.seg, lay.lens, *_bth(q, packed), *_bth(k, packed),
            *_bth(v, packed), *_bth(do, packed), *_bth(dq, packed), *_bth(lse, packed),
            lay.n_pos, scale * LOG2E, scale, lay.len_hint)
    consts = dict(D0=d0, D1=d1, PACKED=packed, HAS_LENS=lay.has_lens, PREC=_precision(q.dtype))
    if _interpreting():
        _bwd_kernel[lay.grid("BLOCK_MAJOR")(_INTERP_BWD)](*args, **consts, **_INTERP_BWD)
    else:
        _tuned("bwd")[lay.grid("BLOCK_MAJOR")](*args, **consts)
    return dq, dk, dv
