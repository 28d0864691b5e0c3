"""Validate every image before training: decodable odd images are converted, the rest skipped, all of it reported.

DALI's decoder takes a whole pipeline down on one bad file, so the data layer checks each image once, through
`records.read_bytes(i)` (files and stores alike), with PIL:

- missing / unreadable / zero-byte / not an image / header over `max_pixels` (decompression bomb) / truncated or
  corrupt data -> **skipped**, with the reason;
- decodable but not *plain* -> **converted** to an 8-bit RGB PNG in ``cache_dir/converted/`` and the record points
  there. Plain = baseline/progressive Huffman 8-bit JPEG in RGB or L, or 8-bit PNG in RGB, RGBA or L: what both
  DALI and the PIL loader (`im.convert("RGB")`) decode alike. Everything else (CMYK JPEG, 16-bit or palette PNG,
  BMP, TIFF, WebP, LA, ...) is converted; 16-bit grey is scaled by 1/257 (rounded), never clipped.

Verdicts are cached in ``cache_dir/validate-cache.json`` keyed by (file, size, mtime) - or (store key, size,
crc32) for stores - so a second run over unchanged images only stats the files. `ValidationReport.write(run_dir)`
writes ``data_report.csv`` (image, status, reason) listing every skipped, converted and adapter-missing image;
`require_usable` turns "nothing left" or "a class left empty" into a one-line `DatasetError`.
No exception escapes for a single image, in-process or in a worker (a crashed worker only costs its images).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dermfast.data.records import DatasetError, ImageRecords

CACHE_VERSION = 1
PLAIN_JPEG_SOF = (0xC0, 0xC1, 0xC2)          # baseline, extended sequential, progressive (Huffman)
PLAIN_PNG = {0: "L", 2: "RGB", 6: "RGBA"}    # colour type -> mode, 8-bit only


class OverrideStore:
    """A store whose keys in `overrides` are read from converted PNG files instead; picklable if `base` is."""

    def __init__(self, base, overrides: dict[str, str]):
        self.base, self.overrides = base, dict(overrides)

    def read(self, key) -> bytes:
        path = self.overrides.get(key)
        if path is None:
            return self.base.read(key)
        with open(path, "rb") as f:
            return f.read()

    def __getattr__(self, name):  # close(), path, ... of the wrapped store
        if name.startswith("__") or name in ("base", "overrides"):
            raise AttributeError(name)
        return getattr(self.base, name)


@dataclass
class ValidationReport:
    total: int = 0                                                  # images in records + adapter-missing ones
    ok: int = 0
    converted: list[tuple[str, str, str]] = field(default_factory=list)   # (key, converted_path, why)
    skipped: list[tuple[str, str]] = field(default_factory=list)          # (key, reason)
    missing: list[tuple[str, str]] = field(default_factory=list)          # (name, reason), from the adapter
    mask_skipped: list[tuple[str, str]] = field(default_factory=list)     # (image, reason): kept, without mask
    skipped_class: list[str | None] = field(default_factory=list)         # class of each skipped image
    cached: int = 0                                                 # verdicts taken from the cache
    path: Path | None = None                                        # data_report.csv, once written

    @property
    def n_usable(self) -> int:
        return self.ok + len(self.converted)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped) + len(self.missing)

    def counts(self) -> dict[str, int]:
        return {"total": self.total, "ok": self.ok, "converted": len(self.converted),
                "skipped": self.n_skipped, "missing": len(self.missing)}

    def write(self, run_dir) -> Path:
        """run_dir/data_report.csv: image (as the user gave it), status (skipped / missing / converted /
        mask-skipped: the image is used, its mask is not), reason."""
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(run_dir) / "data_report.csv"
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([("image", "status", "reason")] + [(k, "skipped", r) for k, r in self.skipped]
                                    + [(k, "missing", r) for k, r in self.missing]
                                    + [(k, "converted", f"{why} -> {p}") for k, p, why in self.converted]
                                    + [(k, "mask-skipped", r) for k, r in self.mask_skipped])
        return self.path

    def summary(self) -> str:
        miss = f" ({len(self.missing):,} missing)" if self.missing else ""
        see = f" (see {self.path})" if self.path is not None and (self.n_skipped or self.converted) else ""
        masks = f", {len(self.mask_skipped):,} masks unusable" if self.mask_skipped else ""
        see = see if not self.mask_skipped or see or self.path is None else f" (see {self.path})"
        return (f"validated {self.total:,} images: {self.n_usable:,} usable ({len(self.converted):,} converted), "
                f"{self.n_skipped:,} skipped{miss}{masks}{see}")


# ----------------------------------------------------------------------------------------------------- one image
class _TrackedIO(io.BytesIO):
    """Notes a read past the end: catches truncation even if some code set ImageFile.LOAD_TRUNCATED_IMAGES."""
    hit_eof = False

    def read(self, n=-1):
        b = super().read(n)
        if n != 0 and not b:
            self.hit_eof = True
        return b


def _open(fp, data: bytes):
    """Image.open, but PIL's own bomb limit (2 x MAX_IMAGE_PIXELS) is left to our max_pixels check: on
    DecompressionBombError the header is parsed again by the format plugin directly (no global is changed)."""
    try:
        return Image.open(fp)
    except Image.DecompressionBombError:
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            if accept and not accept(data[:16]):
                continue
            try:
                fp.seek(0)
                return factory(fp, "")
            except Exception:
                continue
        raise


def _jpeg_sof(data: bytes) -> tuple[int, int] | None:
    """(SOF marker, sample precision) of a JPEG stream, walking its segments; None if not found."""
    i, n = 2, len(data)
    while i + 4 < n and data[i] == 0xFF:
        m = data[i + 1]
        if m == 0xFF:
            i += 1
        elif m == 0x01 or 0xD0 <= m <= 0xD8:
            i += 2
        elif 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            return m, data[i + 4]
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _not_plain(im, data: bytes) -> str | None:
    """None if both decoders read this image as is, else why it needs converting."""
    fmt = "JPEG" if im.format == "MPO" else im.format
    if fmt == "JPEG":
        sof = _jpeg_sof(data)
        if im.mode in ("RGB", "L") and sof is not None and sof[0] in PLAIN_JPEG_SOF and sof[1] == 8:
            return None
        extra = f", SOF{sof[0] - 0xC0} {sof[1]}-bit" if sof and im.mode in ("RGB", "L") else ""
        return f"JPEG mode {im.mode}{extra}"
    if fmt == "PNG":
        depth, ctype = data[24], data[25]
        if depth == 8 and PLAIN_PNG.get(ctype) == im.mode:
            return None
        return f"PNG mode {im.mode} {depth}-bit"
    return f"{fmt} mode {im.mode}"


def _to_rgb8(im) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im)
        if im.mode == "F":
            a = np.clip(np.rint(a * (255.0 if np.nanmax(a) <= 1.0 else 1.0)), 0, 255)
        else:  # 16-bit (I from older PIL's 16-bit PNG too): round(v / 257)
            a = (np.clip(a.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(np.nan_to_num(a).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def inspect_image(data: bytes, max_pixels: int, out_png: str | None) -> tuple[str, str, str | None]:
    """(status, reason, converted_path) for one encoded image; status is ok / converted / skipped."""
    if not data:
        return "skipped", "empty file (0 bytes)", None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning, palette-transparency notes, EXIF quirks
        fp = _TrackedIO(data)
        try:
            im = _open(fp, data)
        except UnidentifiedImageError:
            return "skipped", "not an image (unknown format)", None
        except Image.DecompressionBombError as e:
            return "skipped", f"too large: {e}", None
        except Exception as e:
            return "skipped", f"corrupt header: {type(e).__name__}: {e}", None
        w, h = im.size
        if w * h > max_pixels:
            return "skipped", f"too large: {w}x{h} (> {max_pixels:,} pixels)", None
        if w == 0 or h == 0:
            return "skipped", f"empty image: {w}x{h}", None
        why = _not_plain(im, data)
        if why is None and im.format in ("JPEG", "MPO") and max(w, h) > 64:
            im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))  # entropy-decodes all data, IDCT at 1/8 scale
        fp.hit_eof = False
        try:
            im.load()
        except Image.DecompressionBombError as e:  # a plugin's own check at load time (TIFF, GIF, ...)
            return "skipped", f"too large: {e}", None
        except Exception as e:
            return "skipped", f"corrupt: {type(e).__name__}: {e}", None
        if fp.hit_eof:
            return "skipped", "corrupt: image file is truncated", None
        if why is None:
            return "ok", "", None
        rgb = _to_rgb8(im)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out_png}.{os.getpid()}.tmp"
    rgb.save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, out_png)
    return "converted", why, out_png


def _check(item) -> tuple[str, str, str | None]:
    """Worker entry: item = (path or None, bytes or None, max_pixels, out_png). Never raises."""
    path, data, max_pixels, out_png = item
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        return inspect_image(data, max_pixels, out_png)
    except FileNotFoundError:
        return "skipped", "missing file", None
    except Exception as e:
        return "skipped", f"error: {type(e).__name__}: {e}", None


# ---------------------------------------------------------------------------------------------------- the run
class _Pool:
    """_check over a batch on a process pool; a batch whose pool broke (a worker killed by a segfault or the
    OOM killer) is redone one image at a time, so only the culprit is lost."""

    def __init__(self, workers: int):
        self.workers, self.ex = workers, None

    def _fresh(self, workers: int):
        if self.ex is not None:
            self.ex.shutdown(cancel_futures=True)
        self.ex = ProcessPoolExecutor(workers)

    def map(self, items: list) -> list:
        if self.ex is None:
            self._fresh(self.workers)
        try:
            return list(self.ex.map(_check, items, chunksize=8))
        except BrokenProcessPool:
            out = []
            self._fresh(1)
            for it in items:
                try:
                    out.append(self.ex.submit(_check, it).result())
                except BrokenProcessPool:
                    out.append(("skipped", "decoder crashed (worker process died)", None))
                    self._fresh(1)
            self._fresh(self.workers)
            return out

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown()


def _load_cache(path: Path, max_pixels: int) -> dict:
    try:
        with open(path) as f:
            c = json.load(f)
        if c.get("version") == CACHE_VERSION and c.get("max_pixels") == max_pixels:
            return c["entries"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return {}


def _save_cache(path: Path, max_pixels: int, entries: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"version": CACHE_VERSION, "max_pixels": max_pixels, "entries": entries}, f)
    os.replace(tmp, path)


def _precheck(records, i, store, cache, conv_dir, max_pixels, todo):
    """(status, reason, converted, from_cache) for image i if known without decoding, else queue it on `todo`."""
    key, lab = records.paths[i], int(records.labels[i])
    if lab < -1 or lab >= len(records.classes):
        return "skipped", f"unknown label {lab} ({len(records.classes)} classes)", None, 0
    data = None
    try:
        if store is None:
            st = os.stat(key)
            if st.st_size == 0:
                return "skipped", "empty file (0 bytes)", None, 0
            ck, sig = f"f:{os.path.abspath(key)}", [st.st_size, st.st_mtime_ns]
        else:
            data = store.read(key)
            ck, sig = f"s:{key}", [len(data), zlib.crc32(data)]
    except FileNotFoundError:
        return "skipped", "missing file", None, 0
    except Exception as e:
        return "skipped", f"unreadable: {type(e).__name__}: {e}", None, 0
    hit = cache.get(ck)
    if hit is not None and hit[:2] == sig and (hit[2] != "converted" or os.path.isfile(hit[4])):
        return hit[2], hit[3], hit[4], 1
    name = hashlib.sha1(f"{ck}|{sig[0]}|{sig[1]}".encode()).hexdigest()[:24]
    todo.append((i, ck, sig, (key if store is None else None, data, max_pixels, str(conv_dir / f"{name}.png"))))
    return None


def validate_records(records: ImageRecords, *, cache_dir: Path, max_pixels: int = 64_000_000, workers: int = 0,
                     progress: bool = True) -> tuple[ImageRecords, ValidationReport]:
    """Check every image of `records`; returns (usable records, report). Converted images point at PNGs under
    cache_dir/converted (for a store: an `OverrideStore`). `workers` > 1 uses a process pool."""
    from tqdm import tqdm

    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_path, conv_dir = cache_dir / "validate-cache.json", cache_dir / "converted"
    cache = _load_cache(cache_path, max_pixels)
    store, n = records.store, len(records)
    report = ValidationReport(total=n)
    for m in getattr(records, "missing", None) or []:
        name, reason = (m if isinstance(m, (tuple, list)) else (m, "listed, but no such file"))
        report.missing.append((str(name), str(reason)))
    report.total += len(report.missing)

    verdicts: list = [None] * n
    todo: list[tuple[int, str, list, tuple]] = []            # (index, cache key, signature, worker item)
    pool = _Pool(workers) if workers > 1 else None
    bar = tqdm(total=n, desc="validating images", unit="img", disable=not progress, mininterval=1.0)

    def flush():  # decode a batch (store bytes are held for one batch only)
        if not todo:
            return
        items = [t[3] for t in todo]
        results = pool.map(items) if pool is not None else [_check(it) for it in items]
        for (i, ck, sig, _), res in zip(todo, results):
            verdicts[i] = res
            if not res[1].startswith(("missing file", "error:", "decoder crashed")):  # those: retried next run
                cache[ck] = [*sig, *res]
        bar.update(len(todo))
        todo.clear()

    try:
        for i in range(n):
            verdicts[i] = _precheck(records, i, store, cache, conv_dir, max_pixels, todo)
            if verdicts[i] is not None:
                report.cached += verdicts[i][3]
                verdicts[i] = verdicts[i][:3]
                bar.update(1)
            elif len(todo) >= 64 * max(workers, 1):
                flush()
        flush()
    finally:
        bar.close()
        if pool is not None:
            pool.close()
        _save_cache(cache_path, max_pixels, cache)

    keep, converted_at = [], {}
    for i, (status, reason, conv) in enumerate(verdicts):
        key = records.origins[i]  # the user's name for the image in every report
        if status == "skipped":
            report.skipped.append((key, reason))
            lab = int(records.labels[i])
            report.skipped_class.append(records.classes[lab] if 0 <= lab < len(records.classes) else None)
            continue
        keep.append(i)
        if status == "converted":
            report.converted.append((key, conv, reason))
            converted_at[len(keep) - 1] = conv
        else:
            report.ok += 1
    out = records.subset(keep)
    if store is None:
        for j, conv in converted_at.items():
            out.paths[j] = conv
    elif converted_at:
        out.store = OverrideStore(store, {out.paths[j]: conv for j, conv in converted_at.items()})
    if out.has_masks:
        _prepare_masks(out, report, cache_dir / "masks")
    return out, report


def _prepare_masks(records: ImageRecords, report: ValidationReport, out_dir: Path) -> None:
    """Point each usable image's mask at its stored 0 / 255 grey PNG (`masks.prepare_mask`); a mask that cannot
    be used (unreadable, another size than the image) is dropped ("") and reported as mask-skipped."""
    from dermfast.data.augment import image_size
    from dermfast.data.masks import prepare_mask
    for j, m in enumerate(records.masks):
        if not m:
            continue
        try:
            size = image_size(records.read_bytes(j))
        except (OSError, ValueError) as e:
            stored, reason = "", f"image size unreadable ({e})"
        else:
            stored, reason = prepare_mask(m, size, out_dir)
        records.masks[j] = stored
        if reason:
            report.mask_skipped.append((records.origins[j], reason))


def require_usable(records: ImageRecords, report: ValidationReport, require_all_classes: bool = True) -> None:
    """Raise DatasetError (one line) if `records` (validate_records' output) holds no image, or a class has none."""
    see = f"see {report.path}" if report.path is not None else "see the data report"
    if len(records) == 0:
        raise DatasetError(f"no usable images: {report.n_skipped:,} skipped, {see}")
    if not require_all_classes or not records.classes:
        return
    counts = np.bincount(records.labels[records.labels >= 0], minlength=len(records.classes))
    for c, cnt in zip(records.classes, counts):
        if cnt == 0:
            lost = [k for (k, _), cl in zip(report.skipped, report.skipped_class) if cl == c]
            if not lost:
                raise DatasetError(f"class {c!r} has no images")
            names = ", ".join(os.path.basename(str(k)) for k in lost[:3]) + (", ..." if len(lost) > 3 else "")
            raise DatasetError(f"class {c!r} has no usable images ({len(lost)} skipped: {names}; {see})")
