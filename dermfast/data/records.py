"""Image records: the one in-memory form every dataset adapter produces and every loader consumes.

`ImageRecords` holds file paths, integer labels (-1 = unlabelled), the class names, and a source flag per image
(0 real, 1 synthetic). `open_dataset(path)` recognises the layouts dermfast reads and raises `DatasetError`
(a one-line message) for a path that does not exist or holds no images.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset that cannot be used: missing path, no images, unknown label. One line, for the CLI."""


@dataclass
class ImageRecords:
    paths: list[str]
    labels: np.ndarray                     # [N] int64, -1 = unlabelled
    classes: list[str]
    source: np.ndarray = field(default=None)  # [N] uint8, 0 real, 1 synthetic
    root: str = ""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.source is None:
            self.source = np.zeros(len(self.paths), dtype=np.uint8)
        self.source = np.asarray(self.source, dtype=np.uint8)
        if not (len(self.paths) == len(self.labels) == len(self.source)):
            raise ValueError("ImageRecords: paths, labels and source must have the same length")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> "ImageRecords":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageRecords([self.paths[i] for i in idx], self.labels[idx], list(self.classes),
                            self.source[idx], self.root)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


def _find_image(images_dir: Path, stem: str) -> Path | None:
    p = images_dir / stem
    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
        return p
    for ext in IMAGE_EXTENSIONS:
        for cand in (images_dir / f"{stem}{ext}", images_dir / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def read_labels_csv(root: Path, csv_name: str = "labels.csv", label_columns=("label", "diagnosis", "dx")) -> ImageRecords:
    """A folder with `labels.csv` (columns `image` and one of label / diagnosis / dx) and `images/`.

    Covers the embedded toy dataset and ../shared/data/isic-cc0-mini. Rows whose file is missing are skipped
    and counted in `records.missing` (never silently).
    """
    root = Path(root)
    with open(root / csv_name, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DatasetError(f"{root / csv_name} has no rows")
    col = next((c for c in label_columns if c in rows[0]), None)
    if "image" not in rows[0] or col is None:
        raise DatasetError(f"{root / csv_name} needs columns 'image' and one of {', '.join(label_columns)}; "
                           f"found {', '.join(rows[0])}")
    images_dir = root / "images" if (root / "images").is_dir() else root
    classes = sorted({r[col] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, missing = [], [], []
    for r in rows:
        p = _find_image(images_dir, r["image"])
        if p is None:
            missing.append(r["image"])
            continue
        paths.append(str(p))
        labels.append(index[r[col]])
    if not paths:
        raise DatasetError(f"{root}: none of the {len(rows)} images listed in {csv_name} exist under {images_dir}")
    rec = ImageRecords(paths, np.array(labels), classes, root=str(root))
    rec.missing = missing  # type: ignore[attr-defined]
    return rec


def read_image_folder(root: Path) -> ImageRecords:
    """Class per subfolder (root/<class>/*.jpg), or a flat folder of images (unlabelled)."""
    root = Path(root)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes, paths, labels = [], [], []
    for d in subdirs:
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if files:
            classes.append(d.name)
            paths += [str(p) for p in files]
            labels += [len(classes) - 1] * len(files)
    if paths:
        return ImageRecords(paths, np.array(labels), classes, root=str(root))
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DatasetError(f"{root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                           f"in class subfolders or at the top level, or a labels.csv)")
    return ImageRecords([str(p) for p in files], np.full(len(files), -1), [], root=str(root))


def open_dataset(path: str | Path) -> ImageRecords:
    """Recognise a dataset layout at `path`: labels.csv + images/, class subfolders, or a flat image folder."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"data path {str(path)!r} does not exist")
    if not root.is_dir():
        raise DatasetError(f"data path {str(path)!r} is not a directory")
    if (root / "labels.csv").is_file():
        return read_labels_csv(root)
    return read_image_folder(root)
