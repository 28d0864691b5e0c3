"""DaliLoader on DALI's CPU pipeline (CI installs nvidia-dali-cuda130), plus GPU-marked tests.

Covered on the CPU: eval order and values, the sampler's order per epoch, one pipeline build over many epochs,
identical batches from fresh loaders with one seed, exact mid-epoch resume (skipped batches never read), epoch
boundaries / jumps / early exits without a rebuild, the parallel source started with spawn in a process where
torch runs, and the GPU graph's definition. On a GPU: nvJPEG decodes (values: tests/test_dali_gpu_parity.py, on PNG), resume and bf16 there,
the parallel source after CUDA is initialised, and `cuda` without an index.
Small generated JPEGs (smooth random content, sizes 48..120 px) and 32 px outputs keep the module fast.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from dermfast.data import dali_loader as dl  # noqa: E402
from dermfast.data.augment import Augment  # noqa: E402
from dermfast.data.dali_loader import DaliLoader  # noqa: E402
from dermfast.data.records import ImageRecords  # noqa: E402
from dermfast.data.sampler import BalancedSampler  # noqa: E402

N = 20
SIZE = 32
SIZES = [(64, 48), (100, 80), (80, 100), (48, 64), (120, 90)]  # (width, height)
EVAL_AUG = Augment(size=SIZE)
TRAIN_AUG = Augment(size=SIZE, scale=(0.3, 1.0), brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)


def _smooth_image(rng, w, h):
    """Low-frequency random colours, so resize filters of different libraries agree closely."""
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_jpegs")
    rng = np.random.default_rng(1234)
    paths = []
    for i in range(N):
        w, h = SIZES[i % len(SIZES)]
        p = root / f"img{i:02d}.jpg"
        _smooth_image(rng, w, h).save(p, quality=95)
        paths.append(str(p))
    labels = np.array([0] * 14 + [1] * 6)[rng.permutation(N)]
    source = np.zeros(N, np.uint8)
    source[[2, 7, 11, 19]] = 1
    return ImageRecords(paths, labels, ["benign", "malignant"], source)


def _epoch(loader):
    return list(loader)


def _cat(batches, key):
    return torch.cat([b[key] for b in batches])


def _cpu(records, aug, bs, **kw):
    kw.setdefault("num_threads", 2)
    return DaliLoader(records, aug, bs, device="cpu", **kw)


def test_eval_every_image_once_in_order(records):
    loader = _cpu(records, EVAL_AUG, 8, train=False)
    assert len(loader) == 3
    batches = _epoch(loader)
    assert [len(b["label"]) for b in batches] == [8, 8, 4]  # last partial batch kept
    assert _cat(batches, "label").tolist() == records.labels.tolist()
    assert _cat(batches, "source").tolist() == records.source.tolist()
    for b in batches:
        assert b["image"].shape == (len(b["label"]), 3, SIZE, SIZE)
        assert b["image"].dtype == torch.float32 and b["image"].device.type == "cpu"
        assert b["label"].dtype == torch.int64 and b["source"].dtype == torch.uint8
    kept = [b["image"].clone() for b in batches]
    again = _epoch(loader)  # second epoch: same batches; earlier tensors not overwritten by DALI's buffers
    for a, b, k in zip(batches, again, kept):
        assert torch.equal(a["image"], k)
        assert torch.equal(a["image"], b["image"])


def _pil_eval_reference(path, aug):
    """The eval recipe with PIL: resize the shorter side (bicubic), centre crop, normalise."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    short = round(aug.size / aug.crop_fraction)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    im = im.resize((nw, nh), Image.BICUBIC)
    # torchvision's CenterCrop: int(round(...)), half to even (DALI's own crop_pos 0.5 rounds half up: not used)
    top, left = int(round((nh - aug.size) / 2.0)), int(round((nw - aug.size) / 2.0))
    a = np.asarray(im, np.float32)[top:top + aug.size, left:left + aug.size] / 255.0
    a = (a - np.array(aug.mean, np.float32)) / np.array(aug.std, np.float32)
    return a.transpose(2, 0, 1)


def test_eval_values_are_normalised_resize_centre_crop(records):
    images = _cat(_epoch(_cpu(records, EVAL_AUG, 8, train=False)), "image").numpy()
    for i in range(len(SIZES)):  # one image of each size (landscape and portrait)
        ref = _pil_eval_reference(records.paths[i], EVAL_AUG)
        assert np.abs(images[i] - ref).mean() < 0.05, i  # measured ~0.007


