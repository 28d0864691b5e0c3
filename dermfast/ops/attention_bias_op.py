"""Attention with an additive score bias: softmax(q k^T * scale + bias) v, for relative-position-bias ViTs.

Why it is shaped this way: BEiT / BEiT v2 (timm `timm.models.beit.Attention`) add a learned bias per head and per
(query, key) pair to the attention scores, gathered from `relative_position_bias_table`; the table is a parameter,
so the bias needs its gradient. dermfast's masked-patch attention (kernels/masked_attention.py) takes no bias, and
two PyTorch attention paths do, with the bias gradient, and are traced by torch.compile without help:

* flex: FlexAttention (`torch.nn.attention.flex_attention`) with a `score_mod` that reads the bias,
  score + bias[h, q_idx, kv_idx] (or bias[b, h, ...]). On CUDA it runs compiled (`torch.compile(flex_attention)`),
  which Inductor lowers to one fused Triton kernel, forward and backward, never materialising the [B, H, L, L]
  probabilities (registered as the peer backend "flex"; on a GPU it comes first). On CPU (asked for
  explicitly; automatic dispatch never picks it there) flex runs its unfused eager implementation, forward only
  (PyTorch's flex has no CPU backward): that is how the tests check its score_mod without a GPU.
* torch: `F.scaled_dot_product_attention` with the bias as a float `attn_mask` (on CUDA, PyTorch's
  memory-efficient kernel takes an additive bias and returns its gradient; elsewhere SDPA's math path). Any
  device, any float dtype, float64 included.

Neither backend is wrapped in a `torch.library` custom op (the other ops are): both are PyTorch operators that
torch.compile and export already trace and differentiate, and an opaque custom op would hide flex from Inductor
(no fused kernel) and need a recomputing backward. The backend choice is made outside the traced graph
(`torch.compiler.assume_constant_result`), so a compiled model traces one backend with no graph break.

Semantics (the reference `attention_bias_ref` is the spec):
    q, k, v: [B, H, L, Dh], one float dtype and device. bias: [H, L, L] (shared by the batch), [1, H, L, L] or
    [B, H, L, L], any float dtype (cast to q's dtype, as autocast casts SDPA's attn_mask), on q's device.
    out[b, h] = softmax(q[b, h] k[b, h]^T * scale + bias[b, h], dim=-1) v[b, h]; scale defaults to Dh ** -0.5.
    Output: [B, H, L, Dh], q.dtype. Gradients flow to q, k, v and bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dermfast.ops.registry import Query, define_op, needs_triton_device

# ------------------------------------------------------------------------------------- validation


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
             scale: Optional[float] = None) -> None:
    """Raise ValueError with a one-line message on bad input."""
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention_bias: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"attention_bias: {name} must be a floating tensor, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"attention_bias: q, k, v must be [B, H, L, Dh], got q of shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention_bias: q, k, v must have the same shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention_bias: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.device != q.device for t in (k, v, bias)):
        raise ValueError(f"attention_bias: q, k, v and bias must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}, {bias.device}")
    B, H, L, _ = q.shape
    if tuple(bias.shape) not in ((H, L, L), (1, H, L, L), (B, H, L, L)):
        raise ValueError(f"attention_bias: bias must be [H, L, L], [1, H, L, L] or [B, H, L, L] = "
                         f"[{H}, {L}, {L}] / [1, {H}, {L}, {L}] / [{B}, {H}, {L}, {L}], got {tuple(bias.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and abs(float(scale)) < float("inf")):
        raise ValueError(f"attention_bias: scale must be a finite float or None, got {scale!r}")


def _resolve_scale(scale: Optional[float], head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


# ---------------------------------------------------------------------------------- the reference


def attention_bias_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                       scale: Optional[float] = None) -> torch.Tensor:
    """The specification: softmax(q k^T * scale + bias) v in plain torch, computed in promote(dtype, float32),
    any device, float64 included, differentiable by autograd (q, k, v, bias). Returns [B, H, L, Dh], q.dtype."""
    validate(q, k, v, bias, scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * _resolve_scale(scale, q.shape[-1])
    s = s + bias.to(q.dtype).to(acc)  # the bias is rounded to q's dtype first, as the backends take it
    return (torch.softmax(s, dim=-1) @ v.to(acc)).to(q.dtype)


# ---------------------------------------------------------------------------------------- backends

_compiled_flex = None


def _flex():
    """torch.compile(flex_attention), built on first use (compiling at import would slow `import dermfast`)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def _flex_forward(q, k, v, bias, scale):
    from torch.nn.attention.flex_attention import flex_attention
    bias = bias.to(q.dtype)
    if bias.dim() == 3:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]
    elif bias.shape[0] == 1:
        bias = bias[0]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx]
    # CUDA: the compiled (fused Triton) kernel; CPU: flex's unfused eager path, forward only (tests). Flex
    # refuses CPU tensors that require grad even under no_grad, and dispatch refused any gradient: detach.
    if q.device.type == "cpu":
        fn, q, k, v = flex_attention, q.detach(), k.detach(), v.detach()
    else:
        fn = _flex()
    return fn(q, k, v, score_mod=score_mod, scale=_resolve_scale(scale, q.shape[-1]))


