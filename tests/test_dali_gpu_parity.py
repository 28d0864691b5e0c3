"""DALI's GPU pipeline computes what its CPU pipeline computes, per sample, tightly enough to catch an off-by-one crop
or a stream race; and the one parity check behind that also runs on a CPU against the torch loader.

Inputs are PNGs: lossless, so the GPU and CPU decoders give the same pixels (DALI's image_slice decodes PNG on both
backends through nvImageCodec, per its documentation). JPEGs would not: nvJPEG and libjpeg-turbo upsample chroma
and round the IDCT differently, which is why the JPEG tests in test_dali_loader.py accept a mean difference of
0.1 - 0.15 in normalised units (6 - 9 grey levels). Content: random colours on an 8 x 9 grid, bilinearly enlarged
to 48..120 px, so that one source pixel of crop shift changes the 32 px output by several levels.

What may still differ between the GPU and the CPU graph, in uint8 levels before normalisation:
  * resize: the same separable resampling on both, float arithmetic in another order: +-1 level
    (NVIDIA/DALI issue 1602, "cpu linear and gpu linear are slightly different (+/-1 bit)");
  * jitter: the grey mean from fn.reductions.mean (another summation order), then a cast that rounds, then fn.hsv's
    3 x 3 colour matrix and its rounding: a +-1 difference can grow by the factors (<= 1.2 x 1.2 x ~1.5) to a few
    levels at a few pixels, never a shift;
  * crop windows, flips, quarter turns and the colour factors come from the host (augment.sample_train_params),
    the same numbers for both graphs; orientation is a pixel permutation; normalisation is the same float formula.
So per sample: mean |gpu - cpu| <= MEAN_TOL levels and max <= MAX_TOL levels.
Why that catches what it must: `test_tolerance_is_below_what_a_one_pixel_shift_makes` (CPU, runs in CI)
measures, on these very images, what a 1-px shift of the eval crop and of the train window, and a sample swapped
for another (a stream race handing over the wrong or a stale buffer), do to the per-sample mean, and asserts each
is above 2 x MEAN_TOL. A race that leaves part of a buffer unwritten shows as garbage pixels: over MAX_TOL.
Measured on a CPU (these images): a 1-px eval crop shift moves a sample's mean by >= 9.4 levels, a 1-px train window
shift by >= 3.7, another sample by >= 45: MEAN_TOL = 1 is 3.7x below the smallest (the test asserts > 2x).

The same check, on a CPU: DALI's CPU pipeline against the torch loader (PIL decode, torchvision resize) on the
train recipe without colour jitter (the torch loader's jitter is torchvision's exact HSV, DALI's a linear
approximation, so they differ by design): mean <= 0.23, max 2 levels; and the eval recipe against torchvision's
own Resize + CenterCrop. DALI's default rounding (the resize's longer side to nearest, the centre-crop offset half
up) put its eval crop one pixel away from torchvision's (13 - 20 levels per sample on these images); the eval graph
now takes torchvision's sizes and offsets from the host (dermfast.data.augment.eval_geometry).
"""
import inspect

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("nvidia.dali")

from dermfast.data import dali_loader as dl  # noqa: E402
from dermfast.data.augment import Augment  # noqa: E402
from dermfast.data.dali_loader import DaliLoader  # noqa: E402
from dermfast.data.records import ImageRecords  # noqa: E402
from dermfast.data.sampler import BalancedSampler  # noqa: E402

