"""Dataset adapters on tiny synthetic copies of each real-world layout (built in tmp_path), plus isic-cc0-mini."""
import csv
import io
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermfast.data.adapters import (HAM_CLASSES, PH2_CLASSES, HDF5Store, check_usable, detect_format,
                                    materialise_npz, missing_summary, open_any, read_dermamnist, read_ham10000,
                                    read_isic2019, read_isic2024, read_ph2)
from dermfast.data.records import DatasetError

SHARED_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic-cc0-mini"


def _jpeg_bytes(seed: int, size=(12, 10), fmt="JPEG") -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def _image(path: Path, seed: int = 0, fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes(seed, fmt=fmt))
    return path


def _write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _decodes(records, i) -> tuple[int, int]:
    with Image.open(io.BytesIO(records.read_bytes(i))) as im:
        im.load()
        return im.size


# ----------------------------------------------------------------------------------------------- HAM10000
def _ham(root: Path) -> Path:
    rows = [("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")]
    dx = ["nv", "nv", "mel", "mel", "bkl", "bcc", "akiec", "vasc", "nv", "nv"]
    for i, d in enumerate(dx):
        rows.append((f"HAM_{i // 2:07d}", f"ISIC_{i:07d}", d, "histo", "45.0", "male", "back"))
        part = "HAM10000_images_part_1" if i < 5 else "ham10000_images_part_2"
        _image(root / part / f"ISIC_{i:07d}.jpg", i)
    rows.append(("HAM_0000099", "ISIC_0000099", "nv", "histo", "", "", ""))   # image file absent
    rows.append(("HAM_0000098", "ISIC_0000098", "xyz", "histo", "", "", ""))  # unknown dx
    rows.append(("HAM_0000097",))                                              # torn row
    _image(root / "HAM10000_images_part_1" / "ISIC_0000098.jpg", 98)
    _write_csv(root / "HAM10000_metadata.csv", rows)
    return root


def test_ham10000_labels_groups_missing(tmp_path):
    rec = read_ham10000(_ham(tmp_path))
    assert rec.classes == list(HAM_CLASSES)
    assert len(rec) == 10
    assert rec.class_counts() == {"akiec": 1, "bcc": 1, "bkl": 1, "df": 0, "mel": 2, "nv": 4, "vasc": 1}
    assert list(rec.groups[:4]) == ["HAM_0000000", "HAM_0000000", "HAM_0000001", "HAM_0000001"]
    reasons = dict(rec.missing)
    assert reasons["ISIC_0000099"] == "image file not found"
    assert reasons["ISIC_0000098"] == "unknown label 'xyz'"
    assert len(rec.missing) == 3  # + the torn row (no image_id)
    assert "3 rows skipped" in missing_summary(rec.missing)
    assert _decodes(rec, 7) == (12, 10)
    assert check_usable(rec)["df"] == 0
    with pytest.raises(DatasetError, match="class 'df' has no usable images"):
        check_usable(rec, require_all_classes=True)
    assert detect_format(tmp_path) == "ham10000"
    assert len(open_any(tmp_path / "HAM10000_metadata.csv")) == 10
    tab = tmp_path / "HAM10000_metadata.tab"  # the Dataverse download is tab-separated
    tab.write_text((tmp_path / "HAM10000_metadata.csv").read_text().replace(",", "\t"))
    assert read_ham10000(tmp_path, metadata=tab).labels.tolist() == rec.labels.tolist()


# ----------------------------------------------------------------------------------------------- ISIC 2019
ISIC19_COLS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def _onehot(k):
    return ["1.0" if j == k else "0.0" for j in range(len(ISIC19_COLS))]


def _isic2019(root: Path, unk=False) -> Path:
    rows = [["image", *ISIC19_COLS]]
    imgs = root / "ISIC_2019_Training_Input" / "ISIC_2019_Training_Input"
    for i, k in enumerate([0, 1, 1, 2, 3, 4, 5, 6, 7, 1]):
        name = f"ISIC_{i:07d}" + ("_downsampled" if i == 9 else "")
        rows.append([name, *_onehot(k)])
        _image(imgs / f"{name}.jpg", i)
    rows.append(["ISIC_0000020", *["1.0", "1.0"] + ["0.0"] * 7])   # two classes marked
    rows.append(["ISIC_0000021", *["0.0"] * 9])                      # none marked
    rows.append(["ISIC_0000022", "abc", *["0.0"] * 8])               # malformed
    rows.append(["ISIC_0000023", *_onehot(1)])                       # image absent
    if unk:
        rows.append(["ISIC_0000024", *_onehot(8)])
        _image(imgs / "ISIC_0000024.jpg", 24)
    _write_csv(root / "ISIC_2019_Training_GroundTruth.csv", rows)
    return root