def _sdpa_forward(q, k, v, bias, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                          scale=_resolve_scale(scale, q.shape[-1]))


def _flex_supports(q: Query) -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as e:  # older torch
        return f"torch.nn.attention.flex_attention is not importable ({e})"
    if q.device.type == "cpu":
        # PyTorch's flex has no CPU backward; its CPU forward is the unfused eager implementation.
        return "FlexAttention has no backward on CPU" if q.requires_grad else None
    reason = needs_triton_device(q)  # compiled flex is an Inductor-generated Triton kernel
    if reason is not None:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {str(q.dtype).removeprefix('torch.')} not in (float16, bfloat16, float32) for compiled flex"
    return None


attention_bias_op = define_op("attention_bias", "softmax(q k^T * scale + bias) v with an additive bias")
attention_bias_op.register("flex", _flex_supports)(_flex_forward)
attention_bias_op.register("torch")(_sdpa_forward)
# GPU: the fused flex kernel first (it never materialises the probabilities), SDPA with a float mask after it;
# unmeasured (no GPU yet): a dispatch table written by `python -m dermfast.bench` overrides this order.
attention_bias_op.default_order["cuda"] = ("flex", "torch")


def _query(q: torch.Tensor, bias: torch.Tensor) -> Query:
    return Query(q.device, q.dtype, {"D": q.shape[-1], "L": q.shape[2]}, q.requires_grad or bias.requires_grad)


@torch.compiler.assume_constant_result
def _choose(device: torch.device, dtype: torch.dtype, head_dim: int, length: int, requires_grad: bool,
            backend: Optional[str]) -> str:
    """The serving backend's name, decided from constants: while torch.compile traces, it runs once and its
    answer is a constant of the graph (no graph break, no dispatch code in the graph)."""
    q = Query(device, dtype, {"D": head_dim, "L": length}, requires_grad)
    return attention_bias_op.select(q, backend).backend


# ------------------------------------------------------------------------------------ functional form


def attention_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                   scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v (module docstring).

    Args:
        q, k, v: [B, H, L, Dh], one float dtype and device.
        bias: [H, L, L], [1, H, L, L] or [B, H, L, L], float (cast to q's dtype), on q's device.
        scale: score scale, default Dh ** -0.5.
        backend: None (automatic; env DERMFAST_BACKEND / set_backend), "flex" (FlexAttention) or "torch" (SDPA
            with a float attn_mask). Asked for explicitly and unable, raises BackendUnavailable with every reason.
    Returns: [B, H, L, Dh], q.dtype.
    """
    validate(q, k, v, bias, scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or bias.requires_grad)
    name = _choose(q.device, q.dtype, q.shape[-1], q.shape[2], grad, backend)
    return attention_bias_op.impls[name].fn(q, k, v, bias, None if scale is None else float(scale))


class AttentionBias(torch.nn.Module):
    """nn.Module form of `attention_bias` (holds the backend and scale)."""

    def __init__(self, scale: Optional[float] = None, backend: Optional[str] = None):
        super().__init__()
        self.scale, self.backend = scale, backend

    def forward(self, q, k, v, bias):
        return attention_bias(q, k, v, bias, self.scale, self.backend)


# ------------------------------------------------------------------------- self-test (automatic dispatch)


def _register_selftest() -> None:
    """Flex is proven against the float64 reference (forward and backward, with a bias gradient) before
    automatic dispatch uses it on a device (dermfast/ops/selftest.py)."""
    from dermfast.ops.selftest import Compare, _fwd_bwd, _randn, register_check

    @register_check("attention_bias")
    def _check(backend, device, dtype, gen):
        B, H, L, D = (2, 2, 7, 16) if device.type == "cpu" else (2, 3, 65, 64)
        ins = [_randn(gen, B, H, L, D, dtype=torch.float64, device=device) for _ in range(3)]
        ins.append(_randn(gen, H, L, L, dtype=torch.float64, device=device))
        g = _randn(gen, B, H, L, D, dtype=torch.float64, device=device)

        # a backend without a backward on this device (flex on a CPU) is proven on the forward it can serve
        backward = attention_bias_op.impls[backend].supports(Query(device, dtype, {"D": D, "L": L}, True)) is None

        def run(b, dt):
            fn = (lambda *a: attention_bias_ref(*a)) if b == "ref" else (lambda *a: attention_bias(*a, backend=b))
            if not backward:
                with torch.no_grad():
                    return (fn(*[x.to(dt) for x in ins]),)
            out, grads = _fwd_bwd(lambda *a: (fn(*a),), [x.to(dt) for x in ins], [0, 1, 2, 3], g)
            return (out[0], *grads)

        got, ref, low = run(backend, dtype), run("ref", torch.float64), run("ref", dtype)
        return [Compare(n, a, r, lo) for n, a, r, lo in zip(("out", "dq", "dk", "dv", "dbias"), got, ref, low)]


_register_selftest()
