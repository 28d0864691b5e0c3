"""Image validation before training: every odd or broken input is converted or skipped and reported, never a crash."""
from __future__ import annotations

import csv
import io
import multiprocessing as mp
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from dermfast.data import validate as V
from dermfast.data.adapters import read_csv
from dermfast.data.records import DatasetError, ImageRecords
from dermfast.data.validate import OverrideStore, ValidationReport, require_usable, validate_records
from tests.corrupt_corpus import encode, huge_png_header, make_corpus


class DictStore:
    """An HDF5-like store of encoded images: .read(key) -> bytes. Module level, so it pickles."""

    def __init__(self, blobs: dict[str, bytes]):
        self.blobs = blobs

    def read(self, key: str) -> bytes:
        return self.blobs[key]


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


def _records(corpus, classes=("mel", "nv")) -> ImageRecords:
    names = list(corpus)
    return ImageRecords([str(corpus[n][0]) for n in names], np.arange(len(names)) % len(classes), list(classes))


def _verdicts(records: ImageRecords, report: ValidationReport) -> dict[str, str]:
    """key -> ok / converted / skipped, from the report (and the count of ok images)."""
    out = {k: "skipped" for k, _ in report.skipped}
    out.update({k: "converted" for k, _, _ in report.converted})
    for k in records.paths:
        out.setdefault(k, "ok")
    assert sum(v == "ok" for v in out.values()) == report.ok
    return out


def _key_to_name(corpus):
    return {str(p): n for n, (p, _) in corpus.items()}


def test_every_corpus_file_gets_its_expected_outcome(corpus, tmp_path):
    rec = _records(corpus)
    out, report = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    names = _key_to_name(corpus)
    got = {names[k]: v for k, v in _verdicts(rec, report).items()}
    assert got == {n: e for n, (_, e) in corpus.items()}
    reasons = {names[k]: r for k, r in report.skipped}
    assert "truncated" in reasons["truncated_jpeg"] and "truncated" in reasons["truncated_png"]
    assert "0 bytes" in reasons["zero_byte_jpeg"]
    assert reasons["huge_png_header"].startswith("too large: 20000x20000")
    assert reasons["huge_jpeg_header"].startswith("too large: 20000x20000")
    assert "not an image" in reasons["text_as_jpeg"] and "missing" in reasons["missing_file"]
    # output records: the usable images only, converted ones pointing at PNGs in the cache
    n_usable = sum(e != "skipped" for _, e in corpus.values())
    assert len(out) == report.n_usable == n_usable and report.total == len(corpus)
    conv = {p for _, p, _ in report.converted}
    assert conv <= set(out.paths) and all(p.startswith(str(tmp_path / "cache" / "converted")) for p in conv)
    kept = [i for i, k in enumerate(rec.paths) if names[k] in {n for n, (_, e) in corpus.items() if e != "skipped"}]
    assert out.labels.tolist() == rec.labels[kept].tolist()


def test_converted_files_are_rgb8_pngs_matching_the_source(corpus, tmp_path):
    rec = _records(corpus)
    _, report = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    names = _key_to_name(corpus)
    conv = {names[k]: (p, why) for k, p, why in report.converted}
    assert set(conv) == {n for n, (_, e) in corpus.items() if e == "converted"}
    for name, (path, why) in conv.items():
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 24)), name
            got = np.asarray(im)
        with Image.open(corpus[name][0]) as src:
            if name == "grey16_png":
                v = np.asarray(src).astype(np.int64)
                assert src.mode.startswith("I") and v.max() > 255 and "16-bit" in why
                want = np.rint(v / 257.0).astype(np.uint8)
                assert np.array_equal(got, np.repeat(want[..., None], 3, -1))
                assert np.unique(got).size > 16  # scaled, not clipped to 255
                continue
            want = np.asarray(src.convert("RGB"))
        assert np.array_equal(got, want), name
        if name == "cmyk_jpeg":
            assert "CMYK" in why
            # and close to the RGB image it was made from (JPEG in between)
            with Image.open(corpus["rgb_png"][0]) as orig:
                assert np.abs(got.astype(int) - np.asarray(orig).astype(int)).mean() < 12


