"""attention_bias: softmax(q k^T * scale + bias) v. The reference against timm's own BEiT attention formula
(written out below); the SDPA backend forward and backward (q, k, v and bias gradients) and the FlexAttention
backend (forward on CPU: PyTorch's flex has no CPU backward; backward on GPU) against the float64 reference;
odd lengths, head dim 80, the three bias shapes; bad input; dispatch; torch.compile."""
import pytest
import torch

from dermfast.ops.attention_bias_op import AttentionBias, attention_bias, attention_bias_op, attention_bias_ref
from dermfast.ops.registry import BackendUnavailable, Query
from tests.conftest import TOLERANCES

SHAPES = [(2, 2, 1, 16), (2, 3, 7, 80), (1, 2, 65, 32), (3, 1, 17, 8)]  # L = 1, odd, above a tile; Dh 80


def beit_peer(q, k, v, bias, scale):
    """timm, timm/models/beit.py, Attention.forward, the non-fused branch (fused_attn False), transcribed:
        q = q * self.scale; attn = (q @ k.transpose(-2, -1)); attn = attn + rel_pos_bias
        attn = attn.softmax(dim=-1); x = attn @ v"""
    q = q * scale
    attn = q @ k.transpose(-2, -1)
    attn = attn + bias
    attn = attn.softmax(dim=-1)
    return attn @ v


def inputs(B, H, L, D, bias_kind, dtype=torch.float64, device="cpu"):
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype, device=device) for _ in range(3))
    shape = {"shared": (H, L, L), "one": (1, H, L, L), "per_sample": (B, H, L, L)}[bias_kind]
    return q, k, v, torch.randn(*shape, dtype=dtype, device=device) * 2


def grads(fn, q, k, v, bias, g, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]
    out = fn(*leaves, **kw)
    return (out, *torch.autograd.grad(out, leaves, g))


@pytest.mark.parametrize("bias_kind", ["shared", "one", "per_sample"])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_timm_beit_formula(shape, bias_kind):
    q, k, v, bias = inputs(*shape, bias_kind)
    scale = shape[-1] ** -0.5
    got = grads(attention_bias_ref, q, k, v, bias, g := torch.randn_like(q))
    want = grads(beit_peer, q, k, v, bias, g, scale=scale)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(attention_bias_ref(q, k, v, bias, scale=0.3), beit_peer(q, k, v, bias, 0.3),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bias_kind", ["shared", "one", "per_sample"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_backend_forward_backward_float64(shape, bias_kind):
    q, k, v, bias = inputs(*shape, bias_kind)
    g = torch.randn_like(q)
    got = grads(attention_bias, q, k, v, bias, g, backend="torch", scale=0.37)
    want = grads(attention_bias_ref, q, k, v, bias, g, scale=0.37)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize("bias_kind", ["shared", "one", "per_sample"])
@pytest.mark.parametrize("shape", SHAPES)
def test_flex_backend_forward_float64_cpu(shape, bias_kind):
    q, k, v, bias = inputs(*shape, bias_kind)
    got = attention_bias(q, k, v, bias, backend="flex")
    torch.testing.assert_close(got, attention_bias_ref(q, k, v, bias), atol=1e-12, rtol=1e-12)


def test_flex_refuses_grad_on_cpu_with_reasons():
    q, k, v, bias = inputs(1, 2, 5, 16, "shared")
    with pytest.raises(BackendUnavailable, match="torch: would fit; flex: FlexAttention has no backward on CPU"):
        attention_bias(q.requires_grad_(), k, v, bias, backend="flex")
    with pytest.raises(BackendUnavailable, match="FlexAttention has no backward on CPU"):
        attention_bias(q.detach(), k, v, bias.requires_grad_(), backend="flex")  # the bias gradient too
    with torch.no_grad():  # no grad wanted: flex serves
        attention_bias(q, k, v, bias, backend="flex")


def test_automatic_dispatch_on_cpu_is_sdpa():
    q = torch.randn(1, 2, 5, 16)
    assert attention_bias_op.select(Query(q.device, q.dtype, {"D": 16, "L": 5})).backend == "torch"


def test_bias_cast_to_q_dtype_and_module_form():
    q, k, v, bias = inputs(2, 2, 9, 16, "shared", dtype=torch.float32)
    got = AttentionBias(scale=0.2, backend="torch")(q, k, v, bias.double())  # a float64 bias is cast to float32
    assert got.dtype == torch.float32
    want = attention_bias_ref(q.double(), k.double(), v.double(), bias.double(), scale=0.2)
    torch.testing.assert_close(got.double(), want, atol=10 * TOLERANCES[torch.float32][0],
                               rtol=10 * TOLERANCES[torch.float32][1])


@pytest.mark.parametrize("bad, match", [
    (dict(bias=torch.randn(2, 5, 4)), r"bias must be \[H, L, L\]"),
    (dict(bias=torch.randn(3, 2, 5, 5)), r"bias must be .* got \(3, 2, 5, 5\)"),
    (dict(bias=torch.ones(2, 5, 5, dtype=torch.int64)), "bias must be a floating tensor"),
    (dict(q=torch.randn(2, 5, 16)), r"must be \[B, H, L, Dh\]"),
    (dict(k=torch.randn(2, 2, 6, 16)), "same shape"),
    (dict(v=torch.randn(2, 2, 5, 16, dtype=torch.float64)), "one dtype"),
    (dict(bias=torch.randn(2, 5, 5, device="meta")), "one device"),
    (dict(scale=float("inf")), "scale must be a finite float"),
])
def test_bad_input_one_line_errors(bad, match):
    args = dict(q=torch.randn(2, 2, 5, 16), k=torch.randn(2, 2, 5, 16), v=torch.randn(2, 2, 5, 16),
                bias=torch.randn(2, 5, 5), scale=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        attention_bias(**args)
    with pytest.raises(ValueError, match=match):
        attention_bias_ref(**args)


def test_compiled_fullgraph_equals_reference():
    q, k, v, bias = inputs(2, 2, 7, 16, "shared")
    fn = torch.compile(lambda *a: attention_bias(*a, scale=0.5), backend="aot_eager", fullgraph=True)
    got = grads(fn, q, k, v, bias, g := torch.randn_like(q))
    want = grads(attention_bias_ref, q, k, v, bias, g, scale=0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L, D", [(197, 64), (65, 80), (7, 32)])
def test_gpu_backends_vs_float64_reference(backend, dtype, L, D):
    """The flash-attention rule: each backend's error against float64 is at most about twice that of the
    reference computed in the same dtype (fp32: TF32 may be on, so the rule, not the fp32 table)."""
    q, k, v, bias = inputs(2, 3, L, D, "shared", device="cuda")
    g = torch.randn_like(q)
    got = grads(attention_bias, *(x.to(dtype) for x in (q, k, v)), bias.float(), g.to(dtype), backend=backend)
    ref = grads(attention_bias_ref, q, k, v, bias, g)
    low = grads(attention_bias_ref, *(x.to(dtype) for x in (q, k, v)), bias.float(), g.to(dtype))
    for name, a, r, lo in zip(("out", "dq", "dk", "dv", "dbias"), got, ref, low):
        err, base = (a.double() - r).abs().max().item(), (lo.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-5 * r.abs().max().item(), (name, err, base)
