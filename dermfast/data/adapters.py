"""Dataset adapters: the public skin-lesion layouts dermfast reads, each turned into `ImageRecords`.

Formats (one reader each; `open_any(path)` detects which from what lies at `path`):
  folder      root/<class>/*.jpg, or a flat folder of images (unlabelled).
  csv         root/labels.csv (image + label | diagnosis | dx) and root/images/: the embedded toy dataset and
              ../shared/data/isic-cc0-mini. Classes: the sorted label names of the csv.
  ham10000    HAM10000_metadata.csv (lesion_id, image_id, dx, dx_type, age, sex, localization; comma or tab
              separated) + <image_id>.jpg in HAM10000_images_part_1/, _part_2/ (any case), images/ or root.
              Classes HAM_CLASSES (fixed order); groups = lesion_id.
  isic2019    ISIC_2019_Training_GroundTruth.csv (image + one-hot "1.0"/"0.0" columns MEL NV BCC AK BKL DF VASC
              SCC UNK) + ISIC_2019_Training_Input/[ISIC_2019_Training_Input/]<image>.jpg. Classes: the one-hot
              columns in file order, UNK dropped unless a row marks it; a row marking no class or several is
              skipped. ISIC_2019_Training_Metadata.csv (image, lesion_id), when there or given, sets groups.
              ISIC 2018 task 3 ground truth (image, MEL NV BCC AKIEC BKL DF VASC) reads the same way.
  isic2024    SLICE-3D: train-image.hdf5 (key isic_id -> scalar JPEG bytes) + train-metadata.csv (isic_id, target
              0/1, patient_id, ...); paths are isic_ids read through `HDF5Store`; classes benign / malignant;
              groups = patient_id. Metadata without target (test set) gives labels -1.
  ph2         PH2_dataset.txt ('||', tab- or comma-separated) or a PH2 csv + PH2 Dataset images/IMD###/...,
              with the lesion masks IMD###_lesion/IMD###_lesion.bmp: dermfast.data.ph2.
  dermamnist  dermamnist.npz (train|val|test _images uint8 [N,H,W(,3)], _labels [N,1]; MedMNIST label order =
              HAM_CLASSES), written once as PNG files into a cache directory keyed by the npz content hash
              (temporary directory + rename: idempotent, safe to race). `records.splits` holds the official
              split as indices into the returned records.
  pairs       images + lesion masks, unlabelled: images/ + masks/ with equal stems, x.jpg + x_mask.png, or ISIC
              2017 / 2018 task 1 (<stem>_segmentation.png in a ground-truth folder): dermfast.data.masks.
  Masks also come with: the folder reader (ISIC task 1 <stem>_segmentation.png in a GroundTruth / masks folder
  beside a flat image folder), ph2 (IMD###_lesion.bmp), csv (a mask column; the toy dataset).

Bad input never crashes a reader and is never dropped silently: a row whose image is missing, whose label is
unknown, empty or malformed, or that repeats an image is skipped and listed in `records.missing` as (name,
reason); every reader sets `missing`. A class of a fixed list with no image stays in `classes` (see
`class_counts()`); `check_usable` makes that an error when asked. No usable image at all raises DatasetError.
"""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from dermfast.data.masks import find_masks, looks_like_pairs, read_pairs
from dermfast.data.ph2 import PH2_CLASSES, read_ph2
from dermfast.data.records import IMAGE_EXTENSIONS, DatasetError, ImageRecords

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
DERMAMNIST_CLASSES = HAM_CLASSES  # MedMNIST DermaMNIST labels 0..6 follow the same (alphabetical) order
ISIC2024_CLASSES = ("benign", "malignant")
FORMATS = ("folder", "csv", "ham10000", "isic2019", "isic2024", "ph2", "dermamnist", "pairs")
_ALIASES = {"imagefolder": "folder", "labelscsv": "csv", "toy": "csv", "ham": "ham10000", "isic2018": "isic2019",
            "slice3d": "isic2024"}
