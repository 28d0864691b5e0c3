"""Knowledge-distillation loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

Why it is shaped this way: the loss is a row-wise reduction over [N, C] logits whose gradient with respect to
the student has a closed form (alpha*T*(q - p) + (1-alpha)*w_y*(softmax(s) - onehot(y)), scaled for the
reduction), so the fused backends compute loss and gradient in ONE forward pass over the logits and the backward
only multiplies the saved gradient by grad_output (kernels/kd_loss.py derives the math). The teacher is a
constant: no gradient ever reaches it. Temperature and alpha are Python floats (hyper-parameters, not tensors).

Contract (every backend, checked by tests/test_kd_loss.py against `kd_loss_ref` in float64)
- student_logits, teacher_logits: [N, C], N >= 1, C >= 1, floating point (the teacher may differ in dtype).
  Math in fp32 (float64 inputs stay float64 in the torch backend).
- target: optional [N] integer class indices in [0, C). None: the KD term alone (alpha is then ignored).
- class_weight: optional [C] float weights of the CE term (needs a target), normalised as
  `F.cross_entropy(weight=...)`: for "mean" the CE part is sum_i w[y_i] CE_i / sum_i w[y_i].
- reduction:
    "mean": alpha*T^2 * mean_i KL_i + (1-alpha) * CE_mean   (CE_mean weighted-normalised as above); 0-dim.
    "sum":  sum_i (alpha*T^2 * KL_i + (1-alpha) * w[y_i] * CE_i); 0-dim.
    "none": the per-row terms of "sum", [N]. (With class weights, the mean of "none" is not "mean".)
  The loss is fp32 (float64 for float64 student logits in the torch backend).
- Non-finite logits (NaN, +inf, -inf) anywhere in a row of either matrix: that row's loss and gradient are NaN
  (so "mean"/"sum" are NaN). Never a finite wrong number. Masking classes with -inf is therefore not supported.
- A target outside [0, C): ValueError by default (`validate_target=True`, which reads one bool from the device:
  a host sync on CUDA). With validate_target=False, or inside torch.compile, nothing is checked on the host
  and such rows get a NaN loss instead; no backend ever reads out of bounds.
- Once differentiable (the backward scales a saved gradient; no double backward).

Backends: cuda (csrc/kd_loss.cu), triton (kernels/kd_loss.py), torch (closed form, any device and dtype).
All run inside the custom op `dermfast::kd_loss` (fake implementation shared, autograd registered), so
torch.compile(fullgraph=True) traces through it. Peer: liger (dermfast/ops/kd_loss_peers.py), when liger_kernel
is installed. Automatic order on a GPU: the measured dispatch table (class count bucket) where one exists, else
cuda, triton, liger, torch (one pass over the logits before a composition that reads them three times).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dermfast.ops import kd_loss_peers
from dermfast.ops._device import on_device
from dermfast.ops.dispatch_table import bucket
from dermfast.ops.registry import Query, all_of, define_op, dtype_in, needs_cuda_ext, needs_triton_device

REDUCTIONS = ("mean", "sum", "none")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# The reference (the spec): written with F.log_softmax / kl_div / cross_entropy; autograd gives the gradient.
# ---------------------------------------------------------------------------------------------------------


def _row_nonfinite(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x).all(dim=1)


def kd_loss_ref(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None,
                temperature: float = 4.0, alpha: float = 0.9, class_weight: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
    """The specification of `kd_loss` (see the module docstring), differentiable by autograd in the student.

    Computes in promote_types(student dtype, float32); run it on float64 inputs for a reference value.
    """
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(acc)
    t = teacher_logits.detach().to(acc)
    T = float(temperature)
    N = s.shape[0]
    log_q = F.log_softmax(s / T, dim=1)
    log_p = F.log_softmax(t / T, dim=1)
    kl_rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)
    if target is None:
        rows = (T * T) * kl_rows
        ce_mean = None
    else:
        a = float(alpha)
        w = class_weight.to(acc) if class_weight is not None else None
        ce_rows = F.cross_entropy(s, target, weight=w, reduction="none")  # = w[y_i] * CE_i
        rows = a * T * T * kl_rows + (1 - a) * ce_rows
        ce_mean = F.cross_entropy(s, target, weight=w, reduction="mean")
        kl_rows = a * T * T * kl_rows
    bad = _row_nonfinite(student_logits.detach()) | _row_nonfinite(teacher_logits.detach())
    nan = torch.full_like(rows, float("nan"))
    rows = torch.where(bad, nan, rows)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if ce_mean is None:
        return rows.sum() / N
    kd = torch.where(bad, nan, kl_rows).sum() / N
    ce_mean = torch.where(bad.any(), torch.full_like(ce_mean, float("nan")), ce_mean)
    return kd + (1 - float(alpha)) * ce_mean


# ---------------------------------------------------------------------------------------------------------
# Scales shared by the backends: loss_i = kd_loss_scale*KL_i + coef_i*CE_i, grad = kd_grad_scale*(q-p) + ...
# ---------------------------------------------------------------------------------------------------------


def _scales(n: int, temperature: float, alpha: float, has_target: bool, has_weight: bool, reduction: str):
    T = float(temperature)
    a = float(alpha) if has_target else 1.0
    per_row = 1.0 / n if reduction == "mean" else 1.0
    kd_loss_scale = a * T * T * per_row
    kd_grad_scale = a * T * per_row
    # "mean" with class weights divides by sum_i w[y_i] on the device (weight_sum); without, by N here.
    ce_scale = (1.0 - a) * (per_row if not (has_weight and reduction == "mean") else 1.0) if has_target else 0.0
    return kd_loss_scale, kd_grad_scale, ce_scale


def _weight_sum(target, class_weight, C, reduction, dtype=torch.float32):
    """sum_i w[y_i] as a 0-dim device tensor of `dtype` (no host sync); out-of-range targets are clamped here only
    so the gather stays in bounds: their rows are NaN in every backend."""
    if target is None or class_weight is None or reduction != "mean":
        return None
    return class_weight.to(dtype).index_select(0, target.clamp(0, C - 1)).sum()


def _torch_fwd(s, t, target, class_weight, temperature, alpha, reduction, write_grad):
    """Closed-form loss and gradient in torch (any device; fp32 math, float64 stays float64)."""
    N, C = s.shape
    acc = torch.promote_types(s.dtype, torch.float32)
    sf, tf = s.to(acc), t.to(acc)
    T = float(temperature)
    has_t, has_w = target is not None, class_weight is not None
    kd_ls, kd_gs, ce_scale = _scales(N, T, alpha, has_t, has_w, reduction)
    log_q = torch.log_softmax(sf / T, dim=1)
    log_p = torch.log_softmax(tf / T, dim=1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(dim=1)
    grad = kd_gs * (log_q.exp() - p) if write_grad else None
    rows = kd_ls * kl
    bad = _row_nonfinite(s) | _row_nonfinite(t)
    if has_t:
        valid = (target >= 0) & (target < C)
        bad = bad | ~valid
        y = target.clamp(0, C - 1).long()
        log_r = torch.log_softmax(sf, dim=1)
        ce = -log_r.gather(1, y[:, None])[:, 0]
        coef = torch.full((N,), ce_scale, device=s.device, dtype=acc)
        if has_w:
            coef = coef * class_weight.to(acc).index_select(0, y)
            ws = _weight_sum(target, class_weight, C, reduction, acc)
            if ws is not None:
                coef = coef / ws
        rows = rows + coef * ce
        if write_grad:
            grad = grad + coef[:, None] * (log_r.exp() - F.one_hot(y, C).to(acc))
    rows = torch.where(bad, torch.full_like(rows, float("nan")), rows)
    loss = rows if reduction == "none" else rows.sum()
    if write_grad:
        grad = torch.where(bad[:, None], torch.full_like(grad, float("nan")), grad)
        gdt = s.dtype if s.dtype == torch.float64 else _grad_dtype(s.dtype)
        grad = grad.to(gdt)
    else:
        grad = s.new_empty((0, 0), dtype=_grad_dtype(s.dtype) if s.dtype != torch.float64 else s.dtype)
    return loss, grad


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    # Same rule as kernels/kd_loss.py grad_dtype_for (which documents why); kept here so that importing this
    # module never imports triton.
    return torch.bfloat16 if dtype == torch.bfloat16 else (torch.float64 if dtype == torch.float64 else torch.float32)


def _triton_fwd(s, t, target, class_weight, temperature, alpha, reduction, write_grad):
    from dermfast.kernels import kd_loss as kern
    N, C = s.shape
    kd_ls, kd_gs, ce_scale = _scales(N, temperature, alpha, target is not None, class_weight is not None, reduction)
    if t.dtype not in _FUSED_DTYPES:
        t = t.float()
    with on_device(s):
        rows, grad = kern.launch(s, t, target, class_weight, _weight_sum(target, class_weight, C, reduction),
                                 inv_t=1.0 / float(temperature), kd_loss_scale=kd_ls, kd_grad_scale=kd_gs,
                                 ce_scale=ce_scale, write_grad=write_grad)
    return (rows if reduction == "none" else rows.sum()), grad


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cuda_fwd(s, t, target, class_weight, temperature, alpha, reduction, write_grad):
    from dermfast import _optional
    N, C = s.shape
    kd_ls, kd_gs, ce_scale = _scales(N, temperature, alpha, target is not None, class_weight is not None, reduction)
    if t.dtype not in _FUSED_DTYPES:
        t = t.to(s.dtype)
    # the kernel wants row strides >= C: an expanded [N, C] (row stride 0) is copied; a single row's stride is
    # never used, so any value (e.g. 1 for a transposed [C, 1]) is passed as C
    s = s if N == 1 or s.stride(0) >= C else s.contiguous()
    t = t if N == 1 or t.stride(0) >= C else t.contiguous()
    stride_s, stride_t = (s.stride(0), t.stride(0)) if N > 1 else (C, C)
    if target is not None and target.dtype != torch.int64:
        target = target.long()
    if class_weight is not None and class_weight.dtype != torch.float32:
        class_weight = class_weight.float()
    wsum = _weight_sum(target, class_weight, C, reduction)
    rows = torch.empty(N, device=s.device, dtype=torch.float32)
    grad = torch.empty((N, C) if write_grad else (0, 0), device=s.device, dtype=_grad_dtype(s.dtype))
    _optional.cuda_ext.kd_loss_fwd(
        s.data_ptr(), t.data_ptr(), target.data_ptr() if target is not None else 0,
        class_weight.data_ptr() if class_weight is not None else 0, wsum.data_ptr() if wsum is not None else 0,
        rows.data_ptr(), grad.data_ptr() if write_grad else 0,
        N, C, stride_s, stride_t, _DTYPE_CODE[s.dtype], _DTYPE_CODE[t.dtype],
        1.0 / float(temperature), kd_ls, kd_gs, ce_scale, s.device.index if s.device.index is not None
        else torch.cuda.current_device(), torch.cuda.current_stream(s.device).cuda_stream)
    return (rows if reduction == "none" else rows.sum()), grad


kd_loss_op = define_op("kd_loss", "KD loss: alpha*T^2*KL + (1-alpha)*class-weighted CE, loss and grad in one pass")
def _ext_has_kd_loss(q: Query) -> str | None:
    from dermfast import _optional
    if _optional.cuda_ext is not None and not hasattr(_optional.cuda_ext, "kd_loss_fwd"):
        return "the compiled extension predates kd_loss_fwd (rebuild it: pip install -e .)"
    return None


kd_loss_op.register("cuda", all_of(needs_cuda_ext, _ext_has_kd_loss, dtype_in(*_FUSED_DTYPES)))(_cuda_fwd)
kd_loss_op.register("triton", all_of(needs_triton_device, dtype_in(*_FUSED_DTYPES)))(_triton_fwd)
kd_loss_op.register("torch")(_torch_fwd)
kd_loss_peers.register(kd_loss_op)  # liger, when liger_kernel is installed (dermfast/ops/kd_loss_peers.py)
kd_loss_op.shape_class = lambda q: f"C{bucket(q.sizes.get('C', 1))}"  # dispatch-table class: class count


# ---------------------------------------------------------------------------------------------------------
# Custom op (torch.compile / export), autograd.
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("dermfast::kd_loss", mutates_args=())
def _kd_loss_custom(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: Optional[torch.Tensor],
                    class_weight: Optional[torch.Tensor], temperature: float, alpha: float, reduction: str,
                    write_grad: bool, backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d student_logits or an empty [0, 0] tensor when write_grad is False)."""
    q = Query(student_logits.device, student_logits.dtype,
              {"C": student_logits.shape[1], "rows": int(reduction == "none")}, write_grad)
    impl = kd_loss_op.select(q, backend)
    s = student_logits if student_logits.stride(1) == 1 else student_logits.contiguous()
    t = teacher_logits if teacher_logits.stride(1) == 1 else teacher_logits.contiguous()
    # the kernels index target and class_weight as flat arrays: a strided view (a column of a label matrix)
    # would otherwise be read with the wrong stride
    target = target.contiguous() if target is not None else None
    class_weight = class_weight.contiguous() if class_weight is not None else None
    return impl.fn(s, t, target, class_weight, temperature, alpha, reduction, write_grad)


