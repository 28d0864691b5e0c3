"""Augmentation settings shared by every loader backend (DALI and torch implement the same recipe).

Train: random resized crop (area `scale`, aspect `ratio`) to `size`, horizontal flip with probability `flip`,
colour jitter (brightness, contrast, saturation as +- fractions, hue as +- fraction of a turn; 0 = off),
normalise with mean / std (0..1 pixel units). Eval: resize the shorter side to size / crop_fraction, centre crop
`size`, normalise; no randomness, every image exactly once, in order.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augment:
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_fraction: float = 0.875  # eval: centre crop of size out of a size / crop_fraction resize

    @property
    def jitter(self) -> bool:
        return any((self.brightness, self.contrast, self.saturation, self.hue))


def mae_augment(size: int) -> Augment:
    """MAE pretraining recipe: RRC with scale (0.2, 1) and flip, no colour jitter."""
    return Augment(size=size, scale=(0.2, 1.0))


def classify_augment(size: int) -> Augment:
    """Fine-tuning recipe for dermoscopy: RRC, flip, moderate colour jitter."""
    return Augment(size=size, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
