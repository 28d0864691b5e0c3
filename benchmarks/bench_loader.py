"""Loader throughput and epoch boundary: full-size (1024 x 768) JPEGs -> 224 px, random resized crop + flip +
normalise to float16, class-balanced sampling, batch 128, for dermfast's dali-gpu (with and without colour
jitter), dali-cpu and torch loaders, beside two peers: a plain DALI pipeline (``fn.readers.file`` ->
``decoders.image_random_crop`` -> resize -> crop_mirror_normalize, prefetch 3, hw_decoder_load 0.99: what the
hardware gives without a user sampler) and torchvision's batched GPU ``decode_jpeg`` with the same windows.

    python benchmarks/bench_loader.py [--quick] [--images 2048] [--batch-size 128] [--workers CORES] [--epochs 3]
    python -m dermfast.bench            (the harness: run(quick) -> rows)

- The JPEGs are written once into the cache, in parallel over the cores (a pool of forked processes).
- Each implementation runs one warm-up epoch (pipeline build, worker start, decoder init: excluded), then
  ``epochs`` timed epochs; batches are synchronised on the GPU as they arrive. Rows:
  pass "batch": ms per batch of a steady-state epoch, counted from the previous epoch's last batch, so the
  boundary is included; ``note`` gives images/s. pass "epoch-boundary": ms from the last batch of epoch e to
  the first batch of e + 1 (dermfast loaders; the peers' readers never end an epoch). ``peak_mib``: GPU memory
  the implementation holds after its epochs (device free-memory drop, DALI's pools and nvJPEG buffers included).
- Two dali-gpu variants measure choices made without a GPU at hand: DALI's default hybrid_huffman_threshold
  (1 MP) against dermfast's 500k, and file reading on the training thread (parallel=False) against the
  spawned reader processes.
- Without a GPU the GPU rows are reported absent; CPU numbers only prove the harness works.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import absent, main, on_gpu, row  # noqa: E402

from dermfast import _optional  # noqa: E402
from dermfast.data.adapters import read_csv  # noqa: E402
from dermfast.data.augment import Augment, sample_train_params  # noqa: E402
from dermfast.data.loader import build_loader, cores_per_rank  # noqa: E402
from dermfast.data.sampler import BalancedSampler  # noqa: E402
from dermfast.data.toy import CLASSES, class_counts, default_cache_dir, render_lesion  # noqa: E402

FULL = {"images": 2048, "width": 1024, "height": 768, "render": 384, "size": 224, "batch": 128, "epochs": 3}
QUICK = {"images": 48, "width": 160, "height": 120, "render": 64, "size": 64, "batch": 16, "epochs": 2}
BENCH = "loader"


# --- data ------------------------------------------------------------------------------------------------------
def _write_one(job: tuple) -> None:
    i, label, w, h, render, path = job
    from PIL import Image
    rng = np.random.default_rng([7, i])
    img = Image.fromarray(render_lesion(rng, label, render)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (h, w, 3), dtype=np.int16)  # sensor noise
    tmp = path.with_suffix(".tmp")
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(tmp, format="JPEG", quality=90)
    tmp.replace(path)


def make_jpegs(n: int, w: int, h: int, render: int, root: Path, workers: int) -> Path:
    """n ISIC-like w x h JPEGs (quality 90) with HAM10000-like labels, written once, over `workers` processes."""
    images = root / "images"
    if (root / "labels.csv").is_file() and len(list(images.glob("*.jpg"))) == n:
        return root
    images.mkdir(parents=True, exist_ok=True)
    labels = [c for c, k in class_counts(n).items() for _ in range(k)][:n]
    jobs = [(i, label, w, h, render, images / f"full_{i:05d}.jpg") for i, label in enumerate(labels)
            if not (images / f"full_{i:05d}.jpg").is_file()]
    if jobs:
        # fork: the children only run numpy / PIL (never CUDA or torch ops), and a fork starts in milliseconds
        with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
            pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (8 * max(1, workers))))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *((f"full_{i:05d}", lab) for i, lab in enumerate(labels))])
    return root


# --- timing ----------------------------------------------------------------------------------------------------
def _held_mib() -> float | None:
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def measure(epoch_iter, epochs: int, gpu: bool) -> dict:
    """epoch_iter(e) -> an iterable of batches (dicts with "image"); one warm-up epoch, then `epochs` timed."""
    last = None
    per_batch, boundary, rates = [], [], []
    for e in range(epochs + 1):
        first = now = None
        n = k = 0
        for b in epoch_iter(e):
            if gpu:
                torch.cuda.synchronize()
            now = time.perf_counter()
            first = now if first is None else first
            n, k = n + b["image"].shape[0], k + 1
        if k == 0:
            raise RuntimeError("an epoch yielded no batch: use more --images or a smaller --batch-size")
        if e >= 1:
            boundary.append((first - last) * 1e3)
            per_batch.append((now - last) / k * 1e3)
            rates.append(n / (now - last))
        last = now
    return {"batch": _timing(per_batch), "boundary": _timing(boundary), "img_s": statistics.median(rates)}


def _timing(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "p20_ms": q[1], "p80_ms": q[7]}


# --- implementations -------------------------------------------------------------------------------------------
def _ours(records, backend: str, aug: Augment, cfg: dict, workers: int, device: torch.device):
    sampler = BalancedSampler(records.labels, records.source, class_fractions="equal", seed=0)
    loader = build_loader(records, aug, cfg["batch"], train=True, sampler=sampler, loader=backend, device=device,
                          seed=0, workers=workers, output_dtype=torch.float16)

    def epoch(e):
        loader.set_epoch(e)
        return loader
    return epoch, loader


def _ours_direct(records, aug: Augment, cfg: dict, workers: int, **options):
    """A DaliLoader with options build_loader does not expose (decoder settings to compare)."""
    from dermfast.data.dali_loader import DaliLoader
    sampler = BalancedSampler(records.labels, records.source, class_fractions="equal", seed=0)
    loader = DaliLoader(records, aug, cfg["batch"], train=True, sampler=sampler, device="gpu", seed=0,
                        num_threads=workers, output_dtype=torch.float16, **options)

    def epoch(e):
        loader.set_epoch(e)
        return loader
    return epoch, loader


def _readers_file(records, aug: Augment, cfg: dict, workers: int, gpu: bool):
    from nvidia import dali
    from nvidia.dali import fn, types
    pipe = dali.Pipeline(batch_size=cfg["batch"], num_threads=workers, device_id=0 if gpu else None, seed=0,
                         prefetch_queue_depth=3, exec_dynamic=True)
    with pipe:
        jpegs, labels = fn.readers.file(files=list(records.paths), labels=[int(v) for v in records.labels],
                                        random_shuffle=True, name="reader")
        dec = {"device": "mixed", "hw_decoder_load": 0.99} if gpu else {"device": "cpu"}
        img = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=list(aug.scale),
                                            random_aspect_ratio=list(aug.ratio), **dec)
        img = fn.resize(img, size=[aug.size, aug.size], antialias=True)
        img = fn.crop_mirror_normalize(img, mirror=fn.random.coin_flip(probability=aug.flip),
                                       mean=[255 * m for m in aug.mean], std=[255 * s for s in aug.std],
                                       dtype=types.FLOAT16, output_layout="CHW")
        pipe.set_outputs(img, labels.gpu() if gpu else labels)
    pipe.build()
    batches = len(records) // cfg["batch"]

    def epoch(e):
        for _ in range(batches):
            img, label = pipe.run()
            yield {"image": torch.from_dlpack(img.as_tensor()), "label": torch.from_dlpack(label.as_tensor())}
    return epoch, pipe


def _torchvision_gpu(records, aug: Augment, cfg: dict):
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F
    mean = torch.tensor(aug.mean, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(aug.std, device="cuda").view(1, 3, 1, 1)
    b = cfg["batch"]

    def epoch(e):
        order = np.random.default_rng([0, e]).permutation(len(records))
        for k in range(len(records) // b):
            idx = order[k * b:(k + 1) * b]
            data = [torch.frombuffer(bytearray(records.read_bytes(int(i))), dtype=torch.uint8) for i in idx]
            imgs = decode_jpeg(data, device="cuda")
            p = sample_train_params(aug, 0, 0, e, np.arange(k * b, (k + 1) * b), [im.shape[2] for im in imgs],
                                    [im.shape[1] for im in imgs])
            out = torch.stack([F.resized_crop(im, int(p["y"][j]), int(p["x"][j]), int(p["h"][j]), int(p["w"][j]),
                                              [aug.size, aug.size], antialias=True) for j, im in enumerate(imgs)])
            flip = torch.from_numpy(p["flip"].astype(bool)).to("cuda", non_blocking=True).view(-1, 1, 1, 1)
            out = torch.where(flip, out.flip(3), out)
            yield {"image": ((out.float() / 255 - mean) / std).half()}
    return epoch, None


# --- run -------------------------------------------------------------------------------------------------------
def run(quick: bool = False, images: int | None = None, batch_size: int | None = None, workers: int | None = None,
        epochs: int | None = None) -> list[dict]:
    cfg = dict(QUICK if quick else FULL)
    cfg.update({k: v for k, v in {"images": images, "batch": batch_size, "epochs": epochs}.items() if v})
    workers = workers or cores_per_rank()
    gpu = on_gpu()
    root = default_cache_dir() / f"bench-loader-{cfg['width']}x{cfg['height']}-{cfg['images']}"
    records = read_csv(make_jpegs(cfg["images"], cfg["width"], cfg["height"], cfg["render"], root, workers),
                       classes=list(CLASSES))
    shape = f"{cfg['width']}x{cfg['height']}->{cfg['size']} b{cfg['batch']} n{len(records)}"
    plain = Augment(size=cfg["size"])  # RRC (0.08, 1) + flip + normalise
    jitter = Augment(size=cfg["size"], brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
    cuda = torch.device("cuda") if gpu else torch.device("cpu")
    plans = [  # (impl, workload, builder or the reason it cannot run here)
        ("dermfast-dali-gpu", "rrc+flip", lambda: _ours(records, "dali-gpu", plain, cfg, workers, cuda)
         if gpu and _optional.HAS_DALI else _why(gpu, dali=True)),
        ("dermfast-dali-gpu", "rrc+flip+jitter", lambda: _ours(records, "dali-gpu", jitter, cfg, workers, cuda)
         if gpu and _optional.HAS_DALI else _why(gpu, dali=True)),
        ("dermfast-dali-gpu-hht1M", "rrc+flip",  # DALI's default hybrid_huffman_threshold, to compare
         lambda: _ours_direct(records, plain, cfg, workers, decoder_options={"hybrid_huffman_threshold": 1_000_000})
         if gpu and _optional.HAS_DALI else _why(gpu, dali=True)),
        ("dermfast-dali-gpu-serial-read", "rrc+flip",  # files read on the training thread, to compare
         lambda: _ours_direct(records, plain, cfg, workers, parallel=False)
         if gpu and _optional.HAS_DALI else _why(gpu, dali=True)),
        ("dermfast-dali-cpu", "rrc+flip", lambda: _ours(records, "dali-cpu", plain, cfg, workers, cuda)
         if _optional.HAS_DALI else _why(True, dali=True)),
        ("dermfast-torch", "rrc+flip", lambda: _ours(records, "torch", plain, cfg, workers, cuda)),
        ("dali-readers.file-gpu", "rrc+flip", lambda: _readers_file(records, plain, cfg, workers, True)
         if gpu and _optional.HAS_DALI else _why(gpu, dali=True)),
        ("dali-readers.file-cpu", "rrc+flip", lambda: _readers_file(records, plain, cfg, workers, False)
         if _optional.HAS_DALI else _why(True, dali=True)),
        ("torchvision-decode_jpeg-gpu", "rrc+flip", lambda: _torchvision_gpu(records, plain, cfg)
         if gpu else "no CUDA GPU"),
    ]
    rows: list[dict] = []
    try:
        _run_plans(plans, rows, shape, cfg, gpu, workers)
    except BaseException as e:  # SIGTERM / a failure: the harness keeps the rows measured so far
        e.partial_rows = rows
        raise
    return rows


def _run_plans(plans, rows: list[dict], shape: str, cfg: dict, gpu: bool, workers: int) -> None:
    for impl, workload, build in plans:
        base = _held_mib()
        try:
            made = build()
        except Exception as e:  # a peer that cannot run here (e.g. torchvision without its compiled ops)
            made = f"{type(e).__name__}: {e}"
        if isinstance(made, str):
            rows.append(absent(BENCH, workload, shape, "float16", impl, "batch", made))
            continue
        epoch_iter, keep = made
        on_device = gpu and not impl.endswith("-cpu")
        r = measure(epoch_iter, cfg["epochs"], gpu)
        held = _held_mib()
        peak = None if base is None or held is None else held - base
        note = f"{r['img_s']:.1f} img/s; {workers} workers/threads" + ("" if on_device else "; host decode")
        rows.append(row(BENCH, workload, shape, "float16", impl, "batch", r["batch"], peak=peak, note=note,
                        extra={"images_per_s": f"{r['img_s']:.1f}", "workers": workers}))
        if impl.startswith("dermfast"):
            rows.append(row(BENCH, workload, shape, "float16", impl, "epoch-boundary", r["boundary"],
                            note="last batch of epoch e -> first batch of e+1"))
        del epoch_iter, keep


def summary(rows: list[dict]) -> str:
    """Markdown: img/s per implementation and the issue-6 targets (>= 80 % of the plain DALI pipeline, >= 5x the
    torch DataLoader, epoch boundary < 50 ms)."""
    ok = {(r["impl"], r["workload"], r["pass"]): r for r in rows if r.get("status") == "ok"}

    def rate(impl, workload="rrc+flip"):
        r = ok.get((impl, workload, "batch"))
        return float(r["images_per_s"]) if r and r.get("images_per_s") else None

    out = ["## Loader (JPEG -> crop -> resize -> normalise, balanced sampling)", ""]
    if not on_gpu():
        out += ["CPU run: proves the benchmark works; not a performance result.", ""]
    for (impl, workload, pass_), r in ok.items():
        if pass_ == "batch":
            boundary = ok.get((impl, workload, "epoch-boundary"))
            extra = f", epoch boundary {float(boundary['median_ms']):.1f} ms" if boundary else ""
            held = f", {float(r['peak_mib']):.0f} MiB GPU memory held" if r.get("peak_mib") else ""
            out.append(f"- {impl} ({workload}): {r['images_per_s']} img/s{extra}{held}")
    ours, plain, torch_rate = rate("dermfast-dali-gpu"), rate("dali-readers.file-gpu"), rate("dermfast-torch")
    if ours and plain:
        out.append(f"- dali-gpu / plain DALI reader pipeline: {ours / plain:.2f} (target >= 0.80)")
    if ours and torch_rate:
        out.append(f"- dali-gpu / torch DataLoader: {ours / torch_rate:.1f}x (target >= 5x)")
    return "\n".join(out + [""])


def _why(gpu: bool, dali: bool) -> str:
    if not gpu:
        return "no CUDA GPU"
    return f"no DALI ({_optional.DALI_REASON})" if dali else "unavailable"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--images", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--epochs", type=int)
    known, rest = ap.parse_known_args()
    sys.exit(main(lambda quick: run(quick, known.images, known.batch_size, known.workers, known.epochs), rest))
