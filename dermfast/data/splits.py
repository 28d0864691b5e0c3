"""Train / val / test splits of `ImageRecords`: stratified by label, seeded, grouped.

`split_records(records, fractions=(0.8, 0.1, 0.1), seed=0)` returns {"train", "val", "test"} -> sorted int64
indices into `records`:
  * grouped: when `records.groups` is set (HAM10000 / ISIC 2019 lesion_id, ISIC 2024 patient_id) a group goes
    whole to one side; it is stratified under the majority label of its images (ties: the lower label).
    An empty / None group means the image is its own group.
  * stratified: each label (unlabelled = its own stratum) is split on its own so every side gets about
    `fraction x images` of it: largest-remainder rounding for single images, largest-group-first filling of the
    side furthest below its target for groups.
  * coverage: a class with >= 3 images gets a unit on every side whose fraction is > 0, as far as its number of
    groups allows (priority train, test, val).
  * a class left off a side whose fraction is > 0 (one or two images, or a single group: all go to train) is
    named in one printed line ("split: class 'df' has 1 image (x.jpg) and it went to train: val and test ...").
  * deterministic: stratum `c` shuffles its units (sorted by group name first) with
    `numpy.random.default_rng([seed, c + 1])`, so a seed gives the same split on every machine and a class's
    split does not depend on the other classes.

K-fold cross-validation (`--folds K`): `assign_folds(records, k, seed)` gives each image its fold 1..K with
scikit-learn's `StratifiedKFold` (no groups) or `StratifiedGroupKFold` (a group, e.g. a lesion, goes whole to one
fold), `shuffle=True, random_state=seed`, the image's label as the stratum (unlabelled: -1), so a seed gives the
same folds on every machine. `fold_splits(records, k, fold, seed)` is the run of one fold: test = that fold,
train / val = the other folds split by `split_records` (fractions 1 - VAL_FRACTION, VAL_FRACTION, 0), so the
validation images that pick the checkpoint and the decision threshold never include a test image.

`save_splits(splits, records, path)` writes a CSV with columns image, label, split (image = the path relative to
`records.root`, or the store key), one row per assigned image in record order; `load_splits(path, records)`
reads it back against (possibly re-opened) records. `check_splits` verifies that sides are disjoint and that no
group spans two sides.
"""
from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np

from dermfast.data.records import DatasetError, ImageRecords

SPLITS = ("train", "val", "test")
_COVER_PRIORITY = (0, 2, 1)  # train, test, val


def _fractions(fractions) -> np.ndarray:
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1; "
                         f"got {tuple(fractions)}")
    return fr


def _group_keys(records: ImageRecords) -> np.ndarray:
    """One string per image naming its unit; an image without a group gets a key of its own."""
    n = len(records)
    if records.groups is None:
        return np.char.mod("\x00%09d", np.arange(n))
    keys = []
    for i, g in enumerate(records.groups):
        missing = g is None or (isinstance(g, float) and np.isnan(g)) or str(g) == ""
        keys.append(f"\x00{i:09d}" if missing else f"g{g}")
    return np.array(keys, dtype=str)


def _apportion(m: int, fr: np.ndarray, cover: bool) -> np.ndarray:
    """Counts per side summing to m: largest remainder of m * fr; with `cover`, no side with fr > 0 left empty
    while another side has more than one."""
    raw = m * fr
    counts = np.floor(raw).astype(np.int64)
    rest = m - int(counts.sum())
    counts[np.argsort(-(raw - counts), kind="stable")[:rest]] += 1
    if cover:
        for k in _COVER_PRIORITY:
            donor = int(np.argmax(counts))
            if fr[k] > 0 and counts[k] == 0 and counts[donor] > 1:
                counts[donor] -= 1
                counts[k] += 1
    return counts


def _allocate(sizes: np.ndarray, fr: np.ndarray, cover: bool) -> np.ndarray:
    """Side (0 train, 1 val, 2 test) of each unit of one stratum, units given in shuffled order."""
    if (sizes == 1).all():
        return np.repeat(np.arange(3), _apportion(len(sizes), fr, cover))
    side = np.full(len(sizes), -1, dtype=np.int64)
    targets, filled = [float(t) for t in sizes.sum() * fr], [0.0, 0.0, 0.0]
    rest = [int(u) for u in np.argsort(-sizes, kind="stable")]  # largest first, shuffled order among equals
    if cover:
        for k in [k for k in _COVER_PRIORITY if fr[k] > 0][:len(rest)]:
            u = rest.pop(0) if k == 0 else rest.pop()  # train takes the largest unit, val / test the smallest
            side[u], filled[k] = k, filled[k] + sizes[u]
    for u in rest:
        k = max(range(3), key=lambda j: (targets[j] - filled[j], -j))
        side[u], filled[k] = k, filled[k] + sizes[u]
    return side


