"""The trivial segmentation baseline every report shows beside the learned models (`--stage segment --model otsu`).

Recipe (the classic dermoscopy baseline; strong on PH2, whose lesions are dark on even skin):
  1. the blue channel (lesions absorb blue most; hair and skin tone matter least there), smoothed by a Gaussian
     of sigma = `sigma_frac` x the image's shorter side (resolution-independent);
  2. Otsu's threshold on its 256-bin histogram (the threshold maximising the between-class variance); pixels
     darker than it are lesion;
  3. the largest 8-connected component is kept, its holes are filled (scipy.ndimage).
No training, no parameters fitted on data: the same function serves training-time reports and `evaluate`.
"""
from __future__ import annotations

import numpy as np

SIGMA_FRAC = 0.01  # Gaussian sigma as a fraction of the shorter side (about 5 px on a PH2 image of 560 rows)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of 8-bit-range values: the bin edge t maximising w0 w1 (mu0 - mu1)^2 over the
    histogram of `values` (the class 'below' is values < t). A constant input returns its value."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("otsu_threshold: empty input")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)            # pixels in bins 0..k (threshold after bin k)
    w1 = v.size - w0
    s0 = np.cumsum(hist * centers)[:-1]
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (float((hist * centers).sum()) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(np.argmax(between))
    return float(edges[k + 1])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False stays all False)."""
    from scipy import ndimage
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def otsu_segment(image: np.ndarray, sigma_frac: float = SIGMA_FRAC) -> np.ndarray:
    """image: [H, W, 3] uint8 RGB -> [H, W] bool lesion mask (dark blue channel, largest component, filled)."""
    from scipy import ndimage
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"otsu_segment takes an [H, W, 3] RGB image, got shape {img.shape}")
    blue = img[..., 2].astype(np.float32)
    sigma = max(float(sigma_frac) * min(img.shape[:2]), 0.0)
    if sigma > 0:
        blue = ndimage.gaussian_filter(blue, sigma)
    t = otsu_threshold(blue)
    dark = blue < t
    return ndimage.binary_fill_holes(largest_component(dark))
