"""Peers as backends of `kd_loss`: Liger-Kernel's distillation losses, when `liger_kernel` is installed.

    liger   alpha * T^2 * LigerJSD(beta=0)(log_softmax(s/T), log_softmax(t/T))
            + (1 - alpha) * LigerCrossEntropyLoss(weight=class_weight)(s, y)

Liger's generalized JSD at beta = 0 is the forward KL, KL(P || Q) with P the teacher (its second argument, in log
space) and Q the student (the first): its kernel (liger_kernel/ops/jsd.py, `_jsd_kernel`, branch `beta == 0.0`)
writes loss = P * (log P - log Q) / n and d/d(log Q) = -P / n, n the number of rows: KL summed over classes and
averaged over rows, which is T^-2 / alpha times dermfast's KD term for reduction "mean". Its CE takes class weights
with PyTorch's normalisation (sum_i w[y_i] CE_i / sum_i w[y_i]), as `kd_loss` specifies.

It runs inside dermfast's custom op like the other backends: Liger's autograd computes the loss and, with
`torch.autograd.grad`, the gradient the op saves. Glue that keeps dermfast's contract where Liger's differs:
- reduction "sum": the KD mean times N plus Liger's CE with reduction "sum"; reduction "none" is refused (Liger's JSD returns only the mean);
- a row with a non-finite logit, or a target outside [0, C) (Liger would ignore -100 silently and read out of
  bounds otherwise: targets are clamped before Liger sees them), makes the loss NaN and that row's gradient NaN;
- the loss is returned in fp32 (Liger's JSD returns the input's dtype).
Liger's kernels are Triton and need a CUDA tensor. liger_kernel is not installed in dermfast's CI: this glue is
tested there against `kd_loss_ref` with Liger's two functions replaced by their documented math
(tests/test_kd_loss_peers.py), and against the real library on a GPU where it is installed.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from dermfast.ops.registry import Query, all_of, dtype_in

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def liger_reason() -> str | None:
    """None if liger_kernel is importable (looked up without importing: it imports triton and CUDA state)."""
    try:
        found = importlib.util.find_spec("liger_kernel") is not None
    except (ImportError, ValueError) as e:
        return f"liger_kernel cannot be looked up ({type(e).__name__}: {e})"
    return None if found else "liger_kernel is not installed (pip install liger-kernel)"


def _liger_supports(q: Query) -> str | None:
    why = liger_reason()
    if why is not None:
        return why
    if q.device.type != "cuda":
        return f"Liger's Triton kernels need a CUDA tensor, got a {q.device.type} tensor"
    if q.sizes.get("rows"):
        return "reduction 'none': Liger's JSD returns only the mean over rows"
    return None


liger_supports = all_of(_liger_supports, dtype_in(*_DTYPES))


def liger_losses():
    """(jsd(log_q, log_p) -> mean forward KL, ce(weight, reduction) -> cross-entropy module): Liger's, imported here."""
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD

    def jsd(log_q, log_p):
        return LigerJSD(beta=0.0)(log_q, log_p)

    def ce(weight, reduction):
        return LigerCrossEntropyLoss(weight=weight, reduction=reduction)
    return jsd, ce


def liger_forward(s, t, target, class_weight, temperature, alpha, reduction, write_grad, losses=None):
    """The kd_loss backend signature: (loss, d loss / d s or an empty [0, 0] tensor). `losses`: the pair
    `liger_losses()` returns (tests pass the documented math where liger_kernel is absent)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"kd_loss: the liger backend takes reduction 'mean' or 'sum', got {reduction!r}")
    jsd, ce = losses if losses is not None else liger_losses()
    N, C = s.shape
    T = float(temperature)
    a = float(alpha) if target is not None else 1.0
    with torch.enable_grad():
        leaf = s.detach().float().requires_grad_(write_grad)
        log_q = F.log_softmax(leaf / T, dim=1)
        log_p = F.log_softmax(t.detach().float() / T, dim=1)
        loss = (a * T * T * (N if reduction == "sum" else 1)) * jsd(log_q, log_p).float()  # jsd: mean over rows
        bad = ~torch.isfinite(s).all(dim=1) | ~torch.isfinite(t).all(dim=1)
        if target is not None:
            valid = (target >= 0) & (target < C)
            bad = bad | ~valid
            w = class_weight.float() if class_weight is not None else None
            loss = loss + (1.0 - a) * ce(w, reduction)(leaf, target.clamp(0, C - 1).long()).float()
        grad = torch.autograd.grad(loss, leaf)[0] if write_grad else None
    loss = torch.where(bad.any(), torch.full_like(loss, float("nan")), loss.detach())
    if not write_grad:
        return loss, s.new_empty((0, 0), dtype=torch.bfloat16 if s.dtype == torch.bfloat16 else torch.float32)
    grad = torch.where(bad[:, None], torch.full_like(grad, float("nan")), grad)
    return loss, grad.to(torch.bfloat16 if s.dtype == torch.bfloat16 else torch.float32)


def register(op) -> None:
    """Register the liger peer on `op` (the kd_loss registry op) and the documented CUDA order (why: the module
    docstring of dermfast/ops/registry.py: one pass over the logits before a composition of three)."""
    op.register("liger", liger_supports)(liger_forward)
    op.default_order["cuda"] = ("cuda", "triton", "liger", "torch")
