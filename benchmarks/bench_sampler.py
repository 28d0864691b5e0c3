"""Sampler speed: one epoch's indices for ISIC-2024-sized label sets (host code: numpy, on any machine).

    python benchmarks/bench_sampler.py [--quick] [--out FILE]        (or: python -m dermfast.bench --only sampler)

400,000 labels at 1:1000 imbalance (ISIC 2024: 400,666 benign vs 393 malignant), 25% synthetic; the median
time per epoch of `BalancedSampler.rank_indices` for each configuration. `--quick` uses 20,000 labels. This is
host work: the time is wall-clock on the CPU whether or not a GPU is present.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import main, row, time_fn  # noqa: E402

from dermfast.data.sampler import BalancedSampler  # noqa: E402

CONFIGS = {
    "natural order": {},
    "balanced 0.5": {"class_fractions": "equal"},
    "balanced + neg_keep 0.1": {"class_fractions": "equal", "neg_keep": 0.1},
    "balanced + real:synth 1:3": {"class_fractions": "equal", "synth_ratio": 3.0},
    "balanced, rank 3 of 8": {"class_fractions": "equal", "rank": 3, "world_size": 8},
}


def run(quick: bool = False) -> list[dict]:
    n, imbalance = (20_000, 1000) if quick else (400_000, 1000)
    labels = np.zeros(n, np.int64)
    labels[::imbalance] = 1
    source = (np.random.default_rng(0).random(n) < 0.25).astype(np.uint8)
    rows = []
    for name, kw in CONFIGS.items():
        s = BalancedSampler(labels, source if "synth_ratio" in kw else None, seed=0, **kw)
        epoch = iter(range(10**9))  # a new epoch every call: the sampler re-draws per epoch
        timing = time_fn(lambda: s.rank_indices(next(epoch)), warmup=2, rep=5 if quick else 25, host=True)
        k = len(s.rank_indices(0))
        rows.append(row("sampler", name, f"n={n} 1:{imbalance}", "int64", "dermfast", "epoch", timing,
                        bytes_=8.0 * k, note=f"{k:,} indices per epoch (gbps = index bytes written)"))
    return rows


if __name__ == "__main__":
    sys.exit(main(run))
