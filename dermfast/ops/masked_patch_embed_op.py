"""Masked patch embedding: gather the kept pixel patches, then run the patch-embed projection on those alone.

Why it is shaped this way: MAE's encoder embeds every patch and then throws 75% of the tokens away. Gathering
the kept patches straight from the image ([B, C, H, W] viewed as [B, C, h, p, w, p], indexed by
(ids_keep // w, ids_keep % w)) reads only the kept pixels and makes the projection a [B*K, C*p*p] x
[C*p*p, D] GEMM: 4x fewer patch-embed FLOPs and no [B, L, D] token tensor at mask ratio 0.75. A
convolution with stride p is exactly that GEMM per patch, so the output equals patch-embed-then-mask up to
the GEMM's summation order.

The torch path (advanced-index gather + one matmul, which cuBLAS / the CPU BLAS run at full speed) is the
implementation; a Triton gather would only move the same bytes. It is a `torch.library` custom op
(`dermfast::masked_patch_embed`) with a fake implementation and a registered autograd:
  out[b, k] = W @ patch(b, ids_keep[b, k]) + bias + pos[ids_keep[b, k]]
  dW = g^T @ patches, dbias = sum g, dpos[l] = sum_b g[b, r_b(l)] (an accumulating index_put_ into [B, L, D],
  then a sum over b: ids from random masking never collide within a sample, so it is deterministic; a repeated
  id gets the sum of its rows), dimgs = the same accumulating scatter of g @ W into the kept patches.
Under autocast the wrapper casts the floating inputs to the autocast dtype, as F.linear would.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dermfast.ops.registry import Query, define_op


def masked_patch_embed_ref(imgs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, patch_size: int,
                           ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Patch-embed-then-mask (the spec): conv2d(stride p) -> [B, L, D] (+ pos) -> gather ids_keep -> [B, K, D].

    imgs: [B, C, H, W] (H, W multiples of p); weight: [D, C, p, p] or [D, C*p*p]; bias: [D] or None;
    ids_keep: [B, K] int64 patch indices (row-major over the h x w grid); pos_embed: [1, L, D] or [L, D].
    """
    B, C = imgs.shape[:2]
    D = weight.shape[0]
    w = weight.reshape(D, C, patch_size, patch_size)
    x = F.conv2d(imgs, w.to(imgs.dtype), bias.to(imgs.dtype) if bias is not None else None, stride=patch_size)
    x = x.flatten(2).transpose(1, 2)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, -1, D).to(x.dtype)
    return torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))


def _grid_index(imgs: torch.Tensor, patch_size: int, ids_keep: torch.Tensor):
    B, C, H, W = imgs.shape
    w = W // patch_size
    rows = torch.arange(B, device=imgs.device)[:, None]
    return rows, ids_keep // w, ids_keep % w


