"""The evaluation report: one self-contained HTML file (every figure an embedded PNG, no external assets).

Metrics carry their bootstrap intervals ("ci" of the metrics dict, shown as [low, high] after each value) and a
small evaluation set its warning ("small_test_set") at the top.
Figures are drawn on matplotlib `Figure` objects with the Agg canvas, never through pyplot, so no global
backend or figure state is touched. Sections: metrics table (the ensemble beside each member, and the run's
trivial colour-histogram baseline, "baseline" of the metrics dict, with a warning when the model does not beat
it: "baseline_verdict"), per-class
table, confusion matrix, ROC and precision-recall curves (one-vs-rest per class; binary problems show the
positive class), reliability diagram, the most confident errors per true class as thumbnails, and Grad-CAM /
attention-rollout overlays.

`write_cv_report` is the page of a cross-validation (dermfast/train/cv.py): per fold the model beside the
trivial baseline, the mean and standard deviation over folds, the pooled out-of-fold metrics, and the paired
per-fold differences with their standard errors and the verdict.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

SUMMARY_KEYS = (("n", "images"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                ("macro_f1", "macro F1"), ("auroc", "AUROC (OvR macro)"), ("pauc_80tpr", "pAUC above 80% TPR"),
                ("sens_at_90spec", "sensitivity @ 90% spec."), ("sens_at_95spec", "sensitivity @ 95% spec."),
                ("ece", "ECE (15 bins)"))


def _figure(w: float = 4.2, h: float = 3.6):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def png_image(arr: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _img_tag(png: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def confusion_png(cm: list[list[int]], classes: list[str]) -> bytes:
    cm_a = np.asarray(cm)
    fig = _figure(1.2 + 0.55 * len(classes), 1.0 + 0.5 * len(classes))
    ax = fig.add_subplot()
    rows = cm_a.sum(1, keepdims=True)
    ax.imshow(np.divide(cm_a, rows, out=np.zeros_like(cm_a, dtype=float), where=rows > 0), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm_a[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (colour: row-normalised)", fontsize=9)
    return _png(fig)


def _curve_classes(y: np.ndarray, classes: list[str], positive: str | None) -> list[int]:
    present = [k for k in range(len(classes)) if (y == k).any() and (y != k).any()]
    if len(classes) == 2:
        k = classes.index(positive) if positive in classes else 1
        return [k] if k in present else []
    return present


def roc_pr_png(y: np.ndarray, probs: np.ndarray, classes: list[str], positive: str | None) -> bytes:
    from sklearn.metrics import auc, precision_recall_curve, roc_curve
    fig = _figure(8.4, 3.6)
    ax_roc, ax_pr = fig.subplots(1, 2)
    for k in _curve_classes(y, classes, positive):
        fpr, tpr, _ = roc_curve(y == k, probs[:, k])
        ax_roc.plot(fpr, tpr, label=f"{classes[k]} (AUC {auc(fpr, tpr):.3f})")
        prec, rec, _ = precision_recall_curve(y == k, probs[:, k])
        ax_pr.plot(rec, prec, label=f"{classes[k]} (prevalence {np.mean(y == k):.2f})")
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.axhline(0.8, color="grey", lw=0.6, ls="--")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one-vs-rest)")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
    return _png(fig)


def reliability_png(rel: dict) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    centres = [(lo + hi) / 2 for lo, hi in zip(rel["lo"], rel["hi"])]
    width = rel["hi"][0] - rel["lo"][0]
    acc = [a if a is not None else 0.0 for a in rel["accuracy"]]
    ax.bar(centres, acc, width=width * 0.95, color="tab:blue", alpha=0.7, label="accuracy")
    conf = [(c, v) for c, v in zip(centres, rel["confidence"]) if v is not None]
    if conf:
        ax.plot(*zip(*conf), "o", color="tab:red", ms=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="reliability")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def _fmt(v) -> str:
    if v is None:
        return "<i>undefined</i>"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _interval(m: dict, key: str) -> str:
    """' [low, high]' of m["ci"][key] (a bootstrap interval), or '' when there is none."""
    iv = (m.get("ci") or {}).get(key)
    return f" <small>[{iv[0]:.3f}, {iv[1]:.3f}]</small>" if isinstance(iv, (list, tuple)) and len(iv) == 2 else ""


def write_report(path: Path, metrics: dict, members: list[dict], classes: list[str], figures: dict[str, bytes],
                 errors: dict[str, list[tuple[bytes, str]]], explanations: list[tuple[bytes, str]],
                 explain_method: str | None, notes: list[str]) -> Path:
    """metrics: the (ensemble) metrics dict; members: [{"checkpoint", **metrics}] for ensembles (else []);
    figures: {title: png}; errors: {true class: [(thumbnail png, caption)]}; explanations: [(png, caption)]."""
    cols = [("ensemble" if members else "model", metrics)] + [(Path(m["checkpoint"]).parent.name or m["checkpoint"], m)
                                                               for m in members]
    if metrics.get("baseline"):  # the trivial baseline (dermfast.eval.baseline) on the same images
        cols.append(("trivial baseline", metrics["baseline"]))
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in cols)
    rows = "".join(f"<tr><td>{label}</td>" + "".join(f"<td>{_fmt(m.get(k))}{_interval(m, k)}</td>" for _, m in cols)
                   + "</tr>" for k, label in SUMMARY_KEYS)
    ci = metrics.get("ci") or {}
    ci_html = (f"<p>[low, high]: {ci['level']:.0%} confidence interval, {html.escape(ci['method'])}.</p>"
               if ci else "")
    warn_html = (f'<p class=warn><b>warning:</b> {html.escape(metrics["small_test_set"])}</p>'
                 if metrics.get("small_test_set") else "")
    if metrics.get("baseline_verdict"):
        warn_html += f'<p class=warn><b>warning:</b> {html.escape(metrics["baseline_verdict"])}</p>'
    base = metrics.get("baseline")
    base_html = (f"<p>trivial baseline: {html.escape(str(base.get('name')))}, fitted on the run's "
                 f"{_fmt(base.get('n_train'))} training images ("
                 + html.escape("; ".join(f"{k}: {v}" for k, v in (base.get("recipe") or {}).items())) + ").</p>"
                 if base else "")
    pc = metrics["per_class"]
    pc_rows = "".join(
        f"<tr><td>{html.escape(c)}</td>" + "".join(f"<td>{_fmt(pc[c].get(k))}</td>"
                                                   for k in ("precision", "recall", "f1", "auroc", "support")) + "</tr>"
        for c in classes)
    figs = "".join(f"<figure>{_img_tag(png, title)}<figcaption>{html.escape(title)}</figcaption></figure>"
                   for title, png in figures.items())
    err_html = ""
    for cls, items in errors.items():
        if items:
            thumbs = "".join(f"<figure>{_img_tag(png, cap, 112)}<figcaption>{html.escape(cap)}</figcaption></figure>"
                             for png, cap in items)
            err_html += f"<h3>true class {html.escape(cls)}</h3><div class=row>{thumbs}</div>"
    err_html = err_html or "<p>No errors.</p>"
    exp_html = "".join(f"<figure>{_img_tag(png, cap, 224)}<figcaption>{html.escape(cap)}</figcaption></figure>"
                       for png, cap in explanations) or "<p>none</p>"
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dermfast evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} td:first-child{{text-align:left}}
figure{{display:inline-block;margin:6px;vertical-align:top}} figcaption{{font-size:11px;max-width:230px}}
.row{{display:flex;flex-wrap:wrap}} .warn{{color:#a00}}</style></head><body>
<h1>dermfast evaluation</h1>
<p>checkpoint: {html.escape(str(metrics.get("checkpoint")))}<br>data: {html.escape(str(metrics.get("data")))}<br>
positive class (pAUC, sensitivity): {_fmt(metrics.get("positive_class"))}</p>
{warn_html}<ul>{note_html}</ul>
<h2>Metrics</h2><table><tr><th>metric</th>{head}</tr>{rows}</table>{ci_html}{base_html}
<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>AUROC (OvR)</th>
<th>support</th></tr>{pc_rows}</table>
<h2>Figures</h2>{figs}
<h2>Most confident errors</h2>{err_html}
<h2>Explanations ({html.escape(explain_method or "none")})</h2><div class=row>{exp_html}</div>
</body></html>
"""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path


