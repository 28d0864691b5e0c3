import random

import pytest
import torch

from dermfast.ops import MaskingResult, random_masking, random_masking_indices, random_masking_ref
from dermfast.ops.random_masking_op import hash32, hash32_int, keep_count, masking_noise_ref, step_key

M32 = 0xFFFFFFFF
gpu = pytest.mark.gpu


def lowbias32_py(x: int) -> int:
    """Independent plain-Python uint32 transcription of the hash (the C / Triton kernels mirror it)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def test_hash_matches_plain_uint32_arithmetic():
    xs = torch.randint(0, 2**32, (4096,), dtype=torch.int64)
    xs[:3] = torch.tensor([0, 1, M32])
    got = hash32(xs)
    assert got.tolist() == [lowbias32_py(int(v)) for v in xs]
    assert [hash32_int(int(v)) for v in xs[:64]] == got[:64].tolist()


@pytest.mark.parametrize("B,L", [(1, 1), (3, 7), (2, 65), (2, 257)])
def test_noise_is_the_documented_chain(B, L):
    seed, step, off = 123456789, 42, 5
    noise = masking_noise_ref(B, L, seed, step, sample_offset=off)
    for b in range(B):
        h = lowbias32_py(lowbias32_py(lowbias32_py(seed) ^ step) ^ (b + off))
        assert noise[b].tolist() == [lowbias32_py(h ^ p) for p in range(L)]
    assert step_key(seed, step) == lowbias32_py(lowbias32_py(seed) ^ step)


def _check_contract(res: MaskingResult, x, pos, ratio):
    B, L, D = x.shape
    keep = keep_count(L, ratio)
    assert res.visible.shape == (B, keep, D) and res.visible.dtype == x.dtype
    assert res.mask.shape == (B, L) and res.mask.dtype == x.dtype
    assert res.ids_restore.shape == (B, L) and res.ids_keep.shape == (B, keep)
    assert res.cu_seqlens.dtype == torch.int32 and res.cu_seqlens.tolist() == [b * keep for b in range(B + 1)]
    assert torch.equal(res.mask.sum(1), torch.full((B,), float(L - keep), dtype=x.dtype))
    src = x + pos if pos is not None else x
    for b in range(B):
        assert sorted(res.ids_restore[b].tolist()) == list(range(L))  # a permutation
        assert len(set(res.ids_keep[b].tolist())) == keep
        assert torch.all(res.mask[b, res.ids_keep[b]] == 0)  # 0 keep, 1 remove
        assert torch.equal(res.visible[b], src[b, res.ids_keep[b]])
    shuffled = torch.argsort(res.ids_restore, dim=1)  # ids_restore undoes the shuffle
    assert torch.equal(shuffled[:, :keep], res.ids_keep)


@pytest.mark.parametrize("B,L,D", [(1, 1, 4), (3, 7, 5), (2, 65, 16), (2, 257, 8)])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_masking_contract_torch(B, L, D, ratio, dtype):
    x = torch.randn(B, L, D, dtype=dtype)
    pos = torch.randn(1, L, D, dtype=dtype)
    res = random_masking(x, ratio, seed=7, step=3, pos_embed=pos)
    assert isinstance(res, MaskingResult)
    _check_contract(res, x, pos, ratio)
    ref = random_masking_ref(x, ratio, 7, 3, pos_embed=pos)
    for a, b in zip(res, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B,L,D", [(1, 1, 3), (3, 7, 5), (2, 65, 16), (2, 257, 9)])
@pytest.mark.parametrize("ratio", [0.0, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_is_bit_identical_to_torch(B, L, D, ratio, dtype):
    x = torch.randn(B, L, D, dtype=dtype)
    pos = torch.randn(L, D, dtype=dtype)
    kw = dict(seed=11, step=2**33 + 5, pos_embed=pos, sample_offset=3)
    ref = random_masking(x, ratio, backend="torch", **kw)
    got = random_masking(x, ratio, backend="triton", **kw)
    _check_contract(got, x, pos, ratio)
    for name in MaskingResult._fields:  # visible too: a gather plus one add in x's dtype is exact
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


def test_unwritten_outputs_would_be_caught(monkeypatch):
    # the Triton launcher allocates with torch.empty: fill fresh allocations with NaN / sentinels
    import dermfast.kernels.random_masking as k
    real_empty = torch.empty

    def poisoned(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(k.torch, "empty", poisoned)
    x = torch.randn(3, 37, 6)
    got = random_masking(x, 0.6, seed=1, step=1, backend="triton")
    ref = random_masking(x, 0.6, seed=1, step=1, backend="torch")
    for name in MaskingResult._fields:
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ragged_packing(backend):
    B, L, D = 5, 23, 7
    x = torch.randn(B, L, D)
    pos = torch.randn(1, L, D)
    ratios = torch.tensor([0.0, 0.5, 0.75, 0.9, 0.99])
    res = random_masking(x, ratios, seed=4, step=9, pos_embed=pos, backend=backend)
    ks = [keep_count(L, float(r)) for r in ratios.double()]
    assert res.cu_seqlens.tolist() == [sum(ks[:b]) for b in range(B + 1)]
    assert res.visible.shape == (sum(ks), D) and res.ids_keep.shape == (sum(ks),)
    ref = random_masking_ref(x, ratios, 4, 9, pos_embed=pos)
    for name in MaskingResult._fields:
        assert torch.equal(getattr(res, name), getattr(ref, name)), name
    full = random_masking(x, 0.0, seed=4, step=9, pos_embed=pos, backend="torch")  # same shuffle, all kept
    for b, k in enumerate(ks):
        seg = slice(res.cu_seqlens[b], res.cu_seqlens[b + 1])
        assert torch.equal(res.ids_keep[seg], full.ids_keep[b, :k])  # a prefix of the row's shuffle
        assert torch.equal(res.visible[seg], (x + pos)[b, res.ids_keep[seg]])
        assert int(res.mask[b].sum()) == L - k
    assert torch.equal(res.ids_restore, full.ids_restore)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ragged", [False, True])
def test_gradients_are_the_reference_scatter(backend, ragged):
    B, L, D = 3, 19, 6
    x = torch.randn(B, L, D, requires_grad=True)
    pos = torch.randn(1, L, D, requires_grad=True)
    ratio = torch.tensor([0.5, 0.25, 0.75]) if ragged else 0.6
    res = random_masking(x, ratio, seed=2, step=5, pos_embed=pos, backend=backend)
    g = torch.randn_like(res.visible)
    gx, gp = torch.autograd.grad(res.visible, (x, pos), g)
    x64, pos64 = x.detach().double().requires_grad_(), pos.detach().double().requires_grad_()
    ref = random_masking_ref(x64, ratio, 2, 5, pos_embed=pos64)
    rx, rp = torch.autograd.grad(ref.visible, (x64, pos64), g.double())
    assert torch.equal(gx, rx.float())  # each kept patch receives exactly one gradient row
    torch.testing.assert_close(gp, rp.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(gx.ne(0).any(-1), res.mask.eq(0))  # zero gradient on removed patches
    # only x (no pos) and only pos
    gx_only, = torch.autograd.grad(random_masking(x, ratio, 2, 5, backend=backend).visible, x, g)
    assert torch.equal(gx_only, rx.float())
    xd = x.detach()
    gp_only, = torch.autograd.grad(random_masking(xd, ratio, 2, 5, pos_embed=pos, backend=backend).visible, pos, g)
    torch.testing.assert_close(gp_only, rp.float(), atol=1e-5, rtol=1e-5)


def test_property_random_shapes_match_across_backends():
    rng = random.Random(1234)
    cases = [(rng.randint(1, 9), rng.randint(1, 300), rng.randint(1, 1300)) for _ in range(3)]
    cases += [(9, 1, 1), (2, 256, 1)]
    for B, L, D in cases:
        ratio = rng.choice([0.0, 0.5, 0.75, 0.95])
        x = torch.randn(B, L, D)
        pos = torch.randn(L, D)
        kw = dict(seed=rng.randrange(2**40), step=rng.randrange(2**20), pos_embed=pos,
                  sample_offset=rng.randrange(2**33))
        ref = random_masking(x, ratio, backend="torch", **kw)
        got = random_masking(x, ratio, backend="triton", **kw)
        for name in MaskingResult._fields:
            assert torch.equal(getattr(got, name), getattr(ref, name)), (B, L, D, ratio, name)


def test_masking_is_a_function_of_the_key():
    x = torch.randn(4, 49, 8)
    a = random_masking_ref(x, 0.75, seed=1, step=10)
    b = random_masking_ref(x.clone(), 0.75, seed=1, step=10)
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)
    other_step = random_masking_ref(x, 0.75, seed=1, step=11).mask
    other_seed = random_masking_ref(x, 0.75, seed=2, step=10).mask
    assert not torch.equal(a.mask, other_step) and not torch.equal(a.mask, other_seed)
    # every sample differs from the others, and a shard offset gives the later rows' masks
    assert len({tuple(r.tolist()) for r in a.mask}) == 4
    shard = random_masking_ref(x[2:], 0.75, seed=1, step=10, sample_offset=2).mask
    assert torch.equal(shard, a.mask[2:])


def test_keep_fraction_is_uniform_over_patches():
    x = torch.randn(512, 16, 1)
    mask = random_masking_ref(x, 0.75, seed=3, step=0).mask
    removed = mask.mean(0)  # per-patch removal frequency, about 0.75 each
    assert torch.all((removed - 0.75).abs() < 0.08), removed


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_indices_only(backend):
    res = random_masking_indices(3, 50, 0.75, seed=5, step=6, sample_offset=1, backend=backend)
    ref = random_masking_ref(torch.randn(3, 50, 2), 0.75, 5, 6, sample_offset=1)
    assert res.visible.shape == (3, 12, 0) and res.mask.dtype == torch.float32
    for name in ("mask", "ids_restore", "ids_keep", "cu_seqlens"):
        assert torch.equal(getattr(res, name), getattr(ref, name).to(getattr(res, name).dtype)), name


def test_dense_path_makes_no_host_tensor(monkeypatch):
    # the old reference built torch.tensor(seed, device=...) per call (a blocking copy on CUDA)
    x = torch.randn(2, 9, 4)
    expected = random_masking(x, 0.5, seed=3, step=4)

    def no_tensor(*a, **k):
        raise AssertionError("torch.tensor called in the masking hot path")

    monkeypatch.setattr(torch, "tensor", no_tensor)
    got = random_masking(x, 0.5, seed=3, step=4)
    assert torch.equal(got.ids_keep, expected.ids_keep)


def test_bad_input_is_a_clear_error():
    x = torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, L, D\]"):
        random_masking(torch.randn(4, 4), 0.5, 0, 0)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(torch.randn(1, 4, 4), 1.0, 0, 0)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(x, -0.1, 0, 0)
    with pytest.raises(ValueError, match=r"every mask_ratio must be in \[0, 1\)"):
        random_masking(x, torch.tensor([0.5, 1.0]), 0, 0, backend="triton")
    with pytest.raises(ValueError, match=r"a mask_ratio tensor must be \[B\] = \[2\]"):
        random_masking(x, torch.tensor([0.5, 0.5, 0.5]), 0, 0)
    with pytest.raises(ValueError, match="floating point"):
        random_masking(x, torch.tensor([1, 0]), 0, 0)
    with pytest.raises(ValueError, match=r"pos_embed must be \[1, L, D\] or \[L, D\]"):
        random_masking(x, 0.5, 0, 0, pos_embed=torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="x must be contiguous"):
        random_masking(torch.randn(2, 4, 4).transpose(1, 2), 0.5, 0, 0)
    with pytest.raises(ValueError, match="pos_embed must be contiguous"):
        random_masking(x, 0.5, 0, 0, pos_embed=torch.randn(4, 4).t())
    with pytest.raises(ValueError, match="x must be float16, bfloat16, float32 or float64"):
        random_masking(torch.ones(2, 4, 4, dtype=torch.int64), 0.5, 0, 0)
    with pytest.raises(ValueError, match="step must be an int"):
        random_masking(x, 0.5, 0, 1.5)
    with pytest.raises(ValueError, match="seed must fit in int64"):
        random_masking(x, 0.5, 2**64, 0)
    with pytest.raises(ValueError, match="sample_offset must be >= 0"):
        random_masking(x, 0.5, 0, 0, sample_offset=-1)


def test_opcheck_forward_and_backward():
    x = torch.randn(3, 11, 5, requires_grad=True)
    pos = torch.randn(11, 5, requires_grad=True)
    for backend in ("torch", "triton"):
        torch.library.opcheck(torch.ops.dermfast.random_masking.default,
                              (x, pos, 0.5, None, 1, 2, 3, torch.float32, backend))
        torch.library.opcheck(torch.ops.dermfast.random_masking.default,
                              (x, None, 0.0, torch.tensor([0.5, 0.2, 0.9]), 1, 2, 0, torch.float32, backend),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        res = random_masking(x.detach(), 0.5, 1, 2)
        g = torch.randn_like(res.visible).reshape(-1, 5)
        torch.library.opcheck(torch.ops.dermfast.random_masking_backward.default,
                              (g, res.ids_restore, res.cu_seqlens, True, True, backend))


def test_compiles_fullgraph_without_recompiling_per_step():
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    x = torch.randn(2, 16, 8, requires_grad=True)
    pos = torch.randn(1, 16, 8)

    def f(x, step):
        r = random_masking(x, 0.75, seed=3, step=step, pos_embed=pos)
        return r.visible.sum() + r.mask.sum()

    cf = torch.compile(f, backend=counter, fullgraph=True)
    for step in range(4):
        out = cf(x, step)
        out.backward()
        assert torch.equal(out, f(x, step))
    assert counter.frame_count <= 2  # the first step static, then step is a SymInt: no recompile per step


def test_ragged_compiles_with_a_data_dependent_size():
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.randn(3, 16, 8, requires_grad=True)
    ratios = torch.tensor([0.5, 0.75, 0.25])

    def f(x, step):
        r = random_masking(x, ratios, seed=3, step=step)
        return r.visible.sum(0), r.cu_seqlens

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)  # T is an unbacked size in the fake impl
    for step in range(2):
        (got, cu), (want, cu_ref) = cf(x, step), f(x, step)
        got.sum().backward()
        assert torch.equal(got, want) and torch.equal(cu, cu_ref) and cu.tolist() == [0, 8, 12, 24]


_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dermfast.kernels import random_masking as k
ptr = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
for dt in ("bf16",):
    sig = {"x_ptr": ptr[dt], "pos_ptr": ptr[dt], "vis_ptr": ptr[dt], "mask_ptr": "*fp32", "restore_ptr": "*i64",
           "keep_ptr": "*i64", "cu_ptr": "*i32", "h_step": "u32", "sample_offset": "i64", "L": "i32", "D": "i32",
           "HAS_POS": "constexpr", "BLOCK_L": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"}
    for bl in (256,):  # 4096 compiles too (checked by hand), at several times the cost
        triton.compile(ASTSource(k._masking_fwd_kernel, sig, constexprs={"HAS_POS": True, "BLOCK_L": bl,
                                 "BLOCK_K": 32, "BLOCK_D": 128}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    bsig = {"g_ptr": ptr[dt], "restore_ptr": "*i64", "cu_ptr": "*i32", "gx_ptr": ptr[dt], "gpos_ptr": ptr[dt],
            "B": "i32", "L": "i32", "D": "i32", "NEED_X": "constexpr", "NEED_POS": "constexpr",
            "BLOCK_L": "constexpr", "BLOCK_D": "constexpr"}
    triton.compile(ASTSource(k._masking_bwd_kernel, bsig, constexprs={"NEED_X": True, "NEED_POS": True,
                             "BLOCK_L": 16, "BLOCK_D": 128}), target=GPUTarget("cuda", 90, 32))
print("COMPILED")
"""


