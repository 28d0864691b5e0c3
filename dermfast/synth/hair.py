"""DullRazor hair removal (Lee et al. 1997), as Derm-T2IM cleans its few-shot images before fine-tuning.

    grey level -> black-hat (closing - image) with line structuring elements in 4 directions (thin dark
    structures: hairs) -> threshold -> dilate the mask a little -> inpaint the masked pixels from their
    neighbourhood.

Two backends with the same steps: `torch` (batched tensors on any device: max-pool morphology, inpainting by
repeated normalised 3x3 averaging of the known pixels, which fills a hair a pixel per iteration from both
sides) and `opencv` (cv2.morphologyEx + cv2.inpaint TELEA, for uint8 images on the CPU; used by "auto" for CPU
inputs when OpenCV is installed). The two agree on the mask; their inpainting differs in detail.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _line_max(x: torch.Tensor, k: int, direction: str) -> torch.Tensor:
    """Max over a k-long line (h, v, d = diagonal, a = anti-diagonal) centred on each pixel; 'valid': the
    output is k - 1 smaller than x along the line's axes (the caller pads)."""
    if direction == "h":
        return F.max_pool2d(x, (1, k), stride=1)
    if direction == "v":
        return F.max_pool2d(x, (k, 1), stride=1)
    H, W = x.shape[-2] - (k - 1), x.shape[-1] - (k - 1)
    out = None
    for d in range(k):
        c = k - 1 - d if direction == "a" else d
        s = x[..., d:d + H, c:c + W]
        out = s if out is None else torch.maximum(out, s)
    return out


def _closing(g: torch.Tensor, k: int, direction: str) -> torch.Tensor:
    """Grey closing (dilation, then erosion) with a flat line SE. The input is padded once by 2 * (k // 2)
    replicating its border and both steps run 'valid', so the border is not mistaken for a dark valley."""
    r = k // 2
    ph = 2 * r if direction != "v" else 0
    pv = 2 * r if direction != "h" else 0
    x = F.pad(g, (ph, ph, pv, pv), mode="replicate")
    dil = _line_max(x, k, direction)
    return -_line_max(-dil, k, direction)


def _dilate(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    return F.max_pool2d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate"), (kh, kw), stride=1)


def hair_mask_torch(images: torch.Tensor, kernel: int = 17, threshold: float = 10 / 255) -> torch.Tensor:
    """images [B, 3, H, W] float in [0, 1] -> mask [B, 1, H, W] bool (True = hair)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if kernel < 3 or kernel % 2 == 0:
        raise ValueError(f"kernel must be odd and >= 3, got {kernel}")
    w = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    g = (images.float() * w).sum(1, keepdim=True)
    blackhat = torch.stack([_closing(g, kernel, d) - g for d in "hvda"]).amax(0)
    mask = blackhat > threshold
    return _dilate(mask.float(), 3, 3) > 0


def inpaint_torch(images: torch.Tensor, mask: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
    """Fill mask [B, 1, H, W] (True = unknown) of images [B, C, H, W] from the known pixels around it."""
    x = images.float().clone()
    known = (~mask).float()
    x = x * known
    ones = torch.ones(1, 1, 3, 3, device=x.device)
    iterations = iterations or max(8, min(64, max(images.shape[-2:]) // 4))
    for _ in range(iterations):
        num = F.conv2d(x.flatten(0, 1)[:, None], ones, padding=1).view_as(x)
        den = F.conv2d(known, ones, padding=1)
        fill = (den > 0) & (known == 0)
        x = torch.where(fill, num / den.clamp_min(1e-6), x)
        known = torch.maximum(known, fill.float())
    return torch.where(mask, x, images.float()).to(images.dtype)


def remove_hair(images: torch.Tensor, kernel: int = 17, threshold: float = 10 / 255, backend: str = "auto"):
    """images [B, 3, H, W] float in [0, 1] (any device) -> (clean images (same dtype / device), mask bool).

    backend: auto (OpenCV for CPU tensors when installed, else torch) | torch | opencv.
    """
    if backend not in ("auto", "torch", "opencv"):
        raise ValueError(f"backend must be auto, torch or opencv, got {backend!r}")
    if backend == "auto":
        backend = "opencv" if images.device.type == "cpu" and _has_cv2() else "torch"
    if backend == "torch":
        mask = hair_mask_torch(images, kernel, threshold)
        return inpaint_torch(images, mask), mask
    import numpy as np
    u8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    outs, masks = [], []
    for im in u8:
        clean, m = remove_hair_cv2(im, kernel, int(round(threshold * 255)))
        outs.append(clean)
        masks.append(m)
    clean = torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).float().div(255).to(images.device, images.dtype)
    return clean, torch.from_numpy(np.stack(masks) > 0)[:, None].to(images.device)


def _has_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def remove_hair_cv2(image_u8, kernel: int = 17, threshold: int = 10):
    """OpenCV DullRazor on one [H, W, 3] uint8 RGB image -> (clean uint8, mask uint8 0/255)."""
    import cv2
    import numpy as np
    g = cv2.cvtColor(image_u8, cv2.COLOR_RGB2GRAY)
    hats = [cv2.morphologyEx(g, cv2.MORPH_BLACKHAT, se) for se in (
        np.ones((1, kernel), np.uint8), np.ones((kernel, 1), np.uint8),
        np.eye(kernel, dtype=np.uint8), np.fliplr(np.eye(kernel, dtype=np.uint8)).copy())]
    mask = (np.max(hats, axis=0) > threshold).astype(np.uint8) * 255
    mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))
    return cv2.inpaint(image_u8, mask, 3, cv2.INPAINT_TELEA), mask
