"""plots.png at the end of every stage: loss and learning-rate curves (and eval metrics when there are any).

Drawn with PIL (already a dependency) so every environment gets the figure: no matplotlib needed. Each panel
has its title, min / max tick labels on both axes and the curve; the loss axis is logarithmic when the loss
spans more than a decade.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H, PAD = 440, 270, 60
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


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


def _panel(title: str, curves: list[tuple[str, list[float], list[float]]], log_y: bool = False) -> Image.Image:
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    font = _font(12)
    d.text((PAD, 6), title, fill="black", font=font)
    x0, y0, x1, y1 = PAD, 24, W - 12, H - 30
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    pts = [(x, y) for _, xs, ys in curves for x, y in zip(xs, ys)]
    if not pts:
        d.text((x0 + 10, (y0 + y1) // 2), "no data", fill="gray", font=font)
        return im
    ty = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    ymin, ymax = min(ty(p[1]) for p in pts), max(ty(p[1]) for p in pts)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        ymax, ymin = ymax + 0.5 * (abs(ymax) or 1), ymin - 0.5 * (abs(ymin) or 1)
    sx = lambda x: x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)  # noqa: E731
    sy = lambda y: y1 - (ty(y) - ymin) / (ymax - ymin) * (y1 - y0)  # noqa: E731
    for i, (label, xs, ys) in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        line = [(sx(x), sy(y)) for x, y in zip(xs, ys)]
        if len(line) == 1:
            d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        else:
            d.line(line, fill=colour, width=2)
        if len(curves) > 1:
            d.text((x1 - 110, y0 + 4 + 12 * i), label, fill=colour, font=font)
    untx = (lambda v: 10 ** v) if log_y else (lambda v: v)
    d.text((2, y0 - 2), f"{untx(ymax):.3g}", fill="black", font=font)
    d.text((2, y1 - 10), f"{untx(ymin):.3g}", fill="black", font=font)
    d.text((x0, y1 + 4), f"{xmin:g}", fill="black", font=font)
    d.text((x1 - 30, y1 + 4), f"{xmax:g}", fill="black", font=font)
    d.text(((x0 + x1) // 2 - 12, y1 + 14), "step" + ("   (log y)" if log_y else ""), fill="black", font=font)
    return im


def save_training_plots(log_csv: Path, out: Path, eval_csv: Path | None = None) -> Path:
    """Loss and lr against step from log.csv (+ one panel of eval metrics from eval.csv when present)."""
    rows = _read(log_csv)
    if not rows:
        raise ValueError(f"no rows in {log_csv} to plot")
    xs, loss = _series(rows, "loss")
    log_y = bool(loss) and min(loss) > 0 and max(loss) / min(loss) > 10
    panels = [_panel("training loss", [("loss", xs, loss)], log_y=log_y),
              _panel("learning rate", [("lr", *_series(rows, "lr"))])]
    ev = _read(eval_csv) if eval_csv else []
    if ev:
        keys = [k for k in ev[0] if k not in ("step", "epoch")][:5]
        panels.append(_panel("evaluation", [(k, *_series(ev, k)) for k in keys]))
    fig = Image.new("RGB", (W * len(panels), H), "white")
    for i, p in enumerate(panels):
        fig.paste(p, (i * W, 0))
    fig.save(out)
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
