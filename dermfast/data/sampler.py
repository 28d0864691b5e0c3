"""The one sampler every loader uses: class balance, negative downsampling, real:synthetic mixing, sharding.

An epoch's order is a pure function of (seed, epoch): numpy's PCG64 seeded with [seed, epoch], so the same
seed and epoch give the same indices on any machine, and a resumed run continues the same sequence
(`state_dict` keeps the epoch and how far into it this rank got).

Per epoch, per class c:
1. the real pool is the class's real images; for the majority class (or `downsample_class`), `neg_keep` keeps a
   fraction (a float <= 1) or a count (an int, or a float > 1), drawn afresh each epoch;
2. with `synth_ratio` r (synthetic images per real image, a float or {class: r}; `math.inf` = synthetic only),
   the class's draws are split real : synthetic = 1 : r;
3. with `class_fractions` (None = natural counts, "equal", or {class: fraction}), the epoch's size N (default:
   the pools' total) is divided among classes by fraction; a class needing more draws than its pool holds takes
   the whole pool and then draws the rest with replacement (oversampling the rare class, as the ISIC 2024
   winners did with 393 positives).
The epoch's indices are shuffled, padded by wrapping to a multiple of `world_size`, and rank r takes
positions r, r + world_size, ...: disjoint slices whose union is the epoch.
Everything is vectorised numpy: 400,000 labels at 1:1000 take a few milliseconds an epoch (bench_sampler).
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping

import numpy as np


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to weights summing exactly to total."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("class fractions must not all be zero")
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    short = total - int(out.sum())
    if short:
        out[np.argsort(-(exact - out), kind="stable")[:short]] += 1
    return out


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """n indices from pool: without replacement while the pool lasts, then with replacement."""
    if n <= 0 or len(pool) == 0:
        return pool[:0]
    if n <= len(pool):
        return pool[rng.permutation(len(pool))[:n]]
    extra = pool[rng.integers(0, len(pool), n - len(pool))]
    return np.concatenate([pool, extra])


class BalancedSampler:
    """Seeded, epoch-keyed, shard-aware index sampler over labels [N] and sources [N] (0 real, 1 synthetic).

    Iterating yields this rank's dataset indices for the current epoch (from the saved position on, after
    `load_state_dict`); `set_epoch(e)` moves to epoch e, as torch's DistributedSampler does.
    """

    def __init__(self, labels, source=None, *, class_fractions: str | Mapping[int, float] | None = None,
                 neg_keep: float | int | None = None, downsample_class: int | None = None,
                 synth_ratio: float | Mapping[int, float] | None = None, epoch_size: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        labels = np.asarray(labels, dtype=np.int64)
        source = np.zeros(len(labels), np.uint8) if source is None else np.asarray(source, dtype=np.uint8)
        if labels.ndim != 1 or source.shape != labels.shape:
            raise ValueError("BalancedSampler: labels and source must be 1-D and the same length")
        if len(labels) == 0:
            raise ValueError("BalancedSampler: no images to sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"BalancedSampler: rank {rank} not in [0, world_size={world_size})")
        if labels.min() < 0:
            raise ValueError("BalancedSampler: every image needs a label >= 0 (got -1: unlabelled)")
        self.num_classes = int(labels.max()) + 1
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(self.num_classes + 1))
        per_class = [order[bounds[c]:bounds[c + 1]] for c in range(self.num_classes)]
        self.real = [idx[source[idx] == 0] for idx in per_class]
        self.synth = [idx[source[idx] == 1] for idx in per_class]
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch, self.position, self._resume_from = 0, 0, 0
        self.neg_keep, self.epoch_size = neg_keep, epoch_size
        counts = np.array([len(r) for r in self.real])
        self.downsample_class = int(np.argmax(counts)) if downsample_class is None else int(downsample_class)
        self.synth_ratio = self._per_class(synth_ratio, "synth_ratio", default=0.0)
        if synth_ratio is not None and not isinstance(synth_ratio, Mapping):
            # one ratio for all: it applies to the classes that have synthetic images
            if not any(len(s) for s in self.synth):
                raise ValueError("synth_ratio is set but there are no synthetic images")
            self.synth_ratio = [r if len(self.synth[c]) else 0.0 for c, r in enumerate(self.synth_ratio)]
        for c, r in enumerate(self.synth_ratio):
            if r < 0:
                raise ValueError(f"synth_ratio for class {c} must be >= 0, got {r}")
            if r > 0 and len(self.synth[c]) == 0 and len(self.real[c]) + len(self.synth[c]) > 0:
                raise ValueError(f"synth_ratio asks for synthetic images of class {c}, but there are none")
            if math.isinf(r) and len(self.synth[c]) == 0:
                raise ValueError(f"class {c} is synthetic-only but has no synthetic images")
        if class_fractions is None:
            self.fractions = None
        elif class_fractions == "equal":
            present = np.array([len(self.real[c]) + len(self.synth[c]) > 0 for c in range(self.num_classes)])
            self.fractions = present / present.sum()
        else:
            self.fractions = np.array(self._per_class(class_fractions, "class_fractions", default=0.0))
            if np.any(self.fractions < 0) or self.fractions.sum() <= 0:
                raise ValueError("class_fractions must be >= 0 and not all zero")
            self.fractions = self.fractions / self.fractions.sum()
            for c in np.flatnonzero(self.fractions):
                if len(self.real[c]) + len(self.synth[c]) == 0:
                    raise ValueError(f"class_fractions asks for class {c}, which has no images")
        self._len = None

    def _per_class(self, value, name: str, default: float) -> list[float]:
        if value is None:
            return [default] * self.num_classes
        if isinstance(value, Mapping):
            bad = [k for k in value if not 0 <= int(k) < self.num_classes]
            if bad:
                raise ValueError(f"{name}: unknown class index {bad[0]} (classes 0..{self.num_classes - 1})")
            return [float(value.get(c, default)) for c in range(self.num_classes)]
        return [float(value)] * self.num_classes

    # --- one epoch ---------------------------------------------------------------------------------------
    def _real_pool(self, rng: np.random.Generator, c: int) -> np.ndarray:
        pool = self.real[c]
        if c == self.downsample_class and self.neg_keep is not None:
            keep = self.neg_keep
            # a float <= 1 is a fraction (1.0 keeps all); an int, or a float > 1, is a count
            n = int(round(len(pool) * keep)) if isinstance(keep, float) and keep <= 1 else int(keep)
            if n < 0:
                raise ValueError(f"neg_keep must be >= 0, got {keep}")
            pool = pool[rng.permutation(len(pool))[:min(n, len(pool))]]
        return pool

    def _class_draws(self, rng: np.random.Generator, c: int, n: int | None, real_pool: np.ndarray) -> np.ndarray:
        """n draws of class c split real : synthetic = 1 : r (n None: the class's natural count)."""
        r = self.synth_ratio[c]
        syn_pool = self.synth[c]
        if n is None:
            if r == 0:
                return real_pool[rng.permutation(len(real_pool))]
            n = len(syn_pool) if math.isinf(r) else len(real_pool) + int(round(len(real_pool) * r))
        n_syn = n if math.isinf(r) else int(round(n * r / (1.0 + r)))
        if len(real_pool) == 0:
            n_syn = n
        return np.concatenate([_draw(rng, real_pool, n - n_syn), _draw(rng, syn_pool, n_syn)])

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """All ranks' indices for `epoch`, shuffled (before sharding); int64."""
        rng = np.random.default_rng([self.seed, epoch])
        pools = [self._real_pool(rng, c) for c in range(self.num_classes)]
        if self.fractions is None:
            parts = [self._class_draws(rng, c, None, pools[c]) for c in range(self.num_classes)]
            if self.epoch_size is not None:
                parts = [np.concatenate(parts)]
                parts = [_draw(rng, parts[0], self.epoch_size)]
        else:
            natural = sum(len(p) for p in pools) + sum(
                len(self.synth[c]) if self.synth_ratio[c] > 0 else 0 for c in range(self.num_classes))
            total = self.epoch_size or natural
            counts = _largest_remainder(total, self.fractions)
            parts = [self._class_draws(rng, c, int(counts[c]), pools[c]) for c in range(self.num_classes)]
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if len(idx) == 0:
            raise ValueError("BalancedSampler: this epoch has no images (check neg_keep and class_fractions)")
        return idx[rng.permutation(len(idx))].astype(np.int64)

    def rank_indices(self, epoch: int) -> np.ndarray:
        idx = self.epoch_indices(epoch)
        per_rank = -(-len(idx) // self.world_size)
        if per_rank * self.world_size > len(idx):  # wrap so every rank gets the same count
            idx = np.resize(idx, per_rank * self.world_size)
        return idx[self.rank::self.world_size]

    # --- iteration and state -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position, self._resume_from = int(epoch), 0, 0

    def __iter__(self) -> Iterator[int]:
        idx = self.rank_indices(self.epoch)
        self._len = len(idx)
        start, self._resume_from = self._resume_from, 0
        for i in range(start, len(idx)):
            self.position = i + 1
            yield int(idx[i])

    def __len__(self) -> int:
        """Indices the next iteration yields (the rest of the epoch right after `load_state_dict`)."""
        if self._len is None:
            self._len = len(self.rank_indices(self.epoch))
        return self._len - self._resume_from

    def state_dict(self, consumed: int | None = None) -> dict:
        """State to checkpoint. Pass `consumed` (samples this rank actually trained on this epoch): a loader
        with prefetching workers has drawn further ahead than the model has seen."""
        return {"seed": self.seed, "epoch": self.epoch,
                "position": self.position if consumed is None else int(consumed),
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["seed"]) != self.seed or int(state["world_size"]) != self.world_size:
            raise ValueError(f"sampler state is for seed {state['seed']} / world_size {state['world_size']}, "
                             f"this sampler has seed {self.seed} / world_size {self.world_size}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._resume_from = self.position
