"""`Run`: what a stage sees of the engine while it builds and steps (device, rank, counters, data helpers).

The engine creates one `Run` per training run and passes it to every Stage hook. Stages read from it and use
its helpers; they do not construct devices, process groups, loaders' rank / thread settings or run folders
themselves, so every stage gets the multi-GPU and resume behaviour right in one place.
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


class Run:
    """Attributes (read-only for stages unless said otherwise):

    cfg: the resolved config.  run_dir: Path of --out.  device: torch.device (cuda:LOCAL_RANK under torchrun).
    world: World(rank, world_size, local_rank, local_world_size); is_main: rank 0.
    step: optimiser steps done.  micro_step: micro-batches done in the whole run (the masking key: the same
    on every rank).  epoch: the current epoch.  batch_size: images per micro-batch on this rank.
    sample_offset: rank * batch_size, the global index of this rank's first sample in the global batch.
    model / raw_model: the wrapped (DDP / FSDP) model for forward passes, and the plain module.
    workers / threads: the thread budget (loader threads, torch intra-op threads).
    """

    def __init__(self, cfg, run_dir: Path, device: torch.device, world: World, workers: int, threads: int,
                 bf16: bool):
        self.cfg, self.run_dir, self.device, self.world = cfg, Path(run_dir), device, world
        self.workers, self.threads, self.bf16 = workers, threads, bf16
        self.step = self.micro_step = self.epoch = 0
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
        with self.main_first():
            if self.is_main:
                data = prepare_data(cfg.data, self.run_dir, **args)
                for name in ("data_report.csv", "splits.csv"):
                    if (self.run_dir / name).is_file():
                        self.wrote(self.run_dir / name)
            else:
                with tempfile.TemporaryDirectory(prefix=f"dermfast-rank{self.world.rank}-") as tmp:
                    with contextlib.redirect_stdout(io.StringIO()):
                        data = prepare_data(cfg.data, Path(tmp), **{**args, "progress": False})
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