_NON_CLASS_COLUMNS = {"score_weight", "validation_weight"}


# ----------------------------------------------------------------------------------------------- shared helpers
class _Collector:
    """Accepted images and skipped rows (name, reason) of one reader."""

    def __init__(self, classes, what: str):
        self.classes, self.what = list(classes), what
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.paths, self.labels, self.groups, self.missing, self.seen = [], [], [], [], set()
        self.masks = None  # a list (one mask path or "" per kept image) once a reader calls with_masks()

    def with_masks(self) -> "_Collector":
        self.masks = []
        return self

    def skip(self, name, reason: str) -> bool:
        self.missing.append((str(name), reason))
        return False

    def add(self, name: str, path, label, group=None, line=None, not_found="image file not found",
            mask="") -> bool:
        """label: a class name, a class index, or -1 (unlabelled); mask: its file, "" for none (readers that
        call `with_masks`). Returns whether the image was kept."""
        reason = ("empty image name" if not name else "duplicate row" if name in self.seen else
                  "empty label" if label == "" else
                  f"unknown label {label!r}" if isinstance(label, str) and label not in self.index else
                  not_found if path is None else None)
        if reason:
            return self.skip(name or f"<line {line}>", reason)
        label = self.index[label] if isinstance(label, str) else label
        self.seen.add(name)
        self.paths.append(str(path))
        self.labels.append(int(label))
        self.groups.append(group or name)  # no group -> the image is its own group
        if self.masks is not None:
            self.masks.append(str(mask or ""))
        return True

    def records(self, root, grouped: bool = False, store=None) -> ImageRecords:
        if not self.paths:
            raise DatasetError(f"{self.what}: no usable images ({missing_summary(self.missing)})")
        rec = ImageRecords(self.paths, np.array(self.labels, dtype=np.int64), self.classes, root=str(root),
                           groups=np.array(self.groups, dtype=object) if grouped else None, store=store,
                           masks=self.masks)
        rec.missing = self.missing  # type: ignore[attr-defined]
        return rec


def missing_summary(missing) -> str:
    """One line: how many rows were skipped and why (the three commonest reasons)."""
    if not missing:
        return "no rows skipped"
    top = Counter(reason for _, reason in missing).most_common(3)
    more = "" if len(top) == len(set(r for _, r in missing)) else ", ..."
    return f"{len(missing)} rows skipped: " + ", ".join(f"{n} {r}" for r, n in top) + more


def _table(path: Path, keep=None):
    """(header, iterator of (line number, {column: stripped value})) for a comma- or tab-separated file.
    Short rows get "" for the absent cells; blank lines are not rows. `keep` limits the columns stored."""
    path = Path(path)

    def reader(f):
        first = f.readline()
        f.seek(0)
        return csv.reader(f, delimiter="\t" if first.count("\t") > first.count(",") else ",")

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = [h.strip() for h in next(reader(f), [])]
    if not header:
        raise DatasetError(f"{path} is empty")
    cols = [(i, h) for i, h in enumerate(header) if keep is None or h.lower() in keep]

    def rows():
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            it = reader(f)
            next(it, None)
            for line, cells in enumerate(it, 2):
                if any(c.strip() for c in cells):
                    yield line, {h: (cells[i].strip() if i < len(cells) else "") for i, h in cols}
    return header, rows()


def _col(header, *names):
    """The header entry matching one of `names` (case-insensitive), or None."""
    low = {h.lower(): h for h in header}
    return next((low[n.lower()] for n in names if n.lower() in low), None)


def _need(path, header, **cols):
    """Resolve required columns {role: (alternatives...)} or raise a one-line DatasetError."""
    for role, names in cols.items():
        if _col(header, *names) is None:
            raise DatasetError(f"{path} needs a column {' or '.join(map(repr, names))}; found {', '.join(header)}")
    return {role: _col(header, *names) for role, names in cols.items()}


def _first(root: Path, *patterns):
    """The first file (sorted) matching the first pattern that matches any, or None."""
    return next((p for pat in patterns for p in sorted(root.glob(pat)) if p.is_file()), None)


