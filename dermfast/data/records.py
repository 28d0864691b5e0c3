"""Image records: the one in-memory form every dataset adapter produces and every loader consumes.

`ImageRecords` holds file paths (or keys into a `store` of encoded images, e.g. an HDF5 file), integer labels
(-1 = unlabelled), the class names, a source flag per image (0 real, 1 synthetic), and optional groups
(e.g. HAM10000 lesion_id, so a split never puts one lesion on both sides), optional lesion masks (one mask file
per image, "" where an image has none) and the origin of each image: the path as the user gave it, kept when the
record is pointed at a converted copy in the cache, so that every file a user reads names the image they know
(`origins`; for a store, the key). Loaders read encoded bytes through
`read_bytes(i)` and decode themselves (PIL, or DALI's decoder), so files and stores look the same to them.

This module is the bottom of dermfast.data: it imports no other dermfast module. Reading a dataset from disk
(`dermfast.data.adapters.open_any`, which raises `DatasetError` for a path that does not exist or holds no
images) sits above it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    groups: np.ndarray | None = None       # [N] object/str, e.g. lesion_id; None = every image its own group
    store: object | None = None            # has .read(key) -> bytes; None = paths are files
    missing: list = field(default_factory=list)  # [(name, reason)] rows an adapter skipped; never silent
    masks: np.ndarray | None = None        # [N] object: mask file path, "" = none for that image; None = no masks
    origins: list[str] | None = None       # [N] the image's path as the user gave it; None -> `paths`

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.source is None:
            self.source = np.zeros(len(self.paths), dtype=np.uint8)
        self.source = np.asarray(self.source, dtype=np.uint8)
        if not (len(self.paths) == len(self.labels) == len(self.source)):
            raise ValueError("ImageRecords: paths, labels and source must have the same length")
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=object)
            if len(self.groups) != len(self.paths):
                raise ValueError("ImageRecords: groups must have one entry per image")
        if self.masks is not None:
            self.masks = np.asarray(["" if m is None else str(m) for m in self.masks] + [None], dtype=object)[:-1]
            if len(self.masks) != len(self.paths):
                raise ValueError("ImageRecords: masks must have one entry per image")
        self.origins = list(self.paths) if self.origins is None else [str(o) for o in self.origins]
        if len(self.origins) != len(self.paths):
            raise ValueError("ImageRecords: origins must have one entry per image")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> "ImageRecords":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageRecords([self.paths[i] for i in idx], self.labels[idx], list(self.classes),
                            self.source[idx], self.root,
                            None if self.groups is None else self.groups[idx], self.store, list(self.missing),
                            None if self.masks is None else self.masks[idx], [self.origins[i] for i in idx])

    @property
    def has_masks(self) -> bool:
        """True when the records carry masks (some entries may still be "": no mask for that image)."""
        return self.masks is not None

    def read_mask_bytes(self, i: int) -> bytes | None:
        """The encoded mask of image i (a file), or None where it has none."""
        if self.masks is None or not self.masks[i]:
            return None
        with open(self.masks[i], "rb") as f:
            return f.read()

    def read_bytes(self, i: int) -> bytes:
        """The encoded image i (JPEG, PNG, ...), from its file or from the store."""
        if self.store is not None:
            return self.store.read(self.paths[i])
        with open(self.paths[i], "rb") as f:
            return f.read()

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}