def test_isic2019_onehot_errors_and_unk(tmp_path):
    rec = read_isic2019(_isic2019(tmp_path))
    assert rec.classes == ISIC19_COLS[:-1]  # UNK all zero -> dropped
    assert len(rec) == 10 and rec.class_counts()["NV"] == 3 and rec.groups is None
    reasons = dict(rec.missing)
    assert reasons["ISIC_0000020"].startswith("several classes marked")
    assert reasons["ISIC_0000021"] == "no class marked"
    assert reasons["ISIC_0000022"] == "malformed one-hot value"
    assert reasons["ISIC_0000023"] == "image file not found"
    assert len(rec.missing) == 4
    assert rec.paths[9].endswith("ISIC_0000009_downsampled.jpg")
    assert _decodes(rec, 0) == (12, 10)
    assert detect_format(tmp_path) == "isic2019"

    with_unk = read_isic2019(_isic2019(tmp_path / "unk", unk=True))
    assert with_unk.classes == ISIC19_COLS and with_unk.class_counts()["UNK"] == 1


def test_isic2019_metadata_groups(tmp_path):
    _isic2019(tmp_path)
    meta = [("image", "age_approx", "anatom_site_general", "lesion_id", "sex")]
    meta += [(f"ISIC_{i:07d}", "50", "torso", f"BCN_{i // 3:07d}" if i < 6 else "", "male") for i in range(9)]
    _write_csv(tmp_path / "meta.csv", meta)
    rec = read_isic2019(tmp_path, metadata=tmp_path / "meta.csv")
    assert list(rec.groups[:4]) == ["BCN_0000000"] * 3 + ["BCN_0000001"]
    assert rec.groups[7] == "ISIC_0000007"  # no lesion_id -> its own group


# ----------------------------------------------------------------------------------------------- ISIC 2024
def _isic2024(root: Path) -> Path:
    h5py = pytest.importorskip("h5py")
    root.mkdir(parents=True, exist_ok=True)
    rows = [("isic_id", "target", "patient_id", "age_approx")]
    with h5py.File(root / "train-image.hdf5", "w") as f:
        for i in range(6):
            b = _jpeg_bytes(100 + i)
            if i % 3 == 0:
                f.create_dataset(f"ISIC_{i:07d}", data=np.void(b))
            elif i % 3 == 1:
                f[f"ISIC_{i:07d}"] = np.array(b, dtype=f"S{len(b)}")  # -> np.bytes_
            else:
                f.create_dataset(f"ISIC_{i:07d}", data=np.frombuffer(b, dtype=np.uint8))
            rows.append((f"ISIC_{i:07d}", str(int(i == 4)), f"IP_{i // 2}", "60"))
    rows += [("ISIC_0000077", "0", "IP_9", "60"), ("ISIC_0000005", "1", "IP_2", ""), ("ISIC_0000003", "x", "IP_1", "")]
    _write_csv(root / "train-metadata.csv", rows)
    return root / "train-image.hdf5"


def _read_in_child(store, key, q):
    q.put(store.read(key))


def test_isic2024_hdf5_store(tmp_path):
    h5 = _isic2024(tmp_path)
    rec = open_any(h5)
    assert isinstance(rec.store, HDF5Store) and rec.classes == ["benign", "malignant"]
    assert len(rec) == 6 and rec.class_counts() == {"benign": 5, "malignant": 1}
    assert list(rec.groups) == ["IP_0", "IP_0", "IP_1", "IP_1", "IP_2", "IP_2"]
    assert dict(rec.missing) == {"ISIC_0000077": "not in train-image.hdf5", "ISIC_0000005": "duplicate row",
                                 "ISIC_0000003": "unknown target 'x'"}
    for i in range(6):  # np.void, np.bytes_ and uint8-array variants all come back as JPEG bytes
        assert isinstance(rec.read_bytes(i), bytes) and _decodes(rec, i) == (12, 10)
    store = pickle.loads(pickle.dumps(rec.store))
    assert store._file is None and store.read("ISIC_0000001") == rec.read_bytes(1)
    store._pid = -1  # as after a fork: the next read opens a fresh handle
    assert store.read("ISIC_0000002") == rec.read_bytes(2) and store._pid == os.getpid()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(rec.store, "ISIC_0000004", q))
    p.start()
    got = q.get(timeout=20)
    p.join(20)
    assert got == rec.read_bytes(4)
    assert detect_format(tmp_path) == "isic2024"


def test_isic2024_needs_metadata(tmp_path):
    pytest.importorskip("h5py")
    h5 = _isic2024(tmp_path)
    (tmp_path / "train-metadata.csv").rename(tmp_path / "elsewhere.csv")
    with pytest.raises(DatasetError, match="metadata"):
        open_any(h5)
    assert len(read_isic2024(h5, metadata=tmp_path / "elsewhere.csv")) == 6