def _index_dirs(dirs) -> dict:
    """{file stem: path} of the image files directly inside `dirs` (the first directory listing a stem wins)."""
    index = {}
    for d in dirs:
        if Path(d).is_dir():
            for e in sorted(os.scandir(d), key=lambda e: e.name):
                if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
                    index.setdefault(os.path.splitext(e.name)[0], e.path)
    return index


def _lookup(index: dict, name: str):
    stem, ext = os.path.splitext(name)
    return index.get(name) or (index.get(stem) if ext.lower() in IMAGE_EXTENSIONS else None) \
        or index.get(name + "_downsampled")


def _int(value):
    try:
        f = float(value)
        return int(f) if f.is_integer() else None
    except (TypeError, ValueError, OverflowError):
        return None


def _find_image(images_dir: Path, stem: str) -> Path | None:
    p = images_dir / stem
    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
        return p
    for ext in IMAGE_EXTENSIONS:
        for cand in (images_dir / f"{stem}{ext}", images_dir / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


# ----------------------------------------------------------------------------------------------- readers
def read_folder(root) -> ImageRecords:
    """root/<class>/*.jpg, or a flat folder of images (unlabelled, classes [])."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory")
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


def read_csv(root, csv_name: str = "labels.csv", classes=None) -> ImageRecords:
    """root/labels.csv (columns image and label | diagnosis | dx) with images in root/images/ or root.
    `classes` fixes the class list (and order); other labels are then skipped as unknown.
    An optional column mask (or mask_path, segmentation) names each image's lesion mask file, relative to the
    csv's folder or absolute; empty = no mask; a named file that does not exist skips the row (reported)."""
    root = Path(root)
    path = root if root.is_file() else root / csv_name
    header, rows = _table(path)
    c = _need(path, header, image=("image",), label=("label", "diagnosis", "dx"))
    mask_col = _col(header, "mask", "mask_path", "segmentation")
    rows = list(rows)
    classes = list(classes) if classes is not None else sorted({r[c["label"]] for _, r in rows if r[c["label"]]})
    images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    out = _Collector(classes, str(path))
    if mask_col is not None:
        out.with_masks()
    for line, r in rows:
        name = r[c["image"]]
        mask = r[mask_col] if mask_col is not None else ""
        if mask:
            mask = path.parent / mask
            if not mask.is_file():
                out.skip(name or f"<line {line}>", f"mask file not found ({mask})")
                continue
        out.add(name, _find_image(images, name) if name else None, r[c["label"]], line=line, mask=mask)
    return out.records(path.parent)


def read_ham10000(root, metadata=None, image_dirs=None) -> ImageRecords:
    """HAM10000: metadata csv (lesion_id, image_id, dx, ...) + image folders; groups = lesion_id."""
    root = Path(root)
    if root.is_file():
        metadata, root = metadata or root, root.parent
    meta = Path(metadata) if metadata else _first(root, "HAM10000_metadata*", "ham10000_metadata*")
    if meta is None:
        raise DatasetError(f"{root}: no HAM10000_metadata.csv found")
    header, rows = _table(meta)
    c = _need(meta, header, image=("image_id",), dx=("dx",))
    lesion = _col(header, "lesion_id")
    if image_dirs is None:
        image_dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name.lower().startswith("ham10000_images"))
        image_dirs += [root / "images", root]
    index = _index_dirs(image_dirs)
    out = _Collector(HAM_CLASSES, str(meta))
    for line, r in rows:
        name = r[c["image"]]
        out.add(name, _lookup(index, name), r[c["dx"]].lower(), r[lesion] if lesion else None, line)
    return out.records(root, grouped=lesion is not None)


