"""Fused MAE reconstruction loss (norm-pix MSE on removed patches): Triton forward and backward.

Why it is shaped this way
- The official MAE `forward_loss` patchifies the target (a full [B, L, P] copy), normalises it (more copies),
  computes the error on every patch and only then multiplies by the mask. Here one program takes a tile of
  BLOCK_L patches of one sample and reads the target pixels straight from `imgs` [B, C, H, W] through its
  strides (patch element j = (r * p + q) * C + c, MAE's (p, q, c) order, sits at imgs[b, c, hi*p + r, wi*p + q]),
  so no patchified copy exists and any layout (contiguous, channels_last, a slice) is read in place.
- A whole patch (P = p*p*C values, 192 / 588 / 768 for p = 8 / 14 / 16) lives in registers as one row of a
  [BLOCK_L, BLOCK_P] tile, BLOCK_P = next power of two >= P with the tail masked, so the per-patch mean and the
  unbiased variance are exact two-pass statistics over registers (no E[x^2] - E[x]^2 cancellation).
- Kept patches (mask 0) are never read: their lanes are masked off, so the kernel moves only the removed
  fraction of imgs and pred (25 % of the official function's reads at mask ratio 0.75 are skipped). Consequence,
  documented in the op: a NaN in a kept patch does not reach the loss (the reference's `loss * mask` would
  propagate it).
- Determinism without float atomics: the forward writes one (sum of mask-weighted errors, sum of mask) pair per
  program; a one-program reduction adds them in a fixed order and divides, loss = S / max(N, 1).

Backward: recomputed, not saved (the choice the issue leaves open). The forward does not know the upstream
gradient g or, until every program is done, N. Saving the unscaled gradient 2 m (pred - t) / P in pred's dtype
underflows in fp16 (|pred - t| = 1e-3 at P = 588 is 3.4e-6, an fp16 subnormal with ~6 bits left) before the
1 / N and the loss scale are applied; saving it in fp32 allocates a [B, L, P] fp32 buffer that lives from the
loss to the backward and costs more bytes (write + read 8 B/elem) than re-reading imgs and pred (<= 6 B/elem).
So the forward saves only references to its inputs (which the caller holds anyway: the model returns pred),
allocates nothing of size [B, L, P], and writes nothing of that size when no gradient is wanted (evaluation).
The backward kernel redoes the statistics in the same single pass and writes
    dL/dpred[b, l, j] = g * m[b, l] * 2 (pred[b, l, j] - t[b, l, j]) / (P * max(N, 1))
formed in fp32 and rounded once to pred's dtype (exactly the reference's rounding), zeros on kept patches.
g / max(N, 1) * 2 / P comes from a one-program prologue kernel that sums the mask (deterministic) and reads g
from device memory: no host sync, so the op stays capturable and compilable.

Math (per patch, x = target pixels, y = prediction, both as fp32; P values; m = mask weight):
    mean = sum(x) / P;  var = sum((x - mean)^2) / (P - 1)  (unbiased, as torch.var / MAE);  s = sqrt(var + eps)
    t = (x - mean) / s  if norm_pix else x
    e = sum((y - t)^2) / P;  loss = sum_{b,l} m e / max(sum m, 1)

Inputs: imgs float32/float16/bfloat16 [B, C, H, W], any strides; pred float32/float16/bfloat16 [B, L, P], any
strides (the model's `decoder_pred(...)[:, 1:]` view is read as is); mask [B, L] of any real dtype, any strides
(bool is passed as its uint8 view). Validation is done by the caller (dermfast.ops.mae_loss_op) before any launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_P = 4096  # a patch must fit one tile row in registers (p = 32 at C = 3 is 3072)
_TILE = 4096  # BLOCK_L * BLOCK_P: elements per program
_REDUCE_BLOCK = 1024


@triton.jit
def _patch_tile(imgs_ptr, pred_ptr, mask_ptr, pid, n_lblk, L, Wp, C, p, P,
                s_ib, s_ic, s_ih, s_iw, s_pb, s_pl, s_pp, s_mb, s_ml, inv_p, inv_pm1, eps,
                NORM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr):
    """Loads one [BLOCK_L, BLOCK_P] tile (removed patches only) -> (y - t, m, valid, pred offsets)."""
    b = (pid // n_lblk).to(tl.int64)
    lb = pid % n_lblk
    l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    j = tl.arange(0, BLOCK_P)
    l_ok = l < L
    m = tl.load(mask_ptr + b * s_mb + l.to(tl.int64) * s_ml, mask=l_ok, other=0).to(tl.float32)
    row_ok = l_ok & (m != 0.0)  # kept patches are never read
    valid = row_ok[:, None] & (j < P)[None, :]
    # patch element j = (r * p + q) * C + c  ->  imgs[b, c, hi * p + r, wi * p + q]
    c = j % C
    q = (j // C) % p
    r = j // (C * p)
    hi = l // Wp
    wi = l % Wp
    row = (hi[:, None] * p + r[None, :]).to(tl.int64)
    col = (wi[:, None] * p + q[None, :]).to(tl.int64)
    img_off = b * s_ib + c[None, :].to(tl.int64) * s_ic + row * s_ih + col * s_iw
    x = tl.load(imgs_ptr + img_off, mask=valid, other=0.0).to(tl.float32)
    pred_off = b * s_pb + l[:, None].to(tl.int64) * s_pl + j[None, :].to(tl.int64) * s_pp
    y = tl.load(pred_ptr + pred_off, mask=valid, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=1) * inv_p
        d = tl.where(valid, x - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) * inv_pm1
        rstd = 1.0 / tl.sqrt(var + eps)
        t = d * rstd[:, None]
    else:
        t = x
    diff = tl.where(valid, y - t, 0.0)
    return diff, m, l_ok, b, l


@triton.jit
def _mae_loss_fwd_kernel(imgs_ptr, pred_ptr, mask_ptr, part_ptr, n_lblk, L, Wp, C, p, P,
                         s_ib, s_ic, s_ih, s_iw, s_pb, s_pl, s_pp, s_mb, s_ml, inv_p, inv_pm1, eps,
                         NORM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr):
    """part[pid] = (sum over the tile's patches of m * e, sum of m): one pair per program, no atomics."""
    pid = tl.program_id(0)
    diff, m, l_ok, b, l = _patch_tile(imgs_ptr, pred_ptr, mask_ptr, pid, n_lblk, L, Wp, C, p, P,
                                      s_ib, s_ic, s_ih, s_iw, s_pb, s_pl, s_pp, s_mb, s_ml, inv_p, inv_pm1, eps,
                                      NORM, BLOCK_L, BLOCK_P)
    e = tl.sum(diff * diff, axis=1) * inv_p
    # m * e only where the patch was read (m != 0): 0 * e for kept patches is skipped, not multiplied
    s = tl.sum(tl.where(m != 0.0, m * e, 0.0), axis=0)
    n = tl.sum(m, axis=0)
    tl.store(part_ptr + 2 * pid, s)
    tl.store(part_ptr + 2 * pid + 1, n)


@triton.jit
def _mae_loss_reduce_kernel(part_ptr, loss_ptr, n_part, BLOCK: tl.constexpr):
    """loss = sum(S) / max(sum(N), 1) over the forward's partial pairs, in a fixed order (one program)."""
    offs = tl.arange(0, BLOCK)
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_part, BLOCK):
        idx = start + offs
        ok = idx < n_part
        acc_s += tl.load(part_ptr + 2 * idx, mask=ok, other=0.0)
        acc_n += tl.load(part_ptr + 2 * idx + 1, mask=ok, other=0.0)
    total = tl.sum(acc_s, axis=0)
    count = tl.sum(acc_n, axis=0)
    tl.store(loss_ptr, total / tl.maximum(count, 1.0))


