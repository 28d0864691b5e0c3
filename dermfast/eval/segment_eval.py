"""Scoring segmenters on records with masks, at the ORIGINAL image resolution, and `evaluate` of a --stage segment
checkpoint.

Prediction (`predict_probs`): each image is decoded, resized (bicubic, aspect ignored) to the model's S x S,
normalised with the checkpoint's mean / std, the sigmoid of the logits is resized back (bilinear) to the image's
own H x W and thresholded at 0.5; the true mask is read at that size. So Dice / Jaccard / HD95
(`dermfast.eval.segmentation`) are those of the image the user gave, in its pixels. The Otsu baseline
(`dermfast.eval.otsu`) runs on the same decoded images.

`evaluate_segmentation(args)` is what `python -m dermfast.evaluate --checkpoint SEGRUN [--data D]` runs for a
segmentation checkpoint: OUT/metrics.json (dice, jaccard, hd95, n, hd95_worst, empty_truth, baseline = Otsu on
the same images, checkpoint, data, model), OUT/per_image.csv (image = the user's path, `origins`; dice,
jaccard, hd95, and the same three of Otsu), OUT/report.html (overlays of the worst and best images by Dice).
"""
from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from dermfast.eval.segmentation import SegScores, resize_prob

BASELINE_NAME = "Otsu on the smoothed blue channel, largest component, holes filled"


def read_rgb(records, i: int) -> np.ndarray:
    """Image i as [H, W, 3] uint8 RGB."""
    from PIL import Image
    with Image.open(io.BytesIO(records.read_bytes(i))) as im:
        return np.asarray(im.convert("RGB"))


def read_mask(records, i: int, shape: tuple[int, int]) -> np.ndarray | None:
    """Mask i as [H, W] bool (values above 127 are lesion), None where the image has none. A mask whose size is
    not its image's is an error naming both files."""
    from PIL import Image
    data = records.read_mask_bytes(i)
    if data is None:
        return None
    with Image.open(io.BytesIO(data)) as m:
        m = np.asarray(m.convert("L")) > 127
    if m.shape != tuple(shape):
        raise ValueError(f"mask {records.masks[i]} is {m.shape[1]}x{m.shape[0]} but its image "
                         f"{records.origins[i]} is {shape[1]}x{shape[0]}")
    return m


def with_masks(records):
    """The records that have a mask file (indices into `records` and the subset)."""
    if not records.has_masks:
        return np.zeros(0, dtype=np.int64), records.subset([])
    idx = np.flatnonzero(np.asarray([bool(m) for m in records.masks]))
    return idx, records.subset(idx)


def predict_probs(model, meta: dict, images: list[np.ndarray], device, autocast=None) -> list[np.ndarray]:
    """Sigmoid probabilities at each image's own resolution: list of [H, W] float32."""
    import contextlib

    import torch
    import torch.nn.functional as F
    size = int(meta["img_size"])
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1)
    xs = []
    for im in images:
        t = torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1)[None].float() / 255
        xs.append(F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False, antialias=True))
    x = ((torch.cat(xs).clamp(0, 1) - mean) / std).to(device)
    with torch.no_grad(), (autocast or contextlib.nullcontext()):
        p = model(x).float().sigmoid().cpu().numpy()[:, 0]
    return [resize_prob(pi, *im.shape[:2]) for pi, im in zip(p, images)]