def test_train_follows_sampler_order(records):
    sampler = BalancedSampler(records.labels, records.source, class_fractions="equal", seed=3)
    loader = _cpu(records, TRAIN_AUG, 6, train=True, sampler=sampler, seed=5)
    for epoch in range(2):
        idx = sampler.rank_indices(epoch)
        n_full = len(idx) // 6 * 6  # drop_last: partial batch dropped
        assert len(loader) == len(idx) // 6
        batches = _epoch(loader)
        assert sampler.epoch == epoch
        assert all(len(b["label"]) == 6 for b in batches)
        assert _cat(batches, "label").tolist() == records.labels[idx[:n_full]].tolist()
        assert _cat(batches, "source").tolist() == records.source[idx[:n_full]].tolist()
        img = _cat(batches, "image")
        assert img.shape == (n_full, 3, SIZE, SIZE) and torch.isfinite(img).all()
    assert not np.array_equal(sampler.rank_indices(0), sampler.rank_indices(1))


def _train_epochs(records, seed, epochs, start=0):
    sampler = BalancedSampler(records.labels, records.source, class_fractions="equal", seed=3)
    loader = _cpu(records, TRAIN_AUG, 6, train=True, sampler=sampler, seed=seed)
    loader.set_epoch(start)
    return [_cat(_epoch(loader), "image") for _ in range(epochs)]


def test_train_augmentations_repeatable_per_seed_and_epoch(records):
    a0, a1 = _train_epochs(records, seed=5, epochs=2)
    b0, b1 = _train_epochs(records, seed=5, epochs=2)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)  # same seed: bit-identical augmented batches
    (c1,) = _train_epochs(records, seed=5, epochs=1, start=1)
    assert torch.equal(a1, c1)  # epoch 1 alone (a resumed run) == epoch 1 after epoch 0
    (d0,) = _train_epochs(records, seed=6, epochs=1)
    assert not torch.equal(a0, d0)  # another seed: other augmentations (same order)


def test_resume_mid_epoch_from_sampler_state(records):
    sampler = BalancedSampler(records.labels, records.source, class_fractions="equal", seed=3)
    sampler.load_state_dict({"seed": 3, "epoch": 1, "position": 6, "rank": 0, "world_size": 1})
    loader = _cpu(records, TRAIN_AUG, 6, train=True, sampler=sampler, seed=5)
    rest = sampler.rank_indices(1)[6:]
    n_full = len(rest) // 6 * 6
    batches = _epoch(loader)
    assert _cat(batches, "label").tolist() == records.labels[rest[:n_full]].tolist()
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["position"] == 6 + n_full
    assert loader.epoch == 2


def test_train_without_sampler_is_a_seeded_permutation(records):
    loader = _cpu(records, Augment(size=SIZE), 32, train=True, seed=1)  # batch > N: drop_last off, one batch
    assert len(loader) == 1
    (b,) = _epoch(loader)
    order = np.random.default_rng([1, 0]).permutation(N)
    assert b["label"].tolist() == records.labels[order].tolist()


def test_leaving_an_epoch_early_then_next_epoch(records):
    loader = _cpu(records, EVAL_AUG, 8, train=False)
    for b in loader:
        break
    assert _cat(_epoch(loader), "label").tolist() == records.labels.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_output(records, dtype):
    ref = _cat(_epoch(_cpu(records, EVAL_AUG, 8, train=False)), "image")
    out = _cat(_epoch(_cpu(records, EVAL_AUG, 8, train=False, output_dtype=dtype)), "image")
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()  # one rounding to 8 / 11 mantissa bits


def _images(loader, epochs, break_after=None):
    """{epoch: images} over `epochs` epochs; epoch `break_after[0]` is left after `break_after[1]` batches."""
    out = {}
    for _ in range(epochs):
        e, got = loader.epoch, []
        for k, b in enumerate(loader):
            got.append(b["image"])
            if break_after and e == break_after[0] and k + 1 == break_after[1]:
                break
        out[e] = torch.cat(got)
    return out


def test_parallel_source_in_a_process_where_torch_has_run(records):
    # The CPU analogue of the GPU machine's failure (DALI cannot fork its workers once CUDA is initialised):
    # torch's thread pools are running here, the workers are started with spawn (the default), once, and plans
    # written after they started (epoch 1 left early, then a jump to epoch 3) still reach them.
    torch.set_num_threads(2)
    (torch.randn(64, 64) @ torch.randn(64, 64)).sum()  # intra-op threads started
    kw = {"train": True, "seed": 2}
    ref = _cpu(records, TRAIN_AUG, 6, parallel=False, **kw)
    par = _cpu(records, TRAIN_AUG, 6, parallel=True, py_workers=1, **kw)
    assert par.py_start_method == "spawn"
    want = _images(ref, 2)
    got = _images(par, 2, break_after=(1, 1))
    par.set_epoch(3)
    ref.set_epoch(3)
    want.update(_images(ref, 1))
    got.update(_images(par, 1))
    assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3])
    assert torch.equal(got[1], want[1][:6])  # the one batch taken before the break
    assert par.builds == 1