def split_records(records: ImageRecords, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified, grouped, seeded train / val / test indices (see the module docstring)."""
    fr = _fractions(fractions)
    n = len(records)
    if n == 0:
        return {s: np.zeros(0, dtype=np.int64) for s in SPLITS}
    _, unit = np.unique(_group_keys(records), return_inverse=True)
    unit = unit.reshape(-1)
    n_units, n_labels = int(unit.max()) + 1, max(len(records.classes), int(records.labels.max()) + 1, 0)
    counts = np.zeros((n_units, n_labels + 1), dtype=np.int64)  # column 0: unlabelled
    np.add.at(counts, (unit, np.maximum(records.labels, -1) + 1), 1)
    labelled = counts[:, 1:].sum(axis=1) > 0
    unit_label = np.where(labelled, counts[:, 1:].argmax(axis=1) if n_labels else -1, -1)
    unit_size = counts.sum(axis=1)
    unit_side = np.full(n_units, -1, dtype=np.int64)
    for c in np.unique(unit_label):
        units = np.flatnonzero(unit_label == c)
        units = units[np.random.default_rng([int(seed), int(c) + 1]).permutation(len(units))]
        sizes = unit_size[units]
        unit_side[units] = _allocate(sizes, fr, cover=int(sizes.sum()) >= 3)
    side = unit_side[unit]
    for note in uncovered_classes(records, side, fr):
        print(note)
    return {s: np.flatnonzero(side == k).astype(np.int64) for k, s in enumerate(SPLITS)}


def uncovered_classes(records: ImageRecords, side: np.ndarray, fr: np.ndarray) -> list[str]:
    """One line per class missing from a side that is meant to hold images (fraction > 0): a class of one or
    two images (or one group) goes whole to train, so val / test never measure it; the run says so.
    side: [N] 0 train, 1 val, 2 test per image."""
    notes = []
    for c in np.unique(records.labels[records.labels >= 0]):
        where = np.flatnonzero(records.labels == c)
        missing = [SPLITS[k] for k in range(3) if fr[k] > 0 and not (side[where] == k).any()]
        if not missing:
            continue
        name = records.classes[c] if c < len(records.classes) else str(int(c))
        held = [SPLITS[k] for k in range(3) if (side[where] == k).any()]
        what = (f"1 image ({Path(str(records.paths[where[0]])).name}) and it went to {held[0]}" if len(where) == 1
                else f"{len(where)} images and they went to {' and '.join(held)}")
        notes.append(f"split: class {name!r} has {what}: {' and '.join(missing)} hold{'' if len(missing) > 1 else 's'} none of it, so its "
                     "metrics there are undefined")
    return notes


VAL_FRACTION = 0.15  # of the training folds, the inner validation split of a --folds run


def assign_folds(records: ImageRecords, k: int, seed: int = 0) -> np.ndarray:
    """[N] int64 fold number 1..k of each image: stratified by label, grouped by `records.groups`, seeded
    (scikit-learn StratifiedKFold / StratifiedGroupKFold, shuffle=True, random_state=seed). ValueError when there
    are fewer than k units (groups, or images without one); a class with fewer units than k folds is named in
    one printed line (some test folds hold none of it)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    k, n = int(k), len(records)
    if k < 2:
        raise ValueError(f"cross-validation needs k >= 2 folds, got {k}")
    _, unit = np.unique(_group_keys(records), return_inverse=True)
    unit = unit.reshape(-1)
    n_units = int(unit.max()) + 1 if n else 0
    if n_units < k:
        what = "groups" if records.groups is not None else "images"
        raise ValueError(f"{k} folds need at least {k} {what}; the data has {n_units}")
    labels = np.maximum(np.asarray(records.labels, dtype=np.int64), -1)
    rs = int(seed) % 2**32
    splitter = (StratifiedKFold(k, shuffle=True, random_state=rs) if n_units == n
                else StratifiedGroupKFold(k, shuffle=True, random_state=rs))
    fold = np.zeros(n, dtype=np.int64)
    with warnings.catch_warnings():  # "the least populated class has only m members": said below in our words
        warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
        parts = splitter.split(np.zeros((n, 1)), labels, None if n_units == n else unit)
        for f, (_, test) in enumerate(parts):
            fold[test] = f + 1
    for c in np.unique(labels[labels >= 0]):
        missing = k - len(np.unique(fold[labels == c]))
        if missing:
            name = records.classes[c] if c < len(records.classes) else str(int(c))
            print(f"folds: class {name!r} has {int((labels == c).sum())} images in {len(np.unique(unit[labels == c]))} "
                  f"unit(s): {missing} of the {k} test folds hold none of it, so its metrics there are undefined")
    return fold


def fold_splits(records: ImageRecords, k: int, fold: int, seed: int = 0,
                val_fraction: float = VAL_FRACTION) -> dict[str, np.ndarray]:
    """The splits of fold `fold` (1..k) of a k-fold cross-validation: test = the images of that fold
    (`assign_folds`), train / val = the other folds through `split_records` (stratified, grouped, seeded)."""
    if not 1 <= int(fold) <= int(k):
        raise ValueError(f"fold must be in 1..{k}, got {fold}")
    folds = assign_folds(records, k, seed)
    test, rest = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
    inner = split_records(records.subset(rest), fractions=(1.0 - val_fraction, val_fraction, 0.0), seed=seed)
    return {"train": rest[inner["train"]], "val": rest[inner["val"]], "test": test.astype(np.int64)}


def check_splits(splits: dict, records: ImageRecords) -> None:
    """ValueError if an index is out of range or on two sides, or if a group spans two sides."""
    seen = np.zeros(len(records), dtype=np.int64)
    for s in SPLITS:
        idx = np.asarray(splits.get(s, []), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(records)):
            raise ValueError(f"split {s!r} holds indices outside 0..{len(records) - 1}")
        np.add.at(seen, idx, 1)
    if (seen > 1).any():
        raise ValueError(f"{int((seen > 1).sum())} images are on more than one side")
    if records.groups is not None:
        sides = {}
        for s in SPLITS:
            for g in records.groups[np.asarray(splits.get(s, []), dtype=np.int64)]:
                if g is not None and str(g) != "" and sides.setdefault(str(g), s) != s:
                    raise ValueError(f"group {g!r} is on both {sides[str(g)]!r} and {s!r}")


def _image_keys(records: ImageRecords) -> list[str]:
    """How save_splits names each image: the path the user gave (`records.origins`: a converted copy in the cache
    is named by its original), relative to records.root (POSIX) where it lies under it, or the store key."""
    names = list(getattr(records, "origins", None) or records.paths)
    if records.store is not None or not records.root:
        return [str(p) for p in names]
    root = os.path.abspath(records.root)
    out = []
    for p in names:
        a = os.path.abspath(p)
        out.append(Path(os.path.relpath(a, root)).as_posix() if a.startswith(root + os.sep) else str(p))
    return out


def _label_name(records: ImageRecords, i: int) -> str:
    lab = int(records.labels[i])
    return records.classes[lab] if 0 <= lab < len(records.classes) else ""


def save_splits(splits: dict, records: ImageRecords, path) -> Path:
    """Write splits as CSV (image, label, split), atomically (temporary file + rename)."""
    check_splits(splits, records)
    side = np.full(len(records), -1, dtype=np.int64)
    for k, s in enumerate(SPLITS):
        side[np.asarray(splits.get(s, []), dtype=np.int64)] = k
    keys, path = _image_keys(records), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("image", "label", "split"))
        for i in np.flatnonzero(side >= 0):
            w.writerow((keys[i], _label_name(records, i), SPLITS[side[i]]))
    os.replace(tmp, path)
    return path


