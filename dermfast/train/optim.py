"""Optimiser and schedule: AdamW (torch fused by default, apex FusedAdam on CUDA when installed), linear warmup
then cosine decay, set per optimiser step from the step number alone (so a resumed run needs no scheduler
state: the step is the state)."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, tokens and position embeddings (1-D parameters), as in MAE."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("token") else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(groups: list[dict], lr: float, betas, kind: str, device: torch.device):
    """(optimizer, name). kind: auto | adamw | apex. 'auto' takes apex FusedAdam on CUDA when importable."""
    betas = tuple(betas)
    if kind in ("auto", "apex") and device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # optional peer; not on the package index
            return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True), "apex.FusedAdam"
        except ImportError as e:
            if kind == "apex":
                raise ValueError(f"--optimizer apex: apex is not importable ({e})") from None
    elif kind == "apex":
        raise ValueError("--optimizer apex needs a CUDA device")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True), "torch.AdamW(fused)"


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """lr of optimiser step `step` (0-based): linear warmup over `warmup_steps`, then cosine to `min_lr` at
    the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_grads_(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients of `params` in place by min(1, max_norm / (total_norm + 1e-6)), as
    torch.nn.utils.clip_grad_norm_ does, with the global norm already computed (under FSDP2, over all shards).
    Works on each DTensor's local shard (the coefficient is the same on every rank); no host sync."""
    if not params:
        return
    coef = torch.clamp(max_norm / (total_norm.float() + 1e-6), max=1.0)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), grads in groups.items():
        torch._foreach_mul_(grads, coef.to(device=device, dtype=dtype))