def test_report_csv_lists_every_skipped_converted_and_missing_image(corpus, tmp_path):
    rec = _records(corpus)
    rec.missing = ["gone_1.jpg", ("gone_2.jpg", "row 7: no such file")]
    _, report = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    path = report.write(tmp_path / "runs" / "x")
    assert path == tmp_path / "runs" / "x" / "data_report.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"image", "status", "reason"} and all(r["reason"] for r in rows)
    listed = {r["image"]: r["status"] for r in rows}
    for name, (p, expected) in corpus.items():
        if expected != "ok":
            assert listed[str(p)] == expected, name
        else:
            assert str(p) not in listed
    assert listed["gone_1.jpg"] == listed["gone_2.jpg"] == "missing"
    assert report.counts() == {"total": len(corpus) + 2, "ok": report.ok, "converted": len(report.converted),
                               "skipped": len(report.skipped) + 2, "missing": 2}
    s = report.summary()
    assert s.startswith(f"validated {len(corpus) + 2} images: {report.n_usable} usable "
                        f"({len(report.converted)} converted), {report.n_skipped} skipped (2 missing)")
    assert str(path) in s


def test_labels_csv_rows_without_a_file_are_reported(corpus, tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(corpus["rgb_jpeg"][0].read_bytes())
    (root / "images" / "b.jpg").write_bytes(corpus["truncated_jpeg"][0].read_bytes())
    (root / "labels.csv").write_text("image,dx\na,nv\nb,mel\nc,nv\n")
    out, report = validate_records(read_csv(root), cache_dir=tmp_path / "cache", progress=False)
    assert len(out) == 1 and [m[0] for m in report.missing] == ["c"]
    report.write(tmp_path / "run")
    with pytest.raises(DatasetError, match=r"class 'mel' has no usable images \(1 skipped: b.jpg"):
        require_usable(out, report)


def test_cached_second_run_gives_the_same_result_from_the_cache(corpus, tmp_path):
    rec = _records(corpus)
    out1, r1 = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "cache" / "validate-cache.json").is_file() and r1.cached == 0
    out2, r2 = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    assert out2.paths == out1.paths and r2.skipped == r1.skipped and r2.converted == r1.converted
    # every image that reached the decoder comes from the cache (missing / zero-byte ones are only stat'ed)
    assert r2.cached == len(corpus) - 2
    # a changed file is validated again; a deleted converted PNG is rebuilt
    p = corpus["rgb_jpeg"][0]
    p.write_bytes(corpus["truncated_jpeg"][0].read_bytes())
    os.remove(r1.converted[0][1])
    _, r3 = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    assert str(p) in dict(r3.skipped) and r3.cached == len(corpus) - 4
    assert os.path.isfile(r1.converted[0][1])
    # a different max_pixels drops the cache
    _, r4 = validate_records(rec, cache_dir=tmp_path / "cache", max_pixels=10**7, progress=False)
    assert r4.cached == 0


def test_require_usable_errors(corpus, tmp_path):
    bad = [n for n, (_, e) in corpus.items() if e == "skipped"]
    rec = ImageRecords([str(corpus[n][0]) for n in bad], np.zeros(len(bad)), ["nv"])
    out, report = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    report.write(tmp_path / "run")
    with pytest.raises(DatasetError, match=rf"^no usable images: {len(bad)} skipped, see .*data_report.csv$"):
        require_usable(out, report)

    good = [n for n, (_, e) in corpus.items() if e != "skipped"]
    paths = [str(corpus[n][0]) for n in good] + [str(corpus["truncated_jpeg"][0]), str(corpus["zero_byte_jpeg"][0])]
    labels = [0] * len(good) + [2, 2]
    rec = ImageRecords(paths, labels, ["nv", "mel", "df"])
    out, report = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(DatasetError) as e:
        require_usable(out, report)
    msg = str(e.value)
    assert "\n" not in msg and "mel" in msg and "has no images" in msg  # 'mel' never had one
    rec.labels[0] = 1
    out, report = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(DatasetError, match=r"class 'df' has no usable images \(2 skipped: truncated.jpg, empty.jpg"):
        require_usable(out, report)
    require_usable(out, report, require_all_classes=False)  # images remain: fine without the class check


def test_unknown_label_is_skipped(corpus, tmp_path):
    p = str(corpus["rgb_jpeg"][0])
    rec = ImageRecords([p, p], [0, 5], ["nv"])
    out, report = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    assert len(out) == 1 and "unknown label 5" in report.skipped[0][1]


def test_parallel_run_matches_serial(corpus, tmp_path):
    rec = _records(corpus)
    out1, r1 = validate_records(rec, cache_dir=tmp_path / "c1", progress=False)
    out2, r2 = validate_records(rec, cache_dir=tmp_path / "c2", workers=2, progress=False)
    assert r2.skipped == r1.skipped and r2.ok == r1.ok
    assert [(k, w) for k, _, w in r2.converted] == [(k, w) for k, _, w in r1.converted]
    for (_, a, _), (_, b, _) in zip(r1.converted, r2.converted):
        assert os.path.basename(a) == os.path.basename(b)
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert out1.labels.tolist() == out2.labels.tolist()


