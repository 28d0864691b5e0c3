"""Augmentation settings shared by every loader backend (DALI and torch implement the same recipe).

Train: random resized crop (area `scale`, aspect `ratio`) to `size`, horizontal flip with probability `flip`,
vertical flip with probability `vflip`, a random multiple of 90 degrees when `rot90` (after the crop, on the square
S x S output, so a non-square window never changes shape), colour jitter (brightness, contrast, saturation as +- fractions, hue as +- fraction of a turn; 0 = off),
normalise with mean / std (0..1 pixel units). Eval: resize the shorter side to size / crop_fraction, centre crop
`size`, normalise; no randomness, every image exactly once, in order.

Geometry order (every backend, image and mask alike): crop + resize, horizontal flip, vertical flip, then
``rot90`` counter-clockwise quarter turns (``numpy.rot90(a, k)`` on the [H, W] axes). Colour jitter is per pixel (the
contrast mean is over the whole image), so it commutes with all of them and never touches a mask.

The random parameters of a training sample (crop window, flips, quarter turns, jitter factors) are drawn on the host by
`sample_train_params`, a pure function of (seed, rank, epoch, position in the epoch) through a counter-based hash,
and only applied by the loaders: DALI receives them through ``fn.external_source`` as per-sample tensor
arguments, the torch loader applies them with torchvision's functional ops. So a resumed run, a fresh run with
the same seed, any worker layout and either backend give each sample the same window, flip and factors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augment:
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    vflip: float = 0.0     # vertical flip probability
    rot90: bool = False    # a uniform random multiple of 90 degrees (0, 90, 180, 270), counter-clockwise
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


# --- per-sample random parameters, computed on the host --------------------------------------------------------
# Every loader backend draws a training sample's crop window, flip and jitter factors here, from a counter-based
# hash of (seed, rank, epoch, position in the rank's epoch, draw number): no RNG state anywhere, so the same
# sample gets the same augmentation in a fresh run, in a resumed run, in any worker process, with any batch
# split, and in the DALI and torch loaders alike (the loaders only apply the parameters).

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_DRAWS_PER_ATTEMPT = 4      # area, log-aspect, top, left
_ATTEMPTS = 10              # torchvision RandomResizedCrop.get_params tries 10 windows, then falls back
_D_FLIP = _ATTEMPTS * _DRAWS_PER_ATTEMPT
_D_BRIGHT, _D_CONTRAST, _D_SAT, _D_HUE = _D_FLIP + 1, _D_FLIP + 2, _D_FLIP + 3, _D_FLIP + 4
_DRAWS = _D_HUE + 1
# Added later, after the others (a column's value depends on its number only, so the older draws are unchanged).
_D_VFLIP, _D_ROT90 = _DRAWS, _DRAWS + 1
_DRAWS_GEOMETRY = _D_ROT90 + 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, rank: int, epoch: int, positions, draws: int = _DRAWS) -> np.ndarray:
    """Uniforms in [0, 1): float64 [n, draws], a pure function of (seed, rank, epoch, position, draw).

    positions: [n] int, each sample's index in this rank's epoch order (0 = the epoch's first sample).
    """
    with np.errstate(over="ignore"):
        key = np.array([int(seed) & _MASK64], np.uint64)
        for part in (rank, epoch):
            key = _mix64(key * _GOLDEN + np.uint64(int(part) & _MASK64))
        pos = np.asarray(positions, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
        z = _mix64(key + _mix64(pos * _GOLDEN + np.uint64(1)))
        z = _mix64(z + np.arange(draws, dtype=np.uint64).reshape(1, -1) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _uniform(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


def eval_geometry(aug: Augment, width, height) -> dict:
    """The eval resize + centre crop of images of `width` x `height` (int arrays or ints) exactly as torchvision
    computes it (`T.Resize(round(size / crop_fraction))` then `T.CenterCrop(size)`, what the torch loader, timm's
    eval transform and dermfast.predict apply): the shorter side becomes `short`, the longer
    int(short * long / shorter) (truncated: torchvision `_compute_resized_output_size`), and the crop starts at
    int(round((resized - size) / 2)) (Python's round: half to even). DALI rounds both otherwise by default
    (the long side to nearest, the offset half up), 1 px apart on many sizes, so its eval graph takes these.
    Returns int64 arrays `new_w`, `new_h`, `left`, `top`."""
    w = np.asarray(width, dtype=np.int64)
    h = np.asarray(height, dtype=np.int64)
    short = int(round(aug.size / aug.crop_fraction))
    wide = w > h  # torchvision: (short, long) = (w, h) if w <= h else (h, w)
    lo, hi = np.where(wide, h, w), np.where(wide, w, h)
    new_long = (short * hi) // lo  # int(short * long / short_side): exact for these magnitudes
    new_w, new_h = np.where(wide, new_long, short), np.where(wide, short, new_long)
    half_even = np.vectorize(lambda v: int(round(v / 2.0)), otypes=[np.int64])
    return {"new_w": new_w, "new_h": new_h, "left": half_even(new_w - aug.size), "top": half_even(new_h - aug.size)}


def sample_train_params(aug: Augment, seed: int, rank: int, epoch: int, positions, width, height) -> dict:
    """The training augmentation of n samples of sizes (width[n], height[n]) at `positions` of the epoch.

    Returns numpy arrays, all [n]: crop window ``x``, ``y`` (left, top), ``w``, ``h`` in pixels (int32, inside
    the image; the window distribution of torchvision's RandomResizedCrop: area fraction in ``aug.scale``,
    log-uniform aspect w/h in ``aug.ratio``, 10 attempts then the centre crop with the ratio clamped),
    ``flip`` (int32 0/1, 1 with probability ``aug.flip``), ``brightness``, ``contrast``, ``saturation``
    (float32 factors, 1 = unchanged, uniform in [max(0, 1-x), 1+x]) and ``hue`` (float32, a fraction of a
    turn, uniform in [-aug.hue, aug.hue]), ``vflip`` (int32 0/1, 1 with probability ``aug.vflip``) and ``rot90``
    (int32 in 0..3, counter-clockwise quarter turns, uniform when ``aug.rot90``, else 0). Widths/heights are the stored image's (EXIF orientation ignored,
    as PIL's ``Image.open`` and the DALI loader with ``adjust_orientation=False`` see it).
    """
    u = sample_uniforms(seed, rank, epoch, positions, draws=_DRAWS_GEOMETRY)
    W = np.asarray(width, dtype=np.float64).reshape(-1, 1)
    H = np.asarray(height, dtype=np.float64).reshape(-1, 1)
    n = u.shape[0]
    a = u[:, :_D_FLIP].reshape(n, _ATTEMPTS, _DRAWS_PER_ATTEMPT)
    area = W * H * _uniform(a[..., 0], *aug.scale)
    log_r = np.log(np.asarray(aug.ratio, dtype=np.float64))
    aspect = np.exp(_uniform(a[..., 1], log_r[0], log_r[1]))
    w = np.rint(np.sqrt(area * aspect))
    h = np.rint(np.sqrt(area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    cw, ch = w[rows, first], h[rows, first]
    top = np.floor(a[rows, first, 2] * (H[:, 0] - ch + 1))
    left = np.floor(a[rows, first, 3] * (W[:, 0] - cw + 1))
    # Fallback (no attempt fitted): centre crop of the whole image, aspect clamped to aug.ratio.
    fw, fh, in_ratio = W[:, 0].copy(), H[:, 0].copy(), W[:, 0] / H[:, 0]
    lo, hi = min(aug.ratio), max(aug.ratio)
    narrow, wide = in_ratio < lo, in_ratio > hi
    fh[narrow] = np.rint(fw[narrow] / lo)
    fw[wide] = np.rint(fh[wide] * hi)
    none = ~ok.any(axis=1)
    cw, ch = np.where(none, fw, cw), np.where(none, fh, ch)
    top = np.where(none, (H[:, 0] - ch) // 2, top)
    left = np.where(none, (W[:, 0] - cw) // 2, left)

    def factor(x: float, col: int) -> np.ndarray:
        if not x:
            return np.ones(n, np.float32)
        return _uniform(u[:, col], max(0.0, 1.0 - x), 1.0 + x).astype(np.float32)

    return {
        "x": left.astype(np.int32), "y": top.astype(np.int32), "w": cw.astype(np.int32), "h": ch.astype(np.int32),
        "flip": (u[:, _D_FLIP] < aug.flip).astype(np.int32),
        "brightness": factor(aug.brightness, _D_BRIGHT), "contrast": factor(aug.contrast, _D_CONTRAST),
        "saturation": factor(aug.saturation, _D_SAT),
        "hue": (_uniform(u[:, _D_HUE], -aug.hue, aug.hue) if aug.hue else np.zeros(n)).astype(np.float32),
        "vflip": (u[:, _D_VFLIP] < aug.vflip).astype(np.int32),
        "rot90": (np.floor(u[:, _D_ROT90] * 4) if aug.rot90 else np.zeros(n)).astype(np.int32),
    }


# (hflip, vflip, rot90 k) -> the same map as (transpose, hflip, vflip): first transpose the [H, W] axes (or not),
# then flip. The dihedral group of the square has 8 elements, and every one is "transpose or not, then flips";
# a backend without a per-sample rotation (DALI: ``fn.select`` between the image and ``fn.transpose`` of it,
# then ``fn.flip``) applies this form. Row index: hflip * 8 + vflip * 4 + k. Derivation: rot90 = vflip after
# transpose, rot180 = hflip and vflip, rot270 = hflip after transpose; a flip before a transpose swaps axes.
# tests/test_augment_geometry.py checks all 16 rows against numpy's fliplr / flipud / rot90.
def _dihedral_table() -> np.ndarray:
    rows = []
    for h in (0, 1):
        for v in (0, 1):
            for k in range(4):
                t, fh, fv = 0, h, v           # as "transpose t, then flips (fh, fv)"
                for _ in range(k):            # one more quarter turn: rot90 . flips(fh, fv) . T^t
                    # rot90 = V . T; T . flips(a, b) = flips(b, a) . T; T . T = identity
                    t, fh, fv = 1 - t, fv, fh
                    fv = 1 - fv
                rows.append((t, fh, fv))
    return np.asarray(rows, np.int32)


DIHEDRAL = _dihedral_table()


def as_transpose_flips(hflip, vflip, rot90) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample (transpose, hflip, vflip), int32 [n] each, equal to hflip, then vflip, then rot90 quarter turns."""
    row = np.asarray(hflip, np.int64) * 8 + np.asarray(vflip, np.int64) * 4 + np.asarray(rot90, np.int64)
    t = DIHEDRAL[row]
    return tuple(t[..., j].copy() for j in range(3))  # contiguous: DALI takes no strided inputs


_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image as stored (EXIF orientation ignored), from its header.

    JPEG (walks the markers to the frame header) and PNG (IHDR) are parsed directly, in microseconds; any other
    format goes through PIL's header reader. Raises ValueError for data no reader understands.
    """
    if data[:2] == b"\xff\xd8":
        i, n = 2, len(data)
        while i + 4 <= n:
            if data[i] != 0xFF:
                break  # not at a marker: a malformed stream, let PIL judge it
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
                i += 2
                continue
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if marker in _JPEG_SOF and i + 9 <= n:
                h = int.from_bytes(data[i + 5:i + 7], "big")
                w = int.from_bytes(data[i + 7:i + 9], "big")
                if w > 0 and h > 0:
                    return w, h
                break
            if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any frame header
                break
            i += 2 + length
    elif data[:8] == _PNG_MAGIC and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    import io

    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as e:
        raise ValueError(f"cannot read the image size ({type(e).__name__}: {e})") from e