# ----------------------------------------------------------------------------------------------- PH2
PH2_TXT = """||   Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Pigment Network | Dots/Globules | Streaks | Regression Areas | Blue-Whitish Veil ||           Colors ||
|| IMD002 ||                        ||                  1 ||         0 |               T |             A |       A |                A |                 A ||             3  4 ||
|| IMD003 ||                        ||                  0 ||         0 |               T |             A |       A |                A |                 A ||                4 ||
|| IMD008 ||                        ||                  2 ||         2 |              AT |            AT |       P |                P |                 P ||       1  3  4  5 ||
|| IMD009 ||                        ||                  0 ||         0 |               T |             A |       A |                A |                 A ||                3 ||
|| IMD010 ||                        ||                  7 ||         0 |               T |             A |       A |                A |                 A ||                3 ||
|| IMD011 ||                        ||                  2 ||         2 |              AT |            AT |       P |                P |                 P ||          3  4  5 ||
|| IMD404 ||           Melanoma     ||                  2 ||         2 |              AT |            AT |       P |                P |                 P ||             4  5 ||

Legends:
  Clinical Diagnosis:
    0 - Common Nevus;
    1 - Atypical Nevus;
    2 - Melanoma.
  Asymmetry: 0 - Fully Symmetric; 1 - Symetric in 1 axe; 2 - Fully Asymmetric.
"""


