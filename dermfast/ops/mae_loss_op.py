"""MAE reconstruction loss: patchify, per-patch pixel normalisation (norm_pix_loss), MSE on removed patches.

The reference follows facebookresearch/mae `forward_loss` exactly (unbiased per-patch variance, eps=1e-6, mean
over a patch's pixels, sum over removed patches divided by the number removed), so losses are comparable with
the paper's. The fused kernels (kernels/mae_loss.py, csrc/mae_loss.cu) compute the same value straight from
`imgs` [B, C, H, W] and `pred` [B, L, P]: no patchified copy of the target, one read of each per pass; the
backward recomputes the per-patch statistics instead of saving a gradient (why: kernels/mae_loss.py header).

Ragged masks. The issue's ragged masking (`random_masking` with a per-sample ratio tensor) packs the *visible*
tokens ([T, D] with cu_seqlens), but the decoder restores every sample to its L positions, so what reaches the
loss is still `pred` [B, L, P] and a [B, L] mask in which each row removes a different number of patches. The
loss handles any such mask: rows that keep everything contribute nothing, rows that remove everything count
fully, and the normalisation stays global, sum over all removed patches / total removed in the batch (as MAE's
`(loss * mask).sum() / mask.sum()`; a sample removing more patches weighs more). A batch removing nothing gives 0.
Mask values are weights (0 keep, 1 remove in MAE); any real dtype is accepted (bool, integer, float).

Differences from the reference worth knowing: the kernels never read kept patches, so a NaN / Inf in a kept
patch's pixels or prediction does not reach the loss (the reference's `loss * mask` propagates it); the
gradient flows to `pred` (and, through a torch formula, to `imgs` if it requires grad), never to `mask`.

torch.compile / export: the public function calls the custom op `torch.ops.dermfast.mae_loss` (backend chosen
inside, at run time), whose registered autograd calls `torch.ops.dermfast.mae_loss_backward`; each has one fake
implementation shared by every backend. Inputs are validated in Python before any launch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dermfast.ops._device import on_device
from dermfast.ops.registry import Query, all_of, define_op, dtype_in, needs_cuda_ext, needs_triton_device

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_P = 4096  # kernels/mae_loss.py MAX_P: a patch is one register tile row
CUDA_MAX_P = 1024  # csrc/mae_loss.cu: 32 lanes x 32 values


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """imgs: [B, C, H, W] with H, W multiples of `patch` -> [B, L, patch*patch*C], (p, q, c) order as in MAE."""
    B, C, H, W = imgs.shape
    if H % patch or W % patch:
        raise ValueError(f"patchify: image {H}x{W} is not a multiple of patch size {patch}")
    h, w = H // patch, W // patch
    x = imgs.reshape(B, C, h, patch, w, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, patch * patch * C)


def unpatchify(x: torch.Tensor, patch: int, channels: int = 3, height: int | None = None) -> torch.Tensor:
    """Inverse of `patchify`: [B, L, patch*patch*C] -> [B, C, H, W] (square unless `height` in patches given)."""
    B, L, _ = x.shape
    h = height if height is not None else int(round(L ** 0.5))
    w = L // h
    if h * w != L:
        raise ValueError(f"unpatchify: {L} patches do not form a {h}-row grid")
    x = x.reshape(B, h, w, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * patch, w * patch)


def mae_loss_ref(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int,
                 norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over removed patches.

    Args:
        imgs: [B, C, H, W] target images.
        pred: [B, L, patch*patch*C] decoder output (patch order of `patchify`).
        mask: [B, L], 0 keep, 1 remove; only removed patches count. Rows may remove different numbers of
            patches (ragged); the loss is sum over removed patches / total removed (at least 1).
        norm_pix: normalise each target patch by its mean and (unbiased) variance, as MAE's norm_pix_loss.
    Returns: scalar loss, float32 (float64 for float64 inputs).
    """
    acc = torch.promote_types(pred.dtype, torch.float32)  # fp32 accumulation; float64 stays float64
    target = patchify(imgs, patch).to(acc)
    if pred.shape != target.shape:
        raise ValueError(f"mae_loss: pred {tuple(pred.shape)} does not match patchified target {tuple(target.shape)}")
    if mask.shape != target.shape[:2]:
        raise ValueError(f"mae_loss: mask {tuple(mask.shape)} must be [B, L] = {tuple(target.shape[:2])}")
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    loss = ((pred.to(acc) - target) ** 2).mean(dim=-1)
    mask = mask.to(acc)
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


