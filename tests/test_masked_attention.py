"""masked_attention: reference vs a textbook per-segment loop; Triton kernels (interpreter on CPU) vs the float64
reference, forward and dq / dk / dv; the flash-attention rule in fp16 / bf16; no leaks between segments;
padded rows; bad input; dispatch; custom-op registration (opcheck, torch.compile).

Interpreter cost: about 1 s per fwd + bwd at T ~ 100, H = 2 on one CPU core; shapes are kept at that size.
"""
import pytest
import torch

from dermfast.ops import BackendUnavailable, Query, masked_attention, masked_attention_ref
from dermfast.ops import masked_attention_op as mao
from tests.conftest import TOLERANCES

LENGTHS = [1, 7, 65, 33]  # 1, odd, just above a tile, not a multiple of 16


def cu_of(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def naive(q, k, v, cu=None, lengths=None, scale=None):
    """Textbook attention per segment / per sample, in the inputs' own dtype.

    The independent spec the reference is checked against (float64), and PyTorch's own low-precision result
    for the flash-attention rule (fp16 / bf16)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def attend(qq, kk, vv):  # [H, n, D]
        return torch.softmax((qq @ kk.transpose(-1, -2)) * scale, dim=-1) @ vv

    if cu is not None:
        bounds = cu.tolist()
        return torch.cat([attend(*(x[a:e].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
                          for a, e in zip(bounds[:-1], bounds[1:])])
    out = []
    for b in range(q.shape[0]):
        n = q.shape[2] if lengths is None else int(lengths[b])
        live = attend(q[b, :, :n], k[b, :, :n], v[b, :, :n])
        out.append(torch.cat([live, live.new_zeros(q.shape[1], q.shape[2] - n, q.shape[3])], dim=1))
    return torch.stack(out)


def packed_qkv(lengths, H, D, dtype, device="cpu"):
    """q, k, v [T, H, D] as strided views of one qkv tensor (as timm's projection gives them)."""
    qkv = torch.randn(sum(lengths), 3, H, D, dtype=dtype, device=device)
    return qkv.unbind(1)


def padded_qkv(B, H, N, D, dtype, device="cpu"):
    qkv = torch.randn(B, N, 3, H, D, dtype=dtype, device=device)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def fwd_bwd(fn, q, k, v, grad, **kw):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out, dq, dk, dv


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_against_reference(got, low, ref, dtype, names=("out", "dq", "dk", "dv")):
    """fp32: (atol, rtol) from conftest; fp16 / bf16: error <= 2x PyTorch's own error in that dtype."""
    for name, g, lo, r in zip(names, got, low, ref):
        assert torch.isfinite(g).all(), name
        if dtype == torch.float32:
            atol, rtol = TOLERANCES[torch.float32]
            torch.testing.assert_close(g.double(), r, atol=10 * atol, rtol=10 * rtol, msg=name)
        else:
            err, base = max_err(g, r), max_err(lo, r)
            assert err <= 2 * base + 1e-5, f"{name}: kernel error {err:.3g} > 2x PyTorch {dtype} error {base:.3g}"


# ------------------------------------------------------------------------------------ the reference


@pytest.mark.parametrize("lengths", [LENGTHS, [0, 5, 0, 3]])
def test_reference_is_the_textbook_definition_packed(lengths):
    q, k, v = packed_qkv(lengths, 3, 24, torch.float64)
    cu = cu_of(lengths)
    g = torch.randn(sum(lengths), 3, 24, dtype=torch.float64)
    got = fwd_bwd(masked_attention_ref, q, k, v, g, cu_seqlens=cu)
    want = fwd_bwd(naive, q, k, v, g, cu=cu)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_reference_is_the_textbook_definition_padded_and_dense():
    q, k, v = padded_qkv(4, 2, 19, 16, torch.float64)
    lens = torch.tensor([19, 1, 0, 8])
    g = torch.randn(4, 2, 19, 16, dtype=torch.float64)
    for kw_ref, kw_naive in (({"lengths": lens}, {"lengths": lens}), ({}, {})):
        got = fwd_bwd(masked_attention_ref, q, k, v, g, **kw_ref)
        want = fwd_bwd(naive, q, k, v, g, **kw_naive)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    dense = masked_attention_ref(q, k, v)
    torch.testing.assert_close(dense, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_torch_backend_backward_formula_matches_autograd(layout):
    """The torch backend's explicit backward (from LSE) equals autograd through the reference, LSE grad too."""
    if layout == "packed":
        lengths = [3, 0, 9]
        q, k, v = packed_qkv(lengths, 2, 8, torch.float64)
        kw = {"cu_seqlens": cu_of(lengths)}
    else:
        q, k, v = padded_qkv(3, 2, 9, 8, torch.float64)
        kw = {"lengths": torch.tensor([9, 2, 0])}
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = torch.ops.dermfast.masked_attention(q, k, v, kw.get("cu_seqlens"), None, kw.get("lengths"),
                                                   None, "torch")
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    live = torch.isfinite(lse)
    loss = (out * g).sum() + (torch.where(live, lse, 0) * gl).sum()
    got = torch.autograd.grad(loss, (q, k, v))
    ro, rl = mao._forward_ref(q, k, v, **kw)
    loss = (ro * g).sum() + (torch.where(live, rl, 0) * gl).sum()
    want = torch.autograd.grad(loss, (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# -------------------------------------------------------------------------- triton, under the interpreter


@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_packed_matches_float64_reference(dtype, D):
    q, k, v = packed_qkv(LENGTHS, 2, D, dtype)
    cu = cu_of(LENGTHS)
    g = torch.randn(q.shape, dtype=dtype)
    got = fwd_bwd(masked_attention, q, k, v, g, cu_seqlens=cu, backend="triton")
    ref = fwd_bwd(masked_attention_ref, *(x.double() for x in (q, k, v)), g.double(), cu_seqlens=cu)
    low = fwd_bwd(naive, q, k, v, g, cu=cu) if dtype != torch.float32 else ref
    assert got[0].dtype == dtype and got[0].shape == q.shape
    check_against_reference(got, low, ref, dtype)


@pytest.mark.parametrize("D", [32, 96, 128])
def test_triton_other_head_dims(D):
    lengths = [5, 20]
    q, k, v = packed_qkv(lengths, 1, D, torch.float16)
    cu = cu_of(lengths)
    g = torch.randn(q.shape, dtype=torch.float16)
    got = fwd_bwd(masked_attention, q, k, v, g, cu_seqlens=cu, backend="triton")
    ref = fwd_bwd(masked_attention_ref, *(x.double() for x in (q, k, v)), g.double(), cu_seqlens=cu)
    check_against_reference(got, fwd_bwd(naive, q, k, v, g, cu=cu), ref, torch.float16)


def test_triton_padded_rows_zero_and_garbage_ignored():
    """Padded: keys >= length ignored, output rows >= length exactly 0, gradients there 0; nan in the padding
    never leaks; outputs and gradients are poisoned before the launch so unwritten elements would show."""
    from dermfast.kernels import masked_attention as kern
    B, H, N, D = 4, 2, 40, 80
    q, k, v = (x.contiguous() for x in padded_qkv(B, H, N, D, torch.float32))
    lens = torch.tensor([40, 17, 1, 0], dtype=torch.int32)
    pad = torch.arange(N)[None, :] >= lens[:, None]  # [B, N]
    for x in (q, k, v):
        x.masked_fill_(pad[:, None, :, None], float("nan"))
    out = torch.full(q.shape, float("nan"))
    lse = torch.full(q.shape[:-1], float("nan"))
    kern.forward(q, k, v, None, lens, D ** -0.5, out=out, lse=lse)
    qc, kc, vc = (x.nan_to_num(0.0).double() for x in (q, k, v))
    ref = masked_attention_ref(qc, kc, vc, lengths=lens)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[pad[:, None, :].expand(B, H, N)] == 0)
    assert torch.all(lse[pad[:, None, :].expand(B, H, N)] == float("-inf"))

    g = torch.randn(q.shape)
    grads = tuple(torch.full(q.shape, float("nan")) for _ in range(3))
    kern.backward(g, q, k, v, out, lse, None, None, lens, D ** -0.5, grads=grads)
    want = fwd_bwd(masked_attention_ref, qc, kc, vc, g.double(), lengths=lens)[1:]
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=name)
        assert torch.all(a[pad[:, None, :].expand(B, H, N)] == 0), name


def test_triton_packed_poisoned_outputs_all_written():
    from dermfast.kernels import masked_attention as kern
    lengths = [1, 7, 0, 40]
    q, k, v = packed_qkv(lengths, 2, 80, torch.float16)
    cu = cu_of(lengths)
    out = torch.full(q.shape, float("nan"), dtype=torch.float16)
    lse = torch.full(q.shape[:-1], float("nan"))
    kern.forward(q, k, v, cu, None, 80 ** -0.5, out=out, lse=lse)
    grads = tuple(torch.full(q.shape, float("nan"), dtype=torch.float16) for _ in range(3))
    kern.backward(torch.randn(q.shape, dtype=torch.float16), q, k, v, out, lse, None, cu, None, 80 ** -0.5,
                  grads=grads)
    for t in (out, lse, *grads):
        assert torch.isfinite(t).all()


def test_triton_dense_matches_sdpa():
    q, k, v = padded_qkv(2, 2, 33, 80, torch.float16)
    g = torch.randn(q.shape, dtype=torch.float16)
    got = fwd_bwd(masked_attention, q, k, v, g, backend="triton")
    ref = fwd_bwd(masked_attention_ref, *(x.double() for x in (q, k, v)), g.double())
    check_against_reference(got, fwd_bwd(naive, q, k, v, g), ref, torch.float16)


def test_segments_do_not_leak():
    """Perturb segment 2's q, k, v and the upstream gradient there: nothing else moves (bit for bit)."""
    lengths = [5, 30, 20, 9]
    cu = cu_of(lengths)
    q, k, v = (x.contiguous() for x in packed_qkv(lengths, 2, 64, torch.float32))
    g = torch.randn(q.shape)
    base = fwd_bwd(masked_attention, q, k, v, g, cu_seqlens=cu, backend="triton")
    seg = slice(int(cu[2]), int(cu[3]))
    q2, k2, v2, g2 = (x.clone() for x in (q, k, v, g))
    for x in (q2, k2, v2, g2):
        x[seg] = torch.randn_like(x[seg]) * 3
    moved = fwd_bwd(masked_attention, q2, k2, v2, g2, cu_seqlens=cu, backend="triton")
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[seg] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, moved):
        assert torch.equal(a[others], b[others]), f"{name} of other segments moved"
        assert not torch.equal(a[seg], b[seg]), f"{name} of the perturbed segment did not move"


def test_lse_gradient_triton():
    lengths = [3, 18]
    q, k, v = packed_qkv(lengths, 1, 32, torch.float32)
    cu = cu_of(lengths)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = torch.ops.dermfast.masked_attention(q, k, v, cu, None, None, None, "triton")
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * g).sum() + (lse * gl).sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, rl = mao._forward_ref(qd, kd, vd, cu_seqlens=cu)
    want = torch.autograd.grad((ro * g.double()).sum() + (rl * gl.double()).sum(), (qd, kd, vd))
    torch.testing.assert_close(lse.double(), rl, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    q, k, v = packed_qkv([3, 4], 2, 64, torch.float32)
    cu = cu_of([3, 4])
    with pytest.raises(ValueError, match="same shape"):
        masked_attention(q, k[:6], v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="one dtype"):
        masked_attention(q, k.half(), v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="start at 0"):
        masked_attention(q, k, v, cu_seqlens=torch.tensor([1, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        masked_attention(q, k, v, cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at T"):
        masked_attention(q, k, v, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D int32"):
        masked_attention(q, k, v, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="max_seqlen"):
        masked_attention(q, k, v, cu_seqlens=cu, max_seqlen=3)
    with pytest.raises(ValueError, match="packed"):
        masked_attention(q[None], k[None], v[None], cu_seqlens=cu)
    with pytest.raises(ValueError, match="not both"):
        masked_attention(q, k, v, cu_seqlens=cu, lengths=torch.tensor([1, 2]))
    qp, kp, vp = padded_qkv(2, 2, 8, 64, torch.float32)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, N = 8\]"):
        masked_attention(qp, kp, vp, lengths=torch.tensor([8, 9]))
    with pytest.raises(ValueError, match=r"lengths\[1\]=-1"):
        masked_attention(qp, kp, vp, lengths=torch.tensor([8, -1]))
    with pytest.raises(ValueError, match="B = 2 entries"):
        masked_attention(qp, kp, vp, lengths=torch.tensor([8]))
    with pytest.raises(ValueError, match=r"\[B, H, N, Dh\]"):
        masked_attention(qp[0], kp[0], vp[0])
    q40, k40, v40 = packed_qkv([3, 4], 2, 40, torch.float32)
    with pytest.raises(BackendUnavailable, match="head dim 40"):
        masked_attention(q40, k40, v40, cu_seqlens=cu, backend="triton")
    with pytest.raises(BackendUnavailable, match="float64"):
        masked_attention(q.double(), k.double(), v.double(), cu_seqlens=cu, backend="triton")


def test_index_lists_are_accepted():
    q, k, v = packed_qkv([3, 4], 1, 16, torch.float32)
    torch.testing.assert_close(masked_attention(q, k, v, cu_seqlens=[0, 3, 7]),
                               masked_attention(q, k, v, cu_seqlens=cu_of([3, 4])))
    qp, kp, vp = padded_qkv(2, 1, 5, 16, torch.float32)
    torch.testing.assert_close(masked_attention(qp, kp, vp, lengths=[5, 2]),
                               masked_attention(qp, kp, vp, lengths=torch.tensor([5, 2])))


def test_value_check_remembered_and_redone_after_mutation():
    q, k, v = packed_qkv([3, 4], 1, 16, torch.float32)
    cu = cu_of([3, 4])
    masked_attention(q, k, v, cu_seqlens=cu)
    assert getattr(cu, mao._CHECKED_ATTR)[0] == cu._version
    cu[1] = 9  # in-place change bumps the version: checked again
    with pytest.raises(ValueError, match="non-decreasing"):
        masked_attention(q, k, v, cu_seqlens=cu)



def test_host_index_validates_without_reading_the_index_tensor(monkeypatch):
    q, k, v = packed_qkv([3, 4], 1, 16, torch.float32)
    qp, kp, vp = padded_qkv(2, 1, 5, 16, torch.float32)
    want = masked_attention(q, k, v, cu_seqlens=cu_of([3, 4]))
    want_p = masked_attention(qp, kp, vp, lengths=torch.tensor([5, 2]))

    def no_read(self, *a, **kw):
        raise AssertionError("the index tensor was read back to the host")
    monkeypatch.setattr(torch.Tensor, "tolist", no_read)
    monkeypatch.setattr(torch.Tensor, "item", no_read)
    torch.testing.assert_close(masked_attention(q, k, v, cu_seqlens=cu_of([3, 4]), host_index=(0, 3, 7)), want,
                               atol=0, rtol=0)
    torch.testing.assert_close(masked_attention(qp, kp, vp, lengths=torch.tensor([5, 2]), host_index=[5, 2]),
                               want_p, atol=0, rtol=0)
    # the host values are validated like the tensor's would be
    with pytest.raises(ValueError, match="non-decreasing"):
        masked_attention(q, k, v, cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32), host_index=[0, 5, 3, 7])
    with pytest.raises(ValueError, match="max_seqlen"):
        masked_attention(q, k, v, cu_seqlens=cu_of([3, 4]), max_seqlen=3, host_index=[0, 3, 7])
    with pytest.raises(ValueError, match=r"lengths\[1\]=6"):
        masked_attention(qp, kp, vp, lengths=torch.tensor([5, 6]), host_index=[5, 6])
    with pytest.raises(ValueError, match="host_index has 2 values but cu_seqlens has 3"):
        masked_attention(q, k, v, cu_seqlens=cu_of([3, 4]), host_index=[0, 7])
    with pytest.raises(ValueError, match="list or tuple of ints"):
        masked_attention(q, k, v, cu_seqlens=cu_of([3, 4]), host_index=torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match="neither was passed"):
        masked_attention(qp, kp, vp, host_index=[5, 2])
    monkeypatch.undo()
    # host values that disagree with the device tensor: an error (asynchronous on CUDA), never a silent result
    with pytest.raises(RuntimeError, match="differs from the host_index"):
        masked_attention(q, k, v, cu_seqlens=cu_of([3, 4]), host_index=[0, 4, 7])


def test_automatic_dispatch_falls_back_with_reasons():
    op = mao.masked_attention_fwd_op
    assert op.select(Query(torch.device("cpu"), torch.float16, {"D": 80})).backend == "torch"  # no CPU triton
    odd = Query(torch.device("cuda"), torch.float16, {"D": 40})
    assert "head dim 40" in op.reasons(odd)["triton"]
    assert op.select(odd).backend == "torch"
    assert "float64" in op.reasons(Query(torch.device("cuda"), torch.float64, {"D": 64}))["triton"]
    from dermfast.info import report
    text = report()
    assert "masked_attention " in text and "masked_attention_bwd" in text


# ----------------------------------------------------------------------------------- custom op / compile


def test_opcheck_torch_backend():
    fast = ("test_schema", "test_autograd_registration", "test_faketensor")  # aot_dispatch: once, it is slow
    for args, utils in (
        ((*packed_qkv([2, 0, 5], 2, 16, torch.float32), cu_of([2, 0, 5]), None, None, None, "torch"), None),
        ((*padded_qkv(2, 2, 6, 16, torch.float32), None, None, torch.tensor([6, 3]), 0.3, "torch"), fast),
    ):
        q, k, v, *rest = args
        q, k, v = (x.detach().contiguous().requires_grad_() for x in (q, k, v))
        kw = {} if utils is None else {"test_utils": utils}
        torch.library.opcheck(torch.ops.dermfast.masked_attention.default, (q, k, v, *rest), **kw)


def test_opcheck_triton_backend():
    q, k, v = (x.detach().contiguous().requires_grad_() for x in packed_qkv([3, 13], 1, 16, torch.float32))
    torch.library.opcheck(torch.ops.dermfast.masked_attention.default,
                          (q, k, v, cu_of([3, 13]), None, None, None, "triton"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    lengths = [4, 9]
    cu = cu_of(lengths)
    q, k, v = (x.detach().requires_grad_() for x in packed_qkv(lengths, 2, 16, torch.float32))

    def f(q, k, v, cu):
        return masked_attention(q * 2, k, v, cu_seqlens=cu, max_seqlen=9).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, cu)
    gq = torch.autograd.grad(got, q)[0]
    want = f(q, k, v, cu)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gq, torch.autograd.grad(want, q)[0])


_COMPILE_SM90 = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile
from dermfast.kernels import masked_attention as kern
ptrs = {n: "*bf16" for n in "Q K V O DO DQ DK DV".split()}
ptrs.update(LSE="*fp32", DELTA="*fp32", DLSE="*fp32", CU="*i32", SEG="*i32", LENS="*i32")
def build(fn, consts, **opts):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if "scale" in n else "i32")
           for n in fn.arg_names}
    return triton_compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                          target=GPUTarget("cuda", 90, 32), options=opts)
for packed in (True, False):
    base = dict(D0=64, D1=16, PACKED=packed, HAS_LENS=not packed, PREC="ieee")
    fwd = build(kern._fwd_kernel, dict(base, BLOCK_M=128, BLOCK_N=64), num_warps=4, num_stages=3)
    bwd = build(kern._bwd_kernel, dict(base, BLOCK_MAJOR=64, BLOCK_MINOR=32), num_warps=4, num_stages=2)
    assert "cubin" in fwd.asm and "cubin" in bwd.asm
assert "cubin" in build(kern._delta_kernel, dict(D0=64, D1=16, BLOCK=64, HAS_DLSE=True)).asm
print("compiled")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """Lower the kernels to a cubin for sm_90 (no GPU needed): the interpreter never runs Triton's compiler,
    so lowering errors (types across constexpr branches, dot shapes, shared memory) would otherwise only show
    on a GPU. Head dim 80 (64 + 16 split), bf16, both layouts. A subprocess, because this process runs with
    TRITON_INTERPRET=1 (its kernels are interpreted functions)."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,D,ragged", [(65, 80, False), (65, 80, True), (257, 80, False), (257, 32, True)])
def test_gpu_vit_h_shapes(dtype, L, D, ragged):
    """ViT-H encoder (L 65 / 257, hd 80) and MAE decoder (hd 32) shapes, B 8 x H 16, fp16 / bf16."""
    gen = torch.Generator().manual_seed(1)
    B, H = 8, 16
    lengths = ([int(L * (0.4 + 0.6 * torch.rand((), generator=gen))) or 1 for _ in range(B)] if ragged
               else [L] * B)
    q, k, v = packed_qkv(lengths, H, D, dtype, "cuda")
    cu = cu_of(lengths, "cuda")
    g = torch.randn(q.shape, dtype=dtype, device="cuda")
    got = fwd_bwd(masked_attention, q, k, v, g, cu_seqlens=cu, backend="triton")
    ref = fwd_bwd(masked_attention_ref, *(x.double() for x in (q, k, v)), g.double(), cu_seqlens=cu)
    check_against_reference(got, fwd_bwd(naive, q, k, v, g, cu=cu), ref, dtype)
    # the padded form of the same batch gives the same rows
    Lmax = max(lengths)
    seg, pos = mao._pack_index(cu, q.shape[0])
    qp, kp, vp, gp = (mao._to_padded(x, seg, pos, B, Lmax).contiguous() for x in (q, k, v, g))
    lens = torch.tensor(lengths, device="cuda")
    padded = fwd_bwd(masked_attention, qp, kp, vp, gp, lengths=lens, backend="triton")
    for a, b in zip(got, padded):
        torch.testing.assert_close(a, mao._to_packed(b, seg, pos), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
def test_gpu_head_dims(D):
    lengths = [1, 7, 65, 33, 257]
    q, k, v = packed_qkv(lengths, 4, D, torch.float16, "cuda")
    cu = cu_of(lengths, "cuda")
    g = torch.randn(q.shape, device="cuda", dtype=torch.float16)
    got = fwd_bwd(masked_attention, q, k, v, g, cu_seqlens=cu, backend="triton")
    ref = fwd_bwd(masked_attention_ref, *(x.double() for x in (q, k, v)), g.double(), cu_seqlens=cu)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.gpu
def test_gpu_fp32_is_declined_by_triton_and_served_by_another_backend():
    """fp32 attention spills registers in every Triton config (info --resources): the Triton backend declines it
    on a GPU with that reason, and automatic dispatch serves it with another backend, exactly."""
    lengths = [7, 65]
    q, k, v = packed_qkv(lengths, 4, 64, torch.float32, "cuda")
    cu = cu_of(lengths, "cuda")
    with pytest.raises(BackendUnavailable, match="spills registers"):
        masked_attention(q, k, v, cu_seqlens=cu, backend="triton")
    got = masked_attention(q, k, v, cu_seqlens=cu)
    ref = masked_attention_ref(*(x.double() for x in (q, k, v)), cu_seqlens=cu)
    torch.testing.assert_close(got.double(), ref, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------ review regressions


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_triton_strided_last_dim_is_read_correctly(layout):
    """q / k / v whose last dim is not unit-stride (a slice of an interleaved buffer): the kernels address columns
    as base + col, so such a view used to be silently mis-read (error ~3 in the forward)."""
    if layout == "packed":
        lengths = [5, 11]
        buf = torch.randn(sum(lengths), 1, 32, 3)
        kw, kw_ref = {"cu_seqlens": cu_of(lengths)}, {"cu_seqlens": cu_of(lengths)}
    else:
        buf = torch.randn(2, 1, 9, 32, 3)
        kw = kw_ref = {"lengths": torch.tensor([9, 4])}
    q, k, v = buf[..., 0], buf[..., 1], buf[..., 2]
    assert q.stride(-1) == 3
    g = torch.randn(q.shape)
    got = fwd_bwd(masked_attention, q, k, v, g, backend="triton", **kw)
    ref = fwd_bwd(masked_attention_ref, *(x.double() for x in (q, k, v)), g.double(), **kw_ref)
    check_against_reference(got, ref, ref, torch.float32)
    grad_strided = g.new_empty(g.shape + (2,))[..., 0].copy_(g)  # upstream gradient strided too
    got2 = fwd_bwd(masked_attention, q, k, v, grad_strided, backend="triton", **kw)
    check_against_reference(got2, ref, ref, torch.float32)


@pytest.mark.parametrize("fwd_blocks,bwd_blocks", [((64, 16), (64, 16)), ((16, 64), (16, 64))])
def test_triton_unequal_tile_shapes(monkeypatch, fwd_blocks, bwd_blocks):
    """The GPU configs pair BLOCK_M != BLOCK_N and BLOCK_MAJOR != BLOCK_MINOR; the interpreter's one config has them
    equal, which would hide an index mix-up between the two. Run both orders on packed and padded input."""
    from dermfast.kernels import masked_attention as kern
    monkeypatch.setattr(kern, "_INTERP_FWD", dict(zip(("BLOCK_M", "BLOCK_N"), fwd_blocks)))
    monkeypatch.setattr(kern, "_INTERP_BWD", dict(zip(("BLOCK_MAJOR", "BLOCK_MINOR"), bwd_blocks)))
    lengths = [1, 7, 40, 23]
    q, k, v = packed_qkv(lengths, 1, 80, torch.float32)
    g = torch.randn(q.shape)
    cu = cu_of(lengths)
    got = fwd_bwd(masked_attention, q, k, v, g, cu_seqlens=cu, backend="triton")
    ref = fwd_bwd(masked_attention_ref, *(x.double() for x in (q, k, v)), g.double(), cu_seqlens=cu)
    check_against_reference(got, ref, ref, torch.float32)
    qp, kp, vp = padded_qkv(2, 1, 37, 80, torch.float32)
    lens = torch.tensor([37, 19])
    gp = torch.randn(qp.shape)
    got = fwd_bwd(masked_attention, qp, kp, vp, gp, lengths=lens, backend="triton")
    ref = fwd_bwd(masked_attention_ref, *(x.double() for x in (qp, kp, vp)), gp.double(), lengths=lens)
    check_against_reference(got, ref, ref, torch.float32)


@pytest.mark.gpu
def test_gpu_full_vit_h_batch_offsets():
    """The whole ViT-H batch, B 256 x L 257 x H 16 x Dh 80, bf16: padded (ragged lengths) and packed (T = 65,792);
    every element-offset product is formed in int64 in the kernels, this is where an int32 one would wrap or
    fault. Reference: fp32 SDPA on the same values; error at most 2x (+ slack) bf16 SDPA's own."""
    B, H, L, D = 256, 16, 257, 80
    gen = torch.Generator(device="cuda").manual_seed(2)
    q, k, v, g = (torch.randn(B, H, L, D, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(4))
    lens = torch.randint(1, L + 1, (B,), device="cuda", generator=gen)
    lens[0], lens[-1] = L, 1
    key_ok = torch.arange(L, device="cuda")[None, :] < lens[:, None]  # [B, L]
    row_ok = key_ok[:, None, :, None]

    def sdpa(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_ok[:, None, None, :])
        return out * row_ok

    got = fwd_bwd(masked_attention, q, k, v, g, lengths=lens, backend="triton")
    ref = fwd_bwd(sdpa, *(x.float() for x in (q, k, v)), g.float())
    low = fwd_bwd(sdpa, q, k, v, g)
    for name, a, lo, r in zip(("out", "dq", "dk", "dv"), got, low, ref):
        err, base = max_err(a * row_ok, r), max_err(lo * row_ok, r)
        assert err <= 2 * base + 1e-2, f"padded {name}: {err:.3g} vs bf16 SDPA {base:.3g}"
    del got, ref, low
    # packed, every segment L long (dense in packed form), checked against the dense kernel run
    pk = [x.transpose(1, 2).reshape(B * L, H, D) for x in (q, k, v, g)]
    cu = torch.arange(0, B * L + 1, L, device="cuda", dtype=torch.int32)
    got = fwd_bwd(masked_attention, *pk[:3], pk[3], cu_seqlens=cu, backend="triton")
    dense = fwd_bwd(masked_attention, q, k, v, g, backend="triton")
    for name, a, d in zip(("out", "dq", "dk", "dv"), got, dense):
        torch.testing.assert_close(a, d.transpose(1, 2).reshape(B * L, H, D), atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_tensors_on_a_device_that_is_not_current():
    """Triton launches on the current device; q on cuda:1 while cuda:0 is current must still run on cuda:1."""
    lengths = [5, 40]
    q, k, v = packed_qkv(lengths, 2, 80, torch.float16, "cuda:1")
    cu = cu_of(lengths, "cuda:1")
    g = torch.randn(q.shape, dtype=torch.float16, device="cuda:1")
    with torch.cuda.device(0):
        got = fwd_bwd(masked_attention, q, k, v, g, cu_seqlens=cu, backend="triton")
    ref = fwd_bwd(masked_attention_ref, *(x.double() for x in (q, k, v)), g.double(), cu_seqlens=cu)
    check_against_reference(got, fwd_bwd(naive, q, k, v, g, cu=cu), ref, torch.float16)