def score(model, meta: dict, records, device, batch_size: int = 32, autocast=None, baseline: bool = True,
          keep: bool = False) -> dict:
    """Score `model` (None: Otsu itself) and, with `baseline`, Otsu on every image of `records` that has a mask.
    Returns {"model": SegScores, "otsu": SegScores | None, "index": [record indices], "preds": {i: (pred, otsu)}
    when keep}."""
    from dermfast.eval.otsu import otsu_segment
    idx, recs = with_masks(records)
    model_s, otsu_s = SegScores(), SegScores() if baseline else None
    preds = {}
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    for start in range(0, len(recs), batch_size):
        rows = range(start, min(start + batch_size, len(recs)))
        images = [read_rgb(recs, j) for j in rows]
        masks = [read_mask(recs, j, im.shape[:2]) for j, im in zip(rows, images)]
        if model is not None:
            probs = predict_probs(model, meta, images, device, autocast)
            pred = [p >= 0.5 for p in probs]
        else:
            pred = [otsu_segment(im) for im in images]
        for j, im, m, p in zip(rows, images, masks, pred):
            model_s.add(p, m)
            o = None
            if otsu_s is not None:
                o = p if model is None else otsu_segment(im)
                otsu_s.add(o, m)
            if keep:
                preds[j] = (p, o)
    if model is not None and was_training:
        model.train()
    return {"model": model_s, "otsu": otsu_s, "index": idx.tolist(), "records": recs, "preds": preds}


