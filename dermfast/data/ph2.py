"""PH2 (200 dermoscopic images, Mendonca et al. 2013) as it is commonly copied, with its lesion masks.

Table: ``PH2_dataset.txt`` or a ``PH2*.csv`` (``.xlsx`` copies are ignored: never chosen, never read), in any of
  - the original ``||`` table: ``|| Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | ...``;
  - tab-separated (the same columns, a tab between cells);
  - comma-separated: a name column (image_name, image name, name, image, image_id) and the clinical diagnosis as
    0 / 1 / 2 or a class name, or X-marked Common Nevus / Atypical Nevus / Melanoma columns.
  A byte-order mark and CRLF line ends are fine. Clinical diagnosis: 0 common nevus, 1 atypical nevus,
  2 melanoma (`PH2_CLASSES`). Rows that name no ``IMDnnn`` case (the legend below the table, notes, blank lines)
  are not images and not reported; a row naming a case that cannot be used is skipped and reported; a table in
  which no case row is recognised is a `DatasetError` naming the expected layout.
Images: ``PH2 Dataset images/IMDnnn/IMDnnn_Dermoscopic_Image/IMDnnn.bmp`` (also ``PH2_Dataset_images/``,
``images/`` or the root; the case folder or the images folder itself may hold the file).
Masks: ``IMDnnn/IMDnnn_lesion/IMDnnn_lesion.bmp`` (or .png): the lesion segmentation. A ``.jpg`` copy of the mask
beside it is lossy and ignored; ``IMDnnn_roi/*_R<k>_Label<j>.bmp`` are colour-region masks, not the lesion, and are
ignored. A case without a lesion mask keeps its image with mask "" (no mask).

This module imports only `dermfast.data.records`; `dermfast.data.adapters.open_any` dispatches to `read_ph2`.
"""
from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np

from dermfast.data.records import DatasetError, ImageRecords

PH2_CLASSES = ("common_nevus", "atypical_nevus", "melanoma")
_CASE = re.compile(r"IMD\d+", re.IGNORECASE)
_NAME_CELLS = ("name", "image name", "image_name", "image", "image_id")
_LAYOUT = ("expected PH2_dataset.txt as the original '||' table (|| Name || Histological Diagnosis || Clinical "
           "Diagnosis || ...), tab- or comma-separated with a name column (Name / Image Name) and a Clinical "
           "Diagnosis column (0 common nevus, 1 atypical nevus, 2 melanoma) or X-marked Common Nevus / Atypical "
           "Nevus / Melanoma columns, one row per IMDnnn case")
_MASK_EXTS = (".bmp", ".png", ".BMP", ".PNG")  # lossless only: the .jpg copy of a mask is not read
_IMAGE_EXTS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".BMP", ".PNG", ".JPG", ".JPEG")


def ph2_label(row: dict):
    """(class index, None) or (None, reason) from a PH2 row with lower-cased column names."""
    value = next((row[k] for k in ("clinical diagnosis", "clinical_diagnosis", "diagnosis", "label") if row.get(k)),
                 None)
    if value is not None:
        v = value.strip().lower().replace("_", " ")
        if v in ("0", "1", "2"):
            return int(v), None
        names = [c.replace("_", " ") for c in PH2_CLASSES]
        return (names.index(v), None) if v in names else (None, f"unknown clinical diagnosis {value!r}")
    marks = [i for i, c in enumerate(PH2_CLASSES)
             if row.get(c.replace("_", " "), "").strip().lower() in ("x", "1", "yes", "true")]
    if len(marks) == 1:
        return marks[0], None
    return None, "no clinical diagnosis" if not marks else "several diagnoses marked"


