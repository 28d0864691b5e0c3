"""Peers as backends of masked_attention (dermfast/ops/attention_peers.py): each peer, through the op, equals the
float64 torch reference forward and backward, on odd lengths (1, 7, 65) and head dim 80.

What runs on this CPU (torch 2.13): sdpa (dense) and sdpa_nested (packed jagged NestedTensor) forward and
backward in float64; flex forward only (torch has no FlexAttention backward on CPU). flash_attn is not installed
here: its glue is checked against FlashAttention's documented varlen contract written out below; the library
itself, and every peer's GPU path, run in the @gpu tests.
"""
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from dermfast.ops import BackendUnavailable, masked_attention, masked_attention_ref
from dermfast.ops import attention_peers
from dermfast.ops.masked_attention_op import masked_attention_fwd_op
from dermfast.ops.tolerances import TOLERANCES

LENGTHS = [1, 7, 65]
H, D = 2, 80


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def cu_of(lengths, device="cpu"):
    return torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0).to(torch.int32)


def fwd_bwd(fn, q, k, v, g):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def assert_equal_to_reference(got, ref, dtype):
    atol, rtol = TOLERANCES[dtype]
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a.double(), r.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def packed(lengths, dtype=torch.float64, device="cpu"):
    T = sum(lengths)
    return [torch.randn(T, H, D, dtype=dtype, device=device) for _ in range(4)]


def test_sdpa_nested_packed_fwd_bwd_float64():
    q, k, v, g = packed(LENGTHS)
    cu = cu_of(LENGTHS)
    got = fwd_bwd(lambda *x: masked_attention(*x, cu_seqlens=cu, max_seqlen=65, backend="sdpa_nested"), q, k, v, g)
    ref = fwd_bwd(lambda *x: masked_attention_ref(*x, cu_seqlens=cu, max_seqlen=65), q, k, v, g)
    assert_equal_to_reference(got, ref, torch.float64)


def test_sdpa_nested_empty_segment_and_no_max_seqlen():
    lengths = [2, 0, 5]
    q, k, v, g = packed(lengths)
    cu = cu_of(lengths)
    got = fwd_bwd(lambda *x: masked_attention(*x, cu_seqlens=cu, backend="sdpa_nested"), q, k, v, g)
    ref = fwd_bwd(lambda *x: masked_attention_ref(*x, cu_seqlens=cu), q, k, v, g)
    assert_equal_to_reference(got, ref, torch.float64)


@pytest.mark.parametrize("N", [1, 7, 65])
def test_sdpa_dense_fwd_bwd_float64(N):
    q, k, v, g = (torch.randn(2, H, N, D, dtype=torch.float64) for _ in range(4))
    got = fwd_bwd(lambda *x: masked_attention(*x, scale=0.3, backend="sdpa"), q, k, v, g)
    ref = fwd_bwd(lambda *x: masked_attention_ref(*x, scale=0.3), q, k, v, g)
    assert_equal_to_reference(got, ref, torch.float64)


@pytest.mark.parametrize("layout", ["packed", "padded", "dense"])
def test_flex_forward_float64(layout):
    if layout == "packed":
        q, k, v, _ = packed(LENGTHS)
        kw = {"cu_seqlens": cu_of(LENGTHS), "max_seqlen": 65}
    else:
        q, k, v = (torch.randn(3, H, 65, D, dtype=torch.float64) for _ in range(3))
        kw = {} if layout == "dense" else {"lengths": torch.tensor(LENGTHS, dtype=torch.int32)}
        if layout == "padded":  # garbage (NaN) in the padding must not reach a valid row
            pad = torch.arange(65)[None, :] >= torch.tensor(LENGTHS)[:, None]
            for x in (q, k, v):
                x.masked_fill_(pad[:, None, :, None], float("nan"))
    with torch.no_grad():
        got = masked_attention(q, k, v, backend="flex", **kw)
        ref = masked_attention_ref(q, k, v, **kw)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    # the BlockMask is built once per index tensor and reused by the next layer
    if layout != "dense":
        index = kw.get("cu_seqlens", kw.get("lengths"))
        kept = getattr(index, attention_peers._MASK_ATTR)[1]
        with torch.no_grad():
            masked_attention(q, k, v, backend="flex", **kw)
        assert getattr(index, attention_peers._MASK_ATTR)[1] is kept


