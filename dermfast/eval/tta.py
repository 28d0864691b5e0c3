"""Test-time augmentation for dermoscopy: the mean of the class probabilities over symmetric views of each image.

A dermoscopic image has no up or down and no left or right, so every element of the dihedral group D4 (the
4 rotations by 90 degrees, each with and without a mirror) shows the same lesion. Modes:

    none   the image itself (1 view)
    flips  identity, horizontal, vertical, both flips (4 views; both flips = rotation by 180 degrees)
    d4     the 8 dihedral views: rot90^k for k = 0..3, each also mirrored left-right

Probabilities (softmax), not logits, are averaged, as evaluate's ensembles do. The mode a model was trained
for is recorded in its checkpoint metadata ("tta": "d4"), so `python -m dermfast.evaluate` and
`python -m dermfast.predict` apply the same views.
"""
from __future__ import annotations

import contextlib

import torch

TTA_MODES = ("none", "flips", "d4")

# a view is (k, mirror): rotate by k x 90 degrees in the image plane (dims H, W), then mirror left-right if set
_VIEWS = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, True), (2, False)),  # vertical flip = rot180 then a left-right mirror
    "d4": tuple((k, m) for k in range(4) for m in (False, True)),
}


def tta_views(mode: str) -> tuple[tuple[int, bool], ...]:
    """The views of a mode as (quarter turns, mirror) pairs; ValueError naming the modes for an unknown one."""
    if mode not in _VIEWS:
        raise ValueError(f"unknown test-time augmentation {mode!r}; accepted: {', '.join(TTA_MODES)}")
    return _VIEWS[mode]


def apply_view(x: torch.Tensor, view: tuple[int, bool]) -> torch.Tensor:
    """x: [B, C, H, W] -> the view of every image (H = W needed for odd quarter turns)."""
    k, mirror = view
    if k % 2 and x.shape[-1] != x.shape[-2]:
        raise ValueError(f"a 90-degree rotation needs square images, got {x.shape[-2]}x{x.shape[-1]}; use 'flips'")
    if k:
        x = torch.rot90(x, k, dims=(-2, -1))
    return x.flip(-1) if mirror else x


@torch.no_grad()
def tta_probs(model, x: torch.Tensor, mode: str = "none", autocast=None) -> torch.Tensor:
    """x: [B, C, H, W] -> [B, num_classes] float32 class probabilities, the mean over the views of `mode`."""
    views = tta_views(mode)
    acc = None
    for v in views:
        with (autocast or contextlib.nullcontext()):
            logits = model(apply_view(x, v))
        p = logits.float().softmax(-1)
        acc = p if acc is None else acc + p
    return acc / len(views)


@torch.no_grad()
def predict_tta(model, loader, device: torch.device, mode: str = "none", autocast=None):
    """(probs [N, C] float64, labels [N] int64) numpy arrays over one pass of an evaluation loader, each
    image's probabilities the mean over the views of `mode` (evaluate.predict with the views of this module)."""
    import numpy as np
    tta_views(mode)  # an unknown mode fails before any batch is read
    probs, labels = [], []
    for batch in loader:
        probs.append(tta_probs(model, batch["image"].to(device), mode, autocast).double().cpu())
        labels.append(batch["label"].cpu())
    if not probs:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy().astype(np.int64)


__all__ = ["TTA_MODES", "tta_views", "apply_view", "tta_probs", "predict_tta"]
