"""Embedded default dataset: procedural, seeded, dermoscopy-like lesion images written once as JPEG files.

Design
  * ``render_lesion`` paints one image with vectorised numpy (PIL only draws hair and vessel polylines):
    a skin background (tone, smooth shading, dermoscope vignette), then a lesion whose outline is the radial
    function ``rho(theta) = R * (1 + sum_k a_k cos(k theta + phi_k))``: harmonics k=1..3 set asymmetry,
    k=4..16 border irregularity, and a sigmoid width sets border blur. Each class draws diameter /
    asymmetry / irregularity / edge blur / opacity from its own ranges (``_STYLES``) and has its own colour
    painter (``_PAINTERS``); the ranges overlap on purpose, so a classifier must combine shape, colour and
    texture cues. Hair strokes are added to ~30% of images regardless of class.
  * ``generate_toy_dataset`` writes ``images/<name>.jpg``, ``labels.csv`` (``image,label``) and ``meta.json``
    into a cache directory, so the default training run exercises the real JPEG decode path. Image ``i`` uses
    ``numpy.random.default_rng([seed, i])`` and the label order is a seeded shuffle, so a seed always gives
    byte-identical files. Files are written into a temporary sibling directory renamed into place at the end:
    an interrupted run never leaves a directory that passes the completeness check.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

CLASSES: tuple[str, ...] = ("nv", "mel", "bkl", "bcc", "akiec", "vasc", "df")
HAM10000_COUNTS: Mapping[str, int] = MappingProxyType(
    {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115})
TOY_VERSION = 1
JPEG_QUALITY = 92
_GENERATOR = "dermfast.data.toy"


def class_counts(n_images: int, floor: int = 8) -> dict[str, int]:
    """Per-class image counts with the HAM10000 imbalance scaled to ``n_images`` (exact sum, HAM order).

    Every class gets at least ``min(floor, n_images // 7)`` images; the remaining budget is split in
    proportion to HAM10000 with largest-remainder rounding, so counts never increase along ``CLASSES``."""
    if n_images < len(CLASSES):
        raise ValueError(f"n_images={n_images} < {len(CLASSES)}: every class needs at least one image")
    floor = max(1, min(floor, n_images // len(CLASSES)))
    fixed: dict[str, int] = {}
    while True:  # classes whose proportional share is below the floor are pinned to it; rescale the rest
        free = [c for c in CLASSES if c not in fixed]
        budget, weight = n_images - floor * len(fixed), sum(HAM10000_COUNTS[c] for c in free)
        target = {c: budget * HAM10000_COUNTS[c] / weight for c in free}
        low = {c: floor for c in free if target[c] < floor}
        if not low:
            break
        fixed.update(low)
    counts = {**fixed, **{c: int(target[c]) for c in free}}
    left = n_images - sum(counts.values())
    for c in sorted(free, key=lambda c: (int(target[c]) - target[c], CLASSES.index(c)))[:left]:
        counts[c] += 1
    return {c: counts[c] for c in CLASSES}


# ----------------------------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class _Style:
    """Per-class (low, high) ranges: radius (fraction of the half-image), asymmetry and irregularity
    (harmonic amplitudes, fractions of the radius), edge blur (in normalised radius) and lesion opacity."""
    radius: tuple[float, float]
    asym: tuple[float, float]
    irr: tuple[float, float]
    edge: tuple[float, float]
    opacity: tuple[float, float]


_STYLES: Mapping[str, _Style] = MappingProxyType({
    "nv": _Style((0.28, 0.55), (0.02, 0.10), (0.004, 0.020), (0.03, 0.09), (0.80, 0.97)),
    "mel": _Style((0.42, 0.78), (0.08, 0.24), (0.015, 0.050), (0.02, 0.12), (0.88, 1.00)),
    "bkl": _Style((0.36, 0.72), (0.04, 0.14), (0.008, 0.030), (0.02, 0.05), (0.82, 0.98)),
    "bcc": _Style((0.32, 0.64), (0.07, 0.20), (0.010, 0.040), (0.05, 0.12), (0.60, 0.85)),
    "akiec": _Style((0.34, 0.66), (0.08, 0.22), (0.015, 0.050), (0.10, 0.22), (0.55, 0.80)),
    "vasc": _Style((0.20, 0.45), (0.02, 0.09), (0.004, 0.020), (0.02, 0.05), (0.85, 1.00)),
    "df": _Style((0.20, 0.45), (0.02, 0.09), (0.004, 0.025), (0.12, 0.28), (0.65, 0.90)),
})


@dataclass(frozen=True)
class _Lesion:
    """Lesion geometry on the image grid. ``x``/``y``: (H, W) float32 coordinates in [-1, 1] (x = column);
    ``s``: (H, W) normalised radius (0 at the centre, 1 on the outline); ``mask``: (H, W) soft mask in [0, 1]."""
    x: np.ndarray
    y: np.ndarray
    cx: float
    cy: float
    radius: float
    amp: np.ndarray  # (16,) harmonic amplitudes (fractions of the radius)
    phase: np.ndarray  # (16,)
    s: np.ndarray
    mask: np.ndarray

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def rho(self, theta: np.ndarray) -> np.ndarray:
        """Outline radius at angles ``theta`` (any shape), same shape, in normalised image units."""
        k = np.arange(1, len(self.amp) + 1)
        wave = (self.amp * np.cos(np.multiply.outer(theta, k) + self.phase)).sum(-1)
        return self.radius * np.maximum(1.0 + wave, 0.3)

    def points(self, rng: np.random.Generator, n: int, lo: float = 0.0, hi: float = 0.8):
        """``n`` random points inside the lesion at normalised radius in [lo, hi]: two (n,) arrays x, y."""
        theta = rng.uniform(-np.pi, np.pi, n)
        frac = np.sqrt(rng.uniform(lo * lo, hi * hi, n))
        r = self.rho(theta) * frac
        return self.cx + r * np.cos(theta), self.cy + r * np.sin(theta)


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise: (size, size) float32, ~unit scale, ``cells`` lattice cells per side."""
    cells = max(1, int(cells))
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, size, endpoint=False, dtype=np.float32) + 0.5 * cells / size
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _spots(g: _Lesion, px, py, rad, edge: float | None = None) -> np.ndarray:
    """Union (max) of round spots at (px, py) with radii ``rad``: Gaussian if ``edge`` is None, else a sigmoid
    disc with that edge width. Returns (H, W) float32 weights in [0, 1]."""
    px, py, rad = (np.atleast_1d(np.asarray(a, np.float32))[:, None, None] for a in (px, py, rad))
    if px.size == 0:
        return np.zeros_like(g.x)
    d2 = (g.x - px) ** 2 + (g.y - py) ** 2
    w = np.exp(-d2 / (2 * rad ** 2)) if edge is None else 1 / (1 + np.exp(np.clip((np.sqrt(d2) - rad) / edge, -50, 50)))
    return w.max(0)