def test_peers_refuse_what_they_cannot_serve_with_the_reason():
    q, k, v, _ = packed(LENGTHS, torch.float32)
    cu = cu_of(LENGTHS)
    with pytest.raises(BackendUnavailable, match="serves the dense layout, not packed"):
        masked_attention(q, k, v, cu_seqlens=cu, backend="sdpa")
    with pytest.raises(BackendUnavailable, match="no FlexAttention backward on CPU"):
        masked_attention(q.requires_grad_(), k, v, cu_seqlens=cu, backend="flex")
    qp = torch.randn(3, H, 65, D)
    with pytest.raises(BackendUnavailable, match="serves the packed layout, not padded"):
        masked_attention(qp, qp, qp, lengths=torch.tensor(LENGTHS), backend="sdpa_nested")
    why = masked_attention_fwd_op.reasons(masked_attention_fwd_op_query())["flash_attn"]
    assert why is not None and ("not installed" in why or "CUDA" in why)
    # the (out, lse) custom op serves dermfast's own backends only
    with pytest.raises(BackendUnavailable, match="cannot serve this form"):
        torch.ops.dermfast.masked_attention(q.detach(), k, v, cu, 65, None, None, "sdpa_nested")


def masked_attention_fwd_op_query():
    from dermfast.ops.registry import Query
    return Query(torch.device("cpu"), torch.float16, {"D": 80, "layout": 1, "L": 65}, True)


def test_cpu_automatic_choice_stays_the_reference():
    q, k, v, _ = packed(LENGTHS, torch.float32)
    from dermfast.ops.masked_attention_op import query_for
    assert masked_attention_fwd_op.select(query_for(q, k, v, "packed", 65)).backend == "torch"


def flash_attn_documented(calls):
    """FlashAttention-2's documented varlen contract (Dao-AILab/flash-attention, flash_attn/flash_attn_interface.py,
    `flash_attn_varlen_func` docstring): q, k, v [total, nheads, headdim]; cu_seqlens_q / _k int32 [batch + 1];
    max_seqlen_q / _k ints; softmax_scale default headdim ** -0.5; out [total, nheads, headdim]. Written out per
    segment with plain softmax attention, to check dermfast's glue (not FlashAttention's numerics)."""
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
        calls.append((cu_q.dtype, cu_k.dtype, max_q, max_k, dropout_p, causal, softmax_scale))
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and isinstance(max_q, int)
        out = torch.empty_like(q)
        for a, b in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:]):
            s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * softmax_scale
            out[a:b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:b])
        return out

    def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
        calls.append(("dense", q.shape))
        assert q.dim() == 4  # [batch, seqlen, nheads, headdim]
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    return types.SimpleNamespace(flash_attn_varlen_func=varlen, flash_attn_func=dense)


def test_flash_attn_glue_against_the_documented_contract(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_documented(calls))
    q, k, v, _ = packed(LENGTHS)
    cu64 = cu_of(LENGTHS).long()
    got = attention_peers.flash_attn_forward(q, k, v, cu64, 65, None, 0.2)
    torch.testing.assert_close(got, masked_attention_ref(q, k, v, cu64, 65, scale=0.2), atol=1e-12, rtol=1e-12)
    assert calls[0] == (torch.int32, torch.int32, 65, 65, 0.0, False, 0.2)
    qd = torch.randn(2, H, 7, D, dtype=torch.float64)
    got = attention_peers.flash_attn_forward(qd, qd * 2, qd + 1, None, None, None, D ** -0.5)
    assert got.is_contiguous() and got.shape == qd.shape
    torch.testing.assert_close(got, masked_attention_ref(qd, qd * 2, qd + 1), atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ GPU

GPU_PEERS = [("flash_attn", "packed"), ("flash_attn", "dense"), ("sdpa", "dense"), ("sdpa_nested", "packed"),
             ("flex", "packed"), ("flex", "padded"), ("flex", "dense")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend,layout", GPU_PEERS)
def test_peer_on_gpu_within_twice_torchs_own_error(backend, layout, dtype):
    from dermfast.ops.masked_attention_op import query_for
    dev = "cuda"
    if layout == "packed":
        q, k, v, g = packed(LENGTHS, torch.float64, dev)
        kw = {"cu_seqlens": cu_of(LENGTHS, dev), "max_seqlen": 65}
    else:
        q, k, v, g = (torch.randn(3, H, 65, D, dtype=torch.float64, device=dev) for _ in range(4))
        kw = {} if layout == "dense" else {"lengths": torch.tensor(LENGTHS, dtype=torch.int32, device=dev)}
    why = masked_attention_fwd_op.impls[backend].supports(query_for(q.to(dtype).requires_grad_(), k, v, layout, 65))
    if why is not None:
        pytest.skip(f"{backend} cannot serve this here: {why}")
    got = fwd_bwd(lambda *x: masked_attention(*x, backend=backend, **kw), q.to(dtype), k.to(dtype), v.to(dtype),
                  g.to(dtype))
    ref = fwd_bwd(lambda *x: masked_attention_ref(*x, **kw), q, k, v, g)
    low = fwd_bwd(lambda *x: masked_attention_ref(*x, **kw), q.to(dtype), k.to(dtype), v.to(dtype), g.to(dtype))
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), got, ref, low):
        err, own = (a.double() - r).abs().max().item(), (lo.double() - r).abs().max().item()
        assert err <= 2 * own + 1e-3, f"{backend} {layout} {name}: {err:.3g} vs torch's own {own:.3g}"