def gather_patches(imgs: torch.Tensor, patch_size: int, ids_keep: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, K, C*p*p] kept pixel patches in (c, i, j) order (a conv weight's flattening)."""
    B, C, H, W = imgs.shape
    p = patch_size
    rows, hi, wi = _grid_index(imgs, p, ids_keep)
    patches = imgs.reshape(B, C, H // p, p, W // p, p)[rows, :, hi, :, wi, :]  # [B, K, C, p, p]
    return patches.reshape(B, ids_keep.shape[1], C * p * p)


def _fwd_torch(imgs, weight, bias, patch_size, ids_keep, pos):
    patches = gather_patches(imgs, patch_size, ids_keep)
    out = F.linear(patches, weight, bias)
    if pos is not None:
        out = out + pos[ids_keep]
    return out


masked_patch_embed_op = define_op("masked_patch_embed", "patch embedding of the kept patches only (MAE)")
masked_patch_embed_op.register("torch")(_fwd_torch)


@torch.library.custom_op("dermfast::masked_patch_embed", mutates_args=())
def _mpe_custom(imgs: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], patch_size: int,
                ids_keep: torch.Tensor, pos_embed: Optional[torch.Tensor], backend: Optional[str]) -> torch.Tensor:
    q = Query(imgs.device, imgs.dtype, {"patch": patch_size, "D": weight.shape[0]}, imgs.requires_grad)
    return masked_patch_embed_op.select(q, backend).fn(imgs, weight, bias, patch_size, ids_keep, pos_embed)


@_mpe_custom.register_fake
def _mpe_fake(imgs, weight, bias, patch_size, ids_keep, pos_embed, backend):
    return imgs.new_empty(ids_keep.shape[0], ids_keep.shape[1], weight.shape[0])


def _mpe_setup_context(ctx, inputs, output):
    imgs, weight, bias, patch_size, ids_keep, pos_embed, _ = inputs
    ctx.save_for_backward(imgs, weight, ids_keep)
    ctx.patch_size = patch_size
    ctx.has_bias = bias is not None
    ctx.has_pos = pos_embed is not None
    ctx.L = pos_embed.shape[0] if pos_embed is not None else 0


def _mpe_backward(ctx, g):
    imgs, weight, ids_keep = ctx.saved_tensors
    p = ctx.patch_size
    B, K, D = g.shape
    need_img, need_w, need_b, _, _, need_pos, _ = ctx.needs_input_grad
    g_img = g_w = g_b = g_pos = None
    if need_w:
        patches = gather_patches(imgs, p, ids_keep)
        g_w = (g.reshape(B * K, D).t() @ patches.reshape(B * K, -1)).to(weight.dtype)
    if need_b and ctx.has_bias:
        g_b = g.sum((0, 1), dtype=torch.promote_types(g.dtype, torch.float32)).to(g.dtype)
    if need_pos and ctx.has_pos:
        # accumulate: a patch listed twice in a sample gets both rows (unique ids never collide, so the adds are
        # exact and deterministic; index_put_ also has a deterministic CUDA mode, unlike a 3-D scatter_add)
        rows = torch.arange(B, device=g.device)[:, None].expand(B, K)
        full = g.new_zeros(B, ctx.L, D).index_put_((rows, ids_keep), g, accumulate=True)
        g_pos = full.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(g.dtype)
    if need_img:
        Bi, C, H, W = imgs.shape
        rows, hi, wi = _grid_index(imgs, p, ids_keep)
        gp = (g @ weight.to(g.dtype)).reshape(B, K, C, p, p).to(imgs.dtype)
        g6 = imgs.new_zeros(B, C, H // p, p, W // p, p)
        # accumulate into the [B, h, w, C, p, p] view, so a repeated id gets the sum of its rows' gradients
        g6.permute(0, 2, 4, 1, 3, 5).index_put_((rows.expand(B, K), hi, wi), gp, accumulate=True)
        g_img = g6.reshape(B, C, H, W)
    return g_img, g_w, g_b, None, None, g_pos, None


_mpe_custom.register_autograd(_mpe_backward, setup_context=_mpe_setup_context)


def _validate(imgs, weight, bias, patch_size, ids_keep, pos_embed):
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
        raise ValueError(f"masked_patch_embed: imgs must be [B, C, H, W], got "
                         f"{tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__}")
    B, C, H, W = imgs.shape
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"masked_patch_embed: patch_size must be a positive int, got {patch_size!r}")
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"masked_patch_embed: image {H}x{W} is not a multiple of patch size {p}")
    L = (H // p) * (W // p)
    if not imgs.is_floating_point():
        raise ValueError(f"masked_patch_embed: imgs must be floating point, got {imgs.dtype}")
    if weight.dim() not in (2, 4) or weight.numel() != weight.shape[0] * C * p * p:
        raise ValueError(f"masked_patch_embed: weight must be [D, {C}, {p}, {p}] or [D, {C * p * p}], got "
                         f"{tuple(weight.shape)}")
    D = weight.shape[0]
    if not weight.is_floating_point():
        raise ValueError(f"masked_patch_embed: weight must be floating point, got {weight.dtype}")
    if bias is not None and (tuple(bias.shape) != (D,) or not bias.is_floating_point()):
        raise ValueError(f"masked_patch_embed: bias must be a floating [D] = [{D}], got {tuple(bias.shape)}")
    if not isinstance(ids_keep, torch.Tensor) or ids_keep.dim() != 2 or ids_keep.shape[0] != B:
        raise ValueError(f"masked_patch_embed: ids_keep must be [B, K] with B={B}, got "
                         f"{tuple(ids_keep.shape) if isinstance(ids_keep, torch.Tensor) else ids_keep!r}")
    if ids_keep.dtype != torch.int64:
        raise ValueError(f"masked_patch_embed: ids_keep must be int64, got {ids_keep.dtype}")
    if ids_keep.device.type == "cpu" and ids_keep.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids_keep.min()), int(ids_keep.max())  # on the host already: no sync
        if lo < 0 or hi >= L:
            raise ValueError(f"masked_patch_embed: ids_keep must lie in [0, L={L}), got [{lo}, {hi}]")
    elif ids_keep.numel() and not torch.compiler.is_compiling():
        # on the device: no host read, an asynchronous device-side assert instead (a negative id would otherwise
        # wrap around in the advanced-index gather: a silently wrong patch)
        torch._assert_async(((ids_keep >= 0) & (ids_keep < L)).all(), "masked_patch_embed: ids_keep outside [0, L)")
    if pos_embed is not None and (tuple(pos_embed.shape) not in ((1, L, D), (L, D))
                                  or not pos_embed.is_floating_point()):
        raise ValueError(f"masked_patch_embed: pos_embed must be a floating [1, L, D] or [L, D] = [1, {L}, {D}], "
                         f"got {tuple(pos_embed.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("ids_keep", ids_keep), ("pos_embed", pos_embed)):
        if t is not None and t.device != imgs.device:
            raise ValueError(f"masked_patch_embed: {name} is on {t.device}, imgs on {imgs.device}")


def masked_patch_embed(imgs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, patch_size: int,
                       ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """Visible tokens [B, K, D] straight from pixels; equals `masked_patch_embed_ref` (patch-embed-then-mask).

    imgs: [B, C, H, W] float; weight: [D, C, p, p] (a conv patch embedding's) or [D, C*p*p]; bias: [D] or
    None; ids_keep: [B, K] int64 (e.g. `random_masking_indices(...).ids_keep`); pos_embed: [1, L, D] or [L, D],
    added to the kept tokens. Differentiable in imgs, weight, bias and pos_embed. Output dtype: imgs' dtype,
    or the autocast dtype when autocast is on.
    """
    _validate(imgs, weight, bias, patch_size, ids_keep, pos_embed)
    D = weight.shape[0]
    dtype = imgs.dtype
    if torch.is_autocast_enabled(imgs.device.type):
        dtype = torch.get_autocast_dtype(imgs.device.type)
    imgs = imgs.to(dtype).contiguous()
    w2 = weight.reshape(D, -1).to(dtype)
    b = bias.to(dtype) if bias is not None else None
    pos = pos_embed.reshape(-1, D).to(dtype) if pos_embed is not None else None
    return torch.ops.dermfast.masked_patch_embed(imgs, w2, b, patch_size, ids_keep, pos, backend)
