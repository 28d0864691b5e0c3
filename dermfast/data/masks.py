"""Lesion masks: the layouts read beside the images, and the one stored form both loaders decode.

Layouts (`find_masks` / `read_pairs`):
  - ISIC 2017 / 2018 task 1: ``ISIC_nnnnnnn.jpg`` with ``ISIC_nnnnnnn_segmentation.png`` in a mask folder next
    to the images (a folder whose name holds "groundtruth", "segmentation" or "mask", e.g.
    ``ISIC2018_Task1_Training_GroundTruth/`` beside ``ISIC2018_Task1-2_Training_Input/``), or beside the image;
  - a folder of pairs: ``images/`` + ``masks/`` (or ``mask/``, ``labels/``, ``segmentations/``) with equal stems
    (``masks/x.png`` for ``images/x.jpg``, or ``masks/x_mask.png`` / ``x_segmentation.png``), or one flat folder
    of ``x.jpg`` + ``x_mask.png`` (also ``x_segmentation.png``, ``x_lesion.png``);
  - PH2 (``IMDnnn_lesion.bmp``): dermfast.data.ph2; the toy dataset: its labels.csv ``mask`` column.
Stored form (`prepare_mask`, called by validation): every mask is rewritten once into the cache as an 8-bit grey
PNG with values 0 / 255 (lesion = at least half of the file's largest value, so 0/1 and 0/255 masks, 1-bit BMPs
and palette PNGs all read the same), and its size must equal its image's; the loaders then threshold at 127.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from dermfast.data.records import IMAGE_EXTENSIONS, DatasetError, ImageRecords

MASK_SUFFIXES = ("_segmentation", "_mask", "_lesion", "_Segmentation", "_Mask")
MASK_DIR_WORDS = ("groundtruth", "segmentation", "mask", "label")
_LOSSLESS = (".png", ".bmp", ".tif", ".tiff", ".gif")


def _is_mask_name(stem: str) -> bool:
    return stem.endswith(MASK_SUFFIXES)


def _index(folder: Path) -> dict[str, str]:
    """{stem: path} of the lossless image files directly in `folder` (sorted: the first of a stem wins)."""
    out = {}
    if folder.is_dir():
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            stem, ext = os.path.splitext(e.name)
            if ext.lower() in _LOSSLESS and e.is_file():
                out.setdefault(stem, e.path)
    return out


def mask_dirs(image_dir: Path) -> list[Path]:
    """Folders that may hold the masks of images in `image_dir`: sibling / child folders whose name holds
    'groundtruth', 'segmentation', 'mask' or 'label' (ISIC task 1, images/ + masks/), then `image_dir` itself."""
    image_dir = Path(image_dir)
    near = [d for base in (image_dir.parent, image_dir) if base.is_dir() for d in sorted(base.iterdir())
            if d.is_dir() and d != image_dir and any(w in d.name.lower() for w in MASK_DIR_WORDS)]
    return near + [image_dir]


def find_masks(image_paths, dirs=None) -> np.ndarray:
    """[N] object: for each image (by stem) its mask file in `dirs` (default: `mask_dirs` of each image's folder)
    named ``<stem><suffix>`` for a suffix of MASK_SUFFIXES, or ``<stem>`` in a folder other than the image's;
    "" where there is none."""
    cache: dict[Path, list[dict]] = {}
    out = []
    for p in image_paths:
        p = Path(p)
        folders = [Path(d) for d in dirs] if dirs is not None else mask_dirs(p.parent)
        key = p.parent if dirs is None else Path("")
        if key not in cache:
            cache[key] = [(_index(d), d != p.parent) for d in folders]
        stem, hit = p.stem, ""
        for idx, other in cache[key]:
            names = [stem + s for s in MASK_SUFFIXES] + ([stem] if other else [])
            hit = next((idx[n] for n in names if n in idx), "")
            if hit:
                break
        out.append(hit)
    return np.asarray(out + [None], dtype=object)[:-1]


def read_pairs(root) -> ImageRecords:
    """A folder of image + mask pairs (see the module doc), unlabelled (classes [], labels -1). Images without a
    mask are usable images and kept with mask "" (the loaders' `has_mask` is 0 for them)."""
    root = Path(root)
    image_dir = _image_dir(root)
    files = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not _is_mask_name(p.stem))
    if not files:
        raise DatasetError(f"{root}: no images (expected images/ + masks/ with equal stems, or x.jpg + x_mask.png)")
    masks = find_masks(files)
    if not any(masks):
        raise DatasetError(f"{root}: no mask found for any image (expected masks/<stem>.png or <stem>_mask.png, "
                           f"ISIC <stem>_segmentation.png)")
    return ImageRecords([str(p) for p in files], np.full(len(files), -1), [], root=str(root), masks=masks)


def _image_dir(root: Path) -> Path:
    """images/, else the one ISIC task 1 input folder (name holding "input"), else root."""
    if (root / "images").is_dir():
        return root / "images"
    inputs = sorted(d for d in root.iterdir() if d.is_dir() and "input" in d.name.lower())
    return inputs[0] if len(inputs) == 1 else root


def looks_like_pairs(root: Path) -> bool:
    """An images/ folder with a mask folder beside it, an ISIC task 1 input folder with a ground-truth folder, or
    a flat folder holding <stem>_mask / _segmentation files."""
    root = Path(root)
    dirs = [d.name.lower() for d in root.iterdir() if d.is_dir()]
    if any("input" in d for d in dirs) and any("groundtruth" in d or "segmentation" in d for d in dirs):
        return True
    if (root / "images").is_dir():
        return any(d.is_dir() and d.name.lower() in ("masks", "mask", "labels", "segmentations")
                   for d in root.iterdir())
    return any(Path(e.name).suffix.lower() in _LOSSLESS and _is_mask_name(Path(e.name).stem)
               for e in os.scandir(root) if e.is_file())


def binarise(arr: np.ndarray) -> np.ndarray:
    """uint8 0 / 255 from any single-channel mask: lesion where the value is at least half the largest one."""
    arr = np.asarray(arr)
    top = arr.max() if arr.size else 0
    if top <= 0:
        return np.zeros(arr.shape, np.uint8)
    return np.where(arr.astype(np.float64) >= top / 2, np.uint8(255), np.uint8(0))


def prepare_mask(path: str, image_size: tuple[int, int], out_dir: Path) -> tuple[str, str | None]:
    """(stored mask path, None), or ("", reason) when the mask cannot be used: missing, undecodable, or of
    another size than its image (width, height). Writes ``out_dir/<sha1>.png`` once per (file, size, mtime)."""
    from PIL import Image
    try:
        st = os.stat(path)
    except OSError as e:
        return "", f"mask {path}: {e.strerror or e}"
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    out = Path(out_dir) / f"{key}.png"
    try:
        if out.is_file():
            with Image.open(out) as m:
                size = m.size
        else:
            with Image.open(path) as m:
                m.load()
                size = m.size
                arr = np.asarray(m.convert("L") if m.mode not in ("I;16", "I", "F") else m)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            Image.fromarray(binarise(arr)).save(tmp, format="PNG")
            os.replace(tmp, out)
    except Exception as e:  # noqa: BLE001 - any failure is a reason, never a crash
        return "", f"mask {path} unreadable ({type(e).__name__}: {e})"
    if tuple(size) != tuple(image_size):
        return "", f"mask {path} is {size[0]}x{size[1]}, the image {image_size[0]}x{image_size[1]}"
    return str(out), None
