"""Reading a cross-validation folder (written by `python -m dermfast.train --folds K`, dermfast/train/cv.py):
below the training package, so `dermfast.evaluate` and `dermfast.predict` read one without importing it.

OUT/cv.json (status, K, stage), OUT/fold-1 .. OUT/fold-K (run folders), OUT/oof_predictions.csv,
OUT/cv_metrics.json, OUT/report.html.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CV_FILE, OOF_FILE, METRICS_FILE, REPORT_FILE = "cv.json", "oof_predictions.csv", "cv_metrics.json", "report.html"


def fold_dir(out, k: int) -> Path:
    return Path(out) / f"fold-{k}"


def is_cv_dir(path) -> bool:
    """True for a cross-validation folder (OUT/cv.json)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / CV_FILE).is_file()


def read_cv(path) -> dict:
    return json.loads((Path(path).expanduser() / CV_FILE).read_text())


def print_summary(result: dict, out: Path, file=None) -> None:
    file = file or sys.stdout
    f = lambda s: "undefined" if s["mean"] is None else (  # noqa: E731
        f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["std"] is not None else ""))
    key = "balanced_accuracy_val_threshold" if result.get("threshold") else "balanced_accuracy"
    m = result["model"]["mean_std"]
    line = (f"cv: {result['folds']} folds, {result['n_images']} images: balanced accuracy {f(m[key])}, "
            f"AUROC {f(m['auroc'])} (mean ± sd over folds)")
    if result.get("baseline"):
        b = result["baseline"]["mean_std"]
        line += f"; trivial baseline {f(b[key])}, {f(b['auroc'])}"
    print(line, file=file)
    print(f"cv: {result['verdict']}", file=file)
    if result.get("threshold"):
        print(f"cv: decision threshold for new data {result['threshold']['value']:.3f} (p_{result['positive_class']}"
              ", chosen on the out-of-fold predictions)", file=file)
    if result.get("warning"):
        print(f"cv: warning: {result['warning']}", file=file)
    print(f"cv: wrote {out}/{{{OOF_FILE}, {METRICS_FILE}, {REPORT_FILE}, fold-1..{result['folds']}}}", file=file)


__all__ = ["CV_FILE", "OOF_FILE", "METRICS_FILE", "REPORT_FILE", "fold_dir", "is_cv_dir", "read_cv",
           "print_summary"]