def test_undecodable_image_is_named(records, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    paths = list(records.paths[:10]) + [str(bad)]
    rec = ImageRecords(paths, np.zeros(len(paths), np.int64), ["x"])
    loader = _cpu(rec, EVAL_AUG, 4, train=False)
    # the host reads each image's size first (the eval crop's geometry), so that read names the file
    with pytest.raises((RuntimeError, ValueError), match="broken.jpg"):
        _epoch(loader)


def test_errors_are_clear(records, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cpu'"):
            DaliLoader(records, EVAL_AUG, 4, train=False, device="gpu")
    with pytest.raises(ValueError, match="output_dtype"):
        _cpu(records, EVAL_AUG, 4, train=False, output_dtype=torch.int32)
    monkeypatch.setattr(dl, "HAS_DALI", False)
    with pytest.raises(ImportError, match="nvidia-dali"):
        _cpu(records, EVAL_AUG, 4, train=False)


@pytest.mark.parametrize("train, aug", [(True, TRAIN_AUG), (True, Augment(size=SIZE, flip=0.0)), (False, EVAL_AUG),
                                        (True, Augment(size=SIZE, vflip=0.5, rot90=True, brightness=0.2))])
def test_gpu_graph_passes_dalis_definition_checks_without_a_gpu(records, monkeypatch, train, aug):
    # DALI checks operator and argument names and CPU/GPU placement when the graph is defined, before any
    # CUDA work: so the mixed decoder's options and the GPU jitter (arithmetic on GPU nodes) are checked here.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    loader = DaliLoader(records, aug, 4, train=train, device="gpu", device_id=0, parallel=False, num_threads=1,
                        output_dtype=torch.bfloat16)
    kw = loader._decoder_kwargs()
    assert kw["hw_decoder_load"] == 0.99 and kw["preallocate_width_hint"] == max(w for w, _ in SIZES)
    assert kw["preallocate_height_hint"] == max(h for _, h in SIZES)
    loader._build()  # defines the graph (pipe.build() would need CUDA)
    assert loader.builds == 1
    with pytest.raises(KeyError, match="bogus"):
        DaliLoader(records, aug, 4, train=train, device="gpu", device_id=0, parallel=False, num_threads=1,
                   decoder_options={"bogus": 1})._build()


def test_file_reading_moves_to_worker_processes_for_the_gpu_pipeline_over_enough_batches(records, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert DaliLoader(records, EVAL_AUG, 2, train=False, device="gpu", device_id=0).parallel  # 10 batches
    assert not DaliLoader(records, EVAL_AUG, 4, train=False, device="gpu", device_id=0).parallel  # 5: not worth it
    assert not _cpu(records, EVAL_AUG, 2, train=False).parallel  # the CPU pipeline: decoding is the bound
    assert DaliLoader(records, EVAL_AUG, 2, train=False, device="gpu", device_id=0).py_start_method == "spawn"


@pytest.mark.gpu
def test_gpu_pipeline(records):
    ev = DaliLoader(records, EVAL_AUG, 8, train=False, device="gpu", device_id=0, num_threads=2)
    batches = _epoch(ev)
    assert batches[0]["image"].device == torch.device("cuda", 0)
    assert _cat(batches, "label").cpu().tolist() == records.labels.tolist()
    tr = DaliLoader(records, TRAIN_AUG, 6, train=True, device="gpu", device_id=0, num_threads=2,
                    output_dtype=torch.bfloat16)
    img = _cat(_epoch(tr), "image")
    assert img.dtype == torch.bfloat16 and img.is_cuda and img.shape[1:] == (3, SIZE, SIZE)


@pytest.mark.gpu
def test_gpu_train_resumes_exactly(records):
    # values against the CPU graph: tests/test_dali_gpu_parity.py (PNG inputs, per-sample tolerances)
    def gpu(**kw):
        return DaliLoader(records, TRAIN_AUG, 6, train=True, device="gpu", device_id=0, num_threads=2,
                          sampler=_balanced(records), seed=5, **kw)

    loader = gpu()
    epochs = [_cat(_epoch(loader), "image") for _ in range(3)]
    assert loader.builds == 1
    again = gpu()
    assert torch.equal(_cat(_epoch(again), "image"), epochs[0])  # a fresh loader: bit-identical batches
    part = gpu()
    part.set_epoch(1)
    next(iter(part))
    resumed = gpu()
    resumed.load_state_dict(part.state_dict())
    assert torch.equal(_cat(_epoch(resumed), "image"), epochs[1][6:])
    half = _cat(_epoch(gpu(output_dtype=torch.bfloat16)), "image")
    assert half.dtype == torch.bfloat16
    assert (half.float() - epochs[0]).abs().max() <= 0.02 * epochs[0].abs().max()


@pytest.mark.gpu
def test_parallel_source_after_cuda_is_initialised(records):
    torch.zeros(1, device="cuda")  # CUDA initialised in this process: DALI could not fork its workers now
    assert torch.cuda.is_initialized()
    for device in ("gpu", "cpu"):
        kw = {"train": True, "seed": 2, "device": device, "num_threads": 2, "sampler": _balanced(records)}
        ref = _cat(_epoch(DaliLoader(records, TRAIN_AUG, 6, parallel=False, **kw)), "image")
        kw["sampler"] = _balanced(records)
        par = DaliLoader(records, TRAIN_AUG, 6, parallel=True, py_workers=2, **kw)
        assert par.py_start_method == "spawn"
        assert torch.equal(_cat(_epoch(par), "image"), ref), device
    with pytest.raises(ValueError, match="fork"):
        DaliLoader(records, TRAIN_AUG, 6, train=True, device="cpu", parallel=True, py_start_method="fork")


@pytest.mark.gpu
def test_cuda_without_an_index_decodes_on_the_current_device(records):
    from dermfast.data.loader import build_loader
    last = torch.cuda.device_count() - 1
    with torch.cuda.device(last):
        loader = build_loader(records, EVAL_AUG, 8, train=False, loader="dali-gpu", device="cuda", workers=2)
        assert _epoch(loader)[0]["image"].device == torch.device("cuda", last)


# --- built once; order from the sampler; exact, pure-function augmentation; resume ------------------------------


def _balanced(records, seed=3):
    return BalancedSampler(records.labels, records.source, class_fractions="equal", seed=seed)


def test_pipeline_built_once_over_three_epochs_each_in_the_samplers_order(records, monkeypatch):
    built = []
    real_build = DaliLoader._build
    monkeypatch.setattr(DaliLoader, "_build", lambda self: built.append(1) or real_build(self))
    sampler = _balanced(records)
    loader = _cpu(records, TRAIN_AUG, 6, train=True, sampler=sampler, seed=5)
    images = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = _epoch(loader)
        idx = sampler.rank_indices(epoch)[: len(batches) * 6]
        assert len(batches) == len(loader) == len(sampler.rank_indices(epoch)) // 6
        assert _cat(batches, "label").tolist() == records.labels[idx].tolist()
        assert _cat(batches, "source").tolist() == records.source[idx].tolist()
        images.append(_cat(batches, "image"))
    assert len(built) == 1 and loader.builds == 1
    assert loader.restarts == 0  # one DALI epoch streamed all three: nothing drained at the boundaries
    assert not torch.equal(images[0], images[1])  # new epoch: new order and new augmentations


def test_two_fresh_loaders_with_the_same_seed_give_identical_batches(records):
    a = _images(_cpu(records, TRAIN_AUG, 6, train=True, sampler=_balanced(records), seed=5), 2)
    b = _images(_cpu(records, TRAIN_AUG, 6, train=True, sampler=_balanced(records), seed=5), 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_mid_epoch_gives_the_remaining_batches_exactly(records, stop_after):
    full = _cpu(records, TRAIN_AUG, 6, train=True, sampler=_balanced(records), seed=5)
    full.set_epoch(1)
    want = _epoch(full)
    first = _cpu(records, TRAIN_AUG, 6, train=True, sampler=_balanced(records), seed=5)
    first.set_epoch(1)
    for k, _ in enumerate(first):
        if k + 1 == stop_after:
            break
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is JSON
    assert state["epoch"] == 1 and state["position"] == 6 * stop_after
    resumed = _cpu(records, TRAIN_AUG, 6, train=True, sampler=_balanced(records), seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a training loop's set_epoch of the pending epoch keeps the resume position
    rest = _epoch(resumed)
    assert len(rest) == len(want) - stop_after
    for a, b in zip(rest, want[stop_after:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert resumed.state_dict()["position"] == 6 * len(want)
    assert resumed.epoch == 2
    # and the resumed loader's next epoch is the uninterrupted loader's next epoch
    assert torch.equal(_cat(_epoch(resumed), "image"), _cat(_epoch(full), "image"))


def test_resume_skips_reading_the_batches_already_seen(records, monkeypatch):
    asked = []  # (epoch, first position) of every batch the source read
    real_locate = dl._BatchSource.locate

    def locate(self, j, i):
        epoch, start, k = real_locate(self, j, i)
        asked.append((epoch, self.plan.batch_rows(epoch, start, k)[0]))
        return epoch, start, k

    monkeypatch.setattr(dl._BatchSource, "locate", locate)
    loader = _cpu(records, TRAIN_AUG, 6, train=True, seed=5)
    loader.load_state_dict({"epoch": 0, "position": 12, "seed": 5, "sampler": None})
    batches = _epoch(loader)
    assert len(batches) == 1  # 20 images, batches of 6: batch 2 is the only one left
    order = np.random.default_rng([5, 0]).permutation(N)
    assert _cat(batches, "label").tolist() == records.labels[order[12:18]].tolist()
    assert [p for e, p in asked if e == 0] == [12]  # batches 0 and 1 of epoch 0 were never read
    assert all(e == 1 for e, _ in asked[1:])  # the rest is the next epoch, read ahead


def test_epoch_boundary_and_jumps_do_not_rebuild(records):
    loader = _cpu(records, TRAIN_AUG, 6, train=True, sampler=_balanced(records), seed=5)
    ref = _cpu(records, TRAIN_AUG, 6, train=True, sampler=_balanced(records), seed=5)
    want = {e: _cat(_epoch(ref), "image") for e in range(3)}
    got = _images(loader, 1)                     # epoch 0; DALI starts epoch 1 at the boundary
    loader.set_epoch(2)                          # ... which is then not wanted: drained, not rebuilt
    got.update(_images(loader, 1))
    loader.set_epoch(0)
    got.update(_images(loader, 1, break_after=(0, 1)))  # left early
    loader.set_epoch(1)
    got.update(_images(loader, 1))
    assert loader.builds == 1 and loader.restarts == 3  # each move ends a DALI epoch early; none rebuilds
    assert torch.equal(got[2], want[2]) and torch.equal(got[1], want[1]) and torch.equal(got[0], want[0][:6])


def test_the_next_epoch_is_read_ahead_across_the_boundary(records, monkeypatch):
    asked = []  # the epoch of every batch the source was asked for
    real_call = dl._BatchSource.__call__

    def call(self, info):
        asked.append(self.locate(info.epoch_idx, info.iteration)[:1])
        return real_call(self, info)

    monkeypatch.setattr(dl._BatchSource, "__call__", call)
    loader = _cpu(records, TRAIN_AUG, 6, train=True, seed=5, prefetch=3)
    it = iter(loader)
    for _ in range(len(loader)):  # every batch of epoch 0, the iterator not yet finished
        next(it)
    assert (1,) in asked  # epoch 1's first batch is already on its way: the boundary does not wait for it


def test_resumed_at_the_end_of_an_epoch_yields_nothing_then_the_next(records):
    ref = _cpu(records, EVAL_AUG, 8, train=False)
    loader = _cpu(records, EVAL_AUG, 8, train=False)
    loader.load_state_dict({"epoch": 4, "position": N, "seed": 0, "sampler": None})
    assert _epoch(loader) == [] and loader.epoch == 5
    assert torch.equal(_cat(_epoch(loader), "image"), _cat(_epoch(ref), "image"))


def test_eval_follows_a_sampler_when_given(records):
    sampler = BalancedSampler(records.labels, records.source, seed=1, rank=1, world_size=3)
    loader = _cpu(records, EVAL_AUG, 4, train=False, sampler=sampler)
    batches = _epoch(loader)
    idx = sampler.rank_indices(0)
    assert len(idx) == 6  # 16 real images (synthetic ones need synth_ratio) over 3 ranks, wrapped
    assert _cat(batches, "label").tolist() == records.labels[idx].tolist()
    assert [len(b["label"]) for b in batches] == [4, 2]  # eval keeps the last partial batch


def test_parallel_source_workers_ignore_a_terminal_ctrl_c(records):
    """A terminal Ctrl-C reaches DALI's reader processes too; the engine turns SIGINT into "finish the step,
    checkpoint", so they must survive it (before the fix they died and the next batch raised)."""
    import multiprocessing
    import os
    import signal
    import time
    par = _cpu(records, TRAIN_AUG, 6, parallel=True, py_workers=1, train=True, seed=2)
    it = iter(par)
    next(it)
    workers = multiprocessing.active_children()
    assert workers
    for w in workers:
        os.kill(w.pid, signal.SIGINT)
    time.sleep(1.0)
    assert all(w.is_alive() for w in workers)
    assert len(list(it)) == len(par) - 1