def read_isic2019(root, ground_truth=None, metadata=None, images=None) -> ImageRecords:
    """ISIC 2019 (or 2018 task 3): one-hot ground-truth csv + images; optional metadata csv -> lesion groups."""
    root = Path(root)
    if root.is_file():
        ground_truth, root = ground_truth or root, root.parent
    gt = Path(ground_truth) if ground_truth else _first(root, "ISIC_2019_Training_GroundTruth.csv", "*GroundTruth*.csv")
    if gt is None:
        raise DatasetError(f"{root}: no ISIC_2019_Training_GroundTruth.csv found")
    header, rows = _table(gt)
    image_col = _need(gt, header, image=("image",))["image"]
    cols = [h for h in header if h != image_col and h and h.lower() not in _NON_CLASS_COLUMNS]
    if not cols:
        raise DatasetError(f"{gt} has no one-hot class columns")
    parsed, errors = [], []
    for line, r in rows:
        name = r[image_col] or f"<line {line}>"
        try:
            hot = [h for h in cols if float(r[h]) > 0.5]
        except ValueError:
            errors.append((name, "malformed one-hot value"))
            continue
        if len(hot) != 1:
            errors.append((name, "no class marked" if not hot else f"several classes marked ({' '.join(hot)})"))
        else:
            parsed.append((r[image_col], hot[0], line))
    used = {lab for _, lab, _ in parsed}
    classes = [h for h in cols if h.upper() != "UNK" or h in used]
    groups = {}
    meta = Path(metadata) if metadata else _first(root, "ISIC_2019_Training_Metadata.csv")
    if meta is not None:
        mh, mrows = _table(meta)
        mc = _need(meta, mh, image=("image",), lesion=("lesion_id",))
        groups = {r[mc["image"]]: r[mc["lesion"]] for _, r in mrows}
    if images is None:
        inputs = sorted(d for d in root.iterdir() if d.is_dir() and "input" in d.name.lower())
        images = [d / d.name for d in inputs] + inputs + [root / "images", root]
    index = _index_dirs([images] if isinstance(images, (str, Path)) else images)
    out = _Collector(classes, str(gt))
    out.missing.extend(errors)
    for name, label, line in parsed:
        out.add(name, _lookup(index, name), label, groups.get(name), line)
    return out.records(root, grouped=meta is not None)


