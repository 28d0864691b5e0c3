"""Peers as backends of `masked_attention`: other libraries' attention kernels behind the registry's capability
check, self-test and (measured) dispatch order, so dermfast is never slower than the best thing installed.

Each peer is a whole differentiable function (q, k, v, cu_seqlens, max_seqlen, lengths, scale) -> out, in the op's
layouts (dermfast/ops/masked_attention_op.py): its own autograd serves the backward (a peer's fused backward is
its speed; recomputing it through dermfast's (out, lse) split would cost a forward). They therefore serve the
public `masked_attention()`; the `dermfast::masked_attention` custom op (which also returns lse) keeps
dermfast's own backends.

    flash_attn   packed: flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale);
                 dense: flash_attn_func on [B, N, H, Dh]. CUDA sm_80+, fp16 / bf16, Dh <= 256 and a multiple
                 of 8; packed needs max_seqlen (a host int: FlashAttention takes it as one). Importable only.
    sdpa         dense only (every sequence has the same length): F.scaled_dot_product_attention, which picks
                 cuDNN / flash / efficient / math itself. Any device and float dtype.
    sdpa_nested  packed only: the packed tokens become a jagged NestedTensor without a copy
                 (torch.nested.nested_tensor_from_jagged(values, offsets=cu_seqlens)) and go through SDPA
                 (flash / efficient varlen kernels on CUDA, per-sequence math on CPU). Any float dtype.
    flex         FlexAttention with a BlockMask: a document mask (segment of query == segment of key) for
                 packed, a length mask for padded, none for dense. Compiled on CUDA (eager flex materialises
                 the score matrix); eager on CPU, where torch has no FlexAttention backward (requires_grad on a
                 CPU tensor is refused). The BlockMask is built once per index tensor version and kept on it, so
                 the layers of one step share it.

Padded inputs to flex are zeroed at positions >= length first: a masked score is -inf, but P @ V still reads the
masked V rows, and 0 * NaN (garbage in the padding) would poison the row. Rows >= length come out 0, as the op
specifies; flash_attn and sdpa_nested do not take the padded layout (pack it).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from dermfast.ops.registry import Query, all_of, device_capability, dtype_in

LAYOUTS = {0: "dense", 1: "packed", 2: "padded"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _layout(q: Query) -> str | None:
    return LAYOUTS.get(q.sizes.get("layout", -1))


def _layout_in(*names: str):
    def check(q: Query) -> str | None:
        got = _layout(q)
        if got is None:
            return "needs the call's layout (dense / packed / padded) to decide"
        return None if got in names else f"serves the {' / '.join(names)} layout, not {got}"
    return check


# ------------------------------------------------------------------------------------------------ flash_attn

def flash_attn_reason() -> str | None:
    """None if flash_attn is importable (checked without importing it: importing builds CUDA state)."""
    try:
        found = importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError) as e:
        return f"flash_attn cannot be looked up ({type(e).__name__}: {e})"
    return None if found else "flash_attn is not installed (pip install flash-attn)"


def _flash_supports(q: Query) -> str | None:
    why = flash_attn_reason()
    if why is not None:
        return why
    if q.device.type != "cuda":
        return f"needs a CUDA tensor, got a {q.device.type} tensor"
    cap = device_capability(q.device)
    if cap is not None and cap < (8, 0):
        return f"FlashAttention-2 needs compute capability >= 8.0, this GPU is sm_{cap[0]}{cap[1]}"
    d = q.sizes.get("D")
    if d is not None and (d > 256 or d % 8):
        return f"head dim {d}: FlashAttention-2 takes multiples of 8 up to 256"
    if _layout(q) == "packed" and q.sizes.get("L") is None:
        return "packed input needs max_seqlen (FlashAttention takes the longest segment as a host int)"
    return None


def flash_attn_forward(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    import flash_attn
    if cu_seqlens is not None:
        cu = cu_seqlens.to(torch.int32)
        return flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0,
                                                 softmax_scale=scale, causal=False)
    out = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0,
                                     softmax_scale=scale, causal=False)
    return out.transpose(1, 2).contiguous()


flash_attn_supports = all_of(_flash_supports, dtype_in(torch.float16, torch.bfloat16),
                             _layout_in("packed", "dense"))


# ------------------------------------------------------------------------------------------------ sdpa (dense)

def sdpa_forward(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    if cu_seqlens is not None or lengths is not None:
        raise ValueError("masked_attention: the sdpa backend serves the dense layout only")
    return F.scaled_dot_product_attention(q, k, v, scale=scale).contiguous()


sdpa_supports = all_of(dtype_in(*_FLOATS), _layout_in("dense"))


# ------------------------------------------------------------------------------------------------ sdpa_nested

def sdpa_nested_forward(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    if cu_seqlens is None:
        raise ValueError("masked_attention: the sdpa_nested backend serves the packed layout only")
    offsets = cu_seqlens.to(torch.int64)
    kw = {} if max_seqlen is None else {"max_seqlen": int(max_seqlen)}
    nq, nk, nv = (torch.nested.nested_tensor_from_jagged(x, offsets, **kw).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(nq, nk, nv, scale=scale).transpose(1, 2).values()
    return out if out.is_contiguous() else out.contiguous()


sdpa_nested_supports = all_of(dtype_in(*_FLOATS), _layout_in("packed"))


# ------------------------------------------------------------------------------------------------ flex

def flex_reason() -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as e:
        return f"this torch has no FlexAttention ({e})"
    return None


def _flex_supports(q: Query) -> str | None:
    why = flex_reason()
    if why is not None:
        return why
    if q.device.type == "cpu" and q.requires_grad:
        return "torch has no FlexAttention backward on CPU (NotImplementedError); forward only there"
    if q.device.type not in ("cpu", "cuda"):
        return f"FlexAttention runs on CPU and CUDA tensors, got a {q.device.type} tensor"
    if q.device.type == "cuda" and q.dtype == torch.float64:
        return "FlexAttention's CUDA kernels take fp16 / bf16 / fp32"
    return None


flex_supports = all_of(_flex_supports, dtype_in(*_FLOATS), _layout_in("packed", "padded", "dense"))

_MASK_ATTR = "_dermfast_flex_block_mask"
_compiled = {}


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention  # eager on CPU; inside a compiled graph the outer compile fuses it
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(flex_attention, dynamic=None)
    return _compiled["fn"]


def _cached_block_mask(index: torch.Tensor, key: tuple, build):
    """The BlockMask built from `index` (cu_seqlens or lengths), kept on the tensor per (version, key)."""
    if torch.compiler.is_compiling():
        return build()
    got = getattr(index, _MASK_ATTR, None)
    if got is not None and got[0] == (index._version, *key):
        return got[1]
    bm = build()
    setattr(index, _MASK_ATTR, ((index._version, *key), bm))
    return bm


def flex_forward(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    from torch.nn.attention.flex_attention import create_block_mask
    flex = _flex_fn(q.device)
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        q, k, v = q.detach(), k.detach(), v.detach()  # flex refuses CPU inputs that require grad, even in no_grad
    if cu_seqlens is not None:
        T = q.shape[0]

        def build():
            cu = cu_seqlens.to(torch.int64)
            seg = torch.searchsorted(cu, torch.arange(T, device=q.device), right=True) - 1

            def same_segment(b, h, qi, ki):
                return seg[qi] == seg[ki]
            return create_block_mask(same_segment, None, None, T, T, device=q.device)

        bm = _cached_block_mask(cu_seqlens, ("packed", T), build)
        q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, T, Dh]
        return flex(q4, k4, v4, block_mask=bm, scale=scale)[0].transpose(0, 1).contiguous()
    if lengths is None:
        return flex(q, k, v, scale=scale).contiguous()
    B, N = q.shape[0], q.shape[2]
    lens = lengths.to(device=q.device, dtype=torch.int64)

    def build():
        def within_length(b, h, qi, ki):
            return (qi < lens[b]) & (ki < lens[b])
        return create_block_mask(within_length, B, None, N, N, device=q.device)

    bm = _cached_block_mask(lengths, ("padded", B, N), build)
    keep = (torch.arange(N, device=q.device)[None, :] < lens[:, None])[:, None, :, None]  # [B, 1, N, 1]
    q, k, v = (x.masked_fill(~keep, 0) for x in (q, k, v))
    out = flex(q, k, v, block_mask=bm, scale=scale)
    return out.masked_fill(~keep, 0).contiguous()  # rows without keys: 0 (flex leaves them 0 too; made sure)


# ------------------------------------------------------------------------------------------------ registration

PEER_BACKENDS = {
    "flash_attn": (flash_attn_supports, flash_attn_forward),
    "sdpa": (sdpa_supports, sdpa_forward),
    "sdpa_nested": (sdpa_nested_supports, sdpa_nested_forward),
    "flex": (flex_supports, flex_forward),
}

# The documented order on a GPU without a measured table (why: dermfast/ops/registry.py and the
# masked_attention module docstring): mature fused peers first, dermfast's never-timed Triton kernel next,
# flex after it (it compiles per new total length), the reference last.
CUDA_DEFAULT_ORDER = ("flash_attn", "sdpa", "sdpa_nested", "triton", "flex", "cuda", "torch")


def register(op) -> None:
    """Register every peer on `op` (the masked_attention registry op) and its documented CUDA order."""
    for name, (supports, fn) in PEER_BACKENDS.items():
        op.register(name, supports)(fn)
    op.default_order["cuda"] = CUDA_DEFAULT_ORDER
