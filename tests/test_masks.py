"""Lesion masks: ISIC 2017 / 2018 task 1 and image + mask pair folders read, masks stored as 0 / 255 grey PNGs
by validation (a mask of another size is reported, never used), the user's image paths kept in `origins` and in
data_report.csv, and the toy dataset's own masks (its JPEGs byte-identical to before masks existed)."""
import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermfast.data.adapters import detect_format, open_any, read_csv
from dermfast.data.masks import binarise, find_masks
from dermfast.data.records import ImageRecords
from dermfast.data.toy import generate_toy_dataset, render_lesion
from dermfast.data.validate import validate_records


def _save(path: Path, arr, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path, format=fmt)
    return path


def _lesion(k, shape=(10, 14)):
    m = np.zeros(shape, np.uint8)
    m[2:6 + k % 3, 3:9] = 255
    return m


def test_isic_task1_layout(tmp_path):
    for k in range(3):
        name = f"ISIC_{k:07d}"
        _save(tmp_path / "ISIC2018_Task1-2_Training_Input" / f"{name}.jpg", np.full((10, 14, 3), 90, np.uint8))
        if k != 1:
            _save(tmp_path / "ISIC2018_Task1_Training_GroundTruth" / f"{name}_segmentation.png", _lesion(k))
    assert detect_format(tmp_path) == "pairs"
    rec = open_any(tmp_path)
    assert [Path(p).name for p in rec.paths] == ["ISIC_0000000.jpg", "ISIC_0000001.jpg", "ISIC_0000002.jpg"]
    assert [Path(m).name if m else "" for m in rec.masks] == ["ISIC_0000000_segmentation.png", "",
                                                              "ISIC_0000002_segmentation.png"]
    assert rec.classes == [] and (rec.labels == -1).all()


@pytest.mark.parametrize("layout", ["images+masks", "flat"])
def test_pair_folders(tmp_path, layout):
    for k in range(2):
        if layout == "flat":
            _save(tmp_path / f"x{k}.png", np.full((10, 14, 3), 90, np.uint8))
            _save(tmp_path / f"x{k}_mask.png", _lesion(k))
        else:
            _save(tmp_path / "images" / f"x{k}.jpg", np.full((10, 14, 3), 90, np.uint8))
            _save(tmp_path / "masks" / f"x{k}.png", _lesion(k))
    rec = open_any(tmp_path)
    assert [Path(p).stem for p in rec.paths] == ["x0", "x1"]  # masks are not taken for images
    assert all(Path(m).stem.startswith(f"x{k}") for k, m in enumerate(rec.masks))


def test_binarise_reads_0_1_and_0_255_masks_alike():
    np.testing.assert_array_equal(binarise(np.array([[0, 1], [1, 0]])), [[0, 255], [255, 0]])
    np.testing.assert_array_equal(binarise(np.array([[0, 255], [200, 3]])), [[0, 255], [255, 0]])
    assert binarise(np.zeros((2, 2))).max() == 0


def test_validation_stores_masks_keeps_origins_and_reports_a_wrong_size_mask(tmp_path):
    img = [_save(tmp_path / f"i{k}.bmp", np.full((10, 14, 3), 60 + k, np.uint8), "BMP") for k in range(3)]
    masks = [_save(tmp_path / "m0.bmp", (_lesion(0) > 0).astype(np.uint8), "BMP"),  # a 0 / 1 BMP
             _save(tmp_path / "m1.png", _lesion(1)), _save(tmp_path / "m2.png", np.zeros((9, 14)))]
    rec = ImageRecords([str(p) for p in img], [0, 0, 0], ["lesion"], masks=[str(m) for m in masks])
    out, report = validate_records(rec, cache_dir=tmp_path / "cache", progress=False)
    assert out.origins == [str(p) for p in img] and all("converted" in p for p in out.paths)  # BMP -> PNG
    stored = np.asarray(Image.open(out.masks[0]))
    assert stored.dtype == np.uint8 and set(np.unique(stored)) == {0, 255}
    np.testing.assert_array_equal(stored, _lesion(0))
    assert out.masks[2] == "" and report.mask_skipped == [(str(img[2]), f"mask {masks[2]} is 14x9, the image 14x10")]
    rows = list(csv.reader(open(report.write(tmp_path / "run"))))
    assert {r[0] for r in rows[1:]} == {str(p) for p in img}  # the user's paths, never the cache copies
    assert ["mask-skipped"] == [r[1] for r in rows if r[1] == "mask-skipped"]


def test_labels_csv_mask_column(tmp_path):
    _save(tmp_path / "images" / "a.jpg", np.full((10, 14, 3), 90, np.uint8))
    _save(tmp_path / "images" / "b.jpg", np.full((10, 14, 3), 90, np.uint8))
    _save(tmp_path / "masks" / "a.png", _lesion(0))
    (tmp_path / "labels.csv").write_text("image,label,mask\na,nv,masks/a.png\nb,mel,\nc,nv,masks/zz.png\n")
    rec = read_csv(tmp_path)
    assert rec.masks.tolist() == [str(tmp_path / "masks" / "a.png"), ""]
    assert rec.missing == [("c", f"mask file not found ({tmp_path / 'masks' / 'zz.png'})")]


def test_toy_images_are_byte_identical_and_masks_cover_the_painted_lesion(tmp_path):
    root = generate_toy_dataset(tmp_path / "t", n_images=14, image_size=48, seed=0, progress=False)
    h = hashlib.sha256()
    for p in sorted((root / "images").iterdir()):
        h.update(p.read_bytes())
    # pinned from the generator before masks were added (commit 908a662): the JPEGs did not change
    assert h.hexdigest() == "310e05856d8e8220e0d97e4e6346719c2fb16060149b9f3a7453cb01675aaa98"
    rec = read_csv(root)
    assert len(rec) == 14 and all(rec.masks)
    gaps = []
    for i in range(14):
        img = np.asarray(Image.open(rec.paths[i]).convert("RGB"), np.float64)
        m = np.asarray(Image.open(rec.masks[i])) > 127
        assert 0.02 < m.mean() < 0.9
        gaps.append(np.abs(img[m].mean(0) - img[~m].mean(0)).sum())
    # the lesion under the mask differs from the skin around it (some classes are painted faintly on purpose)
    assert min(gaps) > 5 and np.median(gaps) > 30, gaps
    img, mask = render_lesion(np.random.default_rng([0, 3]), "mel", 48, with_mask=True)
    np.testing.assert_array_equal(img, render_lesion(np.random.default_rng([0, 3]), "mel", 48))


def test_find_masks_in_given_folders(tmp_path):
    _save(tmp_path / "gt" / "a_segmentation.png", _lesion(0))
    assert find_masks([tmp_path / "img" / "a.jpg", tmp_path / "img" / "b.jpg"], dirs=[tmp_path / "gt"]).tolist() \
        == [str(tmp_path / "gt" / "a_segmentation.png"), ""]
