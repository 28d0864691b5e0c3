"""OUT/report.html of `python -m dermfast.pipeline`: every model side by side, read from the stages' own files.

Models: each evaluation's metrics.json (balanced accuracy, AUROC, pAUC above 80% TPR, macro F1 with their 95%
bootstrap intervals `ci` when evaluate wrote them; ECE), parameters (counted from the evaluated run's
checkpoint.safetensors), the exported student's CPU latency (export's model.json). Evaluate's trivial baseline
(`baseline` in metrics.json: colour histograms + logistic regression, fitted on the run's training split) is a
row of its own, with its verdict; a chance row states what a constant predictor scores (balanced accuracy
1 / classes present, AUROC 0.5). Stages: status and step
(run.json), training time (the pipeline's wall clock, summed over reruns, and the run's own log.csv elapsed_s),
links to each stage's folder and report. Figures: the synthetic sample grid, each training run's curves.
"""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path

METRICS = (("balanced_accuracy", "balanced acc."), ("auroc", "AUROC"), ("pauc_80tpr", "pAUC >80% TPR"),
           ("macro_f1", "macro F1"), ("ece", "ECE"))


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def count_params(checkpoint: Path) -> int | None:
    """Elements of every tensor in a safetensors file (read from its header; no tensor is loaded)."""
    if not checkpoint.is_file():
        return None
    from safetensors import safe_open
    n = 0
    with safe_open(str(checkpoint), framework="pt") as f:
        for k in f.keys():
            size = 1
            for d in f.get_slice(k).get_shape():
                size *= d
            n += size
    return n


def last_elapsed(log_csv: Path) -> float | None:
    try:
        with open(log_csv) as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return None
    for r in reversed(rows):
        try:
            return float(r.get("elapsed_s") or "")
        except ValueError:
            continue
    return None


def _num(v, digits: int = 3) -> str:
    return "&ndash;" if v is None else f"{v:.{digits}f}"


def _params(n: int | None) -> str:
    return "&ndash;" if n is None else f"{n / 1e6:.2f} M"


def _cell(metrics: dict, key: str) -> str:
    ci = (metrics.get("ci") or {}).get(key)
    text = _num(metrics.get(key))
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" <small>[{ci[0]:.3f}, {ci[1]:.3f}]</small>"
    return text


def model_rows(out: Path, steps) -> list[dict]:
    """One row per evaluation found: {name, model, metrics, params, run}."""
    rows = []
    for s in steps:
        if s.kind != "evaluate":
            continue
        m = _json(out / s.name / "metrics.json")
        if m is None:
            continue
        run = s.wired["checkpoint"]
        rows.append({"name": s.name, "model": s.model, "metrics": m, "run": run,
                     "params": count_params(out / run / "checkpoint.safetensors")})
    return rows


