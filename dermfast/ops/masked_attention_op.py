"""Masked-patch attention: softmax attention among each image's visible patches only, packed or padded.

Why it is shaped this way: an MAE encoder sees only the visible patches of each image. With one mask ratio per
batch that is a dense batch; with per-sample ratios it is ragged, and the usual answer (pad, pass a boolean
mask to SDPA) leaves SDPA's fastest kernels. This op takes the ragged batch as it is:

* packed varlen: q, k, v [T, H, Dh] (T = total tokens) with cu_seqlens int32 [B+1] (cu_seqlens[0] = 0,
  non-decreasing, cu_seqlens[B] = T); token t of segment b (cu[b] <= t < cu[b+1]) attends to that segment only.
* padded: q, k, v [B, H, N, Dh] with lengths [B] (0 <= lengths[b] <= N): keys at positions >= lengths[b]
  are ignored and output rows at positions >= lengths[b] are 0 (their gradients are 0 too).
* dense: q, k, v [B, H, N, Dh], neither argument: plain softmax(q k^T * scale) v.

scale defaults to Dh ** -0.5. Output: q's shape and dtype, contiguous.

Backends: triton (kernels/masked_attention.py: fp16 / bf16 / fp32, head dims split into two power-of-two tiles
so 80 is computed as 64 + 16; see its header) and torch (the reference below, which is the spec: any float
dtype including float64, any head dim, any device). The public function is the `torch.library` custom op
`dermfast::masked_attention` (returns (out, lse); the public function hands back out), its backward the custom
op `dermfast::masked_attention_bwd`, with one fake implementation each, so torch.compile and export see them.
The backend is chosen inside the op body at run time.

Peers (dermfast/ops/attention_peers.py): flash_attn (varlen), sdpa (dense), sdpa_nested (jagged NestedTensor),
flex (BlockMask) are backends of the same registry op, chosen by the public `masked_attention()` before the
custom op: a peer serves the whole call with its own autograd (no lse output); dermfast's backends go through
the custom op. Automatic order on a GPU: the measured dispatch table where one exists, else the peers first
(`attention_peers.CUDA_DEFAULT_ORDER`: dermfast's kernel is the default only where it measured >= its best
peer); on a CPU the torch reference (peers only when named). Dispatch shape class: layout / head dim / length
bucket (`shape_class`).

Validation happens in Python before any launch: shapes, dtypes, devices, and the index values (cu_seqlens
starts at 0, never decreases, ends at T; 0 <= lengths <= N; max_seqlen not below the longest segment). A caller
that built the index tensor from host values (a training step always does: the keep counts are host ints)
passes them as `host_index`; the values are then checked on the host with no device read, and the device
tensor is compared with them by `torch._assert_async` (no sync on CUDA: a mismatch fails at a later CUDA call
as a device-side assert, never as a silent wrong result). Without `host_index` the tensor is copied to the host
(one sync). Either way the check runs once per tensor version (remembered on the tensor, so 32 layers sharing
one cu_seqlens check it once), and it is skipped while torch.compile traces. The kernels clamp every index, so
unchecked input cannot reach out of bounds either.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from dermfast.ops import attention_peers
from dermfast.ops._device import on_device
from dermfast.ops.dispatch_table import bucket
from dermfast.ops.registry import BACKENDS, Query, all_of, define_op, dtype_in, needs_triton_device

_CHECKED_ATTR = "_dermfast_masked_attention_checked"


# ------------------------------------------------------------------------------------- validation


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


def _check_index_tensor(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"masked_attention: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"masked_attention: {name} must be a 1-D int32 (or int64) tensor, got "
                         f"{str(t.dtype).removeprefix('torch.')} of shape {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"masked_attention: {name} is on {t.device} but q is on {q.device}")


def as_index(x, q: torch.Tensor):
    """A list / tuple of ints becomes an int32 tensor on q's device; tensors and None pass through."""
    if isinstance(x, (list, tuple)):
        if not all(isinstance(i, int) for i in x):
            raise ValueError(f"masked_attention: index lists must hold ints, got {x!r}")
        return torch.tensor(x, dtype=torch.int32, device=q.device)
    return x