@triton.jit
def _mae_loss_scale_kernel(grad_ptr, mask_ptr, scale_ptr, B, L, s_mb, s_ml, two_over_p, BLOCK: tl.constexpr):
    """scale = g * 2 / (P * max(sum(mask), 1)), g read from device memory (one program, fixed order)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    total = B * L
    for start in range(0, total, BLOCK):
        idx = start + offs
        ok = idx < total
        b = (idx // L).to(tl.int64)
        l = (idx % L).to(tl.int64)
        acc += tl.load(mask_ptr + b * s_mb + l * s_ml, mask=ok, other=0).to(tl.float32)
    count = tl.sum(acc, axis=0)
    g = tl.load(grad_ptr).to(tl.float32)
    tl.store(scale_ptr, g * two_over_p / tl.maximum(count, 1.0))


@triton.jit
def _mae_loss_bwd_kernel(imgs_ptr, pred_ptr, mask_ptr, scale_ptr, out_ptr, n_lblk, L, Wp, C, p, P,
                         s_ib, s_ic, s_ih, s_iw, s_pb, s_pl, s_pp, s_mb, s_ml, inv_p, inv_pm1, eps,
                         NORM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[b, l, :] = scale * m * (pred - t) for removed patches, 0 for kept ones; out is contiguous [B, L, P]."""
    pid = tl.program_id(0)
    diff, m, l_ok, b, l = _patch_tile(imgs_ptr, pred_ptr, mask_ptr, pid, n_lblk, L, Wp, C, p, P,
                                      s_ib, s_ic, s_ih, s_iw, s_pb, s_pl, s_pp, s_mb, s_ml, inv_p, inv_pm1, eps,
                                      NORM, BLOCK_L, BLOCK_P)
    scale = tl.load(scale_ptr)
    g = diff * (scale * m)[:, None]  # diff is 0 on kept patches and on the masked tail
    j = tl.arange(0, BLOCK_P)
    out_off = (b * L + l[:, None].to(tl.int64)) * P + j[None, :].to(tl.int64)
    tl.store(out_ptr + out_off, g.to(out_ptr.dtype.element_ty), mask=l_ok[:, None] & (j < P)[None, :])