# ------------------------------------------------------------------------------------------------ evaluate
def _overlay(im: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Image with the true outline in green and the predicted outline in magenta (2 px)."""
    from scipy.ndimage import binary_dilation

    from dermfast.eval.segmentation import surface
    out = im.copy()
    k = max(1, round(min(im.shape[:2]) / 200))
    for mask, colour in ((truth, (0, 255, 0)), (pred, (255, 0, 255))):
        edge = binary_dilation(surface(mask), iterations=k)
        out[edge] = colour
    return out


def _thumb(arr: np.ndarray, side: int = 256) -> np.ndarray:
    from PIL import Image
    h, w = arr.shape[:2]
    k = side / max(h, w)  # small images are enlarged (nearest: outlines stay crisp), large ones reduced
    size = (max(1, round(w * k)), max(1, round(h * k)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.NEAREST if k > 1 else Image.LANCZOS))


def write_report(path: Path, metrics: dict, result: dict, n_show: int = 4) -> None:
    from dermfast.eval.report import _img_tag, png_image
    recs, ms = result["records"], result["model"]
    order = np.argsort(np.asarray(ms.dice), kind="stable")
    picks = [("worst", order[:n_show]), ("best", order[::-1][:n_show])]
    fmt = (lambda v: "n/a" if v is None else f"{v:.4f}")
    b = metrics.get("baseline") or {}
    parts = ["<html><head><meta charset='utf-8'><title>dermfast segmentation report</title></head><body>",
             "<h1>Segmentation</h1>",
             f"<p>{html.escape(str(metrics['checkpoint']))} on {html.escape(str(metrics['data']))}</p>",
             "<table border=1 cellpadding=4><tr><th></th><th>Dice</th><th>Jaccard</th><th>HD95 (px)</th>"
             "<th>n</th></tr>",
             f"<tr><td>model ({html.escape(metrics['model'])})</td><td>{fmt(metrics['dice'])}</td>"
             f"<td>{fmt(metrics['jaccard'])}</td><td>{fmt(metrics['hd95'])}</td><td>{metrics['n']}</td></tr>"]
    if b:
        parts.append(f"<tr><td>baseline ({html.escape(BASELINE_NAME)})</td><td>{fmt(b['dice'])}</td>"
                     f"<td>{fmt(b['jaccard'])}</td><td>{fmt(b['hd95'])}</td><td>{b['n']}</td></tr>")
    parts.append("</table><p>Per image, then the mean; HD95 in pixels of the original image; an image where "
                 "exactly one of prediction / truth is empty gets HD95 = its diagonal "
                 f"({metrics['hd95_worst']} such). Outlines: green = truth, magenta = prediction.</p>")
    for title, rows in picks:
        parts.append(f"<h2>{title} {len(rows)} by Dice</h2><div>")
        for j in rows:
            j = int(j)
            im = read_rgb(recs, j)
            truth = read_mask(recs, j, im.shape[:2])
            pred = result["preds"][j][0]
            cap = f"{recs.origins[j]}: Dice {ms.dice[j]:.3f}, HD95 {ms.hd95[j]:.1f} px"
            tag = _img_tag(png_image(_thumb(_overlay(im, truth, pred))), cap)
            parts.append(f"<figure style='display:inline-block'>{tag}<figcaption>{html.escape(cap)}</figcaption>"
                         "</figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def write_per_image(path: Path, result: dict) -> None:
    recs, ms, os_ = result["records"], result["model"], result["otsu"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "dice", "jaccard", "hd95"] + (["otsu_dice", "otsu_jaccard", "otsu_hd95"] if os_ else []))
        for j in range(len(ms)):
            row = [recs.origins[j], f"{ms.dice[j]:.6f}", f"{ms.jaccard[j]:.6f}", f"{ms.hd95[j]:.4f}"]
            if os_:
                row += [f"{os_.dice[j]:.6f}", f"{os_.jaccard[j]:.6f}", f"{os_.hd95[j]:.4f}"]
            w.writerow(row)


def evaluate_segmentation(args) -> dict:
    """`python -m dermfast.evaluate --checkpoint SEGRUN [--data D] [--split S] [--out DIR] [--device D]
    [--no-report]` for a --stage segment checkpoint. Raises dermfast.evaluate.EvalError for bad input."""
    from dermfast.device import resolve_device
    from dermfast.eval.eval_set import EvalError, _run_dir_of, data_records, own_split
    from dermfast.models.classifier import CheckpointError
    from dermfast.models.segmenter import load_segmenter
    if len(args.checkpoint) != 1:
        raise EvalError("a segmentation checkpoint is evaluated alone (no ensembles)")
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise EvalError(f"bad --device {args.device!r}: {e}") from None
    try:
        model, meta = load_segmenter(args.checkpoint[0], device)
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    ckpt = Path(meta["checkpoint_path"])
    records, desc = data_records(args.data) if args.data is not None else own_split(ckpt, args.split)
    if not records.has_masks or not any(records.masks):
        raise EvalError(f"the evaluation set has no lesion masks ({desc}): give data with masks (PH2, ISIC task 1 "
                        "*_segmentation.png, a folder of image + mask pairs, or the embedded dataset)")
    try:
        result = score(model, meta, records, device, batch_size=args.batch_size, keep=not args.no_report)
    except ValueError as e:
        raise EvalError(str(e)) from None
    metrics = result["model"].summary()
    base = result["otsu"].summary()
    base["name"] = BASELINE_NAME
    arch = meta["model"]["arch"]
    metrics.update(task="segmentation", baseline=base, checkpoint=str(ckpt), data=desc,
                   model=arch if arch == "otsu" else f"{arch} ({meta['model'].get('encoder')})",
                   images_without_mask=len(records) - len(result["index"]),
                   definitions="Dice / Jaccard / HD95 per image at the original resolution, then the mean; "
                               "both masks empty: 1 / 1 / 0; exactly one empty: 0 / 0 / the image diagonal")
    out = Path(args.out) if args.out else (_run_dir_of(ckpt) or ckpt.parent) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_per_image(out / "per_image.csv", result)
    if not args.no_report and len(result["model"]):
        write_report(out / "report.html", metrics, result)
    metrics["out"] = str(out)
    return metrics


def summary_line(m: dict) -> str:
    fmt = (lambda v: "undefined" if v is None else f"{v:.4f}")
    b = m.get("baseline") or {}
    return (f"evaluate: segmentation, n {m['n']}: Dice {fmt(m['dice'])}, Jaccard {fmt(m['jaccard'])}, "
            f"HD95 {fmt(m['hd95'])} px; Otsu baseline Dice {fmt(b.get('dice'))}, Jaccard {fmt(b.get('jaccard'))}, "
            f"HD95 {fmt(b.get('hd95'))} px -> {m['out']}/metrics.json")