def _crash_on_marker(data, max_pixels, out_png):
    if data.startswith(b"CRASH"):
        os._exit(11)  # a decoder segfault, as the worker sees it
    return _real_inspect(data, max_pixels, out_png)


_real_inspect = V.inspect_image


@pytest.mark.skipif(mp.get_start_method() != "fork", reason="patching the worker needs fork")
def test_a_dying_worker_costs_only_its_image(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(V, "inspect_image", _crash_on_marker)
    crash = tmp_path / "crash.jpg"
    crash.write_bytes(b"CRASH" + bytes(100))
    names = ["rgb_jpeg", "cmyk_jpeg", "truncated_jpeg", "rgb_png"]
    rec = ImageRecords([str(corpus[n][0]) for n in names[:2]] + [str(crash)] + [str(corpus[n][0]) for n in names[2:]],
                       np.zeros(5), ["nv"])
    out, report = validate_records(rec, cache_dir=tmp_path / "cache", workers=2, progress=False)
    assert dict(report.skipped)[str(crash)].startswith("decoder crashed")
    assert report.ok == 2 and len(report.converted) == 1 and len(report.skipped) == 2


def test_store_records(corpus, tmp_path):
    blobs = {name: p.read_bytes() for name, (p, e) in corpus.items() if p.exists()}
    rec = ImageRecords(list(corpus), np.zeros(len(corpus)), ["nv"], store=DictStore(blobs))
    for workers in (0, 2):
        out, report = validate_records(rec, cache_dir=tmp_path / "cache", workers=workers, progress=False)
        got = _verdicts(rec, report)
        assert got == {n: e for n, (_, e) in corpus.items()}
        assert "KeyError" in dict(report.skipped)["missing_file"]
        assert isinstance(out.store, OverrideStore) and out.paths == [n for n in corpus if got[n] != "skipped"]
        for i, key in enumerate(out.paths):
            data = out.read_bytes(i)
            if got[key] == "ok":
                assert data == blobs[key]
            else:
                with Image.open(io.BytesIO(data)) as im:
                    assert (im.format, im.mode) == ("PNG", "RGB")
    assert report.cached == len(blobs)  # the second pass (workers=2) read every verdict from the cache
    # the override store pickles (DataLoader workers) and forwards other attributes to the wrapped store
    import pickle
    s2 = pickle.loads(pickle.dumps(out.store))
    assert s2.read("cmyk_jpeg") == out.store.read("cmyk_jpeg") and s2.blobs is not None


def test_pil_globals_are_neither_needed_nor_changed(corpus, tmp_path, monkeypatch):
    # somebody else switched PIL to tolerate truncated files: truncation is still caught, locally
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    # and PIL's own bomb limit is below our max_pixels: our limit decides, PIL's error never escapes
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    rec = _records(corpus)
    _, report = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    got = {_key_to_name(corpus)[k]: v for k, v in _verdicts(rec, report).items()}
    # TIFF (like GIF, WebP, ...) checks PIL's limit again while loading: skipped, with PIL's reason
    assert got == {n: "skipped" if n == "tiff" else e for n, (_, e) in corpus.items()}
    assert dict(report.skipped)[str(corpus["tiff"][0])].startswith("too large: Image size (768 pixels)")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True and Image.MAX_IMAGE_PIXELS == 100


def test_max_pixels_is_configurable(corpus, tmp_path):
    rec = _records(corpus)
    out, report = validate_records(rec, cache_dir=tmp_path / "cache", max_pixels=500, progress=False)
    assert len(out) == 0 and all(r.startswith(("too large: 32x24", "missing", "empty", "not an image",
                                               "too large: 20000x20000")) for _, r in report.skipped)
    assert V.inspect_image(huge_png_header(30, 30), 10**6, None)[0] == "skipped"  # IDAT too short: corrupt


def test_large_jpeg_draft_decode_still_catches_truncation(tmp_path):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)), "JPEG", quality=90)
    assert V.inspect_image(data, 64_000_000, None) == ("ok", "", None)
    for cut in (len(data) // 2, len(data) - 100):
        status, reason, _ = V.inspect_image(data[:cut], 64_000_000, None)
        assert status == "skipped" and "truncated" in reason
