"""Geometric augmentation (hflip, vflip, quarter turns) on both loader backends, for images and lesion masks.

The reference for the geometry is numpy's own `fliplr`, `flipud` and `rot90` (counter-clockwise), written out
here, not dermfast's code. A painted square (image and mask alike) must land where the image's square lands; the
torch and DALI (CPU pipeline) loaders with one seed give the same images and masks.
Small PNGs (40..72 px) and 24 px outputs keep the module fast.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from dermfast.data.augment import Augment, as_transpose_flips, sample_train_params
from dermfast.data.loader import build_loader
from dermfast.data.records import ImageRecords

SIZE = 24
SIZES = [(64, 48), (48, 64), (72, 54), (40, 40)]
GEOM = Augment(size=SIZE, scale=(0.5, 1.0), vflip=0.5, rot90=True)


def _numpy_reference(a: np.ndarray, h: int, v: int, k: int) -> np.ndarray:
    """hflip, then vflip, then k counter-clockwise quarter turns, on the [H, W] axes, by numpy."""
    if h:
        a = np.fliplr(a)
    if v:
        a = np.flipud(a)
    return np.rot90(a, k)


def test_new_draws_leave_every_existing_parameter_unchanged():
    old, new = Augment(size=SIZE, hue=0.1, brightness=0.2), Augment(size=SIZE, hue=0.1, brightness=0.2,
                                                                    vflip=0.5, rot90=True)
    pos, w, h = np.arange(4000), np.full(4000, 64), np.full(4000, 48)
    a, b = sample_train_params(old, 3, 1, 2, pos, w, h), sample_train_params(new, 3, 1, 2, pos, w, h)
    for key in ("x", "y", "w", "h", "flip", "brightness", "contrast", "saturation", "hue"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not a["vflip"].any() and not a["rot90"].any()  # off by default: today's runs stay identical
    assert 0.45 < b["vflip"].mean() < 0.55
    counts = np.bincount(b["rot90"], minlength=4)
    assert counts.sum() == 4000 and counts.min() > 900  # uniform over 0, 90, 180, 270 degrees
    # the new draws are independent of the old ones (not the flip draw reused)
    assert abs(np.corrcoef(b["vflip"], b["flip"])[0, 1]) < 0.05


def test_transpose_then_flips_is_every_hflip_vflip_rot90_combination():
    a = np.arange(15).reshape(3, 5)  # non-square: a wrong transpose changes the shape
    for h in (0, 1):
        for v in (0, 1):
            for k in range(4):
                t, fh, fv = (int(x) for x in as_transpose_flips(h, v, k))
                b = a.T if t else a
                b = np.fliplr(b) if fh else b
                b = np.flipud(b) if fv else b
                np.testing.assert_array_equal(b, _numpy_reference(a, h, v, k), err_msg=str((h, v, k)))


@pytest.fixture(scope="module")
def square_records(tmp_path_factory):
    """Dark images with one bright off-centre rectangle; the mask is that rectangle (0 / 255 PNG)."""
    root = tmp_path_factory.mktemp("geometry")
    rng = np.random.default_rng(5)
    paths, masks = [], []
    for i in range(12):
        w, h = SIZES[i % len(SIZES)]
        x0, y0 = int(rng.integers(2, w // 3)), int(rng.integers(2, h // 3))
        x1, y1 = x0 + int(rng.integers(w // 4, w // 2)), y0 + int(rng.integers(h // 5, h // 3))
        m = np.zeros((h, w), np.uint8)
        m[y0:y1, x0:x1] = 255
        img = np.stack([m // 2 + 40, m // 3 + 30, m // 4 + 20], -1).astype(np.uint8)
        paths.append(str(root / f"img{i:02d}.png"))
        masks.append(str(root / f"img{i:02d}_mask.png"))
        Image.fromarray(img).save(paths[-1])
        Image.fromarray(m).save(masks[-1])
    return ImageRecords(paths, np.zeros(12, np.int64), ["lesion"], masks=masks)


def _epoch(records, aug, loader, train=True, **kw):
    out = list(build_loader(records, aug, 4, loader=loader, train=train, seed=11, workers=0 if loader == "torch"
                            else 1, drop_last=False, **kw))
    return {k: torch.cat([b[k] for b in out]) for k in out[0]}


def _bright(image: torch.Tensor, aug: Augment) -> torch.Tensor:
    """[B, 3, S, S] normalised -> [B, 1, S, S] 0/1: where the red channel is the rectangle's (above the midpoint
    of each image's darkest and brightest red, which brightness / contrast jitter move)."""
    red = image[:, :1] * aug.std[0] + aug.mean[0]
    lo, hi = red.amin((1, 2, 3), keepdim=True), red.amax((1, 2, 3), keepdim=True)
    return (red > (lo + hi) / 2).float()