def _cells(table: Path) -> list[list[str]]:
    """The table's rows as stripped cells: '||' rows split on '||' (the leading empty cell dropped), else csv
    with a tab or comma delimiter (whichever the first non-blank line has more of). BOM and CRLF tolerated."""
    text = table.read_text(encoding="utf-8-sig", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if any("||" in ln for ln in lines):
        return [[c.strip() for c in ln.split("||")][1:] for ln in lines if "||" in ln]
    first = lines[0] if lines else ""
    delim = "\t" if first.count("\t") > first.count(",") else ","
    return [[c.strip() for c in row] for row in csv.reader(lines, delimiter=delim)]


def ph2_rows(table: Path):
    """(case name, {lower-case column: value} or None for a torn row) for each row naming an IMDnnn case."""
    cols = ["name", "histological diagnosis", "clinical diagnosis"]  # the original layout, if no header
    for cells in _cells(table):
        low = ["name" if c.lower() in _NAME_CELLS else c.lower() for c in cells]
        if "name" in low and not any(_CASE.fullmatch(c) for c in cells):
            cols = low  # a header row
            continue
        row = dict(zip(cols, cells))
        if _CASE.fullmatch(row.get("name", "")):
            yield row["name"], row
        else:
            hit = next((_CASE.search(c) for c in cells if _CASE.search(c)), None)
            if hit is not None:  # a case row whose cells are shifted or torn
                yield hit.group(0), None
            # else: legend, notes: not an image


def _find(folder: Path, stem: str, exts) -> Path | None:
    for ext in exts:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def find_table(root: Path) -> Path | None:
    """PH2_dataset.txt, else a PH2*.txt, else a PH2*.csv (case-insensitive); never an .xlsx."""
    files = sorted(p for p in root.iterdir() if p.is_file())
    for pred in (lambda n: n == "ph2_dataset.txt", lambda n: n.startswith("ph2") and n.endswith(".txt"),
                 lambda n: n.startswith("ph2") and n.endswith(".csv")):
        hit = next((p for p in files if pred(p.name.lower())), None)
        if hit is not None:
            return hit
    return None


def read_ph2(root, table=None) -> ImageRecords:
    """PH2 table + images + lesion masks (see the module doc). groups = the case name."""
    root = Path(root)
    if root.is_file():
        table, root = table or root, root.parent
    table = Path(table) if table else find_table(root)
    if table is None:
        raise DatasetError(f"{root}: no PH2_dataset.txt (or PH2 csv) found")
    if table.suffix.lower() in (".xlsx", ".xls"):
        raise DatasetError(f"{table}: Excel tables are not read; give PH2_dataset.txt or a PH2 csv")
    dirs = [d for d in (root / "PH2 Dataset images", root / "PH2_Dataset_images", root / "images", root)
            if d.is_dir()]
    paths, labels, masks, missing, seen, rows = [], [], [], [], set(), 0
    for name, row in ph2_rows(table):
        rows += 1
        label, reason = ph2_label(row) if row is not None else (None, "malformed row")
        if label is None or name in seen:
            missing.append((name, reason or "duplicate row"))
            continue
        case = next((d / name for d in dirs if (d / name).is_dir()), None)
        image = None
        if case is not None:
            image = _find(case / f"{name}_Dermoscopic_Image", name, _IMAGE_EXTS) or _find(case, name, _IMAGE_EXTS)
        image = image or next((p for d in dirs for p in [_find(d, name, _IMAGE_EXTS)] if p), None)
        if image is None:
            missing.append((name, "image file not found"))
            continue
        mask = None
        if case is not None:
            mask = _find(case / f"{name}_lesion", f"{name}_lesion", _MASK_EXTS) or \
                _find(case, f"{name}_lesion", _MASK_EXTS)
        seen.add(name)
        paths.append(str(image))
        labels.append(label)
        masks.append(str(mask) if mask else "")
    if rows == 0:
        raise DatasetError(f"{table}: no PH2 case row recognised; {_LAYOUT}")
    if not paths:
        top = ", ".join(f"{n} {r}" for r, n in Counter(r for _, r in missing).most_common(3))
        raise DatasetError(f"{table}: no usable images ({len(missing)} rows skipped: {top})")
    rec = ImageRecords(paths, np.array(labels, np.int64), list(PH2_CLASSES), root=str(root),
                       masks=masks)
    rec.missing = missing
    return rec