def _already_checked(t: torch.Tensor, key: tuple) -> bool:
    return getattr(t, _CHECKED_ATTR, None) == (t._version, *key)


def _mark_checked(t: torch.Tensor, key: tuple) -> None:
    setattr(t, _CHECKED_ATTR, (t._version, *key))


def _host_values(name: str, t: torch.Tensor, host_index) -> list[int]:
    """The values of index tensor t on the host: `host_index` when the caller holds them (checked against t on
    the device without a sync), else t copied to the host (one sync)."""
    if host_index is None:
        return t.tolist()
    if not isinstance(host_index, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in host_index):
        raise ValueError(f"masked_attention: host_index must be a list or tuple of ints (the values of {name}), "
                         f"got {type(host_index).__name__}")
    if len(host_index) != t.numel():
        raise ValueError(f"masked_attention: host_index has {len(host_index)} values but {name} has {t.numel()}")
    host = torch.tensor(host_index, dtype=t.dtype)
    # Device-side comparison: no host sync on CUDA (a mismatch raises at a later CUDA call); a plain check on CPU.
    torch._assert_async((t == host.to(t.device, non_blocking=True)).all(),
                        f"masked_attention: {name} on the device differs from the host_index passed with it")
    return list(host_index)


def _check_cu_values(cu: list[int], T: int, max_seqlen: int | None) -> None:
    if cu[0] != 0:
        raise ValueError(f"masked_attention: cu_seqlens must start at 0, got {cu[0]}")
    steps = [b - a for a, b in zip(cu[:-1], cu[1:])]
    bad = next((i for i, s in enumerate(steps) if s < 0), None)
    if bad is not None:
        raise ValueError(f"masked_attention: cu_seqlens must be non-decreasing, but cu_seqlens[{bad + 1}]="
                         f"{cu[bad + 1]} < cu_seqlens[{bad}]={cu[bad]}")
    if cu[-1] != T:
        raise ValueError(f"masked_attention: cu_seqlens must end at T = q.shape[0] = {T}, got {cu[-1]}")
    if max_seqlen is not None and max(steps) > max_seqlen:
        raise ValueError(f"masked_attention: max_seqlen={max_seqlen} is below the longest segment "
                         f"({max(steps)})")


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
             max_seqlen: int | None = None, lengths: torch.Tensor | None = None, scale: float | None = None,
             check_values: bool = True, host_index: Sequence[int] | None = None) -> str:
    """Raise ValueError with a clear message on bad input; return the layout ('packed', 'padded', 'dense').

    host_index: the values of cu_seqlens (or of lengths) as the caller holds them on the host; the value check
    then reads these instead of the device tensor (see the module docstring)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"masked_attention: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"masked_attention: {name} must be a floating tensor, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"masked_attention: q, k, v must have the same shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"masked_attention: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"masked_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and float(scale) == float(scale)
                                  and abs(float(scale)) != float("inf")):
        raise ValueError(f"masked_attention: scale must be a finite float or None, got {scale!r}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"masked_attention: max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
    if cu_seqlens is not None and lengths is not None:
        raise ValueError("masked_attention: pass cu_seqlens (packed [T, H, Dh]) or lengths (padded "
                         "[B, H, N, Dh]), not both")
    if host_index is not None and cu_seqlens is None and lengths is None:
        raise ValueError("masked_attention: host_index is the host copy of cu_seqlens or lengths, but neither "
                         "was passed")
    if q.dim() == 0 or q.shape[-1] < 1:
        raise ValueError(f"masked_attention: q must have a head dim, got shape {tuple(q.shape)}")

    if cu_seqlens is not None:
        if q.dim() != 3:
            raise ValueError(f"masked_attention: with cu_seqlens, q, k, v must be packed [T, H, Dh], got shape "
                             f"{tuple(q.shape)}")
        _check_index_tensor("cu_seqlens", cu_seqlens, q)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"masked_attention: cu_seqlens must have B + 1 >= 2 entries, got {cu_seqlens.numel()}")
        T = q.shape[0]
        key = (T, max_seqlen)
        if check_values and not _already_checked(cu_seqlens, key):
            _check_cu_values(_host_values("cu_seqlens", cu_seqlens, host_index), T, max_seqlen)
            _mark_checked(cu_seqlens, key)
        return "packed"

    if q.dim() != 4:
        raise ValueError(f"masked_attention: q, k, v must be [B, H, N, Dh] (padded / dense) or [T, H, Dh] with "
                         f"cu_seqlens (packed), got shape {tuple(q.shape)}")
    if lengths is None:
        return "dense"
    _check_index_tensor("lengths", lengths, q)
    B, N = q.shape[0], q.shape[2]
    if lengths.numel() != B:
        raise ValueError(f"masked_attention: lengths must have B = {B} entries, got {lengths.numel()}")
    key = (N,)
    if check_values and not _already_checked(lengths, key):
        lens = _host_values("lengths", lengths, host_index)
        bad = next((i for i, n in enumerate(lens) if not 0 <= n <= N), None)
        if bad is not None:
            raise ValueError(f"masked_attention: lengths must lie in [0, N = {N}], got lengths[{bad}]={lens[bad]}")
        _mark_checked(lengths, key)
    return "padded"


# ---------------------------------------------------------------------------------- the reference


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _pack_index(cu: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment, position in segment) of every packed token, int64 [T]."""
    t = torch.arange(T, device=cu.device, dtype=torch.int64)
    seg = torch.searchsorted(cu.to(torch.int64), t, right=True) - 1
    return seg, t - cu.to(torch.int64)[seg]