def _norm_target(imgs: torch.Tensor, patch: int, norm_pix: bool, eps: float, acc: torch.dtype):
    """Patchified target in `acc` -> (t, rstd or None); t normalised as in `mae_loss_ref` when norm_pix."""
    x = patchify(imgs, patch).to(acc)
    if not norm_pix:
        return x, None
    rstd = (x.var(dim=-1, keepdim=True) + eps) ** -0.5
    return (x - x.mean(dim=-1, keepdim=True)) * rstd, rstd


def mae_loss_backward_ref(grad: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                          patch: int, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """dloss/dpred of `mae_loss_ref` times the upstream scalar `grad`: [B, L, P] in pred's dtype, contiguous.

    grad * m[b, l] * 2 (pred - t) / (P * max(sum m, 1)), formed in fp32 (float64 for float64) and rounded once.
    """
    acc = torch.promote_types(pred.dtype, torch.float32)
    t, _ = _norm_target(imgs, patch, norm_pix, eps, acc)
    m = mask.to(acc)
    scale = grad.to(acc) * 2.0 / (pred.shape[-1] * m.sum().clamp_min(1.0))
    out = (pred.to(acc) - t) * (m[..., None] * scale)
    return out.to(pred.dtype).contiguous()


def target_grad(grad_target: torch.Tensor, imgs: torch.Tensor, patch: int, norm_pix: bool, eps: float):
    """Chain rule through the (normalised) target: dL/dt [B, L, P] -> dL/dimgs [B, C, H, W] in imgs' dtype.

    With t = (x - mean) / s, s = sqrt(var_unbiased + eps):  dx = (g - mean(g) - t * sum(g * t) / (P - 1)) / s.
    Only used when imgs requires grad (MAE targets are data, so normally never).
    """
    acc = torch.promote_types(imgs.dtype, torch.float32)
    g = grad_target.to(acc)
    if norm_pix:
        t, rstd = _norm_target(imgs, patch, True, eps, acc)
        P = g.shape[-1]
        g = (g - g.mean(dim=-1, keepdim=True) - t * (g * t).sum(dim=-1, keepdim=True) / (P - 1)) * rstd
    B, C, H, W = imgs.shape
    return unpatchify(g, patch, C, height=H // patch).to(imgs.dtype)


# ------------------------------------------------------------------------------------------------ validation


def check_inputs(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool,
                 eps: float) -> None:
    """ValueError with the problem named, before any launch. Works on fake tensors (shapes and dtypes only)."""
    if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1:
        raise ValueError(f"mae_loss: patch must be a positive int, got {patch!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"mae_loss: eps must be a finite number >= 0, got {eps!r}")
    for name, t in (("imgs", imgs), ("pred", pred), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"mae_loss: {name} must be a tensor, got {type(t).__name__}")
    if imgs.dim() != 4:
        raise ValueError(f"mae_loss: imgs must be [B, C, H, W], got shape {tuple(imgs.shape)}")
    if pred.dim() != 3:
        raise ValueError(f"mae_loss: pred must be [B, L, P], got shape {tuple(pred.shape)}")
    if imgs.dtype not in _FLOATS or pred.dtype not in _FLOATS:
        raise ValueError(f"mae_loss: imgs and pred must be float16, bfloat16, float32 or float64, got "
                         f"{str(imgs.dtype).removeprefix('torch.')} and {str(pred.dtype).removeprefix('torch.')}")
    if mask.dtype.is_complex:
        raise ValueError(f"mae_loss: mask must be real (bool, integer or float), got {mask.dtype}")
    if not (imgs.device == pred.device == mask.device):
        raise ValueError(f"mae_loss: imgs, pred and mask must be on one device, got {imgs.device}, "
                         f"{pred.device}, {mask.device}")
    B, C, H, W = imgs.shape
    if H % patch or W % patch or H < patch or W < patch:
        raise ValueError(f"mae_loss: image {H}x{W} is not a multiple of patch size {patch}")
    want = (B, (H // patch) * (W // patch), patch * patch * C)
    if tuple(pred.shape) != want:
        raise ValueError(f"mae_loss: pred {tuple(pred.shape)} does not match patchified target {want}")
    if tuple(mask.shape) != want[:2]:
        raise ValueError(f"mae_loss: mask {tuple(mask.shape)} must be [B, L] = {want[:2]} (0 keep, 1 remove)")
    if norm_pix and want[2] < 2:
        raise ValueError("mae_loss: norm_pix needs at least 2 values per patch (unbiased variance)")


def _query(imgs: torch.Tensor, pred: torch.Tensor, patch: int, requires_grad: bool = False) -> Query:
    B, L, P = pred.shape
    return Query(pred.device, torch.promote_types(imgs.dtype, pred.dtype),
                 {"B": B, "L": L, "P": P, "patch": patch}, requires_grad)


def _max_p(limit: int):
    def check(q: Query) -> str | None:
        P = q.sizes.get("P", 0)
        return None if P <= limit else f"patch of {P} values exceeds {limit}"
    return check


def _nonempty(q: Query) -> str | None:
    return None if q.sizes.get("B", 1) >= 1 else "empty batch"


def _cuda_ext_has_op(q: Query) -> str | None:
    from dermfast import _optional
    ok = _optional.cuda_ext is not None and hasattr(_optional.cuda_ext, "mae_loss_fwd")
    return None if ok else "dermfast._C predates mae_loss (rebuild: pip install -e .)"


_TRITON_OK = all_of(needs_triton_device, dtype_in(*_KERNEL_DTYPES), _max_p(TRITON_MAX_P), _nonempty)
_CUDA_OK = all_of(needs_cuda_ext, _cuda_ext_has_op, dtype_in(*_KERNEL_DTYPES), _max_p(CUDA_MAX_P), _nonempty)

mae_loss_op = define_op("mae_loss", "MAE reconstruction loss on removed patches (norm-pix)")
mae_loss_backward_op = define_op("mae_loss_backward", "gradient of the MAE loss wrt pred (recomputed)")
mae_loss_op.register("torch")(mae_loss_ref)
mae_loss_backward_op.register("torch")(mae_loss_backward_ref)

# ------------------------------------------------------------------------------------------------ triton


@mae_loss_op.register("triton", _TRITON_OK)
def _triton_fwd(imgs, pred, mask, patch, norm_pix=True, eps=1e-6):
    from dermfast.kernels import mae_loss as kernel
    with on_device(pred):
        return kernel.mae_loss_fwd(imgs, pred, mask, patch, norm_pix, eps)


@mae_loss_backward_op.register("triton", _TRITON_OK)
def _triton_bwd(grad, imgs, pred, mask, patch, norm_pix=True, eps=1e-6):
    from dermfast.kernels import mae_loss as kernel
    with on_device(pred):
        return kernel.mae_loss_bwd(grad, imgs, pred, mask, patch, norm_pix, eps)


# ------------------------------------------------------------------------------------------------ cuda

_CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CUDA_MASK_DTYPES = {**_CUDA_DTYPES, torch.float64: 3, torch.uint8: 4, torch.int32: 5, torch.int64: 6}


def _cuda_args(imgs, pred, mask, patch, norm_pix, eps):
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    elif mask.dtype not in _CUDA_MASK_DTYPES:
        mask = mask.to(torch.float32)  # int8 / int16 / uint16..: a [B, L] conversion, rare
    kw = dict(shape=list(imgs.shape), patch=patch, imgs_strides=list(imgs.stride()),
              pred_strides=list(pred.stride()), mask_strides=list(mask.stride()),
              imgs_dtype=_CUDA_DTYPES[imgs.dtype], pred_dtype=_CUDA_DTYPES[pred.dtype],
              mask_dtype=_CUDA_MASK_DTYPES[mask.dtype], norm_pix=bool(norm_pix), eps=float(eps),
              device=pred.device.index if pred.device.index is not None else torch.cuda.current_device(),
              stream=torch.cuda.current_stream(pred.device).cuda_stream)
    return mask, kw


@mae_loss_op.register("cuda", _CUDA_OK)
def _cuda_fwd(imgs, pred, mask, patch, norm_pix=True, eps=1e-6):
    from dermfast import _optional
    mask, kw = _cuda_args(imgs, pred, mask, patch, norm_pix, eps)
    part = torch.empty(2 * imgs.shape[0] * (imgs.shape[2] // patch), device=pred.device, dtype=torch.float32)
    loss = torch.empty((), device=pred.device, dtype=torch.float32)
    _optional.cuda_ext.mae_loss_fwd(imgs.data_ptr(), pred.data_ptr(), mask.data_ptr(), part.data_ptr(),
                                    loss.data_ptr(), **kw)
    return loss


@mae_loss_backward_op.register("cuda", _CUDA_OK)
def _cuda_bwd(grad, imgs, pred, mask, patch, norm_pix=True, eps=1e-6):
    from dermfast import _optional
    mask, kw = _cuda_args(imgs, pred, mask, patch, norm_pix, eps)
    grad = grad.to(torch.float32).contiguous()
    scale = torch.empty((), device=pred.device, dtype=torch.float32)
    out = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
    _optional.cuda_ext.mae_loss_bwd(grad.data_ptr(), imgs.data_ptr(), pred.data_ptr(), mask.data_ptr(),
                                    scale.data_ptr(), out.data_ptr(), **kw)
    return out


# ------------------------------------------------------------------------------------------------ custom ops


def _loss_dtype(pred_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(pred_dtype, torch.float32)


@torch.library.custom_op("dermfast::mae_loss", mutates_args=())
def _mae_loss_custom(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool,
                     eps: float, backend: Optional[str]) -> torch.Tensor:
    check_inputs(imgs, pred, mask, patch, norm_pix, eps)
    return mae_loss_op.select(_query(imgs, pred, patch), backend).fn(imgs, pred, mask, patch, norm_pix, eps)


@_mae_loss_custom.register_fake
def _mae_loss_fake(imgs, pred, mask, patch, norm_pix, eps, backend):
    check_inputs(imgs, pred, mask, patch, norm_pix, eps)
    return pred.new_empty((), dtype=_loss_dtype(pred.dtype))


@torch.library.custom_op("dermfast::mae_loss_backward", mutates_args=())
def _mae_loss_backward_custom(grad: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                              patch: int, norm_pix: bool, eps: float, backend: Optional[str]) -> torch.Tensor:
    _check_grad(grad, pred)
    check_inputs(imgs, pred, mask, patch, norm_pix, eps)
    impl = mae_loss_backward_op.select(_query(imgs, pred, patch), backend)
    return impl.fn(grad, imgs, pred, mask, patch, norm_pix, eps)


@_mae_loss_backward_custom.register_fake
def _mae_loss_backward_fake(grad, imgs, pred, mask, patch, norm_pix, eps, backend):
    _check_grad(grad, pred)
    check_inputs(imgs, pred, mask, patch, norm_pix, eps)
    return pred.new_empty(pred.shape)


def _check_grad(grad: torch.Tensor, pred: torch.Tensor) -> None:
    if grad.dim() != 0 or not grad.dtype.is_floating_point or grad.device != pred.device:
        raise ValueError(f"mae_loss_backward: grad must be a 0-dim float tensor on {pred.device}, got "
                         f"shape {tuple(grad.shape)} {grad.dtype} on {grad.device}")


def _setup_context(ctx, inputs, output):
    imgs, pred, mask, patch, norm_pix, eps, backend = inputs
    ctx.save_for_backward(imgs, pred, mask)
    ctx.args = (patch, norm_pix, eps, backend)


def _backward(ctx, grad):
    imgs, pred, mask = ctx.saved_tensors
    patch, norm_pix, eps, backend = ctx.args
    need_imgs, need_pred = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g_pred = g_imgs = None
    if need_pred or need_imgs:
        g_pred = torch.ops.dermfast.mae_loss_backward(grad, imgs, pred, mask, patch, norm_pix, eps, backend)
    if need_imgs:  # dL/dt = -dL/dpred
        g_imgs = target_grad(-g_pred, imgs, patch, norm_pix, eps)
    return g_imgs, g_pred if need_pred else None, None, None, None, None, None


_mae_loss_custom.register_autograd(_backward, setup_context=_setup_context)

# ------------------------------------------------------------------------------------------------ public API


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool = True,
             eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """MAE loss on removed patches; the backend (cuda, triton, torch) is chosen at run time for pred.

    imgs: [B, C, H, W] float16 / bfloat16 / float32 / float64, any strides; pred: [B, L, p*p*C] (patchify's
    (p, q, c) order), any strides; mask: [B, L], 0 keep, 1 remove, any real dtype, rows may differ in how many
    they remove. Returns a 0-dim float32 loss (float64 for float64 pred). See the module docstring and
    `mae_loss_ref` (the spec). Raises ValueError for bad inputs, BackendUnavailable for an explicit backend
    that cannot serve the call.
    """
    check_inputs(imgs, pred, mask, patch, norm_pix, eps)
    return torch.ops.dermfast.mae_loss(imgs, pred, mask, int(patch), bool(norm_pix), float(eps), backend)


class MAELoss(torch.nn.Module):
    def __init__(self, patch: int, norm_pix: bool = True, eps: float = 1e-6):
        super().__init__()
        self.patch, self.norm_pix, self.eps = patch, norm_pix, eps

    def forward(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mae_loss(imgs, pred, mask, self.patch, self.norm_pix, self.eps)
