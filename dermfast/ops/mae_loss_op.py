"""MAE reconstruction loss: patchify, per-patch pixel normalisation (norm_pix_loss), MSE on removed patches.

The reference follows facebookresearch/mae `forward_loss` exactly (including the unbiased per-patch variance
and eps=1e-6), so losses are comparable with the paper's. A fused kernel later computes the same value in one
pass over the image and the prediction without materialising the patchified target.
"""
from __future__ import annotations

import torch

from dermfast.ops.registry import Query, define_op


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
        mask: [B, L], 0 keep, 1 remove; only removed patches count.
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


mae_loss_op = define_op("mae_loss", "MAE reconstruction loss on removed patches (norm-pix)")
mae_loss_op.register("torch")(mae_loss_ref)


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool = True,
             eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """Functional form; dispatches to the best backend for pred. See `mae_loss_ref` for the contract."""
    q = Query(pred.device, pred.dtype, {"patch": patch, "L": pred.shape[1] if pred.dim() == 3 else 0},
              pred.requires_grad)
    return mae_loss_op(q, imgs, pred, mask, patch, norm_pix, eps, backend=backend)


class MAELoss(torch.nn.Module):
    def __init__(self, patch: int, norm_pix: bool = True, eps: float = 1e-6):
        super().__init__()
        self.patch, self.norm_pix, self.eps = patch, norm_pix, eps

    def forward(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mae_loss(imgs, pred, mask, self.patch, self.norm_pix, self.eps)
