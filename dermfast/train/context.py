"""`Run`: what a stage sees of the engine while it builds and steps (device, rank, counters, data helpers).

The engine creates one `Run` per training run and passes it to every Stage hook. Stages read from it and use
its helpers; they do not construct devices, process groups, loaders' rank / thread settings or run folders
themselves, so every stage gets the multi-GPU and resume behaviour right in one place.

Cross-validation (`--folds K`, dermfast/train/cv.py): the driver runs one engine run per fold with the fold
number attached to the config (`set_fold`); `Run.prepare_data` then splits the real images as
`dermfast.data.splits.fold_splits` says (test = the fold, train / val = the other folds) instead of 80/10/10.
A config with --folds K but no fold attached is refused: the driver is the way in.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dermfast.train import distributed as dist
from dermfast.train.distributed import World


_FOLD_ATTR = "_cv_fold"


def set_fold(cfg, fold: int) -> None:
    """Attach the fold (1..cfg.folds) a --folds run holds out to its config (not a field: config.yaml keeps
    `folds`, and the fold's splits.csv records which images were held out)."""
    object.__setattr__(cfg, _FOLD_ATTR, int(fold))


def fold_of(cfg) -> int | None:
    """The fold attached by `set_fold`, else None."""
    return getattr(cfg, _FOLD_ATTR, None)


class Run:
    """Attributes (read-only for stages unless said otherwise):

    cfg: the resolved config.  run_dir: Path of --out.  device: torch.device (cuda:LOCAL_RANK under torchrun).
    world: World(rank, world_size, local_rank, local_world_size); is_main: rank 0.
    step: optimiser steps done (of total_steps, the schedule's length).  micro_step: micro-batches done in the
    whole run (the masking key: the same on every rank).  epoch: the current epoch.  batch_size: images per micro-batch on this rank.
    sample_offset: rank * batch_size, the global index of this rank's first sample in the global batch.
    model / raw_model: the wrapped (DDP / FSDP) model for forward passes, and the plain module.
    workers / threads: the thread budget (loader threads, torch intra-op threads).
    """

    def __init__(self, cfg, run_dir: Path, device: torch.device, world: World, workers: int, threads: int,
                 bf16: bool):
        self.cfg, self.run_dir, self.device, self.world = cfg, Path(run_dir), device, world
        self.workers, self.threads, self.bf16 = workers, threads, bf16
        self.step = self.micro_step = self.epoch = 0
        self.total_steps = 0  # set by the engine once the loader's length is known (before the first step)
        self.batch_size = cfg.batch_size
        self.model: nn.Module | None = None
        self.raw_model: nn.Module | None = None
        self.files: list[Path] = []

    # --- facts -------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.world.is_main

    @property
    def sample_offset(self) -> int:
        return self.world.rank * self.batch_size

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.cfg.accum_steps * self.world.world_size

    def autocast(self):
        """bf16 autocast on CUDA (unless --precision fp32); nothing on CPU."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def log(self, msg: str) -> None:
        """Print on rank 0 only."""
        if self.is_main:
            from tqdm.auto import tqdm
            tqdm.write(msg)

    def wrote(self, path) -> Path:
        """Record a file the stage wrote; the final line lists every file of the run."""
        p = Path(path)
        if p not in self.files:
            self.files.append(p)
        return p

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (downloads, caches, dataset generation), then the others."""
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    # --- data ----------------------------------------------------------------------------------------------
    def prepare_data(self, **kw):
        """`dermfast.data.pipeline.prepare_data` on --data of a DataConfig: rank 0 first (it writes
        data_report.csv and splits.csv into the run folder and fills the caches); the other ranks then read
        the same data through the caches into a scratch folder."""
        from dermfast.data.pipeline import prepare_data
        cfg = self.cfg
        args = dict(synthetic=cfg.synthetic, seed=cfg.seed, toy_images=cfg.toy_images,
                    toy_image_size=cfg.toy_image_size, progress=cfg.progress and self.is_main)
        args.update(kw)
        k, fold = int(getattr(cfg, "folds", 0) or 0), fold_of(cfg)
        if k >= 2:
            if fold is None:
                from dermfast.errors import ConfigError
                raise ConfigError(f"--folds {k}: a cross-validation runs through `python -m dermfast.train` "
                                  "(dermfast.train.cv.run_cv), which runs each fold")
            args["fractions"] = (1.0, 0.0, 0.0)  # no 80/10/10 split: the fold's split replaces it below
        with self.main_first():
            if self.is_main:
                data = prepare_data(cfg.data, self.run_dir, **args)
                if k >= 2:
                    data = _fold_data(data, k, fold, cfg.seed, self.run_dir)
                for name in ("data_report.csv", "splits.csv"):
                    if (self.run_dir / name).is_file():
                        self.wrote(self.run_dir / name)
            else:
                with tempfile.TemporaryDirectory(prefix=f"dermfast-rank{self.world.rank}-") as tmp:
                    with contextlib.redirect_stdout(io.StringIO()):
                        data = prepare_data(cfg.data, Path(tmp), **{**args, "progress": False})
                        if k >= 2:
                            data = _fold_data(data, k, fold, cfg.seed, Path(tmp))
        return data

    def sampler(self, labels, source=None, **kw):
        """A `BalancedSampler` for this rank (rank, world size, seed filled in), sharded by global batch:
        rank r's k-th batch is block r of the k-th global batch, so N ranks of batch b see exactly the
        batches one process of batch N*b would (and `sample_offset` is each sample's global index)."""
        from dermfast.train.sharding import GlobalBatchSampler
        kw.setdefault("seed", self.cfg.seed)
        return GlobalBatchSampler(np.asarray(labels), source, rank=self.world.rank,
                                  world_size=self.world.world_size, per_rank_batch=self.batch_size, **kw)

    def train_loader(self, records, aug, sampler=None, **kw):
        """`build_loader(train=True)` with this run's batch size, --loader, device, seed and thread budget."""
        from dermfast.data.loader import build_loader
        args: dict[str, Any] = dict(train=True, sampler=sampler, loader=self.cfg.loader, device=self.device,
                                    seed=self.cfg.seed, workers=self.workers)
        args.update(kw)
        return build_loader(records, aug, self.batch_size, **args)

    def eval_loader(self, records, aug, batch_size: int | None = None, **kw):
        """`build_loader(train=False)`: every image once, in order (each rank reads all of them)."""
        from dermfast.data.loader import build_loader
        args: dict[str, Any] = dict(train=False, loader=self.cfg.loader, device=self.device,
                                    seed=self.cfg.seed, workers=self.workers)
        args.update(kw)
        return build_loader(records, aug, batch_size or self.batch_size, **args)

    # --- model state -----------------------------------------------------------------------------------------
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full (unsharded, unwrapped) model state dict on the CPU; collective under FSDP (all ranks call)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fold_data(data, k: int, fold: int, seed: int, run_dir: Path):
    """PreparedData with the splits of fold `fold` of k over the real images (synthetic ones join train only);
    rewrites run_dir/splits.csv."""
    from dermfast.data.pipeline import PreparedData
    from dermfast.data.records import DatasetError
    from dermfast.data.splits import fold_splits, save_splits
    recs = data.records
    real = np.flatnonzero(recs.source == 0)
    try:
        s = fold_splits(recs.subset(real), k, fold, seed)
    except ValueError as e:
        raise DatasetError(f"--folds {k}: {e}") from None
    splits = {name: real[idx] for name, idx in s.items()}
    splits["train"] = np.concatenate([splits["train"], np.flatnonzero(recs.source == 1)])
    save_splits(splits, recs, Path(run_dir) / "splits.csv")
    return PreparedData(recs, splits, data.report)