def load_splits(path, records: ImageRecords, strict: bool = True) -> dict[str, np.ndarray]:
    """Read a save_splits CSV against `records`. With `strict`, a row naming an image the records lack, or
    with another label than the records give it, raises DatasetError; otherwise such rows are left out.
    A duplicated image, an unknown split name or missing columns always raise."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"splits file {str(path)!r} does not exist")
    keys = _image_keys(records)
    where = {k: i for i, k in enumerate(keys)}
    where.update({str(p): i for i, p in enumerate(records.paths) if str(p) not in where})
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "split"} <= set(rows[0]):
        raise DatasetError(f"{path} needs columns image, label, split (and at least one row)")
    sides = {s: [] for s in SPLITS}
    unknown, relabelled, taken = [], [], set()
    for r in rows:
        image, split, label = (r.get("image") or "").strip(), (r.get("split") or "").strip(), r.get("label")
        if split not in sides:
            raise DatasetError(f"{path}: unknown split {split!r} for {image!r}; accepted: {', '.join(SPLITS)}")
        i = where.get(image)
        if i is None:
            unknown.append(image)
            continue
        if i in taken:
            raise DatasetError(f"{path}: image {image!r} is listed twice")
        if label is not None and label.strip() != _label_name(records, i):
            relabelled.append(image)
            continue
        taken.add(i)
        sides[split].append(i)
    if strict and (unknown or relabelled):
        parts = ([f"{len(unknown)} images not in the dataset (e.g. {unknown[0]!r})"] if unknown else []) + \
                ([f"{len(relabelled)} images with another label (e.g. {relabelled[0]!r})"] if relabelled else [])
        raise DatasetError(f"{path} does not match the dataset: {'; '.join(parts)}")
    return {s: np.sort(np.asarray(v, dtype=np.int64)) for s, v in sides.items()}
