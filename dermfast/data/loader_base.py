"""What every loader backend shares: the order of an epoch, the epoch / resume bookkeeping, the CPU share.

`EpochPlan` is the part every backend (dermfast.data.torch_loader, dermfast.data.dali_loader) shares: which
samples epoch e hands out (the sampler's ``rank_indices(e)``; without a sampler ``range(N)`` for evaluation and a
permutation seeded by (seed, e) for training), how many batches that makes (training drops the last partial batch
when the epoch holds at least one full batch), where a resumed loader starts, and the JSON-able state:

    {"epoch": e, "position": samples of epoch e handed out so far, "seed": seed,
     "sampler": the sampler's state_dict at that position (or None)}

`load_state_dict(state)` makes the next iteration run epoch e from sample `position` on: the skipped samples are
never read or decoded, and since augmentation is keyed by (seed, rank, epoch, position) the batches are the
ones an uninterrupted loader yields there. `set_epoch(e)` with the epoch already pending keeps a resume
position (as `BalancedSampler.set_epoch` does), so a training loop may call it after `load_state_dict`.

Import direction: the backends import this module; the factory (dermfast.data.loader) imports the backends and
re-exports these names. Nothing here imports a loader.
"""
from __future__ import annotations

import os

import numpy as np


def cores_per_rank() -> int:
    """CPU cores this process may use, shared among the ranks of this node (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


class EpochOrder:
    """epoch -> this rank's sample indices for that epoch, int64 [n]; a pure function of the epoch.

    Picklable (DALI's parallel source ships it to its worker processes); keeps the last two epochs asked for
    (around an epoch boundary both are in use).
    """

    def __init__(self, n: int, train: bool, sampler=None, seed: int = 0):
        self.n, self.train, self.sampler, self.seed = int(n), bool(train), sampler, int(seed)
        self._cached: dict[int, np.ndarray] = {}

    def __call__(self, epoch: int) -> np.ndarray:
        epoch = int(epoch)
        order = self._cached.get(epoch)
        if order is None:
            if self.sampler is not None:
                order = np.asarray(self.sampler.rank_indices(epoch), dtype=np.int64)
            elif self.train:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.n).astype(np.int64)
            else:
                order = np.arange(self.n, dtype=np.int64)
            if len(self._cached) >= 2:
                self._cached.pop(next(iter(self._cached)))
            self._cached[epoch] = order
        return order


class EpochPlan:
    """Epoch bookkeeping shared by the loaders: the pending epoch and resume position, batches, state.

    A loader calls `begin()` when an iteration starts (it returns the epoch, the first position and the number
    of batches), `advance(n)` after handing out n samples, and `finish()` when the epoch is done.
    """

    def __init__(self, n: int, batch_size: int, *, train: bool, sampler=None, seed: int = 0,
                 drop_last: bool | None = None):
        self.order = EpochOrder(n, train, sampler, seed)
        self.batch_size, self.train, self.sampler, self.seed = int(batch_size), bool(train), sampler, int(seed)
        self.drop_last = drop_last
        self.rank = int(getattr(sampler, "rank", 0) or 0)
        self.world_size = int(getattr(sampler, "world_size", 1) or 1)
        self._pending = (0, 0)       # (epoch, start position) the next iteration runs
        self._state = (0, 0)         # (epoch, samples handed out) as state_dict reports it
        self._sampler_epoch = None   # the sampler epoch last seen or set: a sampler moved by its owner is followed
        self._follow_sampler()

    # --- the sampler, moved by its owner (set_epoch / load_state_dict before the loader runs) ------------
    def _follow_sampler(self) -> None:
        s = self.sampler
        if s is None or getattr(s, "epoch", None) is None or s.epoch == self._sampler_epoch:
            return
        position = int(s.state_dict().get("position", 0)) if hasattr(s, "state_dict") else 0
        self._sampler_epoch = int(s.epoch)
        self._pending = self._state = (int(s.epoch), position)

    # --- epochs ------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next iteration runs."""
        self._follow_sampler()
        return self._pending[0]

    @property
    def start(self) -> int:
        """The position (samples of the epoch already handed out) the next iteration starts from."""
        self._follow_sampler()
        return self._pending[1]

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run `epoch`: from its start, unless `epoch` is already pending (a resume)."""
        self._follow_sampler()
        epoch = int(epoch)
        if epoch != self._pending[0]:
            self._pending = self._state = (epoch, 0)
        self._move_sampler(epoch)

    def _move_sampler(self, epoch: int) -> None:
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
            self._sampler_epoch = epoch

    def drops_last(self, n: int) -> bool:
        return (self.train and n >= self.batch_size) if self.drop_last is None else bool(self.drop_last)

    def num_batches(self, epoch: int, start: int = 0) -> int:
        """Batches of `epoch` from position `start` on (the batches of a resumed epoch are the uninterrupted
        ones when `start` is a multiple of the batch size, as a loader's own state always is)."""
        n = len(self.order(epoch))
        rest = max(0, n - start)
        return rest // self.batch_size if self.drops_last(n) else -(-rest // self.batch_size)

    def begin(self) -> tuple[int, int, int]:
        """Start the pending epoch: (epoch, start position, batches)."""
        epoch, start = self.epoch, self.start
        self._move_sampler(epoch)
        n = len(self.order(epoch))
        if not 0 <= start <= n:
            raise ValueError(f"resume position {start} is outside epoch {epoch} ({n} samples on this rank)")
        self._state = (epoch, start)
        return epoch, start, self.num_batches(epoch, start)

    def advance(self, samples: int) -> None:
        self._state = (self._state[0], self._state[1] + int(samples))

    def finish(self) -> None:
        """The running epoch is done (or left): the next iteration runs the following epoch from its start."""
        self._pending = (self._state[0] + 1, 0)

    def batch_rows(self, epoch: int, start: int, k: int) -> tuple[int, int]:
        """Positions [lo, hi) of batch k of an iteration of `epoch` that started at `start`."""
        lo = start + k * self.batch_size
        return lo, min(lo + self.batch_size, len(self.order(epoch)))

    # --- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        epoch, position = self._state
        sampler = None
        if self.sampler is not None and hasattr(self.sampler, "state_dict"):
            sampler = {**self.sampler.state_dict(consumed=position), "epoch": epoch}
        return {"epoch": epoch, "position": position, "seed": self.seed, "sampler": sampler}

    def load_state_dict(self, state) -> None:
        if "sampler" not in state and "world_size" in state:  # a bare sampler state (older checkpoints)
            state = {"epoch": state["epoch"], "position": state["position"], "seed": self.seed, "sampler": state}
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"loader state is for seed {state['seed']}, this loader has seed {self.seed}: "
                             "its augmentations would differ")
        epoch, position = int(state["epoch"]), int(state["position"])
        if position < 0:
            raise ValueError(f"loader state position must be >= 0, got {position}")
        if self.sampler is not None and state.get("sampler") and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict({**state["sampler"], "epoch": epoch, "position": position})
            self._sampler_epoch = epoch
        self._pending = self._state = (epoch, position)
