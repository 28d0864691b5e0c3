"""plots.png at the end of every stage: loss and learning-rate curves (and eval metrics when there are any).

Drawn with PIL (already a dependency) so every environment gets the figure: no matplotlib needed. Each panel
has its title, a y-axis label, tick marks with labels at round values on both axes (1 / 2 / 5 x 10^k; powers of
ten on a log axis), and its curves. The loss axis is logarithmic whenever every loss is positive. The lr panel
shows log.csv's `lr` column, the schedule's base lr (a layer-decayed group runs at base lr x its lr_scale), and
says so on its axis. A legend, when a panel has several curves, sits below the axes, never over the curves.
Phase boundaries are vertical dashed lines with their label in every panel: the synth stage's switch from the
VAE to the denoiser is read from the run's config.yaml beside log.csv (`vae_steps`), or given as `markers`.

`training_figure` returns the figure with a description of each panel (scale, ticks, markers, boxes) so tests
check the layout without reading pixels; `save_training_plots` writes it.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 480, 320                          # one panel
LEFT, RIGHT, TOP, BOTTOM = 74, 16, 26, 64  # margins of the plot box inside a panel (tick labels, axis labels)
LEGEND_ROW = 14
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
MARKER_COLOUR = (110, 110, 110)


@dataclass
class PanelInfo:
    """What a panel shows, in figure pixel coordinates: plot_box / legend_box = (x0, y0, x1, y1)."""
    title: str
    ylabel: str
    y_scale: str                                   # "linear" | "log"
    yticks: list[tuple[float, str]]
    xticks: list[tuple[float, str]]
    curves: list[str]
    markers: list[tuple[float, str]] = field(default_factory=list)   # (step, label) drawn
    plot_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    legend_box: tuple[int, int, int, int] | None = None
    x_to_px: object = None                         # step -> figure x pixel


@dataclass
class Figure:
    image: Image.Image
    panels: list[PanelInfo]


def _read(path: Path) -> list[dict]:
    if not path or not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        try:
            x, y = float(r["step"]), float(r[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _label(v: float) -> str:
    if v == 0:
        return "0"
    s = f"{v:.3g}"
    return s.replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round values (a step of 1 / 2 / 5 x 10^k) in [lo, hi]: the step whose tick count is nearest n."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    k = math.floor(math.log10((hi - lo) / max(1, n - 1)))
    best = None
    for step in (m * 10.0 ** e for e in (k - 1, k, k + 1) for m in (1, 2, 5)):
        k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        t = [round(i * step, 12) for i in range(k0, k1 + 1)]
        if len(t) >= 2 and (best is None or abs(len(t) - n) <= abs(len(best) - n)):  # a tie: the larger step
            best = t
    return best or [lo, hi]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over [lo, hi] (lo > 0): the powers of ten inside, then 2 and 5 x 10^k, then
    every m x 10^k, whichever first gives at least three; never more than about eight."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mants in ((1,), (1, 2, 5), tuple(range(1, 10))):
        t = [float(f"{m * 10.0 ** k:.12g}") for k in range(k0, k1 + 1) for m in mants
             if lo * (1 - 1e-9) <= m * 10.0 ** k <= hi * (1 + 1e-9)]
        if len(t) >= 3 or (len(t) >= 2 and mants[-1] == 9):
            while len(t) > 8:
                t = t[::2]
            return t
    return t


def phase_markers(run_dir: Path) -> list[tuple[float, str]]:
    """Phase boundaries of the run in `run_dir` from its config.yaml: [(step, label)]. The synth stage trains
    the VAE for `vae_steps` optimiser steps, then the denoiser (log.csv's step vae_steps + 1 is the first
    denoiser step): a marker between the two. No config, or no such key: none."""
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        return []
    try:
        import yaml
        cfg = yaml.safe_load(p.read_text()) or {}
    except Exception:  # noqa: BLE001  (an unreadable config only costs the marker; the plot is still drawn)
        return []
    if not isinstance(cfg, dict):
        return []
    try:
        vae_steps = int(cfg.get("vae_steps") or 0)
    except (TypeError, ValueError):
        return []
    if vae_steps > 0 and not cfg.get("vae"):
        return [(vae_steps + 0.5, "VAE | denoiser")]
    return []


def _vertical_text(text: str, font, fill) -> Image.Image:
    box = font.getbbox(text)
    im = Image.new("RGBA", (box[2] + 2, box[3] + 2), (255, 255, 255, 0))
    ImageDraw.Draw(im).text((0, 0), text, fill=fill, font=font)
    return im.rotate(90, expand=True)


def _panel(fig: Image.Image, ox: int, title: str, ylabel: str, curves: list[tuple[str, list[float], list[float]]],
           log_y: bool = False, markers: list[tuple[float, str]] = ()) -> PanelInfo:
    d = ImageDraw.Draw(fig)
    font, small = _font(13), _font(11)
    d.text((ox + LEFT, 6), title, fill="black", font=font)
    x0, y0, x1, y1 = ox + LEFT, TOP, ox + W - RIGHT, H - BOTTOM
    lab = _vertical_text(ylabel, small, "black")
    fig.paste(lab, (ox + 4, (y0 + y1) // 2 - lab.height // 2), lab)
    info = PanelInfo(title, ylabel, "log" if log_y else "linear", [], [], [c[0] for c in curves],
                     plot_box=(x0, y0, x1, y1))
    if log_y:
        curves = [(n, [x for x, y in zip(xs, ys) if y > 0], [y for y in ys if y > 0]) for n, xs, ys in curves]
    pts = [(x, y) for _, xs, ys in curves for x, y in zip(xs, ys)]
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    if not pts:
        d.text((x0 + 10, (y0 + y1) // 2), "no data", fill="gray", font=font)
        return info
    ty = math.log10 if log_y else (lambda v: v)
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
    if xmax == xmin:
        xmin, xmax = xmin - 0.5, xmax + 0.5
    if log_y:
        if hi / lo < 1.5:
            lo, hi = lo / 1.25, hi * 1.25
        lo, hi = lo / (hi / lo) ** 0.04, hi * (hi / lo) ** 0.04   # 4 % headroom, so no curve runs on the frame
        ticks = log_ticks(lo, hi)
    else:
        if hi == lo:
            lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
        pad = 0.04 * (hi - lo)
        lo, hi = (lo - pad if lo < 0 else max(0.0, lo - pad)), hi + pad  # a range >= 0 stays >= 0
        ticks = nice_ticks(lo, hi)
    ylo, yhi = ty(lo), ty(hi)
    sx = lambda x: x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)  # noqa: E731
    sy = lambda y: y1 - (ty(y) - ylo) / (yhi - ylo) * (y1 - y0)  # noqa: E731
    info.x_to_px = sx
    for v in ticks:  # y ticks: a grid line, a tick and its label
        py = sy(v)
        d.line([(x0, py), (x1, py)], fill=(232, 232, 232))
        d.line([(x0 - 4, py), (x0, py)], fill="black")
        s = _label(v)
        d.text((x0 - 6 - small.getlength(s), py - 6), s, fill="black", font=small)
        info.yticks.append((v, s))
    for v in nice_ticks(xmin, xmax, 7):
        px = sx(v)
        d.line([(px, y1), (px, y1 + 4)], fill="black")
        s = f"{v:g}"
        d.text((px - small.getlength(s) / 2, y1 + 6), s, fill="black", font=small)
        info.xticks.append((v, s))
    d.text(((x0 + x1) // 2 - 12, y1 + 20), "step", fill="black", font=small)
    for xm, label in markers:
        if not xmin <= xm <= xmax:
            continue
        px = sx(xm)
        for yy in range(y0, y1, 8):  # dashed
            d.line([(px, yy), (px, min(yy + 4, y1))], fill=MARKER_COLOUR, width=1)
        # the label above the frame (never over a curve), right of the line where it fits, clear of the title
        tw = small.getlength(label)
        tx = px + 3 if px + 3 + tw <= x1 else px - 3 - tw
        tx = max(tx, x0 + font.getlength(title) + 10)
        d.line([(px, y0 - 4), (px, y0)], fill=MARKER_COLOUR)
        d.text((tx, y0 - 15), label, fill=MARKER_COLOUR, font=small)
        info.markers.append((xm, label))
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    for i, (label, xs, ys) in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        line = [(sx(x), sy(y)) for x, y in zip(xs, ys)]
        if len(line) == 1:
            d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        elif line:
            d.line(line, fill=colour, width=2)
    if len(curves) > 1:  # the legend: under the axes, a swatch and a name per curve, as many per row as fit
        lx, ly, top = x0, y1 + 36, y1 + 36
        right = x0
        for i, (label, _, _) in enumerate(curves):
            wd = 22 + int(small.getlength(label)) + 12
            if lx + wd > x1 and lx > x0:
                lx, ly = x0, ly + LEGEND_ROW
            colour = COLOURS[i % len(COLOURS)]
            d.line([(lx, ly + 6), (lx + 16, ly + 6)], fill=colour, width=3)
            d.text((lx + 20, ly), label, fill="black", font=small)
            lx += wd
            right = max(right, lx)
        info.legend_box = (x0, top, right, ly + LEGEND_ROW)
    return info


def training_figure(log_csv: Path, eval_csv: Path | None = None,
                    markers: list[tuple[float, str]] | None = None) -> Figure:
    """Loss and lr against step from log.csv (+ one panel of eval metrics from eval.csv when present).
    markers: [(step, label)] vertical lines; None reads the run's phase boundaries (`phase_markers`)."""
    rows = _read(log_csv)
    if not rows:
        raise ValueError(f"no rows in {log_csv} to plot")
    if markers is None:
        markers = phase_markers(Path(log_csv).parent)
    xs, loss = _series(rows, "loss")
    log_y = bool(loss) and min(loss) > 0
    ev = _read(eval_csv) if eval_csv else []
    keys = [k for k in ev[0] if k not in ("step", "epoch")][:5] if ev else []
    rows_h = H + (3 * LEGEND_ROW if keys else 0)  # room for a legend of up to five rows
    n = 3 if keys else 2
    fig = Image.new("RGB", (W * n, rows_h), "white")
    panels = [_panel(fig, 0, "training loss", "loss" + (" (log)" if log_y else ""), [("loss", xs, loss)],
                     log_y=log_y, markers=markers),
              _panel(fig, W, "learning rate", "lr (base)", [("lr (base)", *_series(rows, "lr"))], markers=markers)]
    if keys:
        panels.append(_panel(fig, 2 * W, "evaluation", "metric", [(k, *_series(ev, k)) for k in keys],
                             markers=markers))
    return Figure(fig, panels)


