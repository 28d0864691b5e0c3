"""One factory for every loader backend: same signature, same batches, same resumable state.

    build_loader(records, aug, batch_size, train=..., sampler=..., loader="auto"|"dali"|"dali-gpu"|"dali-cpu"|"torch")

Batches are dicts on `device`: `image` [B, 3, S, S] (`output_dtype`), `label` [B] int64, `source` [B] uint8
(0 real, 1 synthetic). `auto` prefers DALI (GPU decode on a GPU, CPU pipeline otherwise) and falls back to the
torch loader when DALI is not installed; asking for DALI explicitly without it is an error naming the fix.

Every backend keeps its epochs, resume position and state in an `EpochPlan` (dermfast.data.loader_base, which
the backends import; this factory imports the backends, never the other way round). `EpochPlan`,
`EpochOrder` and `cores_per_rank` are re-exported here.
"""
from __future__ import annotations

import torch

from dermfast import _optional
from dermfast.data.augment import Augment
from dermfast.data.loader_base import EpochOrder, EpochPlan, cores_per_rank
from dermfast.data.records import ImageRecords

__all__ = ["LOADERS", "EpochOrder", "EpochPlan", "LoaderUnavailable", "build_loader", "cores_per_rank",
           "cuda_index", "resolve_loader"]

LOADERS = ("auto", "dali", "dali-gpu", "dali-cpu", "torch")


class LoaderUnavailable(ValueError):
    """An explicitly requested loader backend cannot run here (one line, for the CLI)."""


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
