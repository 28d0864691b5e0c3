"""split_records: stratified, grouped, seeded, deterministic; save_splits / load_splits round trip."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from dermfast.data.records import DatasetError, ImageRecords
from dermfast.data.splits import SPLITS, check_splits, load_splits, save_splits, split_records

HAM_SHARE = np.array([327, 514, 1099, 115, 1113, 6705, 142]) / 10015


def _records(n=2000, grouped=False, seed=1, root="/data/ham"):
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    while len(labels) < n:  # lesions of 1..4 images sharing one label (as in HAM10000)
        k, c = int(rng.integers(1, 5)) if grouped else 1, int(rng.choice(7, p=HAM_SHARE))
        labels += [c] * k
        groups += [f"HAM_{len(groups):07d}"] * k
    labels, groups = labels[:n], groups[:n]
    paths = [f"{root}/images/ISIC_{i:07d}.jpg" for i in range(n)]
    return ImageRecords(paths, np.array(labels), ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], root=root,
                        groups=np.array(groups, dtype=object) if grouped else None)


@pytest.mark.parametrize("grouped", [False, True])
def test_stratified_partition(grouped):
    rec = _records(grouped=grouped)
    splits = split_records(rec, (0.7, 0.15, 0.15), seed=3)
    check_splits(splits, rec)
    allidx = np.concatenate([splits[s] for s in SPLITS])
    assert sorted(allidx.tolist()) == list(range(len(rec)))  # a partition
    overall = np.bincount(rec.labels, minlength=7) / len(rec)
    for s, frac in zip(SPLITS, (0.7, 0.15, 0.15)):
        assert abs(len(splits[s]) / len(rec) - frac) < 0.01
        share = np.bincount(rec.labels[splits[s]], minlength=7) / len(splits[s])
        assert np.abs(share - overall).max() < (0.02 if grouped else 0.01), (s, share, overall)
        assert (np.bincount(rec.labels[splits[s]], minlength=7) > 0).all()  # every class on every side


def test_groups_never_span_sides():
    rec = _records(grouped=True)
    splits = split_records(rec, seed=0)
    side_of = {}
    for s in SPLITS:
        for g in rec.groups[splits[s]]:
            assert side_of.setdefault(g, s) == s
    rec.groups[splits["val"][0]] = rec.groups[splits["train"][0]]
    with pytest.raises(ValueError, match="is on both"):
        check_splits(splits, rec)


def test_majority_label_and_coverage():
    # lesion L0 holds 3 mel + 1 nv images: it counts as mel; class 'df' with exactly 3 images lands on all sides
    labels = [4, 4, 4, 5] + [5] * 20 + [3, 3, 3] + [1, 1]
    groups = ["L0"] * 4 + [f"n{i}" for i in range(20)] + ["d0", "d1", "d2", "b0", "b1"]
    rec = ImageRecords([f"{i}.jpg" for i in range(len(labels))], np.array(labels),
                       ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], groups=np.array(groups, dtype=object))
    splits = split_records(rec, seed=0)
    check_splits(splits, rec)
    for s in SPLITS:
        assert (rec.labels[splits[s]] == 3).sum() == 1  # df: one image per side
    assert set(range(4)) <= set(splits["train"].tolist())  # the whole mel lesion goes to train (coverage: largest)
    assert (rec.labels[splits["train"]] == 1).sum() == 2  # bcc: 2 images < 3 -> no coverage, both in train
    assert rec.class_counts()["akiec"] == 0


def test_unlabelled_and_ungrouped_entries():
    labels = np.array([-1] * 10 + [0] * 10)
    groups = np.array([None, ""] * 5 + [f"g{i // 2}" for i in range(10)], dtype=object)
    rec = ImageRecords([f"{i}.png" for i in range(20)], labels, ["a"], groups=groups)
    splits = split_records(rec, (0.6, 0.2, 0.2), seed=1)
    check_splits(splits, rec)
    assert sum(len(v) for v in splits.values()) == 20
    assert all((rec.labels[splits[s]] == -1).sum() == c for s, c in zip(SPLITS, (6, 2, 2)))


def test_deterministic_and_seeded():
    rec = _records(400, grouped=True)
    a, b = split_records(rec, seed=7), split_records(rec, seed=7)
    assert all(np.array_equal(a[s], b[s]) and a[s].dtype == np.int64 for s in SPLITS)
    c = split_records(rec, seed=8)
    assert not all(np.array_equal(a[s], c[s]) for s in SPLITS)
    # golden values: the split of a seed must not change across machines or numpy versions
    small = ImageRecords([f"{i}.jpg" for i in range(20)], np.array([0] * 12 + [1] * 8), ["x", "y"])
    got = split_records(small, (0.5, 0.25, 0.25), seed=0)
    assert {s: v.tolist() for s, v in got.items()} == GOLDEN
    grouped = ImageRecords([f"{i}.jpg" for i in range(12)], np.zeros(12), ["x"],
                           groups=np.array(list("aabbbcdddeff"), dtype=object))
    got = split_records(grouped, (0.5, 0.25, 0.25), seed=0)
    assert {s: v.tolist() for s, v in got.items()} == GOLDEN_GROUPED


GOLDEN = {"train": [0, 1, 3, 7, 10, 11, 12, 14, 17, 18], "val": [4, 6, 9, 13, 19], "test": [2, 5, 8, 15, 16]}
GOLDEN_GROUPED = {"train": [2, 3, 4, 6, 7, 8], "val": [0, 1, 9], "test": [5, 10, 11]}


def test_class_split_independent_of_other_classes():
    rec = _records(600)
    keep = np.flatnonzero(rec.labels != 5)  # drop the nevi: the other classes split exactly as before
    full, part = split_records(rec, seed=2), split_records(rec.subset(keep), seed=2)
    for s in SPLITS:
        assert np.array_equal(np.intersect1d(full[s], keep), keep[part[s]])


def test_bad_fractions():
    rec = _records(50)
    for fr in [(0.8, 0.1), (0.8, 0.3, 0.1), (1.1, -0.1, 0.0)]:
        with pytest.raises(ValueError, match="fractions"):
            split_records(rec, fr)
    splits = split_records(rec, (0.9, 0.1, 0.0))
    assert len(splits["test"]) == 0 and len(splits["train"]) + len(splits["val"]) == 50


def test_save_load_roundtrip(tmp_path):
    root = tmp_path / "ds"
    rec = _records(300, grouped=True, root=str(root))
    splits = split_records(rec, seed=0)
    path = save_splits(splits, rec, tmp_path / "out" / "splits.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "image,label,split" and len(lines) == 301
    assert lines[1].split(",")[0] == "images/ISIC_0000000.jpg"  # relative to records.root: portable
    back = load_splits(path, rec)
    assert all(np.array_equal(back[s], splits[s]) for s in SPLITS)
    moved = _records(300, grouped=True, root=str(tmp_path / "elsewhere"))  # same dataset, another machine
    assert all(np.array_equal(load_splits(path, moved)[s], splits[s]) for s in SPLITS)


def test_load_mismatches(tmp_path):
    rec = _records(30)
    path = save_splits(split_records(rec), rec, tmp_path / "s.csv")
    text = path.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    first = text[1].split(",")
    relabelled = ",".join([first[0], "bogus", first[2]])
    bad.write_text("\n".join([text[0], relabelled, "images/nope.jpg,nv,train", *text[2:]]) + "\n")
    with pytest.raises(DatasetError, match="1 images not in the dataset.*1 images with another label"):
        load_splits(bad, rec)
    loose = load_splits(bad, rec, strict=False)
    assert sum(len(v) for v in loose.values()) == 29
    (tmp_path / "dup.csv").write_text("\n".join([text[0], text[1], text[1]]) + "\n")
    with pytest.raises(DatasetError, match="listed twice"):
        load_splits(tmp_path / "dup.csv", rec)
    (tmp_path / "sp.csv").write_text("\n".join([text[0], first[0] + "," + first[1] + ",holdout"]) + "\n")
    with pytest.raises(DatasetError, match="unknown split 'holdout'"):
        load_splits(tmp_path / "sp.csv", rec)


def test_store_keys_and_real_files(tmp_path):
    class Store:
        def read(self, key):
            return b""
    rec = ImageRecords(["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4"], np.array([0, 1, 0, 1]), ["benign", "malignant"],
                       root=str(tmp_path), groups=np.array(["IP_1", "IP_1", "IP_2", "IP_3"], dtype=object),
                       store=Store())
    splits = split_records(rec, seed=0)
    path = save_splits(splits, rec, tmp_path / "s.csv")
    assert "ISIC_1," in path.read_text()
    assert all(np.array_equal(load_splits(path, rec)[s], splits[s]) for s in SPLITS)
    mini = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic-cc0-mini"
    if mini.is_dir():
        from dermfast.data.adapters import open_any
        copy = tmp_path / "mini"
        shutil.copytree(mini, copy)
        real = open_any(mini)
        sp = split_records(real, seed=0)
        assert {s: len(v) for s, v in sp.items()} == {"train": 89, "val": 11, "test": 11}
        assert all(np.array_equal(load_splits(save_splits(sp, real, tmp_path / "m.csv"), open_any(copy))[s], sp[s])
                   for s in SPLITS)


def test_a_class_too_small_for_every_side_is_named(capsys):
    """Issue 22: a class of one image lands in train only; the split says so (class, image, side), one line."""
    labels = [0] * 20 + [1] * 20 + [2] + [3] * 2
    paths = [f"/d/img_{i:03d}.jpg" for i in range(len(labels))]
    rec = ImageRecords(paths, np.array(labels), ["a", "b", "df", "vasc"], root="/d")
    splits = split_records(rec, seed=0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("split:")]
    assert len(lines) == 2, lines
    one = next(ln for ln in lines if "'df'" in ln)
    assert "1 image" in one and "img_040.jpg" in one and "went to train" in one and "val and test" in one
    assert 40 in splits["train"]
    two = next(ln for ln in lines if "'vasc'" in ln)
    assert "2 images" in two and "went to train" in two
    rec_big = _records(n=500)
    split_records(rec_big, seed=0)  # every class on every side: nothing to say
    assert "split:" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ k-fold (--folds)
from dermfast.data.splits import VAL_FRACTION, assign_folds, fold_splits  # noqa: E402


@pytest.mark.parametrize("grouped", [False, True])
def test_folds_partition_stratified_grouped_and_are_sklearns(grouped):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    rec = _records(n=600, grouped=grouped)
    fold = assign_folds(rec, 5, seed=7)
    assert fold.shape == (600,) and set(np.unique(fold)) == {1, 2, 3, 4, 5}  # every image in exactly one fold
    # the library itself, called as the docstring says: fold f + 1 is sklearn's f-th test set
    if grouped:
        _, unit = np.unique(rec.groups.astype(str), return_inverse=True)
        ref = StratifiedGroupKFold(5, shuffle=True, random_state=7).split(np.zeros((600, 1)), rec.labels, unit)
    else:
        ref = StratifiedKFold(5, shuffle=True, random_state=7).split(np.zeros((600, 1)), rec.labels)
    for f, (_, test) in enumerate(ref):
        np.testing.assert_array_equal(np.flatnonzero(fold == f + 1), np.sort(test))
    for c in np.unique(rec.labels):  # stratified: each class spread over the folds within a lesion or so
        per_fold = np.bincount(fold[rec.labels == c], minlength=6)[1:]
        assert per_fold.max() - per_fold.min() <= (8 if grouped else 1), (c, per_fold)
    if grouped:
        for g in np.unique(rec.groups):
            assert len(np.unique(fold[rec.groups == g])) == 1  # a lesion never spans two folds


def test_folds_deterministic_and_seeded():
    rec = _records(n=300, grouped=True)
    a, b, c = assign_folds(rec, 4, seed=1), assign_folds(rec, 4, seed=1), assign_folds(rec, 4, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_fold_splits_test_is_the_fold_and_val_comes_from_the_other_folds():
    rec = _records(n=400, grouped=True)
    fold = assign_folds(rec, 5, seed=3)
    tests = []
    for k in range(1, 6):
        s = fold_splits(rec, 5, k, seed=3)
        check_splits(s, rec)  # disjoint, no group on two sides
        np.testing.assert_array_equal(s["test"], np.flatnonzero(fold == k))
        assert not (fold[np.concatenate([s["train"], s["val"]])] == k).any()
        assert len(s["train"]) + len(s["val"]) + len(s["test"]) == 400
        assert abs(len(s["val"]) / (400 - len(s["test"])) - VAL_FRACTION) < 0.05
        tests.append(s["test"])
    np.testing.assert_array_equal(np.sort(np.concatenate(tests)), np.arange(400))  # test folds partition the data


def test_folds_bad_input_and_small_class(capsys):
    rec = _records(n=6)
    with pytest.raises(ValueError, match="need at least 10 images"):
        assign_folds(rec, 10)
    with pytest.raises(ValueError, match="k >= 2"):
        assign_folds(rec, 1)
    with pytest.raises(ValueError, match="fold must be in 1..3"):
        fold_splits(_records(n=60), 3, 4)
    small = ImageRecords([f"/d/{i}.jpg" for i in range(12)], np.array([0] * 10 + [1] * 2), ["nv", "mel"])
    assign_folds(small, 3)
    assert "class 'mel' has 2 images in 2 unit(s): 1 of the 3 test folds hold none of it" in capsys.readouterr().out


def test_splits_csv_names_converted_images_by_the_users_path(tmp_path):
    """Issue 19: a BMP converted into the cache is named in splits.csv by the file the user gave, never by
    `<cache>/converted/<sha1>.png`; reading the file back finds the same images (and old files naming cache
    copies still load)."""
    root = tmp_path / "data"
    cache = tmp_path / "cache" / "converted"
    n = 12
    user = [str(root / ("mel" if i % 2 else "nev") / f"IMD{i:03d}.bmp") for i in range(n)]
    conv = [str(cache / f"{i:040x}.png") for i in range(n)]
    rec = ImageRecords(conv, np.arange(n) % 2, ["nev", "mel"], root=str(root), origins=user)
    splits = split_records(rec, seed=0)
    path = save_splits(splits, rec, tmp_path / "splits.csv")
    rows = path.read_text().splitlines()[1:]
    named = sorted(r.split(",")[0] for r in rows)
    assert named == sorted(f"{'mel' if i % 2 else 'nev'}/IMD{i:03d}.bmp" for i in range(n))
    assert not any("converted" in r for r in rows)
    back = load_splits(path, rec)
    for s in SPLITS:
        assert sorted(back[s].tolist()) == sorted(np.asarray(splits.get(s, [])).tolist())
    old = tmp_path / "old_splits.csv"  # written before this change: cache paths
    old.write_text("image,label,split\n" + "".join(f"{conv[i]},{'mel' if i % 2 else 'nev'},train\n" for i in range(n)))
    assert sorted(load_splits(old, rec)["train"].tolist()) == list(range(n))
