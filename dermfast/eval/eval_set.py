"""Which images an evaluation reads: a run's own split (its config.yaml's dataset filtered by its splits.csv) or
every image of a dataset the user names, validated like training data; and `EvalError`, the one-line refusal
(exit 2) of every evaluation tool. Below dermfast.evaluate, so the evaluations that live in dermfast.eval
(segmentation, probes) share it without importing the tool.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from dermfast.data.records import ImageRecords


class EvalError(ValueError):
    """Evaluation cannot proceed on this input (one line, exit 2)."""


def _run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory holding a checkpoint: the nearest folder up to three levels above with config.yaml."""
    for d in [checkpoint.parent, *list(checkpoint.parents)[1:3]]:
        if (d / "config.yaml").is_file():
            return d
    return None


def own_split(checkpoint: Path, split: str = "test", progress: bool = False) -> tuple[ImageRecords, str]:
    """The run's own split: its config.yaml's dataset (None = the embedded one), filtered by its splits.csv."""
    import yaml

    from dermfast.data.pipeline import open_records
    from dermfast.data.splits import load_splits
    from dermfast.data.toy import default_cache_dir
    from dermfast.data.validate import validate_records
    run = _run_dir_of(checkpoint)
    if run is None or not (run / "splits.csv").is_file():
        raise EvalError(f"{checkpoint}: no run directory with config.yaml and splits.csv around it; "
                        "name the evaluation data with --data")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    data = cfg.get("data")
    records = open_records(data, toy_images=int(cfg.get("toy_images", 1200)),
                           toy_image_size=int(cfg.get("toy_image_size", 128)), progress=progress)
    records, _ = validate_records(records, cache_dir=default_cache_dir() / "validate", progress=progress)
    # not strict: training rows of synthetic images are not in the real dataset; the split asked for must be whole
    splits = load_splits(run / "splits.csv", records, strict=False)
    with open(run / "splits.csv", newline="", encoding="utf-8-sig") as f:
        listed = sum(1 for r in csv.DictReader(f) if (r.get("split") or "").strip() == split)
    if len(splits[split]) != listed:
        raise EvalError(f"{run / 'splits.csv'} lists {listed} {split} images but only {len(splits[split])} of them "
                        f"are in the dataset {data if data is not None else '(embedded)'} as it is now")
    desc = f"{data if data is not None else 'embedded toy dataset'} ({split} split of {run / 'splits.csv'})"
    return records.subset(splits[split]), desc


def data_records(path: str, progress: bool = False) -> tuple[ImageRecords, str]:
    from dermfast.data.adapters import open_any
    from dermfast.data.toy import default_cache_dir
    from dermfast.data.validate import validate_records
    records = open_any(path)
    records, report = validate_records(records, cache_dir=default_cache_dir() / "validate", progress=progress)
    if report.n_skipped:
        print(f"evaluate: {report.summary()}", file=sys.stderr)
    return records, str(path)
