"""Exponential moving average of a model's weights (Polyak averaging), for the finetune stage's `--ema DECAY`.

After every applied optimiser step n (1, 2, ...):

    d_n    = min(decay, (1 + n) / (10 + n))        the warm-up of tf.train.ExponentialMovingAverage(num_updates)
    ema   <- d_n * ema + (1 - d_n) * weight         every floating-point parameter and buffer (BN running stats)

Integer buffers (BatchNorm's num_batches_tracked) are copied. On a few hundred images a run is a few hundred
steps and the last weights swing with each batch; the average over the last ~1 / (1 - decay) steps is the
smoother model (timm's ModelEmaV2/V3 do the same for ImageNet; decay 0.99 = a horizon of ~100 steps, right for
runs of a few hundred). Evaluation and the saved model use the average (`swapped_in`); the average and the
update count live in the checkpoint (`state` / `load_state`), so a resumed run continues it exactly.
Not meant for FSDP (the shadow is a full, unsharded copy): the stage refuses that combination.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def ema_decay(decay: float, updates: int) -> float:
    """The decay applied at update number `updates` (1-based): min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class ModelEma:
    """A shadow copy of `model.state_dict()` (same device and dtype), updated by `update(model)`."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._float = [k for k, v in self.shadow.items() if v.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = ema_decay(self.decay, self.updates)
        sd = model.state_dict()
        floats = [self.shadow[k] for k in self._float]
        torch._foreach_lerp_(floats, [sd[k].detach() for k in self._float], 1.0 - d)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(sd[k])

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Inside the block the model holds the averaged weights; its own are put back on exit."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(own)

    def state_dict_cpu(self) -> dict[str, torch.Tensor]:
        """The averaged weights on the CPU (what checkpoint.safetensors / best.safetensors hold)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.shadow.items()}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON) for the checkpoint's extra state."""
        return {f"ema/{k}": v for k, v in self.state_dict_cpu().items()}, {"decay": self.decay,
                                                                            "updates": self.updates}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        got = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
        if set(got) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(got))
            raise ValueError(f"the checkpoint's EMA weights do not match the model ({len(missing)} missing, "
                             f"e.g. {missing[:2]}): resume with the --ema and --model of the run that wrote it")
        for k, v in got.items():
            self.shadow[k].copy_(v)
        self.updates = int(meta["updates"])


__all__ = ["ModelEma", "ema_decay"]
