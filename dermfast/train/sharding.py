"""Shard an epoch by global batch, so that N ranks of batch b train on exactly what one process of batch N*b
would.

`BalancedSampler` shards by stride (rank r takes positions r, r + N, ...). Then rank r's i-th sample of
global batch k is epoch position k*N*b + i*N + r, which no per-rank `sample_offset` can name, and two ranks of
batch b see different (sample, mask) pairs than one rank of batch 2b. Here rank r takes block r of each global
batch: positions k*N*b + r*b + i, whose global index inside the global batch is `r*b + i = sample_offset + i`
(the MAE masking key). The tail after the last full global batch is dealt by stride, padded by wrapping to
the same count on every rank, as the base sampler does.
"""
from __future__ import annotations

import numpy as np

from dermfast.data.sampler import BalancedSampler


class GlobalBatchSampler(BalancedSampler):
    """A `BalancedSampler` (same arguments, same epoch orders, same state) plus `per_rank_batch`."""

    def __init__(self, labels, source=None, *, per_rank_batch: int, **kw):
        if per_rank_batch < 1:
            raise ValueError(f"per_rank_batch must be >= 1, got {per_rank_batch}")
        super().__init__(labels, source, **kw)
        self.per_rank_batch = int(per_rank_batch)

    def rank_indices(self, epoch: int) -> np.ndarray:
        if self.world_size == 1:
            return super().rank_indices(epoch)
        idx = self.epoch_indices(epoch)
        w, b = self.world_size, self.per_rank_batch
        full = len(idx) // (w * b)
        head = idx[:full * w * b].reshape(full, w, b)[:, self.rank].reshape(-1)
        tail = idx[full * w * b:]
        if len(tail):
            per_rank = -(-len(tail) // w)
            tail = np.resize(tail, per_rank * w)[self.rank::w]
        return np.concatenate([head, tail]).astype(np.int64)