def _to_padded(x: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """[T, H, ...] packed -> [B, H, L, ...] padded with zeros."""
    y = x.new_zeros((B, L) + tuple(x.shape[1:]))
    y[seg, pos] = x
    return y.transpose(1, 2)


def _to_packed(y: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[B, H, L, ...] padded -> [T, H, ...] packed."""
    return y.transpose(1, 2)[seg, pos]


def _padded_lengths(cu_seqlens, max_seqlen, lengths, q) -> tuple[torch.Tensor, int]:
    if cu_seqlens is not None:
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
    else:
        lens = lengths
    L = max_seqlen if max_seqlen is not None else (int(lens.max()) if lens.numel() else 0)
    return lens, L


def _attention_padded(q, k, v, lengths, scale):
    """(out, lse) in the accumulation dtype for [B, H, N, Dh] inputs; autograd-safe for rows without keys."""
    N = q.shape[2]
    acc = _acc_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    if lengths is None:
        s = (q @ k.transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        return torch.softmax(s, dim=-1) @ v, lse
    pos_ok = torch.arange(N, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # [B, N]
    pos_ok = pos_ok[:, None, :]  # [B, 1, N]
    # zero everything at positions >= length first, so garbage there (even nan) never reaches a gradient
    q, k, v = (x.masked_fill(~pos_ok[..., None], 0) for x in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~pos_ok[:, :, None, :], float("-inf"))  # keys >= length
    row_ok = pos_ok[..., None]  # [B, 1, N, 1]
    s = torch.where(row_ok, s, torch.zeros((), dtype=s.dtype, device=s.device))  # rows >= length: no -inf rows
    p = torch.where(row_ok, torch.softmax(s, dim=-1), torch.zeros((), dtype=s.dtype, device=s.device))
    lse = torch.where(pos_ok, torch.logsumexp(s, dim=-1), torch.full((), float("-inf"), dtype=s.dtype,
                                                                     device=s.device))
    return p @ v, lse


def _forward_ref(q, k, v, cu_seqlens=None, max_seqlen=None, lengths=None, scale=None):
    """(out in the accumulation dtype, lse) for any layout; the body of the reference and the torch backend."""
    scale = _resolve_scale(scale, q.shape[-1])
    if cu_seqlens is None:
        return _attention_padded(q, k, v, lengths, scale)
    T, B = q.shape[0], cu_seqlens.numel() - 1
    lens, L = _padded_lengths(cu_seqlens, max_seqlen, None, q)
    seg, pos = _pack_index(cu_seqlens, T)
    out, lse = _attention_padded(*(_to_padded(x, seg, pos, B, L) for x in (q, k, v)), lens, scale)
    return _to_packed(out, seg, pos), _to_packed(lse, seg, pos)


def masked_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                         max_seqlen: int | None = None, lengths: torch.Tensor | None = None,
                         scale: float | None = None) -> torch.Tensor:
    """The specification (see the module docstring for the layouts): plain torch, any device, any float dtype
    (float64 included), computed in promote(dtype, float32), differentiable by autograd. Returns q.dtype.

    Packed inputs are scattered into a zero-padded [B, H, max_len, Dh] batch (max_len = max_seqlen, else the
    longest segment, read from the device) and attended with a key mask.
    """
    cu_seqlens, lengths = as_index(cu_seqlens, q), as_index(lengths, q)
    validate(q, k, v, cu_seqlens, max_seqlen, lengths, scale)
    out, _ = _forward_ref(q, k, v, cu_seqlens, max_seqlen, lengths, scale)
    return out.to(q.dtype)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------- backends


def _torch_forward(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    out, lse = _forward_ref(q, k, v, cu_seqlens, max_seqlen, lengths, scale)
    return out.to(q.dtype).contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


def _torch_backward(do, dlse, q, k, v, out, lse, cu_seqlens, max_seqlen, lengths, scale):
    """dV = P^T dO, dP = dO V^T, dS = P (dP - delta), delta = rowsum(dO O) - dLSE, dQ = s dS K, dK = s dS^T Q."""
    in_dtype, acc = q.dtype, _acc_dtype(q.dtype)
    packed = cu_seqlens is not None
    if packed:
        T, B = q.shape[0], cu_seqlens.numel() - 1
        lens, L = _padded_lengths(cu_seqlens, max_seqlen, None, q)
        seg, pos = _pack_index(cu_seqlens, T)
        pad = lambda x: _to_padded(x, seg, pos, B, L)  # noqa: E731
        q, k, v, out, do, lse = (pad(x) for x in (q, k, v, out, do, lse))
        dlse = pad(dlse) if dlse is not None else None
    else:
        lens = lengths
    N = q.shape[2]
    q, k, v, out, do, lse = (x.to(acc) for x in (q, k, v, out, do, lse))
    if lens is None:
        vis = torch.ones(1, 1, N, N, dtype=torch.bool, device=q.device)
    else:
        pos_ok = torch.arange(N, device=q.device)[None, :] < lens.to(q.device)[:, None]
        vis = (pos_ok[:, :, None] & pos_ok[:, None, :])[:, None]  # [B, 1, N, N]
        q, k, v, do = (x.masked_fill(~pos_ok[:, None, :, None], 0) for x in (q, k, v, do))
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.where(vis, torch.exp(s - lse[..., None]), torch.zeros((), dtype=acc, device=q.device))
    delta = (do * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    ds = p * (do @ v.transpose(-1, -2) - delta[..., None])
    dq, dk, dv = (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, p.transpose(-1, -2) @ do
    if packed:
        dq, dk, dv = (_to_packed(x, seg, pos) for x in (dq, dk, dv))
    return tuple(x.to(in_dtype).contiguous() for x in (dq, dk, dv))


def _triton_forward(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    from dermfast.kernels import masked_attention as kern
    with on_device(q):
        return kern.forward(q, k, v, cu_seqlens, lengths, _resolve_scale(scale, q.shape[-1]))


def _triton_backward(do, dlse, q, k, v, out, lse, cu_seqlens, max_seqlen, lengths, scale):
    from dermfast.kernels import masked_attention as kern
    with on_device(q):
        return kern.backward(do, q, k, v, out, lse, dlse, cu_seqlens, lengths, scale)


TRITON_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)


def _triton_head_dim(q: Query) -> str | None:
    d = q.sizes.get("D")
    if d is None or d in TRITON_HEAD_DIMS:
        return None
    return f"head dim {d} not in {TRITON_HEAD_DIMS} (needs Dh = 2^a or 2^a + 2^b, parts >= 16, Dh <= 128)"


def _triton_fp32_on_gpu(q: Query) -> str | None:
    """fp32 attention (ieee dot products) spills 0.1-90 KB of registers per thread in every autotune config on
    sm_80 / sm_90 at ViT shapes (`python -m dermfast.info --resources --dtype float32`): the Triton kernel serves
    fp16 / bf16 on a GPU (what bf16 autocast gives it) and fp32 only under the interpreter (CPU tests)."""
    if q.dtype == torch.float32 and q.device.type == "cuda":
        return "float32 on a GPU: every autotune config spills registers (info --resources); fp16 / bf16 only"
    return None


_triton_supports = all_of(needs_triton_device, dtype_in(torch.float16, torch.bfloat16, torch.float32),
                          _triton_fp32_on_gpu, _triton_head_dim)
masked_attention_fwd_op = define_op("masked_attention", "attention within each image's visible patches (fwd)")
masked_attention_fwd_op.register("triton", _triton_supports)(_triton_forward)
masked_attention_fwd_op.register("torch")(_torch_forward)
masked_attention_bwd_op = define_op("masked_attention_bwd", "masked-patch attention backward (dq, dk, dv)")
masked_attention_bwd_op.register("triton", _triton_supports)(_triton_backward)
masked_attention_bwd_op.register("torch")(_torch_backward)
attention_peers.register(masked_attention_fwd_op)


def shape_class(q: Query) -> str:
    """Dispatch-table class: layout / head dim / longest sequence rounded up to a power of two ("L?" unknown)."""
    layout = attention_peers.LAYOUTS.get(q.sizes.get("layout", -1), "any")
    L = q.sizes.get("L")
    return f"{layout}/D{q.sizes.get('D', '?')}/L{bucket(L) if L is not None else '?'}"


masked_attention_fwd_op.shape_class = shape_class
masked_attention_bwd_op.shape_class = shape_class


def _query(q: torch.Tensor, packed: bool, layout: str | None = None, L: int | None = None,
           requires_grad: bool | None = None) -> Query:
    """layout: 'dense' | 'packed' | 'padded'; L: the longest sequence when known on the host (max_seqlen, N)."""
    sizes = {"D": q.shape[-1], "packed": int(packed)}
    if layout is not None:
        sizes["layout"] = {"dense": 0, "packed": 1, "padded": 2}[layout]
    if L is not None:
        sizes["L"] = int(L)
    return Query(q.device, q.dtype, sizes, q.requires_grad if requires_grad is None else requires_grad)


def query_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, max_seqlen: int | None) -> Query:
    """The Query of a public call: layout, head dim, longest sequence, whether a gradient is wanted."""
    L = max_seqlen if layout == "packed" else q.shape[2]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _query(q, layout == "packed", layout, L, grad)


# ------------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("dermfast::masked_attention", mutates_args=())
def _masked_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                         lengths: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                         backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [q's shape, q.dtype], lse [q.shape[:-1], fp32 (fp64 for fp64)]; natural log, -inf where no key)."""
    layout = "packed" if cu_seqlens is not None else ("padded" if lengths is not None else "dense")
    q_ = _query(q, cu_seqlens is not None, layout, max_seqlen if cu_seqlens is not None else q.shape[2])
    impl = masked_attention_fwd_op.select(q_, backend, among=BACKENDS)
    return impl.fn(q, k, v, cu_seqlens, max_seqlen, lengths, scale)


@_masked_attention_op.register_fake
def _(q, k, v, cu_seqlens=None, max_seqlen=None, lengths=None, scale=None, backend=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("dermfast::masked_attention_bwd", mutates_args=())
def _masked_attention_bwd_op(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor,
                             k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             cu_seqlens: Optional[torch.Tensor], max_seqlen: Optional[int],
                             lengths: Optional[torch.Tensor], scale: float,
                             backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, q's shape and dtype."""
    impl = masked_attention_bwd_op.select(_query(q, cu_seqlens is not None), backend)
    return impl.fn(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, max_seqlen, lengths, scale)


@_masked_attention_bwd_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, max_seqlen, lengths, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, lengths, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, lengths)
    ctx.max_seqlen, ctx.scale, ctx.backend = max_seqlen, _resolve_scale(scale, q.shape[-1]), backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, lengths = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _masked_attention_bwd_op(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                                          lengths, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None, None


_masked_attention_op.register_autograd(_backward, setup_context=_setup_context)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                     max_seqlen: int | None = None, lengths: torch.Tensor | None = None,
                     scale: float | None = None, backend: str | None = None, *,
                     host_index: Sequence[int] | None = None) -> torch.Tensor:
    """Attention within each image's visible patches; see the module docstring for layouts and semantics.

    Args:
        q, k, v: packed [T, H, Dh] (with cu_seqlens) or [B, H, N, Dh] (padded with lengths, or dense); one
            dtype and device; the triton backend reads any strides in place except a strided last dim
            (that tensor is copied first).
        cu_seqlens: int32 [B+1], 0 = cu[0] <= cu[1] <= ... <= cu[B] = T (int64, or a list of ints, is taken too).
        max_seqlen: optional longest segment (spares the torch backend a device read; the triton backend
            needs none).
        lengths: int [B], 0 <= lengths[b] <= N (a tensor or a list of ints).
        scale: score scale, default Dh ** -0.5.
        backend: None (automatic; env DERMFAST_BACKEND / set_backend), "triton", "torch", or a peer:
            "flash_attn", "sdpa" (dense), "sdpa_nested" (packed), "flex" (see attention_peers).
        host_index: optional list / tuple of ints, the values of cu_seqlens (or lengths) as the caller holds
            them on the host: the values are validated from it with no host sync, and the device tensor is
            compared with it asynchronously (`torch._assert_async`). Without it, validation copies the index
            tensor to the host once per tensor version (one sync).
    Returns: [q's shape], q.dtype.
    """
    cu_seqlens, lengths = as_index(cu_seqlens, q), as_index(lengths, q)
    layout = validate(q, k, v, cu_seqlens, max_seqlen, lengths, scale,
                      check_values=not torch.compiler.is_compiling(), host_index=host_index)
    impl = masked_attention_fwd_op.select(query_for(q, k, v, layout, max_seqlen), backend)
    if impl.backend not in BACKENDS:  # a peer: the whole call, with its own autograd
        return impl.fn(q, k, v, cu_seqlens, max_seqlen, lengths, _resolve_scale(scale, q.shape[-1]))
    # dermfast's backends: the custom op runs the one chosen here (so forward and backward agree with this
    # choice); while torch.compile traces, the choice is left to the op body at run time, as before peers
    chosen = backend if backend is not None or torch.compiler.is_compiling() else impl.backend
    return _masked_attention_op(q, k, v, cu_seqlens, max_seqlen, lengths,
                                None if scale is None else float(scale), chosen)[0]