# ---------------------------------------------------------------------------------------------- launchers


def _blocks(P: int) -> tuple[int, int]:
    block_p = triton.next_power_of_2(P)
    return max(1, min(16, _TILE // block_p)), block_p


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask  # same bytes, a loadable type


def _common(imgs, pred, mask, patch):
    B, C, H, W = imgs.shape
    L, P = pred.shape[1], pred.shape[2]
    if P > MAX_P:
        raise ValueError(f"mae_loss kernel: a patch of {P} values exceeds MAX_P = {MAX_P}")
    block_l, block_p = _blocks(P)
    n_lblk = triton.cdiv(L, block_l)
    args = (L, W // patch, C, patch, P, *imgs.stride(), *pred.stride(), *mask.stride(),
            1.0 / P, 1.0 / (P - 1) if P > 1 else float("inf"))
    return B, L, P, n_lblk, block_l, block_p, args


def mae_loss_fwd(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool = True,
                 eps: float = 1e-6, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar fp32 loss. imgs [B, C, H, W], pred [B, L, P], mask [B, L] (validated by the caller).

    `out`: optional 0-dim fp32 tensor to write the loss into (tests poison it)."""
    B, L, P, n_lblk, block_l, block_p, args = _common(imgs, pred, mask, patch)
    n_part = B * n_lblk
    part = torch.empty(2 * n_part, device=pred.device, dtype=torch.float32)
    loss = torch.empty((), device=pred.device, dtype=torch.float32) if out is None else out
    _mae_loss_fwd_kernel[(n_part,)](imgs, pred, _mask_arg(mask), part, n_lblk, *args, eps,
                                    NORM=norm_pix, BLOCK_L=block_l, BLOCK_P=block_p, num_warps=8)
    _mae_loss_reduce_kernel[(1,)](part, loss, n_part, BLOCK=_REDUCE_BLOCK, num_warps=4)
    return loss


def mae_loss_bwd(grad: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int,
                 norm_pix: bool = True, eps: float = 1e-6, out: torch.Tensor | None = None) -> torch.Tensor:
    """dloss/dpred [B, L, P] in pred's dtype, contiguous, for the upstream gradient `grad` (0-dim tensor).

    `out`: optional contiguous [B, L, P] tensor of pred's dtype to write into (tests poison it)."""
    B, L, P, n_lblk, block_l, block_p, args = _common(imgs, pred, mask, patch)
    if out is None:
        out = torch.empty((B, L, P), device=pred.device, dtype=pred.dtype)
    scale = torch.empty((), device=pred.device, dtype=torch.float32)
    m = _mask_arg(mask)
    _mae_loss_scale_kernel[(1,)](grad, m, scale, B, L, *mask.stride(), 2.0 / P, BLOCK=_REDUCE_BLOCK, num_warps=4)
    # 4 warps: at 8 the fp16 kernel spilled 8 B on sm_90 (a 64-register allocation; `info --resources`)
    _mae_loss_bwd_kernel[(B * n_lblk,)](imgs, pred, m, scale, out, n_lblk, *args, eps,
                                        NORM=norm_pix, BLOCK_L=block_l, BLOCK_P=block_p, num_warps=4)
    return out
