"""What every training stage does with its data before the first step, in one place.

    open (embedded toy dataset, or any adapter format) -> add synthetic images (folder + manifest.csv)
      -> validate every image (convert what decoders cannot take, skip and count the rest; data_report.csv)
      -> refuse an unusable dataset (no image, or a class with none) -> split real images (stratified, seeded,
         grouped; splits.csv) -> train records = train split + synthetic images.

Synthetic images (written by the synthesis stage) live in a folder with `manifest.csv` (columns `image`,
`label`, any others ignored) and `images/`; their labels must be class names of the real dataset. They join the
training split only: validation and test stay real.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermfast.data.adapters import open_any, read_csv
from dermfast.data.records import DatasetError, ImageRecords


@dataclass
class PreparedData:
    records: ImageRecords          # every usable image (real + synthetic)
    splits: dict[str, np.ndarray]  # indices into `records`: train (real + synthetic), val, test (real only)
    report: object                 # dermfast.data.validate.ValidationReport

    def part(self, name: str) -> ImageRecords:
        return self.records.subset(self.splits[name])


def read_synthetic(path: str | Path, classes: list[str]) -> ImageRecords:
    """A synthesis output folder (manifest.csv + images/) as records with source = 1."""
    root = Path(path).expanduser()
    if not (root / "manifest.csv").is_file():
        raise DatasetError(f"synthetic data {str(path)!r} has no manifest.csv (the synthesis stage writes one)")
    rec = read_csv(root, csv_name="manifest.csv", classes=classes)
    rec.source[:] = 1
    return rec


def concat(real: ImageRecords, synth: ImageRecords) -> ImageRecords:
    """Real records followed by synthetic (file) records, over the real class list."""
    if list(real.classes) != list(synth.classes):
        raise DatasetError(f"synthetic classes {synth.classes} differ from the dataset's {real.classes}")
    store = real.store
    if store is not None:  # keys of a store + synthetic files: serve the files through overrides
        from dermfast.data.validate import OverrideStore
        store = OverrideStore(store, {p: p for p in synth.paths})
    groups = None
    if real.groups is not None or synth.groups is not None:
        g_real = real.groups if real.groups is not None else np.array(real.paths, dtype=object)
        groups = np.concatenate([g_real, np.array(synth.paths, dtype=object)])
    masks = None  # synthetic images have no lesion mask ("")
    if real.masks is not None or synth.masks is not None:
        blank = lambda r: r.masks if r.masks is not None else np.full(len(r), "", dtype=object)  # noqa: E731
        masks = np.concatenate([blank(real), blank(synth)])
    return ImageRecords(real.paths + synth.paths, np.concatenate([real.labels, synth.labels]), list(real.classes),
                        np.concatenate([real.source, synth.source]), real.root, groups, store,
                        list(real.missing) + list(synth.missing), masks, real.origins + synth.origins)


def open_records(data: str | None, *, toy_images: int = 1200, toy_image_size: int = 128,
                 progress: bool = True) -> ImageRecords:
    """`data` None: the embedded procedural dataset (generated once into the cache); else any adapter format."""
    if data is None:
        from dermfast.data.toy import generate_toy_dataset
        return read_csv(generate_toy_dataset(n_images=toy_images, image_size=toy_image_size, seed=0,
                                             progress=progress))
    return open_any(data)


def prepare_data(data: str | None, run_dir: Path, *, synthetic: str | None = None, seed: int = 0,
                 fractions=(0.8, 0.1, 0.1), require_labels: bool = True, toy_images: int = 1200,
                 toy_image_size: int = 128, workers: int = 0, progress: bool = True) -> PreparedData:
    """Open, validate, check and split; writes run_dir/data_report.csv and run_dir/splits.csv."""
    from dermfast.data.splits import save_splits, split_records
    from dermfast.data.toy import default_cache_dir
    from dermfast.data.validate import require_usable, validate_records

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records = open_records(data, toy_images=toy_images, toy_image_size=toy_image_size, progress=progress)
    labelled = bool(records.classes) and bool(np.all(records.labels >= 0))
    if require_labels and not labelled:
        raise DatasetError(f"{records.root}: this stage needs labelled images (class subfolders or a label csv)")
    if synthetic is not None:
        if not labelled:
            raise DatasetError("synthetic images need a labelled real dataset to join")
        records = concat(records, read_synthetic(synthetic, records.classes))
    records, report = validate_records(records, cache_dir=default_cache_dir() / "validate", workers=workers,
                                       progress=progress)
    report.write(run_dir)
    require_usable(records, report, require_all_classes=labelled)
    print(f"data: {report.summary()}")

    real = np.flatnonzero(records.source == 0)
    if labelled and len(real):
        real_splits = split_records(records.subset(real), fractions=fractions, seed=seed)
        splits = {k: real[v] for k, v in real_splits.items()}
    else:  # unlabelled (MAE on a flat folder): a seeded random split
        perm = real[np.random.default_rng([seed, 0]).permutation(len(real))]
        cuts = np.cumsum(np.round(np.asarray(fractions) / np.sum(fractions) * len(real)).astype(int))[:-1]
        splits = {k: np.sort(v) for k, v in zip(("train", "val", "test"), np.split(perm, cuts))}
    splits["train"] = np.concatenate([splits["train"], np.flatnonzero(records.source == 1)])
    if len(splits["train"]) == 0:
        raise DatasetError(f"no training images left after the split ({len(records)} usable images)")
    save_splits(splits, records, run_dir / "splits.csv")
    return PreparedData(records, splits, report)