def write_report(out: Path, steps, state: dict) -> Path:
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>dermfast pipeline: {e(str(out))}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}td:first-child,th:first-child"
             "{text-align:left}img{max-width:100%}</style>",
             f"<h1>dermfast pipeline</h1><p>recipe <b>{e(str(state.get('recipe')))}</b>, data "
             f"<b>{e(str(state.get('data') or 'embedded procedural dataset'))}</b>, ablations "
             f"<b>{e(', '.join(state.get('ablate') or []) or 'none')}</b>. Command: <code>python -m dermfast.pipeline "
             f"{e(' '.join(state.get('argv') or []))}</code></p>"]

    rows = model_rows(out, steps)
    parts.append("<h2>Models (test split)</h2><table><tr><th>evaluation</th><th>model</th><th>n</th>"
                 + "".join(f"<th>{e(label)}</th>" for _, label in METRICS) + "<th>parameters</th><th>report</th></tr>")
    for r in rows:
        m = r["metrics"]
        parts.append(f"<tr><td>{e(r['name'])}</td><td>{e(r['model'])}</td><td>{m.get('n', '')}</td>"
                     + "".join(f"<td>{_cell(m, k)}</td>" for k, _ in METRICS)
                     + f"<td>{_params(r['params'])}</td>"
                     + f"<td><a href='{e(r['name'])}/report.html'>report</a></td></tr>")
    seen = set()
    for r in rows:  # evaluate's trivial baseline of each run (fitted on that run's training split), once per data
        b = r["metrics"].get("baseline")
        key = (b or {}).get("balanced_accuracy"), (b or {}).get("auroc"), r["metrics"].get("data")
        if not b or key in seen:  # runs on one split fit the same baseline: one row for it
            continue
        seen.add(key)
        parts.append(f"<tr><td>baseline ({e(r['run'])})</td><td>trivial baseline: {e(str(b.get('name', '')))}</td>"
                     f"<td>{b.get('n', '')}</td>" + "".join(f"<td>{_cell(b, k)}</td>" for k, _ in METRICS)
                     + "<td></td><td></td></tr>")
    if rows:
        m = rows[0]["metrics"]
        k = len(m.get("present_classes") or m.get("classes") or []) or None
        parts.append(f"<tr><td>chance</td><td>a constant prediction</td><td></td><td>{_num(1 / k if k else None)}"
                     "</td><td>0.500</td><td colspan='5'></td></tr>")
    parts.append("</table><p>[low, high]: 95% percentile-bootstrap intervals over test images (evaluate's "
                 "<code>ci</code>); pAUC above 80% TPR of the positive class "
                 f"({e(str(rows[0]['metrics'].get('positive_class')) if rows else '')}).</p>")
    for r in rows:
        for key in ("baseline_verdict", "small_test_set"):
            warn = r["metrics"].get(key)
            if warn:
                parts.append(f"<p><b>warning ({e(r['name'])}):</b> {e(str(warn))}</p>")

    side = _json(out / "export" / "model.json")
    if side is not None:
        lat = side.get("cpu_latency_ms_per_image") or {}
        par = side.get("parity") or {}
        f = e(str(side.get("file", "")))
        parts.append("<h2>Exported student</h2><p>"
                     f"<a href='export/{f}'>{f}</a> ({e(str(side.get('format')))}, {e(str(side.get('arch')))}, "
                     f"input {e(str(side.get('input', {}).get('size')))} px); CPU latency "
                     f"per image: {_num(lat.get('1'), 2)} ms at batch 1, {_num(lat.get('32'), 2)} ms at batch 32 "
                     f"({side.get('cpu_cores')} cores); parity max |probs diff| {par.get('max_abs_diff_probs')} "
                     f"via {e(str(par.get('runtime')))}.</p>")

    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>step</th><th>time (pipeline, s)</th>"
                 "<th>time (run's log, s)</th><th>folder</th></tr>")
    for s in steps:
        folder = out / s.name
        if not folder.exists():
            continue
        rec = state.get("stages", {}).get(s.name, {})
        info = _json(folder / "run.json") or {}
        status = info.get("status") or rec.get("status", "")
        links = [f"<a href='{e(s.name)}/'>{e(s.name)}/</a>"]
        for f in ("report.html", "plots.png", "config.yaml", "grid.png", "manifest.csv", "metrics.json"):
            if (folder / f).is_file():
                links.append(f"<a href='{e(s.name)}/{f}'>{f}</a>")
        parts.append(f"<tr><td>{e(s.name)}</td><td>{e(str(status))}</td><td>{info.get('step', '')}</td>"
                     f"<td>{_num(rec.get('seconds'), 0)}</td><td>{_num(last_elapsed(folder / 'log.csv'), 0)}</td>"
                     f"<td>{' '.join(links)}</td></tr>")
    parts.append("</table>")

    if (out / "synth_set" / "grid.png").is_file():
        parts.append("<h2>Synthetic samples</h2><p>One row per class (synthesize's grid.png).</p>"
                     "<img src='synth_set/grid.png' alt='synthetic sample grid'>")
    curves = [s.name for s in steps if s.kind == "train" and (out / s.name / "plots.png").is_file()]
    if curves:
        parts.append("<h2>Training curves</h2>")
        for name in curves:
            parts.append(f"<h3>{e(name)}</h3><img src='{e(name)}/plots.png' alt='{e(name)} curves'>")
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text("\n".join(parts) + "\n")
    tmp.replace(path)
    return path
