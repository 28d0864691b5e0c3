"""Triton kernels for MAE random masking: per-row key sort, index outputs, gather + position embedding.

Why the kernels are shaped this way:
- Forward: one program per sample. The program hashes its row's L patch keys itself (the chain of
  `dermfast.ops.random_masking_op`: only the per-sample and per-patch rounds run on the device; the
  (seed, step) round arrives as a scalar argument, so no key tensor is ever copied from the host), packs each
  key as (hash << 20) | patch (unique, so the order is total and ties go to the lower patch index), and sorts
  the row in registers with `tl.sort` (bitonic; BLOCK_L = next power of two >= L, at most 4096). The low 20
  bits of the sorted keys are the shuffle order itself, so no argsort and no index tensor is materialised:
  ids_keep, ids_restore and the mask are scattered straight from registers, then the same program gathers its
  K visible rows of x (and adds pos_embed) in [BLOCK_K, BLOCK_D] tiles. No int64 [B, L, D] index tensor.
- The hash is evaluated on int64 lanes holding uint32 values, with each 32x32-bit product split in 16-bit
  halves and `x mod 2^32` written as x - ((x >> 32) << 32): only small literals appear, so the kernel means the
  same thing on every Triton version and in the interpreter (no unsigned-literal promotion rules involved).
- Ragged and dense layouts are one kernel: cu_seqlens (int32 [B+1]) gives each row's keep count K_b and the
  first output row; the dense [B, K, D] output is the packed [B*K, D] buffer.
- Backward: grad_x[b, l] = grad_visible[cu[b] + ids_restore[b, l]] if ids_restore[b, l] < K_b else 0, a
  gather (each kept patch receives exactly one gradient row), so no atomics: deterministic. One program per
  [BLOCK_L, BLOCK_D] tile of patches walks the batch, writes grad_x and sums grad_pos in fp32 in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_L = 4096


@triton.jit
def _mod32(x):
    """x mod 2^32 for int64 x >= 0."""
    return x - ((x >> 32) << 32)


@triton.jit
def _mul32(x, C: tl.constexpr):
    """(x * C) mod 2^32 for int64 x in [0, 2^32); products stay below 2^49."""
    lo = x * (C & 0xFFFF)
    hi = ((x * (C >> 16)) & 0xFFFF) << 16
    return _mod32(lo + hi)


@triton.jit
def _hash32(x):
    """lowbias32 on int64 lanes holding uint32 values (the reference's hash32)."""
    x = _mod32(x)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["h_step", "sample_offset"])  # keys change every step: one compile, not many