def test_torch_geometry_is_numpys_fliplr_flipud_rot90(square_records):
    # Whole-image square windows (scale 1, ratio 1 on a square image): the crop is the identity, so the output is
    # exactly numpy's flips / rotation of the stored pixels.
    aug = Augment(size=40, scale=(1.0, 1.0), ratio=(1.0, 1.0), vflip=0.5, rot90=True)
    rec = square_records.subset([i for i, p in enumerate(square_records.paths) if Image.open(p).size == (40, 40)])
    batch = _epoch(rec, aug, "torch")
    seen = set()
    for j in range(len(rec)):
        # the loader's order is a seeded permutation; find each output's source by its mask
        src = None
        for i in range(len(rec)):
            m = np.asarray(Image.open(rec.masks[i])) > 127
            p = sample_train_params(aug, 11, 0, 0, [j], [40], [40])
            ref = _numpy_reference(m, int(p["flip"][0]), int(p["vflip"][0]), int(p["rot90"][0]))
            if np.array_equal(ref, batch["mask"][j, 0].numpy() > 0.5):
                src = i
                seen.add((int(p["flip"][0]), int(p["vflip"][0]), int(p["rot90"][0])))
        assert src is not None, f"sample {j}: the mask is no hflip/vflip/rot90 of any input as numpy does it"
    assert len(seen) == len(rec)  # different geometries were exercised


@pytest.mark.parametrize("loader", ["torch", "dali-cpu"])
def test_a_painted_square_lands_where_the_images_square_lands(square_records, loader):
    if loader != "torch":
        pytest.importorskip("nvidia.dali")
    aug = Augment(size=SIZE, scale=(0.5, 1.0), vflip=0.5, rot90=True, brightness=0.3, contrast=0.3)
    b = _epoch(square_records, aug, loader)
    assert b["mask"].shape == (12, 1, SIZE, SIZE) and b["mask"].dtype == torch.float32
    assert set(b["mask"].unique().tolist()) <= {0.0, 1.0} and b["has_mask"].tolist() == [1] * 12
    bright = _bright(b["image"], aug)
    agree = (bright == b["mask"]).float().mean((1, 2, 3))
    assert agree.min() > 0.93, agree  # only the resampled rectangle's edge may differ
    # the geometry really moved things: the masks are not all in the un-flipped, un-rotated place
    ev = _epoch(square_records, aug, loader, train=False)
    assert (_bright(ev["image"], aug) == ev["mask"]).float().mean() > 0.95


def test_torch_and_dali_give_the_same_images_and_masks_for_one_seed(square_records):
    pytest.importorskip("nvidia.dali")
    t, d = _epoch(square_records, GEOM, "torch"), _epoch(square_records, GEOM, "dali-cpu")
    assert (t["image"] - d["image"]).abs().mean() < 0.03  # resampling only; another orientation would be ~0.3
    assert (t["mask"] == d["mask"]).float().mean() > 0.97  # nearest-neighbour ties at the window's edge
    te, de = (_epoch(square_records, GEOM, name, train=False) for name in ("torch", "dali-cpu"))
    assert (te["image"] - de["image"]).abs().mean() < 0.03
    assert (te["mask"] == de["mask"]).float().mean() > 0.97


def test_images_without_a_mask_get_zeros_and_has_mask_0(square_records):
    rec = square_records.subset(range(4))
    rec.masks[1] = ""
    for loader in ["torch"] + (["dali-cpu"] if _has_dali() else []):
        b = _epoch(rec, Augment(size=SIZE), loader, train=False)
        assert b["has_mask"].tolist() == [1, 0, 1, 1]
        assert b["mask"][1].abs().sum() == 0 and b["mask"][0].sum() > 0


def test_records_without_masks_give_no_mask_key(square_records):
    rec = ImageRecords(square_records.paths[:4], np.zeros(4, np.int64), ["lesion"])
    assert "mask" not in _epoch(rec, GEOM, "torch")


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("train", [True, False])
def test_gpu_graph_with_masks_and_quarter_turns_passes_dalis_definition_checks(square_records, monkeypatch, train):
    # DALI checks operator names, arguments and CPU/GPU placement when the graph is defined, before CUDA work.
    pytest.importorskip("nvidia.dali")
    from dermfast.data.dali_loader import DaliLoader
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    loader = DaliLoader(square_records, GEOM, 4, train=train, device="gpu", device_id=0, parallel=False,
                        num_threads=1)
    loader._build()
    assert loader.builds == 1


@pytest.mark.gpu
def test_gpu_pipeline_moves_masks_like_the_cpu_pipeline(square_records):
    from dermfast.data.dali_loader import DaliLoader
    for train in (True, False):
        cpu = list(DaliLoader(square_records, GEOM, 4, train=train, device="cpu", seed=3, num_threads=2))
        gpu = list(DaliLoader(square_records, GEOM, 4, train=train, device="gpu", device_id=0, seed=3,
                              num_threads=2))
        for a, b in zip(cpu, gpu):
            assert b["mask"].is_cuda and b["has_mask"].is_cuda
            assert (a["mask"] == b["mask"].cpu()).float().mean() > 0.99
            assert (a["image"] - b["image"].cpu()).abs().mean() < 0.03  # nvJPEG / GPU resize vs CPU