@_kd_loss_custom.register_fake
def _(student_logits, teacher_logits, target, class_weight, temperature, alpha, reduction, write_grad, backend):
    N, C = student_logits.shape
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    loss = student_logits.new_empty((N,) if reduction == "none" else (), dtype=acc)
    grad = student_logits.new_empty((N, C) if write_grad else (0, 0), dtype=_grad_dtype(student_logits.dtype))
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.student_dtype = inputs[0].dtype
    ctx.reduction = inputs[6]
    ctx.has_grad = inputs[7]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_of_grad):
    (g,) = ctx.saved_tensors
    if not ctx.has_grad:
        raise RuntimeError("kd_loss: the forward ran with write_grad=False (the student did not require grad)")
    scale = grad_loss[:, None] if ctx.reduction == "none" else grad_loss
    # one kernel, written straight in the student's dtype (no [N, C] fp32 temporary for fp16 students)
    grad_s = torch.mul(g, scale, out=torch.empty_like(g, dtype=ctx.student_dtype))
    return grad_s, None, None, None, None, None, None, None, None


_kd_loss_custom.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Validation, functional form, module.
# ---------------------------------------------------------------------------------------------------------


def _validate(s, t, target, class_weight, temperature, alpha, reduction, validate_target):
    if s.dim() != 2:
        raise ValueError(f"kd_loss: student_logits must be [N, C], got shape {tuple(s.shape)}")
    if t.shape != s.shape:
        raise ValueError(f"kd_loss: teacher_logits {tuple(t.shape)} must match student_logits {tuple(s.shape)}")
    N, C = s.shape
    if N < 1 or C < 1:
        raise ValueError(f"kd_loss: need N >= 1 rows and C >= 1 classes, got [N, C] = [{N}, {C}]")
    if not (s.is_floating_point() and t.is_floating_point()):
        raise ValueError(f"kd_loss: logits must be floating point, got {s.dtype} and {t.dtype}")
    if t.device != s.device:
        raise ValueError(f"kd_loss: teacher_logits on {t.device}, student_logits on {s.device}")
    if not (isinstance(temperature, (int, float)) and 0 < float(temperature) < float("inf")):
        raise ValueError(f"kd_loss: temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"kd_loss: alpha must be a number in [0, 1], got {alpha!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd_loss: reduction={reduction!r}; accepted: {', '.join(REDUCTIONS)}")
    if target is not None:
        if target.shape != (N,):
            raise ValueError(f"kd_loss: target must be [N] = [{N}], got shape {tuple(target.shape)}")
        if target.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"kd_loss: target must be int64 or int32 class indices, got {target.dtype}")
        if target.device != s.device:
            raise ValueError(f"kd_loss: target on {target.device}, logits on {s.device}")
        if validate_target and not torch.compiler.is_compiling():
            if bool(((target < 0) | (target >= C)).any()):  # one bool to the host (a sync on CUDA)
                lo, hi = int(target.min()), int(target.max())
                raise ValueError(f"kd_loss: target values must be in [0, {C}), got values in [{lo}, {hi}]")
    if class_weight is not None:
        if target is None:
            raise ValueError("kd_loss: class_weight weights the CE term and needs a target")
        if class_weight.shape != (C,):
            raise ValueError(f"kd_loss: class_weight must be [C] = [{C}], got shape {tuple(class_weight.shape)}")
        if not class_weight.is_floating_point():
            raise ValueError(f"kd_loss: class_weight must be floating point, got {class_weight.dtype}")
        if class_weight.device != s.device:
            raise ValueError(f"kd_loss: class_weight on {class_weight.device}, logits on {s.device}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None,
            temperature: float = 4.0, alpha: float = 0.9, class_weight: torch.Tensor | None = None,
            reduction: str = "mean", backend: str | None = None, *, validate_target: bool = True) -> torch.Tensor:
    """alpha*T^2*KL(softmax(t/T) || softmax(s/T)) + (1-alpha)*CE(s, target); see the module docstring.

    student_logits, teacher_logits: [N, C] (fp32 / fp16 / bf16 on the fused backends). target: [N] int or None.
    class_weight: [C] or None. reduction: "mean" | "sum" | "none". backend: None (auto) | cuda | triton | torch.
    Returns the loss (0-dim, or [N] for "none"), fp32; gradients flow to student_logits only.
    """
    _validate(student_logits, teacher_logits, target, class_weight, temperature, alpha, reduction, validate_target)
    write_grad = student_logits.requires_grad and torch.is_grad_enabled()
    loss, _ = _kd_loss_custom(student_logits, teacher_logits.detach(), target, class_weight,
                              float(temperature), float(alpha), reduction, write_grad, backend)
    return loss


class KDLoss(torch.nn.Module):
    """Module form of `kd_loss`: forward(student_logits, teacher_logits, target=None)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, class_weight: torch.Tensor | None = None,
                 reduction: str = "mean", backend: str | None = None):
        super().__init__()
        self.temperature, self.alpha, self.reduction, self.backend = temperature, alpha, reduction, backend
        self.register_buffer("class_weight", class_weight, persistent=False)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, target, self.temperature, self.alpha,
                       self.class_weight if target is not None else None, self.reduction, self.backend)