def _ph2(root: Path) -> Path:
    for i, name in enumerate(["IMD002", "IMD003", "IMD008", "IMD009", "IMD010", "IMD011"]):
        _image(root / "PH2 Dataset images" / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp", i, fmt="BMP")
        _image(root / "PH2 Dataset images" / name / f"{name}_lesion" / f"{name}_lesion.bmp", i, fmt="BMP")
    (root / "PH2_dataset.txt").write_text(PH2_TXT)
    return root


def test_ph2_txt(tmp_path):
    rec = read_ph2(_ph2(tmp_path))
    assert rec.classes == list(PH2_CLASSES)
    assert [Path(p).name for p in rec.paths] == ["IMD002.bmp", "IMD003.bmp", "IMD008.bmp", "IMD009.bmp", "IMD011.bmp"]
    assert rec.labels.tolist() == [1, 0, 2, 0, 2]
    assert dict(rec.missing) == {"IMD010": "unknown clinical diagnosis '7'", "IMD404": "image file not found"}
    assert _decodes(rec, 0) == (12, 10)
    assert detect_format(tmp_path) == "ph2"


def test_ph2_csv_variants(tmp_path):
    _ph2(tmp_path)
    _write_csv(tmp_path / "PH2_labels.csv", [("image_name", "clinical diagnosis"), ("IMD002", "Atypical Nevus"),
                                              ("IMD003", "0"), ("IMD008", "melanoma"), ("IMD009", "")])
    rec = read_ph2(tmp_path, table=tmp_path / "PH2_labels.csv")
    assert rec.labels.tolist() == [1, 0, 2] and dict(rec.missing) == {"IMD009": "no clinical diagnosis"}
    _write_csv(tmp_path / "ph2_x.csv", [("Image Name", "Histological Diagnosis", "Common Nevus", "Atypical Nevus",
                                         "Melanoma"), ("IMD002", "", "", "X", ""), ("IMD008", "", "", "", "X"),
                                        ("IMD003", "", "X", "X", "")])
    rec = open_any(tmp_path / "ph2_x.csv")
    assert rec.labels.tolist() == [1, 2] and dict(rec.missing) == {"IMD003": "several diagnoses marked"}


# ----------------------------------------------------------------------------------------------- DermaMNIST
def _npz(path: Path, hw=(28, 28)) -> Path:
    rng = np.random.default_rng(5)
    arrays = {}
    for split, n in (("train", 10), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 7).reshape(n, 1).astype(np.uint8)
    arrays["test_labels"][3, 0] = 9  # out of range
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_dermamnist_cache_and_splits(tmp_path):
    npz, cache = _npz(tmp_path / "data" / "dermamnist.npz"), tmp_path / "cache"
    rec = read_dermamnist(npz, cache_dir=cache)
    assert rec.classes == list(HAM_CLASSES) and len(rec) == 17
    assert {s: len(v) for s, v in rec.splits.items()} == {"train": 10, "val": 4, "test": 3}
    assert rec.missing == [("test_000003.png", "unknown label '9'")]
    assert rec.labels[rec.splits["val"]].tolist() == [0, 1, 2, 3]
    with Image.open(io.BytesIO(rec.read_bytes(3))) as im:
        assert im.size == (28, 28) and np.array_equal(np.asarray(im), np.load(npz)["train_images"][3])
    built = sorted(p.name for p in cache.iterdir())
    assert len(built) == 1 and built[0].startswith("dermamnist-")  # no temporary directory left behind
    mtime = (cache / built[0] / "labels.csv").stat().st_mtime_ns
    assert materialise_npz(npz, cache) == cache / built[0]  # idempotent: reused, not rewritten
    assert (cache / built[0] / "labels.csv").stat().st_mtime_ns == mtime
    val = open_any(npz, split="val", cache_dir=cache)
    assert len(val) == 4 and val.splits["val"].tolist() == [0, 1, 2, 3] and len(val.splits["train"]) == 0
    assert detect_format(npz) == "dermamnist"
    with pytest.raises(DatasetError, match="split"):
        read_dermamnist(npz, split="dev", cache_dir=cache)


def test_dermamnist_default_cache(tmp_path, monkeypatch):
    import dermfast.data.toy as toy
    npz = _npz(tmp_path / "d.npz", hw=(8, 8))
    monkeypatch.delattr(toy, "default_cache_dir", raising=False)  # fallback: $DERMFAST_CACHE
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "envcache"))
    out = materialise_npz(npz)
    assert out.parent == tmp_path / "envcache" and (out / "labels.csv").is_file()
    monkeypatch.setattr(toy, "default_cache_dir", lambda: tmp_path / "toycache", raising=False)
    assert materialise_npz(npz).parent == tmp_path / "toycache"
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        read_dermamnist(bad, cache_dir=tmp_path / "c")
    np.savez(bad, train_images=np.zeros((3, 4, 4, 3), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(DatasetError, match="train_labels"):
        read_dermamnist(bad, cache_dir=tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] == []  # failed builds leave nothing behind


# ----------------------------------------------------------------------------------------------- csv, folder, dispatch
def test_labels_csv_and_folder(tmp_path):
    root = tmp_path / "ds"
    for i in range(4):
        _image(root / "images" / f"img{i}.jpg", i)
    (root / "labels.csv").write_text("image,label\nimg0,a\nimg1,b\nimg2,a\nimg9,b\nimg3\n,a\n")
    rec = open_any(root)
    assert rec.classes == ["a", "b"] and rec.labels.tolist() == [0, 1, 0]
    assert dict(rec.missing) == {"img9": "image file not found", "img3": "empty label", "<line 7>": "empty image name"}

    folder = tmp_path / "folder"
    for c, n in (("mel", 2), ("nv", 3)):
        for i in range(n):
            _image(folder / c / f"{c}{i}.jpg", i)
    fixed = open_any(root, classes=["b", "c", "d"])
    assert fixed.labels.tolist() == [0] and fixed.class_counts() == {"b": 1, "c": 0, "d": 0}
    assert ("img0", "unknown label 'a'") in fixed.missing
    rec = open_any(folder)
    assert detect_format(folder) == "folder" and rec.class_counts() == {"mel": 2, "nv": 3} and rec.missing == []
    assert open_any(folder, format="image_folder").class_counts() == {"mel": 2, "nv": 3}


def test_open_any_errors(tmp_path):
    with pytest.raises(DatasetError, match="accepted: auto, folder, csv, ham10000, isic2019, isic2024, ph2, dermamnist, pairs"):
        open_any(tmp_path, format="imagenet")
    with pytest.raises(DatasetError, match="does not exist"):
        open_any(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        open_any(tmp_path / "empty")
    _write_csv(tmp_path / "bad" / "HAM10000_metadata.csv", [("image_id", "dx"), ("ISIC_1", "nv")])
    with pytest.raises(DatasetError, match="no usable images.*1 image file not found"):
        open_any(tmp_path / "bad")
    _write_csv(tmp_path / "cols" / "HAM10000_metadata.csv", [("image", "diagnosis")])
    with pytest.raises(DatasetError, match="needs a column 'image_id'"):
        open_any(tmp_path / "cols", format="HAM10000")


def test_check_usable_empty_records():
    from dermfast.data.records import ImageRecords
    rec = ImageRecords([], np.zeros(0), ["a", "b"])
    rec.missing = [("x", "image file not found")]
    with pytest.raises(DatasetError, match="no usable images"):
        check_usable(rec)


@pytest.mark.skipif(not SHARED_MINI.is_dir(), reason="../shared/data/isic-cc0-mini not present")
def test_isic_cc0_mini():
    rec = open_any(SHARED_MINI)
    assert detect_format(SHARED_MINI) == "csv"
    assert len(rec) == 111 and rec.missing == []
    assert rec.class_counts() == {"melanoma": 33, "nevus": 78}
    assert check_usable(rec, require_all_classes=True) == {"melanoma": 33, "nevus": 78}
    w, h = _decodes(rec, 0)
    assert max(w, h) <= 512
