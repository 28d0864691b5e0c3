"""Sampler speed: one epoch's indices for ISIC-2024-sized label sets (CPU; numpy).

    python benchmarks/bench_sampler.py [--n 400000] [--imbalance 1000] [--repeats 5]
Prints the median milliseconds per epoch for each configuration.
"""
import argparse
import statistics
import time

import numpy as np

from dermfast.data.sampler import BalancedSampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400_000)
    ap.add_argument("--imbalance", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    labels = np.zeros(a.n, np.int64)
    labels[:: a.imbalance] = 1
    source = (np.random.default_rng(0).random(a.n) < 0.25).astype(np.uint8)
    configs = {
        "natural order": {},
        "balanced 0.5": {"class_fractions": "equal"},
        "balanced + neg_keep 0.1": {"class_fractions": "equal", "neg_keep": 0.1},
        "balanced + real:synth 1:3": {"class_fractions": "equal", "synth_ratio": 3.0},
        "balanced, rank 3 of 8": {"class_fractions": "equal", "rank": 3, "world_size": 8},
    }
    print(f"{a.n:,} labels, 1:{a.imbalance} imbalance; median of {a.repeats} epochs")
    for name, kw in configs.items():
        s = BalancedSampler(labels, source if "synth_ratio" in kw else None, seed=0, **kw)
        times = []
        for e in range(a.repeats):
            t = time.perf_counter()
            idx = s.rank_indices(e)
            times.append(time.perf_counter() - t)
        print(f"  {name:<28} {statistics.median(times) * 1e3:8.1f} ms/epoch  ({len(idx):,} indices)")


if __name__ == "__main__":
    main()
