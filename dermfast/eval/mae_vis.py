"""MAE reconstruction figure: rows of original / masked / reconstruction / reconstruction + visible, as a PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dermfast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dermfast.ops import patchify, unpatchify


def _to_uint8(imgs: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] normalised -> [B, H, W, 3] uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (imgs.float().cpu() * std + mean).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def reconstruction_grid(model, imgs: torch.Tensor, seed: int = 0, step: int = 0,
                        sample_offset: int = 0) -> np.ndarray:
    """imgs: [B, 3, H, W] normalised, on the model's device. Returns an [4*H, B*W, 3] uint8 grid.

    The masks are the model's own (`MaskedAutoencoderViT.forward`: mask [B, L], 0 keep, 1 remove), keyed by
    (seed, step, sample_offset + sample), so a figure shows exactly the masking a training step used.
    """
    was_training = model.training
    model.eval()
    _, pred, mask = model(imgs, seed=seed, step=step, sample_offset=sample_offset)
    model.train(was_training)
    p = model.cfg.patch_size
    pred = pred.float()
    if model.cfg.norm_pix_loss:  # predictions are in per-patch normalised units: map back with the target's stats
        target = patchify(imgs.float(), p)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = unpatchify(pred, p, imgs.shape[1])
    m = unpatchify(mask.float()[:, :, None].expand(-1, -1, p * p * imgs.shape[1]), p, imgs.shape[1])
    masked = imgs.float() * (1 - m) + m * torch.tensor([-2.0, -2.0, -2.0], device=imgs.device).view(1, 3, 1, 1)
    pasted = imgs.float() * (1 - m) + recon * m
    rows = [np.concatenate(list(_to_uint8(t)), axis=1) for t in (imgs, masked, recon, pasted)]
    return np.concatenate(rows, axis=0)


def save_reconstruction_png(model, imgs: torch.Tensor, path: Path, seed: int = 0, step: int = 0,
                            sample_offset: int = 0) -> Path:
    grid = reconstruction_grid(model, imgs, seed, step, sample_offset)
    scale = max(1, 256 // imgs.shape[-1])  # small demo images are upscaled so the figure is readable
    im = Image.fromarray(grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)
    return path
