"""The embedded procedural dataset: deterministic for a seed, written once and atomically, imbalanced like
HAM10000, decodable as JPEG, and learnable (but not trivially) from simple features."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from dermfast.data.toy import (CLASSES, HAM10000_COUNTS, TOY_VERSION, class_counts, default_cache_dir,
                               generate_toy_dataset, render_lesion)


def _files(root):
    return {p.relative_to(root): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = generate_toy_dataset(tmp_path / "a", n_images=21, image_size=48, seed=5, progress=False)
    b = generate_toy_dataset(tmp_path / "b", n_images=21, image_size=48, seed=5, progress=False)
    c = generate_toy_dataset(tmp_path / "c", n_images=21, image_size=48, seed=6, progress=False)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len([n for n in fa if n.suffix == ".jpg"]) == 21
    assert fa.keys() == fb.keys() == fc.keys()
    assert all(fa[n].read_bytes() == fb[n].read_bytes() for n in fa)  # labels.csv, meta.json and every JPEG
    jpgs = [n for n in fa if n.suffix == ".jpg"]
    assert sum(fa[n].read_bytes() != fc[n].read_bytes() for n in jpgs) == len(jpgs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_generation_is_idempotent_and_atomic(tmp_path):
    root = generate_toy_dataset(tmp_path / "t", n_images=14, image_size=40, progress=False)
    stamps = {n: p.stat().st_mtime_ns for n, p in _files(root).items()}
    assert generate_toy_dataset(tmp_path / "t", n_images=14, image_size=40, progress=False) == root
    assert {n: p.stat().st_mtime_ns for n, p in _files(root).items()} == stamps  # nothing rewritten
    # other parameters are not "the same dataset"; a lost file makes the directory incomplete: both regenerate
    generate_toy_dataset(root, n_images=15, image_size=40, progress=False)
    assert len(list((root / "images").iterdir())) == 15
    next((root / "images").iterdir()).unlink()
    generate_toy_dataset(root, n_images=15, image_size=40, progress=False)
    assert len(list((root / "images").iterdir())) == 15
    # force rewrites the same bytes
    before = {n: p.read_bytes() for n, p in _files(root).items()}
    generate_toy_dataset(root, n_images=15, image_size=40, force=True, progress=False)
    assert {n: p.read_bytes() for n, p in _files(root).items()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import dermfast.data.toy as toy

    real, calls = toy.render_lesion, []

    def dies_midway(rng, label, size, **kw):
        calls.append(label)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(rng, label, size, **kw)

    monkeypatch.setattr(toy, "render_lesion", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        generate_toy_dataset(tmp_path / "t", n_images=14, image_size=32, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither a partial root nor a temporary directory
    monkeypatch.setattr(toy, "render_lesion", real)
    root = generate_toy_dataset(tmp_path / "t", n_images=14, image_size=32, progress=False)
    assert len(list((root / "images").iterdir())) == 14


def test_foreign_directory_is_never_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_toy_dataset(tmp_path / "mine", n_images=7, image_size=32, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_default_root_lives_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    root = generate_toy_dataset(n_images=7, image_size=32, seed=3, progress=False)
    assert root == tmp_path / "cache" / f"toy-v{TOY_VERSION}-n7-s32-seed3"
    monkeypatch.delenv("DERMFAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "dermfast"


def test_jpegs_decode_to_rgb_of_the_requested_size(tmp_path):
    root = generate_toy_dataset(tmp_path / "t", n_images=21, image_size=56, progress=False)
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 21 and {r["label"] for r in rows} == set(CLASSES)
    assert [r["image"] for r in rows] == sorted(p.stem for p in (root / "images").iterdir())
    for r in rows:
        with Image.open(root / "images" / f"{r['image']}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (56, 56)
            im.load()


def test_render_lesion_contract():
    img = render_lesion(np.random.default_rng(0), "mel", 72)
    assert img.shape == (72, 72, 3) and img.dtype == np.uint8
    again = render_lesion(np.random.default_rng(0), "mel", 72)
    assert np.array_equal(img, again)
    with pytest.raises(ValueError):
        render_lesion(np.random.default_rng(0), "melanoma", 72)


@pytest.mark.parametrize("n", [7, 20, 56, 100, 1200, 10015])
def test_class_counts_follow_ham10000(n):
    counts = class_counts(n)
    assert list(counts) == list(CLASSES) and sum(counts.values()) == n
    assert min(counts.values()) >= min(8, n // 7) >= 1  # every class present, at least the floor
    assert all(counts[a] >= counts[b] for a, b in zip(CLASSES, CLASSES[1:]))  # nv largest ... df smallest
    if n >= 1200:
        assert counts["nv"] / counts["mel"] > 4  # HAM10000: 6705 / 1113
    if n == sum(HAM10000_COUNTS.values()):
        assert counts == dict(HAM10000_COUNTS)
    with pytest.raises(ValueError):
        class_counts(6)


def test_classes_are_learnable():
    """A linear classifier on 16x16 downsampled pixels + colour histograms, trained on half of 60 images per class
    at 64 px, scores a held-out balanced accuracy far above chance (1/7 = 0.14). Measured 0.74 here (0.69-0.77
    over other seeds): learnable, not trivially separable."""
    feats, ys = [], []
    for c, label in enumerate(CLASSES):
        for i in range(60):
            img = render_lesion(np.random.default_rng([123, c, i]), label, 64).astype(np.float32) / 255
            small = img.reshape(16, 4, 16, 4, 3).mean((1, 3)).ravel()
            hist = np.concatenate([np.histogram(img[..., k], bins=8, range=(0, 1))[0] / 4096 for k in range(3)])
            feats.append(np.concatenate([small, hist]))
            ys.append(c)
    x = torch.tensor(np.array(feats), dtype=torch.float32)
    y = torch.tensor(ys)
    train = torch.arange(len(y)) % 2 == 0
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    torch.manual_seed(0)
    clf = torch.nn.Linear(x.shape[1], len(CLASSES))
    opt = torch.optim.Adam(clf.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(x[train]), y[train]).backward()
        opt.step()
    pred = clf(x[~train]).argmax(1)
    yt = y[~train]
    balanced = np.mean([(pred[yt == c] == c).float().mean().item() for c in range(len(CLASSES))])
    assert balanced >= 0.45, balanced