def _blend(col: np.ndarray, w: np.ndarray, rgb) -> None:
    """In place: ``col`` (H, W, 3) float32 moves toward colour ``rgb`` by weight ``w`` (H, W)."""
    col += w[..., None] * (np.asarray(rgb, np.float32) - col)


def _mix(rng: np.random.Generator, a, b) -> np.ndarray:
    """A random colour on the segment between RGB colours ``a`` and ``b``: (3,) float32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a + np.float32(rng.uniform()) * (b - a) + rng.normal(0, 0.015, 3).astype(np.float32)


def _network(rng: np.random.Generator, g: _Lesion, freq: float) -> np.ndarray:
    """Warped pigment-network lines: (H, W) float32, 1 on the lines, 0 in the holes."""
    a = rng.uniform(0, np.pi)
    u = g.x * np.cos(a) + g.y * np.sin(a) + 0.08 * _noise(rng, g.size, 5)
    v = -g.x * np.sin(a) + g.y * np.cos(a) + 0.08 * _noise(rng, g.size, 5)
    m = np.minimum(np.abs(np.sin(freq * u)), np.abs(np.sin(freq * v)))
    return np.clip(1 - m / 0.35, 0, 1)


def _strokes(size: int, lines: list[np.ndarray], width: int) -> np.ndarray:
    """Rasterise polylines given in [-1, 1] coordinates ((n, 2) arrays) into (H, W) float32 coverage."""
    img = Image.new("L", (size, size))
    draw = ImageDraw.Draw(img)
    for pts in lines:
        draw.line([tuple(p) for p in ((pts + 1) * size / 2).tolist()], fill=255, width=width, joint="curve")
    return np.asarray(img, np.float32) / 255


def _vessels(rng: np.random.Generator, g: _Lesion, n: int) -> np.ndarray:
    """Arborising vessel-like polylines inside the lesion: (H, W) float32 coverage."""
    lines, step = [], g.radius * 0.12
    for x0, y0 in zip(*g.points(rng, n, 0.0, 0.7)):
        todo = [(x0, y0, rng.uniform(-np.pi, np.pi), int(rng.integers(6, 12)))]
        while todo:
            x, y, a, m = todo.pop()
            pts = [(x, y)]
            for _ in range(m):
                a += rng.normal(0, 0.45)
                x, y = x + step * np.cos(a), y + step * np.sin(a)
                pts.append((x, y))
                if m > 3 and rng.random() < 0.2:
                    todo.append((x, y, a + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2), m // 2))
            lines.append(np.array(pts))
    return _strokes(g.size, lines, max(1, round(g.size / 128))) * np.clip(1.1 - g.s, 0, 1)


def _hair(rng: np.random.Generator, size: int) -> np.ndarray:
    """1-7 thin dark curved strokes (quadratic Bezier curves) anywhere in the image: (H, W) float32 coverage."""
    t = np.linspace(0, 1, 24)[:, None]
    lines = []
    for _ in range(int(rng.integers(1, 8))):
        p0 = rng.uniform(-1.2, 1.2, 2)
        a, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.7, 2.2)
        p2 = p0 + length * np.array([np.cos(a), np.sin(a)])
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.25 * length, 2)
        lines.append((1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2)
    return _strokes(size, lines, max(1, round(size / 100)))


# Class painters: (rng, lesion geometry) -> (H, W, 3) float32 lesion colour in [0, 1] (before compositing).
def _paint_nv(rng, g):
    col = np.broadcast_to(_mix(rng, (0.68, 0.50, 0.36), (0.40, 0.26, 0.17)), g.x.shape + (3,)).copy()
    col *= (1 - rng.uniform(0, 0.25) * np.clip(1 - g.s, 0, 1))[..., None]  # darker centre, or uniform
    col *= (1 - rng.uniform(0.08, 0.28) * _network(rng, g, rng.uniform(18, 28)))[..., None]
    if rng.random() < 0.35:  # regular brown globules
        _blend(col, 0.7 * _spots(g, *g.points(rng, int(rng.integers(3, 10)), 0, 0.8), g.radius * 0.05), (0.32, 0.2, 0.13))
    if rng.random() < 0.15:  # dysplastic-looking: one darker eccentric blotch (overlaps with mel)
        _blend(col, 0.6 * _spots(g, *g.points(rng, 1, 0.2, 0.6), g.radius * 0.3), (0.28, 0.17, 0.11))
    return col


def _paint_mel(rng, g):
    col = np.broadcast_to(_mix(rng, (0.52, 0.35, 0.23), (0.30, 0.19, 0.12)), g.x.shape + (3,)).copy()
    palette = ((0.26, 0.15, 0.10), (0.09, 0.07, 0.07), (0.42, 0.48, 0.58), (0.72, 0.38, 0.38),
               (0.86, 0.80, 0.78), (0.58, 0.40, 0.27))
    n = int(rng.integers(2, 6))
    for k, x, y in zip(rng.choice(6, n, p=(0.25, 0.2, 0.22, 0.1, 0.1, 0.13)), *g.points(rng, n, 0.1, 0.85)):
        _blend(col, rng.uniform(0.6, 1.0) * _spots(g, x, y, g.radius * rng.uniform(0.15, 0.45)), palette[k])
    if rng.random() < 0.6:  # atypical network: coarse, only on part of the lesion
        part = np.clip(_noise(rng, g.size, 3), 0, 1)
        col *= (1 - 0.35 * part * _network(rng, g, rng.uniform(12, 20)))[..., None]
    irregular = _spots(g, *g.points(rng, int(rng.integers(0, 12)), 0.5, 0.98), g.radius * rng.uniform(0.03, 0.07))
    _blend(col, 0.8 * irregular, (0.12, 0.08, 0.07))  # irregular peripheral dots / globules
    return col


def _paint_bkl(rng, g):
    col = np.broadcast_to(_mix(rng, (0.72, 0.58, 0.43), (0.45, 0.32, 0.22)), g.x.shape + (3,)).copy()
    ridges = np.abs(np.sin(rng.uniform(3, 6) * _noise(rng, g.size, rng.integers(4, 8))))  # cerebriform folds
    col *= (1 - 0.22 * np.clip(1 - ridges / 0.3, 0, 1) + 0.06 * _noise(rng, g.size, g.size // 5))[..., None]
    _blend(col, 0.9 * _spots(g, *g.points(rng, int(rng.integers(1, 9)), 0, 0.85), g.radius * 0.04, 0.01),
           (0.95, 0.92, 0.80))  # milia-like cysts
    _blend(col, 0.85 * _spots(g, *g.points(rng, int(rng.integers(0, 6)), 0, 0.85), g.radius * 0.04, 0.01),
           (0.22, 0.16, 0.11))  # comedo-like openings
    return col


def _paint_bcc(rng, g):
    col = np.broadcast_to(_mix(rng, (0.93, 0.72, 0.70), (0.80, 0.56, 0.56)), g.x.shape + (3,)).copy()
    _blend(col, 0.55 * _spots(g, *g.points(rng, 1, 0, 0.5), g.radius * 0.35), (0.97, 0.91, 0.89))  # pearly shine
    _blend(col, rng.uniform(0.6, 0.95) * _vessels(rng, g, int(rng.integers(2, 6))), (0.72, 0.10, 0.14))
    nests = g.points(rng, int(rng.integers(0, 5)), 0.1, 0.8)
    _blend(col, 0.75 * _spots(g, *nests, g.radius * rng.uniform(0.06, 0.14), 0.02), (0.40, 0.45, 0.55))
    if rng.random() < 0.3:  # ulceration
        _blend(col, 0.8 * _spots(g, *g.points(rng, 1, 0, 0.4), g.radius * 0.2), (0.45, 0.18, 0.14))
    return col


def _paint_akiec(rng, g):
    col = np.broadcast_to(_mix(rng, (0.90, 0.56, 0.52), (0.74, 0.38, 0.38)), g.x.shape + (3,)).copy()
    col *= (1 + 0.08 * _noise(rng, g.size, 4))[..., None]
    scale = np.clip((_noise(rng, g.size, g.size // 6) - rng.uniform(0.1, 0.6)) / 0.4, 0, 1)
    _blend(col, 0.85 * scale, (0.94, 0.90, 0.80))  # white-yellow scale
    dots = g.points(rng, int(rng.integers(6, 25)), 0, 0.9)
    _blend(col, 0.7 * _spots(g, *dots, g.radius * 0.025, 0.01), (0.70, 0.15, 0.18))  # dotted vessels
    return col


def _paint_vasc(rng, g):
    col = np.broadcast_to(_mix(rng, (0.84, 0.44, 0.50), (0.66, 0.30, 0.40)), g.x.shape + (3,)).copy()
    palette = ((0.70, 0.12, 0.18), (0.50, 0.10, 0.25), (0.36, 0.08, 0.24), (0.25, 0.08, 0.15))
    n = int(rng.integers(3, 10))
    for k, x, y in zip(rng.choice(4, n), *g.points(rng, n, 0, 0.8)):
        _blend(col, rng.uniform(0.8, 1.0) * _spots(g, x, y, g.radius * rng.uniform(0.15, 0.35), 0.012), palette[k])
    return col


def _paint_df(rng, g):
    col = np.broadcast_to(_mix(rng, (0.64, 0.46, 0.35), (0.45, 0.30, 0.22)), g.x.shape + (3,)).copy()
    col *= (1 - 0.15 * _network(rng, g, rng.uniform(22, 32)) * np.clip(g.s * 1.5 - 0.3, 0, 1))[..., None]
    c = g.points(rng, 1, 0, 0.25)
    patch = _spots(g, *c, g.radius * rng.uniform(0.25, 0.55), g.radius * rng.uniform(0.05, 0.12))
    _blend(col, rng.uniform(0.7, 0.95) * patch, (0.92, 0.86, 0.82))  # central white scar-like patch
    return col


_PAINTERS: Mapping[str, Callable[[np.random.Generator, _Lesion], np.ndarray]] = MappingProxyType({
    "nv": _paint_nv, "mel": _paint_mel, "bkl": _paint_bkl, "bcc": _paint_bcc,
    "akiec": _paint_akiec, "vasc": _paint_vasc, "df": _paint_df})


def _lesion(rng: np.random.Generator, st: _Style, x: np.ndarray, y: np.ndarray) -> _Lesion:
    """Draw lesion geometry (centre, radius, outline harmonics, edge blur) for style ``st``."""
    k = np.arange(1, 17)
    amp = np.where(k <= 3, rng.uniform(*st.asym) * rng.uniform(0.3, 1.0, 16) / np.sqrt(k),
                   rng.uniform(*st.irr) * rng.uniform(0.5, 1.0, 16) * 4.0 / k)
    phase = rng.uniform(0, 2 * np.pi, 16)
    cx, cy = np.clip(rng.normal(0, 0.08, 2), -0.2, 0.2)
    g = _Lesion(x, y, float(cx), float(cy), rng.uniform(*st.radius), amp, phase, x, x)
    table = np.linspace(-np.pi, np.pi, 257)  # outline sampled once, interpolated per pixel
    rho = np.interp(np.arctan2(y - cy, x - cx), table, g.rho(table)).astype(np.float32)
    s = np.hypot(x - cx, y - cy) / rho
    mask = 1 / (1 + np.exp(np.clip((s - 1) / rng.uniform(*st.edge), -50, 50)))
    return _Lesion(x, y, g.cx, g.cy, g.radius, amp, phase, s.astype(np.float32), mask.astype(np.float32))


def render_lesion(rng: np.random.Generator, label: str, size: int) -> np.ndarray:
    """Render one dermoscopy-like image of class ``label`` (a code in ``CLASSES``).

    Returns a (size, size, 3) uint8 RGB array; the output depends only on the state of ``rng``."""
    if label not in _STYLES:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")
    if size < 16:
        raise ValueError(f"size={size} is too small (min 16)")
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(t, t)
    tone = rng.beta(1.6, 3.0)  # skin: mostly fair, some darker tones; smooth shading + fine texture
    skin_rgb = np.float32([0.96, 0.80, 0.70]) + np.float32(tone) * np.float32([-0.44, -0.45, -0.44])
    shade = 1 + 0.05 * _noise(rng, size, 3) + 0.02 * _noise(rng, size, size // 8)
    skin = skin_rgb * shade[..., None]
    st = _STYLES[label]
    g = _lesion(rng, st, x, y)
    col = _PAINTERS[label](rng, g) * (1 + 0.04 * _noise(rng, size, size // 6))[..., None]
    img = skin + (g.mask * rng.uniform(*st.opacity))[..., None] * (col - skin)
    if rng.random() < 0.3:
        _blend(img, rng.uniform(0.7, 0.95) * _hair(rng, size), _mix(rng, (0.16, 0.11, 0.09), (0.05, 0.04, 0.04)))
    r2 = x * x + y * y
    light = 1 - rng.uniform(0.05, 0.25) * r2  # dermoscope illumination falloff
    if rng.random() < 0.25:  # circular field of view: dark corners
        light *= np.clip((rng.uniform(1.05, 1.35) - np.sqrt(r2)) / 0.08, 0, 1)
    img = img * light[..., None] + 0.012 * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- the dataset
def default_cache_dir() -> Path:
    """$DERMFAST_CACHE, else $XDG_CACHE_HOME/dermfast, else ~/.cache/dermfast."""
    if os.environ.get("DERMFAST_CACHE"):
        return Path(os.environ["DERMFAST_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dermfast"


def _meta(n_images: int, image_size: int, seed: int) -> dict:
    return {"generator": _GENERATOR, "version": TOY_VERSION, "n_images": n_images, "image_size": image_size,
            "seed": seed, "jpeg_quality": JPEG_QUALITY, "classes": list(CLASSES)}


def _complete(root: Path, meta: dict) -> bool:
    try:
        if json.loads((root / "meta.json").read_text()) != meta:
            return False
        with open(root / "labels.csv", newline="") as f:
            names = [r["image"] for r in csv.DictReader(f)]
    except (OSError, ValueError, KeyError):
        return False
    return len(names) == meta["n_images"] and all((root / "images" / f"{n}.jpg").is_file() for n in names)


def generate_toy_dataset(root=None, n_images: int = 1200, image_size: int = 128, seed: int = 0,
                         force: bool = False, progress: bool = True) -> Path:
    """Write the embedded dataset once: root/images/<name>.jpg, root/labels.csv (image,label), root/meta.json.

    Image i is rendered from numpy.random.default_rng([seed, i]); labels follow `class_counts(n_images)` in a
    seeded shuffle, so a seed gives byte-identical files. Idempotent: a complete dataset with the same
    parameters is returned as is. Written into a temporary sibling directory and renamed into place, so an
    interrupted run never leaves a directory that looks complete. Returns root.
    """
    root = Path(root) if root is not None else (
        default_cache_dir() / f"toy-v{TOY_VERSION}-n{n_images}-s{image_size}-seed{seed}")
    meta = _meta(n_images, image_size, seed)
    if not force and _complete(root, meta):
        return root
    labels = [c for c, n in class_counts(n_images).items() for _ in range(n)]
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(n_images)
    labels = [labels[k] for k in order]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        (tmp / "images").mkdir()
        rows = []
        for i in tqdm(range(n_images), desc="generating toy dataset", unit="img", disable=not progress,
                      mininterval=0.5):
            name = f"toy_{i:06d}"
            img = render_lesion(np.random.default_rng([seed, i]), labels[i], image_size)
            Image.fromarray(img).save(tmp / "images" / f"{name}.jpg", quality=JPEG_QUALITY)
            rows.append((name, labels[i]))
        with open(tmp / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("image", "label"))
            w.writerows(rows)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