MEAN_TOL = 1.0   # levels (0..255), per sample
MAX_TOL = 8.0    # levels, any pixel of a sample
N = 12
SIZE = 32
SIZES = [(64, 48), (100, 80), (80, 100), (48, 64), (120, 90), (97, 61)]  # (width, height); odd sizes too
EVAL_AUG = Augment(size=SIZE)
TRAIN_AUG = Augment(size=SIZE, scale=(0.3, 1.0), brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
ORIENT_AUG = Augment(size=SIZE, scale=(0.3, 1.0), vflip=0.5, rot90=True, brightness=0.2)
GEOMETRY_AUG = Augment(size=SIZE, scale=(0.3, 1.0))  # windows and flips only: what both loaders compute alike


def _png(rng, w, h):
    cells = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((w, h), Image.BILINEAR)


def _mask(rng, w, h):
    m = Image.new("L", (w, h), 0)
    x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
    ImageDraw.Draw(m).ellipse([x0, y0, x0 + w // 2, y0 + h // 2], fill=255)
    return m


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_pngs")
    rng = np.random.default_rng(4321)
    paths, masks = [], []
    for i in range(N):
        w, h = SIZES[i % len(SIZES)]
        p = root / f"img{i:02d}.png"
        _png(rng, w, h).save(p)
        paths.append(str(p))
        if i % 3 == 2:
            masks.append("")  # an image without a mask: its mask is all zeros
        else:
            mp = root / f"img{i:02d}_mask.png"
            _mask(rng, w, h).save(mp)
            masks.append(str(mp))
    labels = np.array([0, 1] * (N // 2))
    source = (np.arange(N) % 4 == 3).astype(np.uint8)
    return ImageRecords(paths, labels, ["benign", "malignant"], source, masks=masks)


def _levels(images: torch.Tensor, aug: Augment) -> torch.Tensor:
    """Normalised [n, 3, S, S] -> the same pixels in 0..255 levels less the mean (differences are levels)."""
    return images.double().cpu() * (255.0 * torch.tensor(aug.std, dtype=torch.float64).view(1, 3, 1, 1))


def per_sample_diff(got: torch.Tensor, want: torch.Tensor, aug: Augment) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) of |got - want| per sample, in levels."""
    d = (_levels(got, aug) - _levels(want, aug)).abs().flatten(1)
    return d.mean(1), d.amax(1)


def assert_parity(got: torch.Tensor, want: torch.Tensor, aug: Augment, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    mean, mx = per_sample_diff(got, want, aug)
    bad = [(i, round(float(m), 3), round(float(x), 1)) for i, (m, x) in enumerate(zip(mean, mx))
           if m > MEAN_TOL or x > MAX_TOL]
    assert not bad, (f"{what}: samples (index, mean, max levels) over the tolerance (mean {MEAN_TOL}, max "
                     f"{MAX_TOL}): {bad}")


def _cat(batches, key):
    return torch.cat([b[key].cpu() for b in batches])


def _balanced(records, seed=3):
    return BalancedSampler(records.labels, records.source, class_fractions="equal", seed=seed)


def _dali(records, aug, *, device, train, **kw):
    kw.setdefault("num_threads", 2)
    if device == "gpu":
        kw.setdefault("device_id", 0)
    return DaliLoader(records, aug, 4, train=train, device=device, parallel=False, **kw)


def _epochs(loader, n, copy_now=False):
    """n epochs of batches; `copy_now`: also clone every image on torch's current stream as soon as it arrives
    (a read racing DALI's stream sees unfinished data), kept beside the batch DALI handed over."""
    out = []
    for _ in range(n):
        for b in loader:
            if copy_now:
                b = dict(b, image_copied=b["image"].clone())
            out.append(b)
    return out


class _ShiftedWindows:
    """Wraps augment.sample_train_params: every crop window moved by one source pixel (right, or left at the
    image's edge; or down / up), nothing else changed. An off-by-one window, as a bug in a graph would make it."""

    def __init__(self, axis: str):
        self.real, self.axis = dl.sample_train_params, axis

    def __call__(self, *args, **kw):
        bound = inspect.signature(self.real).bind(*args, **kw).arguments
        p = self.real(*args, **kw)
        lo, span, limit = (("x", "w", bound["width"]) if self.axis == "x" else ("y", "h", bound["height"]))
        p[lo] = np.where(p[lo] + p[span] < np.asarray(limit), p[lo] + 1, p[lo] - 1).astype(p[lo].dtype)
        return p


# ------------------------------------------------------------------------------------------------ CPU, in CI


def test_tolerance_is_below_what_a_one_pixel_shift_makes(records, monkeypatch):
    # eval: the crop comes after the resize, so a crop one pixel off is the same output one column / row over
    ev = _levels(_cat(_epochs(_dali(records, EVAL_AUG, device="cpu", train=False), 1), "image"), EVAL_AUG)
    h_shift = (ev[..., 1:] - ev[..., :-1]).abs().flatten(1).mean(1)
    v_shift = (ev[..., 1:, :] - ev[..., :-1, :]).abs().flatten(1).mean(1)
    assert h_shift.min() > 2 * MEAN_TOL and v_shift.min() > 2 * MEAN_TOL, (h_shift, v_shift)
    # a stream race handing sample i the pixels of another sample (or of the batch before)
    others = (ev[:, None] - ev[None, :]).abs().flatten(2).mean(2) + torch.eye(len(ev)) * 1e9
    assert others.min() > 2 * MEAN_TOL, others.min()
    # train: the source window moved by one pixel (before the resize: 32 / window width of an output pixel)
    for aug in (TRAIN_AUG, ORIENT_AUG):
        def run():
            return _cat(_epochs(_dali(records, aug, device="cpu", train=True, sampler=_balanced(records), seed=5),
                                1), "image")
        want = run()
        for axis in ("x", "y"):
            with monkeypatch.context() as m:
                m.setattr(dl, "sample_train_params", _ShiftedWindows(axis))
                shifted = run()
            mean, _ = per_sample_diff(shifted, want, aug)
            assert mean.min() > 2 * MEAN_TOL, (aug, axis, mean)


def test_dali_cpu_matches_the_torch_loader_on_windows_and_flips(records):
    """The parity check on a CPU: DALI's CPU pipeline against the torch loader (PIL, torchvision) on the same
    host-drawn windows and flips, three epochs; measured mean 0.2, max 1 - 2 levels (two resize implementations)."""
    from dermfast.data.torch_loader import TorchLoader
    dali = _dali(records, GEOMETRY_AUG, device="cpu", train=True, sampler=_balanced(records), seed=5)
    tl = TorchLoader(records, GEOMETRY_AUG, 4, train=True, sampler=_balanced(records), seed=5, workers=0)
    a, b = _epochs(dali, 3), _epochs(tl, 3)
    assert _cat(a, "label").tolist() == _cat(b, "label").tolist()
    assert_parity(_cat(a, "image"), _cat(b, "image"), GEOMETRY_AUG, "dali-cpu vs torch, train")
    assert torch.equal(_cat(a, "mask"), _cat(b, "mask"))


def _torchvision_eval(records, aug, dali_rounding: bool):
    """The eval recipe with torchvision: timm's eval transform, Resize(shorter side, bicubic, antialias) and
    CenterCrop; with `dali_rounding`, rounded as DALI rounds: the longer side of the resize to nearest (torchvision
    truncates: 37 x 97 / 61 = 58.8 -> 58, DALI 59) and the centre-crop offset half up (torchvision: half to even)."""
    from torchvision.transforms import functional as TF
    out = []
    short = int(round(aug.size / aug.crop_fraction))
    for p in records.paths:
        img = TF.pil_to_tensor(Image.open(p).convert("RGB"))
        h, w = img.shape[-2:]
        if dali_rounding:
            size = [short, round(short * w / h)] if h <= w else [round(short * h / w), short]
        else:
            size = short
        img = TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        h, w = img.shape[-2:]
        rnd = (lambda v: int(np.floor(v + 0.5))) if dali_rounding else round
        top, left = rnd((h - aug.size) / 2), rnd((w - aug.size) / 2)
        x = TF.crop(img, top, left, aug.size, aug.size).float() / 255.0
        out.append(TF.normalize(x, aug.mean, aug.std))
    return torch.stack(out)


def test_dali_eval_crop_is_torchvisions_centre_crop(records):
    """The loaders' eval crops agree with torchvision / timm (and the torch loader, which uses CenterCrop)."""
    got = _cat(_epochs(_dali(records, EVAL_AUG, device="cpu", train=False), 1), "image")
    assert_parity(got, _torchvision_eval(records, EVAL_AUG, dali_rounding=False), EVAL_AUG, "dali-cpu vs CenterCrop")


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_eval_matches_the_cpu_pipeline(records):
    gpu = _epochs(_dali(records, EVAL_AUG, device="gpu", train=False), 2, copy_now=True)
    cpu = _epochs(_dali(records, EVAL_AUG, device="cpu", train=False), 2)
    for key in ("label", "source", "has_mask"):
        assert torch.equal(_cat(gpu, key), _cat(cpu, key)), key
    want = _cat(cpu, "image")
    assert_parity(_cat(gpu, "image"), want, EVAL_AUG, "eval, as handed over")
    assert_parity(_cat(gpu, "image_copied"), want, EVAL_AUG, "eval, copied on arrival")
    assert torch.equal(_cat(gpu, "mask"), _cat(cpu, "mask"))  # nearest neighbour on the CPU in both graphs
    assert gpu[0]["image"].device == gpu[0]["mask"].device == torch.device("cuda", 0)


@pytest.mark.gpu
@pytest.mark.parametrize("aug", [TRAIN_AUG, ORIENT_AUG], ids=["jitter", "orient"])
def test_gpu_train_matches_the_cpu_pipeline_per_sample(records, aug):
    """Three epochs through one GPU pipeline, every batch kept (a buffer DALI reused would change an earlier
    batch) and copied on arrival (a read racing DALI's stream), each sample against the CPU pipeline's."""
    gpu_loader = _dali(records, aug, device="gpu", train=True, sampler=_balanced(records), seed=5)
    gpu = _epochs(gpu_loader, 3, copy_now=True)
    cpu = _epochs(_dali(records, aug, device="cpu", train=True, sampler=_balanced(records), seed=5), 3)
    assert gpu_loader.builds == 1
    assert torch.equal(_cat(gpu, "label"), _cat(cpu, "label"))
    want = _cat(cpu, "image")
    assert_parity(_cat(gpu, "image"), want, aug, "train, as handed over")
    assert_parity(_cat(gpu, "image_copied"), want, aug, "train, copied on arrival")
    assert torch.equal(_cat(gpu, "mask"), _cat(cpu, "mask"))