def _as_bytes(value) -> bytes:
    """JPEG bytes from what h5py returns for a scalar dataset: bytes, np.bytes_, np.void, uint8 array, object."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.void):
        return value.tobytes()
    if isinstance(value, np.ndarray):
        return _as_bytes(value.item()) if value.dtype == object and value.size == 1 else value.tobytes()
    raise TypeError(f"cannot read image bytes from a {type(value).__name__}")


class HDF5Store:
    """Encoded images in one HDF5 file, key -> scalar bytes dataset (ISIC 2024 train-image.hdf5).

    The file opens lazily, once per process: after a fork (DataLoader workers) the child opens its own handle.
    Pickling drops the handle, so the store travels to spawned workers as just its path."""

    def __init__(self, path):
        self.path = str(path)
        self._file, self._pid = None, None

    def _h5(self):
        if self._file is None or self._pid != os.getpid():
            import h5py  # optional dependency: only ISIC 2024 needs it
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def read(self, key: str) -> bytes:
        return _as_bytes(self._h5()[key][()])

    def keys(self) -> list[str]:
        return list(self._h5().keys())

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __getstate__(self):
        return {"path": self.path, "_file": None, "_pid": None}


def read_isic2024(path, metadata=None) -> ImageRecords:
    """ISIC 2024 SLICE-3D: train-image.hdf5 + train-metadata.csv (isic_id, target, patient_id)."""
    path = Path(path)
    if path.is_dir():
        path = _first(path, "train-image.hdf5", "*.hdf5", "*.h5") or path / "train-image.hdf5"
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    if metadata is None:
        metadata = path.with_name(path.stem.replace("image", "metadata") + ".csv")
        if "image" not in path.stem or not metadata.is_file():
            metadata = _first(path.parent, "*metadata*.csv")
    if metadata is None or not Path(metadata).is_file():
        raise DatasetError(f"{path}: no metadata csv (train-metadata.csv) next to it; pass metadata=")
    header, rows = _table(metadata, keep={"isic_id", "target", "patient_id"})
    key = _need(metadata, header, isic_id=("isic_id",))["isic_id"]
    target, patient = _col(header, "target"), _col(header, "patient_id")
    store = HDF5Store(path)
    try:
        keys = set(store.keys())
    except OSError as e:
        raise DatasetError(f"{path} is not a readable HDF5 file ({e})") from None
    out = _Collector(ISIC2024_CLASSES, str(metadata))
    for line, r in rows:
        name, label = r[key], -1 if target is None else _int(r[target])
        if label not in (-1, 0, 1) or (target is not None and label == -1):
            out.skip(name or f"<line {line}>", f"unknown target {r[target]!r}")
        else:
            out.add(name, name if name in keys else None, label, r[patient] if patient else None, line,
                    not_found=f"not in {path.name}")
    return out.records(path.parent, grouped=patient is not None, store=store)


def _cache_root() -> Path:
    try:
        from dermfast.data.toy import default_cache_dir
        return Path(default_cache_dir())
    except ImportError:
        return Path(os.environ.get("DERMFAST_CACHE") or Path.home() / ".cache" / "dermfast")


def materialise_npz(npz, cache_dir=None) -> Path:
    """Write the arrays of a MedMNIST-style npz once as PNG files; returns the cache directory holding
    images/<split>_<i>.png and labels.csv (image, label, split). Keyed by content hash, built in a temporary
    directory renamed into place, so a finished directory is always complete and a second call is free."""
    npz, digest = Path(npz), hashlib.sha256()
    with open(npz, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    root = Path(cache_dir) if cache_dir else _cache_root()
    final = root / f"dermamnist-{digest.hexdigest()[:16]}"
    if (final / "labels.csv").is_file():
        return final
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        (tmp / "images").mkdir()
        lines = []
        try:
            z = np.load(npz)
        except Exception as e:  # not a zip, pickled data, truncated file, ...
            raise DatasetError(f"{npz} is not a readable .npz file ({type(e).__name__}: {e})") from None
        with z:
            for split in [s for s in ("train", "val", "test") if f"{s}_images" in z.files]:
                images = np.asarray(z[f"{split}_images"])
                labels = np.asarray(z[f"{split}_labels"] if f"{split}_labels" in z.files else [])
                if images.ndim == 4 and images.shape[-1] == 1:
                    images = images[..., 0]
                if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (3, 4)) \
                        or len(labels) != len(images) or images.dtype != np.uint8:
                    raise DatasetError(f"{npz}: {split}_images {images.dtype}{list(images.shape)} / {split}_labels "
                                       f"{list(labels.shape)}; expected uint8 [N,H,W(,3)] images, [N(,1)] labels")
                for i, (img, lab) in enumerate(zip(images, labels.reshape(len(labels), -1)[:, 0])):
                    name = f"{split}_{i:06d}.png"
                    Image.fromarray(img).save(tmp / "images" / name, format="PNG")
                    lines.append((name, lab, split))
        if not lines:
            raise DatasetError(f"{npz} holds no train_images / val_images / test_images arrays")
        with open(tmp / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "label", "split"), *lines])
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "labels.csv").is_file():
                raise DatasetError(f"cache directory {final} exists but is incomplete; delete it") from None
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_dermamnist(path, split: str = "all", cache_dir=None) -> ImageRecords:
    """DermaMNIST npz -> records of one split ("train" / "val" / "test") or "all"; `records.splits` maps each
    official split to indices into the returned records."""
    path = Path(path)
    if path.is_dir():
        path = _first(path, "dermamnist*.npz", "*.npz") or path / "dermamnist.npz"
    if split not in ("all", "train", "val", "test"):
        raise DatasetError(f"unknown DermaMNIST split {split!r}; accepted: all, train, val, test")
    cache = materialise_npz(path, cache_dir)
    _, rows = _table(cache / "labels.csv")
    out, member = _Collector(DERMAMNIST_CLASSES, str(path)), []
    for _, r in rows:
        if split == "all" or r["split"] == split:
            label = _int(r["label"])
            if label is None or not 0 <= label < len(DERMAMNIST_CLASSES):
                out.skip(r["image"], f"unknown label {r['label']!r}")
            elif out.add(r["image"], cache / "images" / r["image"], label):
                member.append(r["split"])
    rec = out.records(cache)
    member = np.array(member)
    rec.splits = {s: np.flatnonzero(member == s) for s in ("train", "val", "test")}  # type: ignore[attr-defined]
    return rec


# ----------------------------------------------------------------------------------------------- dispatch
_READERS = {"folder": read_folder, "csv": read_csv, "ham10000": read_ham10000, "isic2019": read_isic2019,
            "isic2024": read_isic2024, "ph2": read_ph2, "dermamnist": read_dermamnist, "pairs": read_pairs}


def detect_format(path) -> str:
    """The format name `open_any` would use for `path` (see the module docstring)."""
    p = Path(path).expanduser()
    if p.is_file():
        name, suffix = p.name.lower(), p.suffix.lower()
        for fmt, hit in (("isic2024", suffix in (".hdf5", ".h5")), ("dermamnist", suffix == ".npz"),
                         ("ham10000", name.startswith("ham10000_metadata")),
                         ("isic2019", "groundtruth" in name and suffix == ".csv"),
                         ("ph2", name.startswith("ph2") and suffix in (".txt", ".csv")),
                         ("csv", suffix in (".csv", ".tsv"))):
            if hit:
                return fmt
        raise DatasetError(f"cannot tell the dataset format of {p}; pass format= one of {', '.join(FORMATS)}")
    names = [e.name.lower() for e in p.iterdir()]
    has = lambda pred: any(pred(n) for n in names)  # noqa: E731
    for fmt, hit in (("ham10000", has(lambda n: n.startswith("ham10000_metadata"))),
                     ("isic2019", has(lambda n: "groundtruth" in n and n.endswith(".csv"))),
                     ("ph2", "ph2_dataset.txt" in names or "ph2 dataset images" in names
                      or "ph2_dataset_images" in names),
                     ("csv", "labels.csv" in names),
                     ("pairs", looks_like_pairs(p)),
                     ("isic2024", has(lambda n: n.endswith((".hdf5", ".h5")))
                      and has(lambda n: "metadata" in n and n.endswith(".csv"))),
                     ("dermamnist", has(lambda n: n.endswith(".npz")) and not any(e.is_dir() for e in p.iterdir()))):
        if hit:
            return fmt
    return "folder"


def open_any(path, format: str = "auto", **kw) -> ImageRecords:
    """Open a dataset of any supported format; `format="auto"` detects it, or force one of FORMATS.
    Extra keywords go to the reader (e.g. split="train" for dermamnist, metadata= for isic2024)."""
    p = Path(path).expanduser()
    key = str(format).lower().replace("-", "").replace("_", "")
    fmt = _ALIASES.get(key, key)
    if fmt != "auto" and fmt not in _READERS:
        raise DatasetError(f"unknown dataset format {format!r}; accepted: auto, {', '.join(FORMATS)}")
    if not p.exists():
        raise DatasetError(f"data path {str(path)!r} does not exist")
    return _READERS[detect_format(p) if fmt == "auto" else fmt](p, **kw)


def check_usable(records: ImageRecords, require_all_classes: bool = False) -> dict[str, int]:
    """Class counts of `records`; DatasetError when there is no usable image, or (require_all_classes) when a
    class has none."""
    skipped = getattr(records, "missing", None) or []
    why = f" ({missing_summary(skipped)})" if skipped else ""
    if len(records) == 0:
        raise DatasetError(f"no usable images{why}")
    counts = records.class_counts()
    empty = [c for c, n in counts.items() if n == 0]
    if require_all_classes and empty:
        raise DatasetError((f"class {empty[0]!r} has no usable images" if len(empty) == 1 else
                            f"classes {', '.join(map(repr, empty))} have no usable images") + why)
    return counts
