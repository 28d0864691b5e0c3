"""What a patch function did to a model: `PatchReport` and `patch_report(model)`.

Every patch function (`dermfast.patch_timm`, `dermfast.patch_transformers`) returns the model it was given and
leaves a `PatchReport` on it (attribute `_dermfast_patch_report`): one line per module it swapped, and one line per
attention-like module it left alone with the reason, so a user sees before training what will be fused:

    swapped  blocks.0.attn  EvaAttention -> MaskedEvaAttention
    left     layers.0.blocks.0.attn  WindowAttention (timm.models.swin_transformer): relative position bias in a
             class dermfast does not swap (only timm.models.beit.Attention)

"Attention-like" for the left lines means: a module whose class name contains "Attention" or "SelfAttention"
that was not swapped (a heuristic on names, stated here so nobody mistakes it for a guarantee). Patching again
replaces the report. `python -m dermfast.patch MODEL_NAME` prints it for a named model built without weights.

This module imports neither timm nor transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

_ATTR = "_dermfast_patch_report"


@dataclass
class PatchReport:
    """swapped: (module name, old class, new class, note); left: (module name, class, reason)."""

    library: str
    swapped: list[tuple[str, str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for name, old, new, note in self.swapped:
            out.append(f"swapped  {name or '<model>'}  {old} -> {new}" + (f" ({note})" if note else ""))
        for name, cls, why in self.left:
            out.append(f"left     {name or '<model>'}  {cls}: {why}")
        return out

    def __str__(self) -> str:
        head = f"dermfast.patch_{self.library}: {len(self.swapped)} swapped, {len(self.left)} left"
        return "\n".join([head, *self.lines()])


def biased_qkv(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's fused qkv projection with separate q / k / v biases (EvaAttention and BEiT's Attention write it the
    same way: `q_bias`, `k_bias`, `v_bias`, `qkv_bias_separate`), transcribed: x [B, N, C] -> qkv [B, N, 3 C']."""
    if m.q_bias is None:
        return m.qkv(x)
    qkv_bias = torch.cat((m.q_bias, m.k_bias, m.v_bias))
    if m.qkv_bias_separate:
        qkv = m.qkv(x)
        qkv += qkv_bias
        return qkv
    return torch.nn.functional.linear(x, weight=m.qkv.weight, bias=qkv_bias)


def autocast_qkv(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Under autocast, q, k, v in the autocast dtype, as autocast does for SDPA (qk_norm's LayerNorm runs in
    fp32 under autocast while v stays bf16; timm's and HF's SDPA calls are cast the same way). x: the module's
    input (its device type names the autocast context)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def attention_like(module: nn.Module) -> bool:
    """The name heuristic for the report's `left` lines (see the module docstring)."""
    return "attention" in type(module).__name__.lower()


def qualname(module: nn.Module) -> str:
    """Class name with its defining module, e.g. 'WindowAttention (timm.models.swin_transformer)'."""
    cls = type(module)
    return f"{cls.__name__} ({cls.__module__})"


def set_report(model: nn.Module, report: PatchReport) -> None:
    # object.__setattr__: nn.Module.__setattr__ would accept it too, but this keeps it out of any module hooks.
    object.__setattr__(model, _ATTR, report)


def patch_report(model: nn.Module) -> PatchReport:
    """The `PatchReport` the last patch function left on `model` (print it, or read .swapped / .left).

    Raises ValueError if no patch function was applied to `model`.
    """
    report = getattr(model, _ATTR, None)
    if report is None:
        raise ValueError(f"patch_report: {type(model).__name__} was not patched (call dermfast.patch_timm or "
                         f"dermfast.patch_transformers first)")
    return report
