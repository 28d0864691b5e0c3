"""Embedded default dataset: procedural, seeded, dermoscopy-like lesion images written once as JPEG files.

* ``render_lesion`` paints one image with vectorised numpy (PIL only rasterises hair and vessel polylines): skin
  (tone, smooth shading, dermoscope vignette / circular field), then a lesion whose outline is the radial function
  ``rho(theta) = R * (1 + sum_k a_k cos(k theta + phi_k))``: harmonics k=1..3 set asymmetry, k=4..16 border
  irregularity, a sigmoid width sets border blur. Each class draws diameter / asymmetry / irregularity / blur /
  opacity from its own ranges (``_STYLES``) and has its own colour painter (``_PAINTERS``: pigment network,
  blotches, vessels, lagoons, scale, central scar...). Ranges overlap on purpose, so telling classes apart needs
  shape, colour and texture together. Hair strokes are added to ~30% of images regardless of class.
* ``generate_toy_dataset`` writes ``images/<name>.jpg``, the lesion masks ``masks/<name>.png`` (8-bit grey, 0 / 255;
  the painter knows the outline), ``labels.csv`` (``image,label,mask``) and ``meta.json`` into a
  cache directory, so the default training run decodes real JPEG files. Image ``i`` is drawn from
  ``numpy.random.default_rng([seed, i])`` and the label order is a seeded shuffle of ``class_counts``, so a seed
  gives byte-identical files. Everything is written into a temporary sibling directory renamed into place at the
  end: an interrupted run never leaves a directory that passes the completeness check.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm
from dermfast.paths import default_cache_dir  # noqa: F401  (also dermfast.data.toy.default_cache_dir)

CLASSES: tuple[str, ...] = ("nv", "mel", "bkl", "bcc", "akiec", "vasc", "df")
HAM10000_COUNTS: Mapping[str, int] = MappingProxyType(
    {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115})
TOY_VERSION = 2  # bump whenever rendering changes: it names the cache directory (v1 was a pre-release draft)
JPEG_QUALITY = 92
_GENERATOR = "dermfast.data.toy"


def class_counts(n_images: int, floor: int = 8) -> dict[str, int]:
    """Per-class counts with the HAM10000 imbalance scaled to ``n_images``: exact sum, keys in ``CLASSES`` order.

    Every class gets at least ``min(floor, n_images // 7)``; the rest of the budget is split in proportion to
    HAM10000 with largest-remainder rounding, so counts never increase along ``CLASSES``."""
    if n_images < len(CLASSES):
        raise ValueError(f"n_images={n_images} < {len(CLASSES)}: every class needs at least one image")
    floor, fixed = max(1, min(floor, n_images // len(CLASSES))), {}
    while True:  # classes whose proportional share is below the floor are pinned to it; the rest is rescaled
        free = [c for c in CLASSES if c not in fixed]
        budget, weight = n_images - floor * len(fixed), sum(HAM10000_COUNTS[c] for c in free)
        target = {c: budget * HAM10000_COUNTS[c] / weight for c in free}
        low = {c: floor for c in free if target[c] < floor}
        if not low:
            break
        fixed.update(low)
    counts = {**fixed, **{c: int(target[c]) for c in free}}
    by_remainder = sorted(free, key=lambda c: (int(target[c]) - target[c], CLASSES.index(c)))
    for c in by_remainder[:n_images - sum(counts.values())]:
        counts[c] += 1
    return {c: counts[c] for c in CLASSES}


# ------------------------------------------------------------------------------------------------- rendering
class _Style(NamedTuple):
    """Per-class (low, high) ranges: radius (fraction of the half-image), asymmetry and irregularity (harmonic
    amplitudes, fractions of the radius), edge blur (in normalised radius) and lesion opacity."""
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


class _Lesion(NamedTuple):
    """Lesion geometry. ``x``/``y``: (H, W) float32 pixel coordinates in [-1, 1] (x = column); ``s``: (H, W)
    normalised radius (0 at the centre, 1 on the outline); ``mask``: (H, W) soft mask in [0, 1]."""
    x: np.ndarray
    y: np.ndarray
    cx: float
    cy: float
    radius: float
    amp: np.ndarray  # (16,) outline harmonic amplitudes, fractions of the radius
    phase: np.ndarray  # (16,)
    s: np.ndarray | None = None
    mask: np.ndarray | None = None

    def rho(self, theta: np.ndarray) -> np.ndarray:
        """Outline radius (normalised image units) at angles ``theta``: same shape as ``theta``."""
        wave = (self.amp * np.cos(np.multiply.outer(theta, np.arange(1, 17)) + self.phase)).sum(-1)
        return self.radius * np.maximum(1.0 + wave, 0.3)

    def points(self, rng: np.random.Generator, n: int, lo: float = 0.0, hi: float = 0.8):
        """``n`` random points inside the lesion at normalised radius in [lo, hi]: two (n,) arrays x, y."""
        theta = rng.uniform(-np.pi, np.pi, n)
        r = self.rho(theta) * np.sqrt(rng.uniform(lo * lo, hi * hi, n))
        return self.cx + r * np.cos(theta), self.cy + r * np.sin(theta)


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise: (size, size) float32, roughly unit scale, ``cells`` lattice cells per side."""
    cells = max(1, int(cells))
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, size, endpoint=False, dtype=np.float32) + np.float32(0.5 * cells / size)
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = (t - i) ** 2 * (3 - 2 * (t - i))
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _spots(g: _Lesion, px, py, rad, edge: float | None = None) -> np.ndarray:
    """Union (max) of round spots at (px, py) with radii ``rad`` (scalars or (n,) arrays): Gaussian if ``edge`` is
    None, else a sigmoid disc with that edge width. Returns (H, W) float32 weights in [0, 1]."""
    px, py, rad = (np.atleast_1d(np.asarray(a, np.float32))[:, None, None] for a in (px, py, rad))
    if px.size == 0:
        return np.zeros_like(g.x)
    d2 = (g.x - px) ** 2 + (g.y - py) ** 2
    w = np.exp(-d2 / (2 * rad ** 2)) if edge is None else 1 / (1 + np.exp(np.minimum((np.sqrt(d2) - rad) / edge, 50)))
    return w.max(0)


