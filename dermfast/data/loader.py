"""One factory for every loader backend: same signature, same batches, same resumable state.

    build_loader(records, aug, batch_size, train=..., sampler=..., loader="auto"|"dali"|"dali-gpu"|"dali-cpu"|"torch")

Batches are dicts on `device`: `image` [B, 3, S, S] (`output_dtype`), `label` [B] int64, `source` [B] uint8
(0 real, 1 synthetic). `auto` prefers DALI (GPU decode on a GPU, CPU pipeline otherwise) and falls back to the
torch loader when DALI is not installed; asking for DALI explicitly without it is an error naming the fix.

`EpochPlan` is the part every backend shares: which samples epoch e hands out (the sampler's
``rank_indices(e)``; without a sampler ``range(N)`` for evaluation and a permutation seeded by (seed, e) for
training), how many batches that makes (training drops the last partial batch when the epoch holds at least one
full batch), where a resumed loader starts, and the JSON-able state:

    {"epoch": e, "position": samples of epoch e handed out so far, "seed": seed,
     "sampler": the sampler's state_dict at that position (or None)}

`load_state_dict(state)` makes the next iteration run epoch e from sample `position` on: the skipped samples are
never read or decoded, and since augmentation is keyed by (seed, rank, epoch, position) the batches are the
ones an uninterrupted loader yields there. `set_epoch(e)` with the epoch already pending keeps a resume
position (as `BalancedSampler.set_epoch` does), so a training loop may call it after `load_state_dict`.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from dermfast import _optional
from dermfast.data.augment import Augment
from dermfast.data.records import ImageRecords

LOADERS = ("auto", "dali", "dali-gpu", "dali-cpu", "torch")


class LoaderUnavailable(ValueError):
    """An explicitly requested loader backend cannot run here (one line, for the CLI)."""


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


def resolve_loader(name: str, device: torch.device) -> str:
    """'auto' / 'dali' -> a concrete backend: 'dali-gpu', 'dali-cpu' or 'torch'."""
    if name not in LOADERS:
        raise LoaderUnavailable(f"unknown loader {name!r}; accepted: {', '.join(LOADERS)}")
    if name == "torch":
        return name
    if not _optional.HAS_DALI:
        if name == "auto":
            return "torch"
        raise LoaderUnavailable(f"loader {name!r} needs NVIDIA DALI ({_optional.DALI_REASON}); "
                                "install it with `pip install 'dermfast[dali]'` or use --loader torch")
    if name in ("auto", "dali"):
        return "dali-gpu" if device.type == "cuda" else "dali-cpu"
    if name == "dali-gpu" and device.type != "cuda":
        raise LoaderUnavailable("loader 'dali-gpu' needs a CUDA device; use --loader dali-cpu or torch")
    return name


def cuda_index(device: torch.device) -> int:
    """The CUDA ordinal of `device`: its index, else torch's current device (what `cuda` means to torch)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def build_loader(records: ImageRecords, aug: Augment, batch_size: int, *, train: bool, sampler=None,
                 loader: str = "auto", device: torch.device | str = "cpu", seed: int = 0, workers: int = -1,
                 output_dtype: torch.dtype = torch.float32, drop_last: bool | None = None):
    """A loader object: iterate for one epoch of batches; `len()` is batches per epoch; `.backend` names it.

    `sampler` (a `BalancedSampler`) orders the epochs, in evaluation too (e.g. a sharded evaluation); without
    one, evaluation (`train=False`) reads every image exactly once, in order, keeping the last partial batch.
    `workers` is DataLoader workers (torch) or DALI CPU threads; -1 = this rank's share of the cores (torch:
    at most 8). `device` 'cuda' without an index means torch's current device.
    Every loader has `set_epoch`, `state_dict` and `load_state_dict` (see `EpochPlan`).
    """
    device = torch.device(device)
    backend = resolve_loader(loader, device)
    if backend == "torch":
        from dermfast.data.torch_loader import TorchLoader
        return TorchLoader(records, aug, batch_size, train=train, sampler=sampler, seed=seed, workers=workers,
                           drop_last=drop_last, output_dtype=output_dtype, device=device)
    from dermfast.data.dali_loader import DaliLoader
    dali_device = "gpu" if backend == "dali-gpu" else "cpu"
    out = DaliLoader(records, aug, batch_size, train=train, sampler=sampler, device=dali_device,
                     device_id=cuda_index(device) if dali_device == "gpu" else None, seed=seed,
                     num_threads=cores_per_rank() if workers < 0 else max(1, workers), output_dtype=output_dtype,
                     drop_last=drop_last)
    out.backend = backend
    if dali_device == "cpu" and device.type != "cpu":
        return _ToDevice(out, device)
    return out


class _ToDevice:
    """Moves a CPU loader's batches to `device` (DALI CPU pipeline feeding a GPU model); the rest is the inner
    loader's (epoch, state, len)."""

    def __init__(self, inner, device: torch.device):
        self.inner, self.device, self.backend = inner, device, inner.backend

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):  # set_epoch, state_dict, load_state_dict, epoch, builds, ...
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __iter__(self):
        for b in self.inner:
            yield {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
