"""Loader throughput: images/s at 224 px from full-size (1024 x 768) JPEGs, decode + random resized crop + flip +
normalise, class-balanced sampling on, for DALI GPU, DALI CPU and the torchvision DataLoader (workers = cores).

    python benchmarks/bench_loader.py [--images 512] [--batch-size 64] [--epochs 2] [--backends ...]

Each backend runs one warm-up epoch, then `--epochs` timed epochs (the batch is moved to the model's device and,
on a GPU, synchronised before the clock stops). Rows go to benchmarks/results/<device>-<date>.csv with the
device, cores, versions and git commit; a table is printed last. Backends that cannot run here (no GPU, no
DALI) are reported as absent. CPU numbers are not GPU performance results: say which machine they came from.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dermfast import _optional
from dermfast.data.adapters import read_csv
from dermfast.data.augment import Augment
from dermfast.data.loader import build_loader
from dermfast.data.sampler import BalancedSampler
from dermfast.data.toy import CLASSES, class_counts, default_cache_dir, render_lesion

RESULTS = Path(__file__).parent / "results"


def make_full_size_jpegs(n: int, root: Path) -> Path:
    """n ISIC-like 1024 x 768 JPEGs (quality 90) with HAM10000-like labels, written once."""
    if (root / "labels.csv").is_file() and len(list((root / "images").glob("*.jpg"))) == n:
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    labels = [c for c, k in class_counts(n).items() for _ in range(k)]
    rows = []
    for i, label in enumerate(labels):
        rng = np.random.default_rng([7, i])
        img = Image.fromarray(render_lesion(rng, label, 384)).resize((1024, 768), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (768, 1024, 3), dtype=np.int16)  # sensor noise
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / "images" / f"full_{i:05d}.jpg", quality=90)
        rows.append((f"full_{i:05d}", label))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *rows])
    return root


def time_backend(records, backend: str, device: torch.device, batch: int, epochs: int, workers: int) -> dict:
    aug = Augment(size=224)  # RRC (0.08, 1) + flip + normalise, no colour jitter
    sampler = BalancedSampler(records.labels, records.source, class_fractions="equal", seed=0)
    loader = build_loader(records, aug, batch, train=True, sampler=sampler, loader=backend, device=device,
                          seed=0, workers=workers)
    rates = []
    for epoch in range(epochs + 1):  # epoch 0 warms up (pipeline build, worker start, decoder init)
        n = 0
        t = time.perf_counter()
        for b in loader:
            n += b["image"].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:
            rates.append(n / (time.perf_counter() - t))
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "images": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--backends", nargs="+", default=["dali-gpu", "dali-cpu", "torch"])
    ap.add_argument("--data", type=Path, default=default_cache_dir() / "bench-loader-1024x768")
    a = ap.parse_args()

    records = read_csv(make_full_size_jpegs(a.images, a.data), classes=list(CLASSES))
    gpu = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if gpu else f"cpu-{platform.processor() or platform.machine()}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    rows = []
    for backend in a.backends:
        device = torch.device("cuda" if gpu and backend != "torch-cpu" else "cpu")
        base = {"bench": "loader", "backend": backend, "device": device_name, "cores": os.cpu_count(),
                "workers": a.workers, "images": a.images, "batch": a.batch_size, "size": 224,
                "date": dt.date.today().isoformat(), "torch": torch.__version__, "commit": commit}
        if backend.startswith("dali") and not _optional.HAS_DALI:
            rows.append({**base, "status": f"absent: {_optional.DALI_REASON}"})
            continue
        if backend == "dali-gpu" and not gpu:
            rows.append({**base, "status": "absent: no CUDA GPU"})
            continue
        r = time_backend(records, backend, device, a.batch_size, a.epochs, a.workers)
        rows.append({**base, "status": "ok", **{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}})

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{device_name.replace(' ', '_')}-{dt.date.today().isoformat()}.csv"
    fields = list(dict.fromkeys(k for r in rows for k in r))
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    torch_rate = next((r["images_per_s"] for r in rows if r["backend"] == "torch" and r["status"] == "ok"), None)
    print(f"\nloader throughput on {device_name}, {os.cpu_count()} cores, {a.images} JPEGs 1024x768 -> 224 px, "
          f"balanced sampling (rows appended to {out})")
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['backend']:<9} {r['status']}")
            continue
        vs = f"  {r['images_per_s'] / torch_rate:4.2f}x torch" if torch_rate else ""
        print(f"  {r['backend']:<9} {r['images_per_s']:8.1f} img/s  (min {r['min']}, max {r['max']}){vs}")


if __name__ == "__main__":
    main()