def _blend(col: np.ndarray, w: np.ndarray, rgb) -> None:
    """In place: ``col`` (H, W, 3) float32 moves toward the colour ``rgb`` by the weights ``w`` (H, W)."""
    col += w[..., None] * (np.asarray(rgb, np.float32) - col)


def _fill(rng: np.random.Generator, g: _Lesion, a, b) -> np.ndarray:
    """(H, W, 3) float32 filled with a random colour between RGB ``a`` and ``b`` (plus a little jitter)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    rgb = a + np.float32(rng.uniform()) * (b - a) + rng.normal(0, 0.015, 3).astype(np.float32)
    return np.broadcast_to(rgb, g.x.shape + (3,)).copy()


def _network(rng: np.random.Generator, g: _Lesion, cells: float) -> np.ndarray:
    """Pigment network from jittered-grid Voronoi borders (F2 - F1 small), ``cells`` holes per image side.
    Returns (H, W) float32: 1 on the lines, 0 in the holes, faded in random patches."""
    n = int(cells)
    m = n + 2  # one padding cell on each side: the 3x3 neighbourhood never leaves the grid
    px = (np.arange(m)[:, None] - 1 + rng.uniform(0.15, 0.85, (m, m))).astype(np.float32).ravel()
    py = (np.arange(m)[None, :] - 1 + rng.uniform(0.15, 0.85, (m, m))).astype(np.float32).ravel()
    qx, qy = (g.x + 1) * np.float32(n / 2), (g.y + 1) * np.float32(n / 2)
    base = (qx.astype(np.int64) + 1) * m + qy.astype(np.int64) + 1
    f0 = f1 = np.full_like(qx, np.inf)  # running smallest and second-smallest squared distances
    for o in (dx * m + dy for dx in (-1, 0, 1) for dy in (-1, 0, 1)):
        d2 = (px.take(base + o) - qx) ** 2 + (py.take(base + o) - qy) ** 2
        f0, f1 = np.minimum(f0, d2), np.minimum(f1, np.maximum(f0, d2))
    fade = np.clip(0.7 + 0.5 * _noise(rng, g.x.shape[0], 4), 0, 1)
    return np.clip(1 - (np.sqrt(f1) - np.sqrt(f0)) / 0.25, 0, 1) * fade


def _strokes(size: int, lines: list[np.ndarray], width: int) -> np.ndarray:
    """Rasterise polylines ((n, 2) arrays in [-1, 1] coordinates) into (size, size) float32 coverage."""
    img = Image.new("L", (size, size))
    draw = ImageDraw.Draw(img)
    for pts in lines:
        draw.line([tuple(p) for p in ((pts + 1) * size / 2).tolist()], fill=255, width=width, joint="curve")
    return np.asarray(img, np.float32) / 255


def _vessels(rng: np.random.Generator, g: _Lesion, n: int) -> np.ndarray:
    """``n`` arborising vessel trees (branching random walks) inside the lesion: (H, W) float32 coverage."""
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
    return _strokes(g.x.shape[0], lines, max(1, round(g.x.shape[0] / 128))) * np.clip(1.1 - g.s, 0, 1)


def _hair(rng: np.random.Generator, size: int) -> np.ndarray:
    """1-7 thin curved strokes (quadratic Bezier curves) anywhere in the image: (size, size) float32 coverage."""
    t, lines = np.linspace(0, 1, 24)[:, None], []
    for _ in range(int(rng.integers(1, 8))):
        p0, a, length = rng.uniform(-1.2, 1.2, 2), rng.uniform(0, 2 * np.pi), rng.uniform(0.7, 2.2)
        p2 = p0 + length * np.array([np.cos(a), np.sin(a)])
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.25 * length, 2)
        lines.append((1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2)
    return _strokes(size, lines, max(1, round(size / 100)))


# Class painters: (rng, lesion geometry) -> (H, W, 3) float32 lesion colour in [0, 1], before compositing on skin.
def _paint_nv(rng, g):  # light-to-mid brown, uniform, regular reticular network, sometimes regular globules
    col = _fill(rng, g, (0.72, 0.52, 0.40), (0.42, 0.25, 0.16))
    col *= (1 - rng.uniform(0, 0.25) * np.clip(1 - g.s, 0, 1))[..., None]  # darker centre, or uniform
    col *= (1 - rng.uniform(0.08, 0.28) * _network(rng, g, rng.uniform(11, 17)))[..., None]
    if rng.random() < 0.35:
        _blend(col, 0.7 * _spots(g, *g.points(rng, int(rng.integers(3, 10))), g.radius * 0.05), (0.32, 0.2, 0.13))
    if rng.random() < 0.15:  # dysplastic-looking: one darker eccentric blotch (overlaps with mel)
        _blend(col, 0.6 * _spots(g, *g.points(rng, 1, 0.2, 0.6), g.radius * 0.3), (0.28, 0.17, 0.11))
    return col


def _paint_mel(rng, g):  # variegated brown / black / blue-grey / red / white blotches, atypical network and dots
    col = _fill(rng, g, (0.58, 0.36, 0.26), (0.34, 0.19, 0.13))
    palette = ((0.28, 0.15, 0.10), (0.09, 0.06, 0.06), (0.45, 0.48, 0.58), (0.72, 0.38, 0.38), (0.86, 0.80, 0.78),
               (0.62, 0.40, 0.28))
    n = int(rng.integers(2, 6))
    for k, x, y in zip(rng.choice(6, n, p=(0.25, 0.2, 0.22, 0.1, 0.1, 0.13)), *g.points(rng, n, 0.1, 0.85)):
        _blend(col, rng.uniform(0.6, 1.0) * _spots(g, x, y, g.radius * rng.uniform(0.15, 0.45)), palette[k])
    if rng.random() < 0.6:  # coarse network on part of the lesion only
        part = np.clip(_noise(rng, g.x.shape[0], 3), 0, 1)
        col *= (1 - 0.35 * part * _network(rng, g, rng.uniform(7, 12)))[..., None]
    dots = g.points(rng, int(rng.integers(0, 12)), 0.5, 0.98)
    _blend(col, 0.8 * _spots(g, *dots, g.radius * rng.uniform(0.03, 0.07)), (0.12, 0.08, 0.07))
    return col


def _paint_bkl(rng, g):  # waxy tan/brown, cerebriform folds, milia-like cysts, comedo-like openings
    col = _fill(rng, g, (0.74, 0.56, 0.44), (0.48, 0.32, 0.23))
    ridges = np.abs(np.sin(rng.uniform(3, 6) * _noise(rng, g.x.shape[0], rng.integers(4, 8))))
    col *= (1 - 0.2 * (1 - ridges) ** 2 + 0.06 * _noise(rng, g.x.shape[0], g.x.shape[0] // 5))[..., None]
    cysts, pores = g.points(rng, int(rng.integers(1, 9)), 0, 0.85), g.points(rng, int(rng.integers(0, 6)), 0, 0.85)
    _blend(col, 0.9 * _spots(g, *cysts, g.radius * 0.04, 0.01), (0.95, 0.92, 0.80))
    _blend(col, 0.85 * _spots(g, *pores, g.radius * 0.04, 0.01), (0.22, 0.16, 0.11))
    return col


def _paint_bcc(rng, g):  # pearly pink, arborising red vessels, blue-grey ovoid nests, sometimes ulceration
    col = _fill(rng, g, (0.93, 0.72, 0.70), (0.80, 0.56, 0.56))
    _blend(col, 0.55 * _spots(g, *g.points(rng, 1, 0, 0.5), g.radius * 0.35), (0.97, 0.91, 0.89))
    _blend(col, rng.uniform(0.6, 0.95) * _vessels(rng, g, int(rng.integers(2, 6))), (0.72, 0.10, 0.14))
    nests = g.points(rng, int(rng.integers(0, 5)), 0.1, 0.8)
    _blend(col, 0.75 * _spots(g, *nests, g.radius * rng.uniform(0.06, 0.14), 0.02), (0.40, 0.45, 0.55))
    if rng.random() < 0.3:
        _blend(col, 0.8 * _spots(g, *g.points(rng, 1, 0, 0.4), g.radius * 0.2), (0.45, 0.18, 0.14))
    return col


def _paint_akiec(rng, g):  # scaly red-pink: patchy white-yellow scale, dotted vessels, ill-defined edge
    size = g.x.shape[0]
    col = _fill(rng, g, (0.90, 0.56, 0.52), (0.74, 0.38, 0.38)) * (1 + 0.08 * _noise(rng, size, 4))[..., None]
    scale = np.clip((_noise(rng, size, size // 4) - rng.uniform(0.0, 0.6)) / 0.8, 0, 1)
    _blend(col, rng.uniform(0.4, 0.8) * scale * np.clip(_noise(rng, size, 3) + 0.8, 0, 1), (0.94, 0.90, 0.80))
    dots = g.points(rng, int(rng.integers(6, 25)), 0, 0.9)
    _blend(col, 0.7 * _spots(g, *dots, g.radius * 0.025, 0.01), (0.70, 0.15, 0.18))
    return col


def _paint_vasc(rng, g):  # red / purple / dark lagoons with sharp borders on a pink-red background
    col = _fill(rng, g, (0.84, 0.44, 0.50), (0.66, 0.30, 0.40))
    palette = ((0.70, 0.12, 0.18), (0.50, 0.10, 0.25), (0.36, 0.08, 0.24), (0.25, 0.08, 0.15))
    n = int(rng.integers(3, 10))
    for k, x, y in zip(rng.choice(4, n), *g.points(rng, n, 0, 0.8)):
        _blend(col, rng.uniform(0.8, 1.0) * _spots(g, x, y, g.radius * rng.uniform(0.15, 0.35), 0.012), palette[k])
    return col


def _paint_df(rng, g):  # brown periphery with a delicate network, white scar-like central patch
    col = _fill(rng, g, (0.66, 0.46, 0.36), (0.46, 0.29, 0.21))
    col *= (1 - 0.15 * _network(rng, g, rng.uniform(14, 20)) * np.clip(g.s * 1.5 - 0.3, 0, 1))[..., None]
    c, r, blur = g.points(rng, 1, 0, 0.25), g.radius * rng.uniform(0.25, 0.55), g.radius * rng.uniform(0.05, 0.12)
    patch = _spots(g, *c, r, blur)
    _blend(col, rng.uniform(0.7, 0.95) * patch, (0.92, 0.86, 0.82))
    return col


_PAINTERS = MappingProxyType({"nv": _paint_nv, "mel": _paint_mel, "bkl": _paint_bkl, "bcc": _paint_bcc,
                              "akiec": _paint_akiec, "vasc": _paint_vasc, "df": _paint_df})


def _lesion(rng: np.random.Generator, st: _Style, x: np.ndarray, y: np.ndarray) -> _Lesion:
    """Draw the lesion geometry (centre, radius, outline harmonics, edge blur) for the class style ``st``."""
    k = np.arange(1, 17)
    amp = np.where(k <= 3, rng.uniform(*st.asym) * rng.uniform(0.3, 1.0, 16) / np.sqrt(k),
                   rng.uniform(*st.irr) * rng.uniform(0.5, 1.0, 16) * 4.0 / k)
    cx, cy = np.clip(rng.normal(0, 0.08, 2), -0.2, 0.2)
    g = _Lesion(x, y, float(cx), float(cy), rng.uniform(*st.radius), amp, rng.uniform(0, 2 * np.pi, 16))
    table = np.linspace(-np.pi, np.pi, 257)  # outline sampled once, interpolated per pixel
    s = (np.hypot(x - cx, y - cy) / np.interp(np.arctan2(y - cy, x - cx), table, g.rho(table))).astype(np.float32)
    mask = 1 / (1 + np.exp(np.clip((s - 1) / np.float32(rng.uniform(*st.edge)), -50, 50)))
    return g._replace(s=s, mask=mask)


def render_lesion(rng: np.random.Generator, label: str, size: int, with_mask: bool = False):
    """One dermoscopy-like image of class ``label`` (a code in ``CLASSES``): (size, size, 3) uint8 RGB.
    The output depends only on the state of ``rng``. ``with_mask``: also the lesion mask, (size, size) uint8
    0 / 255, 255 inside the painted outline (normalised radius ``s < 1``: where the soft mask that blends the
    lesion in is above one half); drawing it takes nothing from ``rng``, so the image is the same either way."""
    if label not in _STYLES:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")
    if size < 16:
        raise ValueError(f"size={size} is too small (min 16)")
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(t, t)
    skin = np.float32([0.96, 0.80, 0.70]) + np.float32(rng.beta(1.6, 3.0)) * np.float32([-0.44, -0.45, -0.44])
    skin = skin * (1 + 0.05 * _noise(rng, size, 3) + 0.02 * _noise(rng, size, size // 8))[..., None]
    st = _STYLES[label]
    g = _lesion(rng, st, x, y)
    col = _PAINTERS[label](rng, g) * (1 + 0.04 * _noise(rng, size, size // 6))[..., None]
    img = skin + (g.mask * np.float32(rng.uniform(*st.opacity)))[..., None] * (col - skin)
    if rng.random() < 0.3:
        hair = np.float32([0.16, 0.11, 0.09]) * np.float32(rng.uniform(0.3, 1.0))
        _blend(img, np.float32(rng.uniform(0.7, 0.95)) * _hair(rng, size), hair)
    r2 = x * x + y * y
    light = 1 - np.float32(rng.uniform(0.05, 0.25)) * r2  # dermoscope illumination falloff
    if rng.random() < 0.25:  # circular field of view: dark corners
        light *= np.clip((np.float32(rng.uniform(1.05, 1.35)) - np.sqrt(r2)) / np.float32(0.08), 0, 1)
    img = img * light[..., None] + np.float32(0.012) * rng.standard_normal(img.shape, dtype=np.float32)
    img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return (img, np.where(g.s < 1, np.uint8(255), np.uint8(0))) if with_mask else img


# ------------------------------------------------------------------------------------------------- the dataset
def _read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _complete(root: Path, meta: dict) -> bool:
    """True when ``root`` holds a finished dataset written with exactly these parameters."""
    if _read_meta(root) != meta:
        return False
    try:
        with open(root / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        present = set(os.listdir(root / "images"))
        masks = set(os.listdir(root / "masks"))
    except (OSError, ValueError):
        return False
    return (len(rows) == meta["n_images"] and all(r.get("label") in CLASSES for r in rows)
            and all(f"{r['image']}.jpg" in present and f"{r['image']}.png" in masks for r in rows))


def generate_toy_dataset(root: str | os.PathLike | None = None, n_images: int = 1200, image_size: int = 128,
                         seed: int = 0, force: bool = False, progress: bool = True) -> Path:
    """Write the embedded dataset once and return its root: ``images/<name>.jpg`` ((image_size, image_size) RGB
    JPEG, quality 92), ``labels.csv`` (header ``image,label``; image = file stem, label = a code in ``CLASSES``)
    and ``meta.json`` (generator, version and parameters).

    ``root`` defaults to ``default_cache_dir() / f"toy-v{TOY_VERSION}-n{n_images}-s{image_size}-seed{seed}"``. A
    complete dataset with the same parameters is returned untouched unless ``force``. An existing ``root`` that
    is not a toy dataset (foreign files, no toy ``meta.json``) is never deleted: that raises FileExistsError."""
    if root is None:
        root = default_cache_dir() / f"toy-v{TOY_VERSION}-n{n_images}-s{image_size}-seed{seed}"
    root = Path(root)
    meta = {"generator": _GENERATOR, "version": TOY_VERSION, "n_images": int(n_images),
            "image_size": int(image_size), "seed": int(seed), "jpeg_quality": JPEG_QUALITY, "classes": list(CLASSES),
            "masks": "png"}  # a directory written before masks existed regenerates (same JPEG bytes) once
    if not force and _complete(root, meta):
        return root
    foreign = root.exists() and (not root.is_dir() or any(root.iterdir()))
    if foreign and (_read_meta(root) or {}).get("generator") != _GENERATOR:
        raise FileExistsError(f"{root} exists and is not a dermfast toy dataset; refusing to overwrite it")
    labels = [c for c, k in class_counts(n_images).items() for _ in range(k)]
    labels = [labels[j] for j in np.random.default_rng([seed, 2**31 - 1]).permutation(n_images)]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        names = [f"toy_{i:06d}" for i in range(n_images)]
        for i in tqdm(range(n_images), desc=f"toy dataset -> {root.name}", unit="img", disable=not progress):
            img, mask = render_lesion(np.random.default_rng([seed, i]), labels[i], image_size, with_mask=True)
            Image.fromarray(img).save(tmp / "images" / f"{names[i]}.jpg", quality=JPEG_QUALITY)
            Image.fromarray(mask).save(tmp / "masks" / f"{names[i]}.png")
        with open(tmp / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "label", "mask"),
                                     *((n, lab, f"masks/{n}.png") for n, lab in zip(names, labels))])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # written last: marks completeness
        if root.exists():  # a stale / incomplete / forced toy dataset: move it aside, then swap in the new one
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "d")
        try:
            os.replace(tmp, root)
        except OSError:
            if not _complete(root, meta):  # lost a race only if the winner wrote the same dataset
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return root
