"""Where a classifier looks: Grad-CAM for CNNs, attention rollout for ViTs, as heat maps over the input image.

Both work through timm's model interface (`forward_features` / `forward_head`), so no layer is named per model:

- Grad-CAM (Selvaraju et al. 2017) on the final feature map that `forward_features` returns, [B, C, h, w]
  (or channels-last [B, h, w, C], as timm's Swin returns): channel weights = spatial mean of d logit / d feature,
  map = ReLU(sum_c weight_c * feature_c), upsampled to the input size. Transformers whose attention cannot be
  read (see below) get the same Grad-CAM on their patch tokens laid out on the patch grid.
- Attention rollout (Abnar & Zuidema 2020) for ViTs built from timm's standard `Attention` (ViT, DeiT-3, the
  `mae_vit` classifier): each block's attention probabilities are recomputed from its input (timm runs fused
  SDPA and never materialises them), averaged over heads, mixed with the identity for the residual
  (0.5 A + 0.5 I, rows renormalised) and multiplied through the blocks; the class token's row over the patch
  tokens is the map. Rollout is class-agnostic: it shows what the class token gathers, not evidence for a class.

Maps are float32 numpy arrays [B, H, W] scaled to [0, 1] per image.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _normalise(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[B, h, w] -> [B, H, W] upsampled bilinearly, min-max scaled to [0, 1] per image."""
    m = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = m.flatten(1).min(1).values[:, None, None]
    hi = m.flatten(1).max(1).values[:, None, None]
    return ((m - lo) / (hi - lo).clamp_min(1e-12)).detach().cpu().numpy().astype(np.float32)


def _prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))


def _std_attention_modules(model: nn.Module) -> list[nn.Module]:
    from timm.layers.attention import Attention
    return [m for m in model.modules() if type(m) is Attention]


def supports_rollout(model: nn.Module) -> bool:
    """A token model whose every attention is timm's standard `Attention` (its probabilities can be recomputed)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or _prefix_tokens(model) < 1:
        return False
    attn = _std_attention_modules(model)
    return len(attn) == len(blocks) and len(attn) > 0


def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> np.ndarray:
    """x: [B, 3, H, W] normalised; target: [B] class per image (default: the predicted class). -> [B, H, W]."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(False)
            feats = model.forward_features(x)
            feats.retain_grad()
            logits = model.forward_head(feats)
            if target is None:
                target = logits.argmax(1)
            score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
            (grad,) = torch.autograd.grad(score, feats)
    finally:
        model.train(was_training)
    feats, grad = feats.detach().float(), grad.float()
    if feats.ndim == 3:  # tokens [B, N, D]: drop prefix tokens, lay the patches on their grid
        p = _prefix_tokens(model)
        feats, grad = feats[:, p:], grad[:, p:]
        side = int(math.isqrt(feats.shape[1]))
        if side * side != feats.shape[1]:
            raise ValueError(f"cannot lay {feats.shape[1]} patch tokens on a square grid for Grad-CAM")
        feats = feats.transpose(1, 2).reshape(feats.shape[0], -1, side, side)
        grad = grad.transpose(1, 2).reshape(grad.shape[0], -1, side, side)
    elif feats.ndim == 4 and feats.shape[-1] == getattr(model, "num_features", -1) != feats.shape[1]:
        feats, grad = feats.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)  # channels-last (Swin)
    elif feats.ndim != 4:
        raise ValueError(f"Grad-CAM needs a [B, C, h, w] feature map or [B, N, D] tokens, got {list(feats.shape)}")
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * feats).sum(1))
    return _normalise(cam, tuple(x.shape[-2:]))


@torch.no_grad()
def attention_rollout(model: nn.Module, x: torch.Tensor, residual: float = 0.5) -> np.ndarray:
    """x: [B, 3, H, W] normalised -> [B, H, W]: the class token's rolled-out attention over the patches."""
    if not supports_rollout(model):
        raise ValueError("attention rollout needs a ViT built from timm's standard Attention blocks")
    probs: list[torch.Tensor] = []

    def hook(mod, args):
        t = args[0]
        B, N, _ = t.shape
        qkv = mod.qkv(t).reshape(B, N, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k = mod.q_norm(qkv[0]), mod.k_norm(qkv[1])
        probs.append(((q * mod.scale) @ k.transpose(-2, -1)).float().softmax(-1).mean(1))  # [B, N, N]

    handles = [m.register_forward_pre_hook(hook) for m in _std_attention_modules(model)]
    was_training = model.training
    model.eval()
    try:
        model.forward_features(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    n = probs[0].shape[-1]
    eye = torch.eye(n, device=probs[0].device)
    roll = eye.expand_as(probs[0]).clone()
    for a in probs:
        a = (1 - residual) * a + residual * eye
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    p = _prefix_tokens(model)
    row = roll[:, 0, p:]
    side = int(math.isqrt(row.shape[1]))
    if side * side != row.shape[1]:
        raise ValueError(f"cannot lay {row.shape[1]} patch tokens on a square grid")
    return _normalise(row.reshape(-1, side, side), tuple(x.shape[-2:]))


def explain(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> tuple[np.ndarray, str]:
    """(maps [B, H, W] in [0, 1], method): attention rollout where the model supports it, else Grad-CAM."""
    if supports_rollout(model):
        return attention_rollout(model, x), "attention rollout"
    return gradcam(model, x, target), "Grad-CAM"


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """image [H, W, 3] uint8, heat [H, W] in [0, 1] -> [H, W, 3] uint8 with the heat map in the jet colours."""
    from matplotlib import colormaps
    colours = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    out = (1 - alpha) * image.astype(np.float32) / 255 + alpha * colours
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