def _masking_fwd_kernel(x_ptr, pos_ptr, vis_ptr, mask_ptr, restore_ptr, keep_ptr, cu_ptr,
                        h_step, sample_offset, L, D,
                        HAS_POS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_L)
    valid = j < L
    # keys: hash(hash(h_step ^ sample) ^ patch) << 20 | patch; padding lanes sort last
    s = _mod32(row + sample_offset)
    hs = _hash32(s ^ h_step.to(tl.int64))
    patch = j.to(tl.int64)
    key = (_hash32(hs ^ patch) << 20) | patch
    key = tl.where(valid, key, (1 << 62) + patch)
    key = tl.sort(key)
    ids = key & 0xFFFFF  # shuffle order: ids[j] = patch at rank j
    ids = tl.where(valid, ids, 0)
    k_row = (tl.load(cu_ptr + row + 1) - tl.load(cu_ptr + row)).to(tl.int64)
    base = tl.load(cu_ptr + row).to(tl.int64)
    row_l = row * L
    tl.store(restore_ptr + row_l + ids, j.to(tl.int64), mask=valid)
    tl.store(mask_ptr + row_l + ids, (j >= k_row).to(mask_ptr.dtype.element_ty), mask=valid)
    tl.store(keep_ptr + base + j, ids, mask=j < k_row)
    tl.debug_barrier()  # ids_keep written by all lanes before the gather reads it back
    if D > 0:
        for k0 in range(0, k_row, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < k_row
            src = tl.load(keep_ptr + base + kk, mask=km, other=0)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                m2 = km[:, None] & (dd < D)[None, :]
                v = tl.load(x_ptr + (row_l + src)[:, None] * D + dd[None, :], mask=m2, other=0.0)
                if HAS_POS:
                    p = tl.load(pos_ptr + src[:, None] * D + dd[None, :], mask=m2, other=0.0)
                    v = v + p
                tl.store(vis_ptr + (base + kk)[:, None] * D + dd[None, :], v.to(vis_ptr.dtype.element_ty),
                         mask=m2)


@triton.jit
def _masking_bwd_kernel(g_ptr, restore_ptr, cu_ptr, gx_ptr, gpos_ptr, B, L, D,
                        NEED_X: tl.constexpr, NEED_POS: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    ll = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    dd = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    lm = ll < L
    dm = dd < D
    m2 = lm[:, None] & dm[None, :]
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for b in range(0, B):
        r = tl.load(restore_ptr + b * L + ll, mask=lm, other=0)  # B * L < 2^31 (validated)
        start = tl.load(cu_ptr + b).to(tl.int64)
        k_row = tl.load(cu_ptr + b + 1).to(tl.int64) - start
        kept = lm & (r < k_row)
        mk = kept[:, None] & dm[None, :]
        g = tl.load(g_ptr + (start + r)[:, None] * D + dd[None, :], mask=mk, other=0.0)
        if NEED_X:
            tl.store(gx_ptr + (b * L + ll)[:, None] * D + dd[None, :], g, mask=m2)
        if NEED_POS:
            acc += g.to(tl.float32)
    if NEED_POS:
        tl.store(gpos_ptr + ll[:, None] * D + dd[None, :], acc.to(gpos_ptr.dtype.element_ty), mask=m2)


def _interp(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def masking_fwd(x: torch.Tensor, pos: torch.Tensor | None, cu: torch.Tensor, total: int, h_step: int,
                sample_offset: int, mask_dtype: torch.dtype):
    """x: [B, L, D] contiguous (D may be 0: indices only); pos: [L, D] or None, x's dtype; cu: int32 [B+1].

    Returns visible [total, D], mask [B, L] (mask_dtype; 0 keep, 1 remove), ids_restore [B, L] int64,
    ids_keep [total] int64. Inputs are validated by the caller (dermfast.ops.random_masking).
    """
    B, L, D = x.shape
    vis = torch.empty(total, D, device=x.device, dtype=x.dtype)
    mask = torch.empty(B, L, device=x.device, dtype=mask_dtype)
    restore = torch.empty(B, L, device=x.device, dtype=torch.int64)
    keep = torch.empty(total, device=x.device, dtype=torch.int64)
    if B == 0:
        return vis, mask, restore, keep
    block_l = max(16, triton.next_power_of_2(L))
    block_d = min(128, max(16, triton.next_power_of_2(max(D, 1))))
    block_k = 16 if _interp(x) else max(8, min(64, 4096 // block_d))
    num_warps = 4 if block_l <= 1024 else 8
    # indices only (D == 0): x and visible may have no storage; hand the kernel a buffer it never touches
    xs, vs = (x, vis) if D > 0 else (mask, mask)
    _masking_fwd_kernel[(B,)](xs, pos if pos is not None and D > 0 else xs, vs, mask, restore, keep, cu,
                              h_step, sample_offset, L, D, HAS_POS=pos is not None, BLOCK_L=block_l,
                              BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps)
    return vis, mask, restore, keep


def masking_bwd(g: torch.Tensor, restore: torch.Tensor, cu: torch.Tensor, need_x: bool, need_pos: bool):
    """g: [T, D] contiguous grad of visible; restore: [B, L] int64; cu: int32 [B+1].

    Returns (grad_x [B, L, D] or empty [0], grad_pos [L, D] or empty [0]) in g's dtype.
    """
    B, L = restore.shape
    D = g.shape[1]
    gx = torch.empty(B, L, D, device=g.device, dtype=g.dtype) if need_x else g.new_empty(0)
    gp = torch.empty(L, D, device=g.device, dtype=g.dtype) if need_pos else g.new_empty(0)
    if (need_x or need_pos) and L * D > 0:
        if B == 0:
            gp.zero_()
            return gx, gp
        block_l = 16
        block_d = min(128, max(16, triton.next_power_of_2(D)))
        grid = (triton.cdiv(L, block_l), triton.cdiv(D, block_d))
        _masking_bwd_kernel[grid](g, restore, cu, gx if need_x else g, gp if need_pos else g, B, L, D,
                                  NEED_X=need_x, NEED_POS=need_pos, BLOCK_L=block_l, BLOCK_D=block_d,
                                  num_warps=4)
    return gx, gp
