"""Binary segmentation metrics as the lesion-segmentation papers report them: Dice, Jaccard and HD95 per image,
then the mean over images (not one pooled confusion matrix over all pixels).

pred, target: [H, W] arrays of {0, 1} / bool at the ORIGINAL image resolution (`resize_prob` brings a model's
probability map back to it before thresholding), so HD95 is in pixels of the image the user gave.

- Dice = 2 |P & T| / (|P| + |T|); Jaccard = |P & T| / |P | T| (medpy.metric.binary.dc / jc).
- HD95: the 95th percentile of the pooled surface distances in both directions (medpy.metric.binary.hd95):
  surface = mask XOR its binary erosion (4-connected structuring element, pixels outside the image count as
  background); each surface pixel of one mask gets its Euclidean distance to the nearest surface pixel of the
  other; the two sets are joined and their 95th percentile (numpy's linear interpolation) is taken.
- Empty masks (medpy raises for HD95 and returns Dice 0 when both are empty; MONAI returns nan / inf):
    both empty        -> Dice 1, Jaccard 1, HD95 0 (the prediction is exactly right);
    exactly one empty -> Dice 0, Jaccard 0, HD95 = the image diagonal sqrt(H^2 + W^2) (the largest distance the
                         image allows: a missed or invented lesion is the worst case, never dropped from the mean).
  `SegScores.hd95_worst` counts the images that got the diagonal, so a reader sees how much of the mean it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _binary(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [H, W] mask, got shape {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0 and 1 (threshold probabilities first)")
        a = a.astype(bool)
    return a


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = _binary(pred, "pred"), _binary(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ in shape: resize the prediction to the "
                         "target's (original) resolution first")
    return p, t


def dice(pred, target) -> float:
    """2 |P & T| / (|P| + |T|); 1 when both masks are empty."""
    p, t = _pair(pred, target)
    s = int(p.sum()) + int(t.sum())
    return 1.0 if s == 0 else 2.0 * int((p & t).sum()) / s


def jaccard(pred, target) -> float:
    """|P & T| / |P | T|; 1 when both masks are empty."""
    p, t = _pair(pred, target)
    u = int((p | t).sum())
    return 1.0 if u == 0 else int((p & t).sum()) / u


def surface(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels: mask XOR erosion with the 4-connected cross (outside the image = 0)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure
    return mask ^ binary_erosion(mask, structure=generate_binary_structure(2, 1), iterations=1)


def hd95(pred, target) -> float:
    """95th percentile of the symmetric surface distances in pixels; 0 when both are empty, the image diagonal
    when exactly one is."""
    from scipy.ndimage import distance_transform_edt
    p, t = _pair(pred, target)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float(np.hypot(*p.shape))
    sp, st = surface(p), surface(t)
    d_pt = distance_transform_edt(~st)[sp]  # each surface pixel of P to the nearest surface pixel of T
    d_tp = distance_transform_edt(~sp)[st]
    return float(np.percentile(np.concatenate([d_pt, d_tp]), 95))


def resize_prob(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """A probability map [h, w] resized (bilinear, align_corners=False) to the original [height, width]."""
    import torch
    import torch.nn.functional as F
    t = torch.as_tensor(np.asarray(prob, dtype=np.float32))[None, None]
    if t.shape[-2:] == (height, width):
        return t[0, 0].numpy()
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


@dataclass
class SegScores:
    """Per-image scores accumulated over an evaluation set; `summary()` gives the means."""
    dice: list[float] = field(default_factory=list)
    jaccard: list[float] = field(default_factory=list)
    hd95: list[float] = field(default_factory=list)
    hd95_worst: int = 0   # images where exactly one of prediction / truth was empty (HD95 = the diagonal)
    empty_truth: int = 0  # images whose true mask is empty

    def add(self, pred, target) -> tuple[float, float, float]:
        p, t = _pair(pred, target)
        row = (dice(p, t), jaccard(p, t), hd95(p, t))
        self.dice.append(row[0])
        self.jaccard.append(row[1])
        self.hd95.append(row[2])
        self.hd95_worst += int(p.any() != t.any())
        self.empty_truth += int(not t.any())
        return row

    def __len__(self) -> int:
        return len(self.dice)

    def summary(self) -> dict:
        """{dice, jaccard, hd95: means over images (None when there is none), n, hd95_worst, empty_truth}."""
        mean = (lambda v: float(np.mean(v)) if v else None)
        return {"dice": mean(self.dice), "jaccard": mean(self.jaccard), "hd95": mean(self.hd95), "n": len(self),
                "hd95_worst": self.hd95_worst, "empty_truth": self.empty_truth}