def save_training_plots(log_csv: Path, out: Path, eval_csv: Path | None = None,
                        markers: list[tuple[float, str]] | None = None) -> Path:
    """Write `training_figure(log_csv, eval_csv, markers)` to `out` (PNG)."""
    training_figure(log_csv, eval_csv, markers).image.save(out)
    return Path(out)


def save_labelled_grid(grid, path: Path, row_labels: list[str], note: str | None = None, scale: int = 1) -> Path:
    """grid: [rows*H, cols*W, 3] uint8 (equal-height rows) -> PNG with a label left of each row and an
    optional note line under the figure; `scale` upsamples small images (nearest) so they are readable."""
    import numpy as np
    grid = np.asarray(grid)
    im = Image.fromarray(grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    size = 12 + 4 * min(scale, 3)
    font = _font(size)
    label_w = 8 + int(0.6 * size * max((len(s) for s in row_labels), default=0))
    note_h = size + 12 if note else 0
    fig = Image.new("RGB", (label_w + im.width, im.height + note_h), "white")
    fig.paste(im, (label_w, 0))
    d = ImageDraw.Draw(fig)
    row_h = im.height / max(1, len(row_labels))
    for i, text in enumerate(row_labels):
        d.text((4, int(row_h * (i + 0.5)) - size // 2), text, fill="black", font=font)
    if note:
        d.text((4, im.height + 6), note, fill=(60, 60, 60), font=font)
    fig.save(path)
    return Path(path)
