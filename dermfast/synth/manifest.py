"""The manifest of a synthesis output folder (DIR/manifest.csv beside DIR/images/): its columns, read and write.

`image` is the file name under images/, `label` the class name (the columns `--synthetic DIR` of every training
stage reads, through dermfast.data.pipeline.read_synthetic); the others record how each image was made, so its
seed and settings regenerate it exactly. Written by `python -m dermfast.synthesize`, read back by it (resume) and
by the FID report (dermfast.synth.fid).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

MANIFEST_COLUMNS = ("image", "label", "sampler", "steps", "guidance", "seed", "checkpoint")


def read_manifest(path: Path) -> dict[str, dict]:
    """{image file name: its row as strings}; {} when there is no manifest yet."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f) if r.get("image")}


def write_manifest(path: Path, rows: dict[str, dict]) -> None:
    """All rows, sorted by image name, through a temporary file and a rename: a kill never leaves half a file."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for name in sorted(rows):
            w.writerow(rows[name])
    os.replace(tmp, path)