def test_triton_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    # the interpreter never runs the compiler: build the real kernels (to cubin, with Triton's bundled ptxas)
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit
    r = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip(f"no ptxas: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and "COMPILED" in r.stdout, r.stderr[-3000:]


# GPU: bf16, ViT-H shapes, the CUDA extension -------------------------------------------------------------


def _cuda_backends():
    from dermfast import _optional
    out = ["triton"]
    if _optional.HAS_CUDA_EXT and hasattr(_optional.cuda_ext, "random_masking_fwd"):
        out.append("cuda")
    return out


@gpu
@pytest.mark.parametrize("B,L,D", [(256, 256, 1280), (7, 4096, 80), (9, 1, 3), (3, 300, 1300), (4, 197, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_backends_are_bit_identical(B, L, D, dtype):
    x = torch.randn(B, L, D, device="cuda", dtype=dtype)
    pos = torch.randn(1, L, D, device="cuda", dtype=dtype)
    kw = dict(seed=99, step=123456, pos_embed=pos, sample_offset=4096)
    ref = random_masking(x, 0.75, backend="torch", **kw)
    cpu = random_masking(x.cpu(), 0.75, backend="torch", **{**kw, "pos_embed": pos.cpu()})
    for backend in _cuda_backends():
        got = random_masking(x, 0.75, backend=backend, **kw)
        for name in MaskingResult._fields:
            assert torch.equal(getattr(got, name), getattr(ref, name)), (backend, name)
            assert torch.equal(getattr(got, name).cpu(), getattr(cpu, name)), (backend, name, "cpu")
    ratios = torch.rand(B) * 0.99
    rag = random_masking(x, ratios, backend="torch", **kw)
    for backend in _cuda_backends():
        got = random_masking(x, ratios, backend=backend, **kw)
        for name in MaskingResult._fields:
            assert torch.equal(getattr(got, name), getattr(rag, name)), (backend, name, "ragged")


@gpu
def test_gpu_backward_is_deterministic_and_matches():
    x = torch.randn(64, 256, 1280, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(1, 256, 1280, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for backend in ["torch"] + _cuda_backends():
        res = random_masking(x, 0.75, 1, 2, pos_embed=pos, backend=backend)
        g = torch.ones_like(res.visible) * 0.5 + res.visible.detach()
        grads.append(torch.autograd.grad(res.visible, (x, pos), g))
    for gx, gp in grads[1:]:
        assert torch.equal(gx, grads[0][0])
        torch.testing.assert_close(gp.float(), grads[0][1].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_tokens_on_a_non_current_device(backend):
    """Triton launches on the current device: x on cuda:1 with cuda:0 current must still be right (fwd + bwd)."""
    if backend not in _cuda_backends():
        pytest.skip(f"{backend} is not available")
    x = torch.randn(4, 50, 24, device="cuda:1", requires_grad=True)
    pos = torch.randn(50, 24, device="cuda:1", requires_grad=True)
    want = random_masking_ref(x.detach().double(), 0.75, 3, 9, pos.detach().double())
    with torch.cuda.device(0):
        got = random_masking(x, 0.75, 3, 9, pos, backend=backend)
        got.visible.sum().backward()
    assert torch.equal(got.ids_keep, want.ids_keep) and torch.equal(got.ids_restore, want.ids_restore)
    assert torch.allclose(got.visible.double(), want.visible, atol=1e-5)
    assert torch.equal(x.grad, (1 - want.mask).to(x.dtype)[:, :, None].expand_as(x))
    assert torch.allclose(pos.grad, (1 - want.mask).sum(0).float()[:, None].expand_as(pos))
