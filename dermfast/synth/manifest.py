"""The manifest of a synthesis output folder (DIR/manifest.csv beside DIR/images/): its columns, read and write;
and DIR/settings.json, the settings that determine every image of the folder.

`image` is the file name under images/, `label` the class name (the columns `--synthetic DIR` of every training
stage reads, through dermfast.data.pipeline.read_synthetic); the others record how each image was made, so its
seed and settings regenerate it exactly. Written by `python -m dermfast.synthesize`, read back by it (resume) and
by the FID report (dermfast.synth.fid).

settings.json holds IMAGE_SETTINGS: the sampler, its steps, the guidance weight, the base seed (an image's own
seed is derived from it, its class and its index), the precision the denoiser ran in (bf16 and fp32 give
different pixels) and the checkpoint (its path and a SHA-256 of the bundle's files, so a retrained run at the
same path is told apart and a moved one is not). The batch size and the device are not among them: every image
has its own generator, so neither changes what an image is (up to float rounding across devices). A rerun
resumes a folder only when these are equal (`settings_diff`); a folder from before settings.json existed is
judged by its manifest's columns.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

MANIFEST_COLUMNS = ("image", "label", "sampler", "steps", "guidance", "seed", "precision", "checkpoint")
SETTINGS_FILE = "settings.json"
IMAGE_SETTINGS = ("sampler", "steps", "guidance", "seed", "precision", "checkpoint", "checkpoint_sha256")
SEED_STRIDE = 1_000_000_000  # image seed = base * SEED_STRIDE + class * 10^7 + index (dermfast.synthesize)


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


def bundle_digest(root: Path) -> str:
    """SHA-256 over the relative names and bytes of every file of a diffusers bundle folder (weights, configs)."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def read_settings(out: Path) -> dict | None:
    """DIR/settings.json, or None when the folder has none (new, or made before the file existed)."""
    p = Path(out) / SETTINGS_FILE
    if not p.is_file():
        return None
    try:
        got = json.loads(p.read_text())
    except ValueError:
        return None
    return got if isinstance(got, dict) else None


def write_settings(out: Path, settings: dict) -> None:
    p = Path(out) / SETTINGS_FILE
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({k: settings.get(k) for k in IMAGE_SETTINGS}, indent=2) + "\n")
    os.replace(tmp, p)


def settings_from_rows(rows: dict[str, dict]) -> dict:
    """The settings a manifest's rows record (a folder without settings.json). A setting the rows disagree on
    becomes a set of its values, so it differs from any single new value."""
    vals: dict[str, set] = {}
    conv = {"steps": int, "guidance": float, "seed": lambda s: int(s) // SEED_STRIDE}
    for r in rows.values():
        for k in ("sampler", "steps", "guidance", "seed", "precision", "checkpoint"):
            v = r.get(k)
            if v in (None, ""):
                continue
            try:
                vals.setdefault(k, set()).add(conv.get(k, str)(v))
            except ValueError:
                vals.setdefault(k, set()).add(v)
    return {k: next(iter(v)) if len(v) == 1 else v for k, v in vals.items()}


def _show(v) -> str:
    if isinstance(v, set):
        return "mixed " + "/".join(sorted(map(str, v)))
    return f"{v:g}" if isinstance(v, float) else str(v)


def settings_diff(old: dict, new: dict) -> list[str]:
    """["steps 10 -> 25", ...]: the image settings on which `old` (recorded) and `new` differ. A setting the old
    record lacks is not compared (an older manifest has no precision column); the checkpoint is compared by its
    digest when both have one (a moved run is the same checkpoint), else by path."""
    out = []
    for k in ("sampler", "steps", "guidance", "seed", "precision"):
        if k in old and old[k] is not None and old[k] != new.get(k):
            out.append(f"{k} {_show(old[k])} -> {_show(new.get(k))}")
    if old.get("checkpoint_sha256") and new.get("checkpoint_sha256"):
        if old["checkpoint_sha256"] != new["checkpoint_sha256"]:
            same_path = old.get("checkpoint") == new.get("checkpoint")
            out.append("checkpoint " + ("weights changed at the same path" if same_path
                                        else f"{_show(old.get('checkpoint'))} -> {new.get('checkpoint')}"))
    elif old.get("checkpoint") is not None and old["checkpoint"] != new.get("checkpoint"):
        out.append(f"checkpoint {_show(old['checkpoint'])} -> {new.get('checkpoint')}")
    return out
