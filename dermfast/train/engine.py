"""Training engine shared by every stage: device and precision, optimiser, schedule, logging, checkpoints.

- bf16 autocast on CUDA; full fp32 on CPU.
- Optimiser: apex FusedAdam when apex is installed, else torch AdamW with `fused=True` (CUDA and CPU).
- Schedule: linear warmup then cosine decay to `min_lr`, stepped per optimiser step.
- Losses stay on the device between log points: the host syncs once per `log_every` steps, not every step.
- Checkpoints: safetensors written to a temporary name and renamed into place (atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, tokens and position embeddings (1-D parameters), as in MAE."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    groups = param_groups(model, weight_decay)
    device = next(model.parameters()).device
    try:
        from apex.optimizers import FusedAdam  # optional peer; not on the package index
        if device.type == "cuda":
            return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True), "apex.FusedAdam"
    except ImportError:
        pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True), "torch.AdamW(fused)"


def warmup_cosine(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float):
    """LambdaLR factor: linear warmup from 0 over `warmup_steps`, then cosine to min_lr at `total_steps`."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        return lr / base_lr
    return factor


class CSVLog:
    """Append rows to run_dir/log.csv; the header comes from the first row's keys."""

    def __init__(self, path: Path):
        self.path = path
        self._fields: list[str] | None = None

    def write(self, row: dict) -> None:
        new = self._fields is None
        if new:
            self._fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields)
            if new:
                w.writeheader()
            w.writerow(row)


def save_checkpoint(path: Path, model: nn.Module, metadata: dict) -> None:
    """Model weights as safetensors, with `metadata` (JSON strings) in the header; atomic replace."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