CV_KEYS = (("balanced_accuracy_val_threshold", "balanced accuracy (fold's val threshold)"),
           ("balanced_accuracy", "balanced accuracy (arg-max)"), ("auroc", "AUROC"),
           ("pauc_80tpr", "pAUC above 80% TPR"), ("accuracy", "accuracy"), ("macro_f1", "macro F1"))


def write_cv_report(path: Path, cv: dict) -> Path:
    """report.html of a cross-validation: `cv` is cv_metrics.json as dermfast.train.cv.collect writes it."""
    def ms(s: dict) -> str:
        if s.get("mean") is None:
            return _fmt(None)
        return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s.get("std") is not None else "")

    base = cv.get("baseline")
    head = "".join(f"<th>{html.escape(lab)}<br>model</th><th>baseline</th>" for _, lab in CV_KEYS)
    rows = ""
    for e in cv["per_fold"]:
        b = e.get("baseline") or {}
        rows += (f"<tr><td>fold {e['fold']}</td><td>{e['n_train']} / {e['n_val']} / {e['n_test']}</td>"
                 f"<td>{_fmt(e.get('threshold'))}</td>"
                 + "".join(f"<td>{_fmt(e['model'].get(k))}</td><td>{_fmt(b.get(k))}</td>" for k, _ in CV_KEYS)
                 + "</tr>")
    mm, bm = cv["model"]["mean_std"], (base or {}).get("mean_std", {})
    rows += ("<tr><td><b>mean ± sd</b></td><td></td><td></td>"
             + "".join(f"<td>{ms(mm[k])}</td><td>{ms(bm.get(k, {}))}</td>" for k, _ in CV_KEYS) + "</tr>")
    po, bpo = cv["model"]["pooled_oof"], (base or {}).get("pooled_oof", {})
    rows += ("<tr><td><b>pooled out-of-fold</b></td><td></td><td></td>"
             + "".join(f"<td>{_fmt(po.get(k))}</td><td>{_fmt(bpo.get(k))}</td>" for k, _ in CV_KEYS) + "</tr>")
    diff_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(d.get('mean'))}</td><td>{_fmt(d.get('se'))}</td>"
        f"<td>{d.get('n_folds')}</td><td>{html.escape(', '.join(f'{x:+.3f}' for x in d.get('per_fold', [])))}</td></tr>"
        for k, d in (cv.get("paired_difference") or {}).items())
    thr = cv.get("threshold")
    thr_html = (f"<p>decision threshold for new data: p_{html.escape(str(cv['positive_class']))} &ge; "
                f"{thr['value']:.4f} (chosen on the pooled out-of-fold predictions)</p>" if thr else "")
    warn = f'<p class=warn><b>warning:</b> {html.escape(cv["warning"])}</p>' if cv.get("warning") else ""
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dermfast cross-validation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} td:first-child{{text-align:left}}
.warn{{color:#a00}}</style></head><body>
<h1>dermfast {cv['folds']}-fold cross-validation ({html.escape(str(cv.get('stage')))})</h1>
<p>{cv['n_images']} images, classes {html.escape(', '.join(cv['classes']))}; positive class
{_fmt(cv.get('positive_class'))}; seed {cv.get('seed')}. Each fold trained on the other folds, chose its checkpoint
and threshold on a validation split of them, and was tested on its own images. Baseline: {html.escape(
        str((base or {}).get('name', 'none')))}, fitted on each fold's training images.</p>
<p><b>{html.escape(str(cv.get('verdict')))}</b></p>{warn}{thr_html}
<h2>Per fold (train / val / test images)</h2>
<table><tr><th>fold</th><th>images</th><th>threshold (val)</th>{head}</tr>{rows}</table>
<h2>Paired per-fold differences, model - baseline</h2>
<table><tr><th>metric</th><th>mean</th><th>standard error</th><th>folds</th><th>per fold</th></tr>{diff_rows}</table>
</body></html>
"""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
