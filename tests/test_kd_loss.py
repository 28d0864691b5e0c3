"""kd_loss: every backend against the float64 reference (loss and student gradient), NaN/inf semantics, bad
input, the custom op (opcheck, torch.compile), and GPU checks (bf16, big C, the CUDA kernel) that skip here.

Triton runs under the interpreter on CPU (tests/conftest.py); its shapes stay small.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dermfast import _optional
from dermfast.ops import KDLoss, kd_loss, kd_loss_ref
from dermfast.ops.kd_loss_op import kd_loss_op
from dermfast.ops.registry import Query
from tests.conftest import TOLERANCES

needs_triton = pytest.mark.skipif(not _optional.HAS_TRITON, reason="triton is not importable")
CPU_BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
SHAPES = [(3, 1), (4, 2), (5, 7), (6, 8), (3, 1000), (2, 1337)]
CASES = ["kd_only", "target", "target_weight"]
# NaN rows are the documented result for some inputs; the interpreter's numpy warns while computing them.
nan_math = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def make_inputs(N, C, case, dtype=torch.float32, device="cpu", scale=3.0):
    """Fresh random logits (spread so the softmaxes are far from uniform), targets, weights."""
    s = (torch.randn(N, C, dtype=torch.float64) * scale).to(dtype).to(device)
    t = (torch.randn(N, C, dtype=torch.float64) * scale).to(dtype).to(device)
    y = torch.randint(0, C, (N,), device=device) if case != "kd_only" else None
    w = (torch.rand(C, dtype=torch.float64) + 0.1).to(device) if case == "target_weight" else None
    T = float(torch.empty(()).uniform_(0.5, 8.0))
    alpha = float(torch.empty(()).uniform_(0.1, 0.9))
    return s, t, y, w, T, alpha


def reference(s, t, y, w, T, alpha, reduction, grad_out=None):
    """float64 loss and d loss / d s (or d <loss, grad_out> / d s for reduction="none")."""
    s64 = s.detach().double().requires_grad_()
    out = kd_loss_ref(s64, t.double(), y, T, alpha, w.double() if w is not None else None, reduction)
    (out * (grad_out.double() if grad_out is not None else 1.0)).sum().backward()
    return out.detach(), s64.grad


def run(backend, s, t, y, w, T, alpha, reduction, grad_out=None):
    sg = s.detach().clone().requires_grad_()
    wt = w.to(torch.float32) if (w is not None and s.dtype != torch.float64) else w
    out = kd_loss(sg, t, y, T, alpha, wt, reduction, backend)
    (out * (grad_out if grad_out is not None else 1.0)).sum().backward()
    return out.detach(), sg.grad


def assert_close(got, want, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    got = got.double()
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    assert torch.isfinite(got).all(), f"{what}: non-finite values {got}"
    assert (err <= bound).all(), f"{what}: max err {err.max().item():.3g}, bound {bound.min().item():.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("N,C", SHAPES)
def test_matches_float64_reference(backend, dtype, reduction, case, N, C):
    s, t, y, w, T, alpha = make_inputs(N, C, case, dtype)
    grad_out = torch.rand(N) + 0.5 if reduction == "none" else None
    want, want_g = reference(s, t, y, w, T, alpha, reduction, grad_out)
    got, got_g = run(backend, s, t, y, w, T, alpha, reduction, grad_out)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert got_g.dtype == dtype and got_g.shape == (N, C)
    # fp32 math on the (rounded) inputs: the loss is fp32-accurate even for fp16 logits; the gradient is
    # returned in the logits' dtype, so it carries that dtype's rounding.
    assert_close(got, want, torch.float32, f"loss ({backend}, {dtype})")
    assert_close(got_g, want_g, dtype, f"grad ({backend}, {dtype})")


@pytest.mark.parametrize("backend,t_dtype", [("torch", torch.bfloat16), ("torch", torch.float64),
                                             pytest.param("triton", torch.float16, marks=needs_triton),
                                             pytest.param("triton", torch.float64, marks=needs_triton)])
def test_teacher_in_another_dtype(backend, t_dtype):
    """A bf16 / fp16 teacher (autocast) or a float64 one with an fp32 student."""
    s, t, y, w, T, alpha = make_inputs(4, 9, "target_weight", torch.float32)
    t = t.to(t_dtype)
    want, want_g = reference(s, t, y, w, T, alpha, "mean")
    got, got_g = run(backend, s, t, y, w, T, alpha, "mean")
    assert_close(got, want, torch.float32, "loss")
    assert_close(got_g, want_g, torch.float32, "grad")


def test_torch_backend_bf16_student_gets_a_bf16_gradient():
    s, t, y, w, T, alpha = make_inputs(5, 13, "target_weight", torch.bfloat16)
    grad_out = torch.rand(5) + 0.5
    want, want_g = reference(s, t, y, w, T, alpha, "none", grad_out)
    got, got_g = run("torch", s, t, y, w, T, alpha, "none", grad_out)
    assert got.dtype == torch.float32 and got_g.dtype == torch.bfloat16
    assert_close(got, want, torch.float32, "loss")
    assert_close(got_g, want_g, torch.bfloat16, "grad")


def test_torch_backend_float64_is_exact():
    s, t, y, w, T, alpha = make_inputs(4, 9, "target_weight", torch.float64)
    want, want_g = reference(s, t, y, w, T, alpha, "mean")
    got, got_g = run("torch", s, t, y, w, T, alpha, "mean")
    assert_close(got, want, torch.float64, "loss")
    assert_close(got_g, want_g, torch.float64, "grad")


def test_reference_matches_the_textbook_formula():
    """kd_loss_ref against F.kl_div(log_softmax, softmax) * T^2 + weighted F.cross_entropy, and a loop."""
    s, t, y, w, T, alpha = make_inputs(5, 6, "target_weight", torch.float64)
    kd = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
    ce = F.cross_entropy(s, y, weight=w)
    assert torch.allclose(kd_loss_ref(s, t, y, T, alpha, w), alpha * kd + (1 - alpha) * ce, atol=1e-12)
    assert torch.allclose(kd_loss_ref(s, t, None, T), kd, atol=1e-12)  # no target: the KD term alone
    rows = []
    for i in range(5):
        p = [math.exp(v / T) for v in t[i].tolist()]
        q = [math.exp(v / T) for v in s[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        kl = sum(a * math.log(a / b) for a, b in zip(p, q))
        ce_i = -math.log(math.exp(s[i, y[i]].item()) / sum(math.exp(v) for v in s[i].tolist()))
        rows.append(alpha * T * T * kl + (1 - alpha) * w[y[i]].item() * ce_i)
    assert torch.allclose(kd_loss_ref(s, t, y, T, alpha, w, "none"), torch.tensor(rows, dtype=torch.float64))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("N,C", [(3, 7), (2, 100), (2, 1337)])
def test_triton_two_pass_path(monkeypatch, dtype, reduction, N, C):
    """Force the chunked online-softmax path (used for C > 4096) on small C by shrinking its thresholds."""
    from dermfast.kernels import kd_loss as kern
    monkeypatch.setattr(kern, "ONE_PASS_MAX_BLOCK", 4)
    monkeypatch.setattr(kern, "CHUNK", 64)
    s, t, y, w, T, alpha = make_inputs(N, C, "target_weight", dtype)
    want, want_g = reference(s, t, y, w, T, alpha, reduction)
    got, got_g = run("triton", s, t, y, w, T, alpha, reduction)
    assert_close(got, want, torch.float32, "loss")
    assert_close(got_g, want_g, dtype, "grad")


@needs_triton
@pytest.mark.parametrize("block_c,rows", [(None, None), (16, 2), (16, 1)])
def test_triton_writes_exactly_its_outputs(block_c, rows):
    """Poisoned, padded output buffers: every in-range element written, the padding untouched."""
    from dermfast.kernels import kd_loss as kern
    N, C = 5, 37
    s, t, y, w, T, alpha = make_inputs(N, C, "target", torch.float32)
    loss = torch.full((N + 3,), -7.0)
    gbuf = torch.full((N + 2, C + 5), -7.0)
    rows_out, g = kern.launch(s, t, y, None, None, inv_t=1 / T, kd_loss_scale=1.0, kd_grad_scale=1.0,
                              ce_scale=0.5, write_grad=True, block_c=block_c, rows=rows, loss=loss[:N],
                              grad=gbuf[:N, :C])
    assert (gbuf[:N, C:] == -7).all() and (gbuf[N:] == -7).all() and (loss[N:] == -7).all()
    assert torch.isfinite(gbuf[:N, :C]).all() and (gbuf[:N, :C] != -7).all() and (loss[:N] != -7).all()
    # the closed form with these scales: g = (q - p) + 0.5 * (softmax(s) - onehot(y))
    q, p = F.softmax(s.double() / T, 1), F.softmax(t.double() / T, 1)
    want = (q - p) + 0.5 * (F.softmax(s.double(), 1) - F.one_hot(y, C))
    assert torch.allclose(gbuf[:N, :C].double(), want, atol=1e-6)


@nan_math
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_give_nan_rows(backend, where, bad):
    N, C = 4, 7
    s, t, y, w, T, alpha = make_inputs(N, C, "target_weight", torch.float32)
    (s if where == "student" else t)[1, 3] = bad
    got, got_g = run(backend, s, t, y, w, T, alpha, "none")
    assert torch.isnan(got[1]) and torch.isnan(got_g[1]).all()
    good = torch.tensor([0, 2, 3])
    want, want_g = reference(s[good], t[good], y[good], w, T, alpha, "none")
    assert_close(got[good], want, torch.float32, "finite rows")
    assert_close(got_g[good], want_g, torch.float32, "finite rows' grad")
    for reduction in ("mean", "sum"):
        assert torch.isnan(run(backend, s, t, y, w, T, alpha, reduction)[0])
    assert torch.isnan(kd_loss_ref(s, t, y, T, alpha, w)) and torch.isnan(kd_loss_ref(s, t, None, T))


@nan_math
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unchecked_out_of_range_target_is_nan_not_a_crash(backend):
    s, t, y, w, T, alpha = make_inputs(4, 7, "target_weight", torch.float32)
    y[2] = 7
    y[0] = -1
    sg = s.clone().requires_grad_()
    rows = kd_loss(sg, t, y, T, alpha, w.float(), "none", backend, validate_target=False)
    assert torch.isnan(rows[0]) and torch.isnan(rows[2]) and torch.isfinite(rows[[1, 3]]).all()
    rows.sum().backward()
    assert torch.isnan(sg.grad[[0, 2]]).all() and torch.isfinite(sg.grad[[1, 3]]).all()
    assert torch.isnan(kd_loss(s, t, y, T, alpha, w.float(), "mean", backend, validate_target=False))


@pytest.mark.parametrize("kwargs,match", [
    (dict(t_shape=(4, 6)), "must match"),
    (dict(s_shape=(4,)), r"\[N, C\]"),
    (dict(s_shape=(0, 7)), "N >= 1"),
    (dict(target=torch.tensor([0, 1, 7, 2])), r"in \[0, 7\)"),
    (dict(target=torch.tensor([0, -1, 3, 2])), r"in \[0, 7\)"),
    (dict(target=torch.tensor([0, 1, 2])), r"target must be \[N\]"),
    (dict(target=torch.tensor([0.0, 1, 2, 3])), "int64 or int32"),
    (dict(target=torch.tensor([0, 1, 2, 3]), class_weight=torch.ones(6)), r"class_weight must be \[C\]"),
    (dict(class_weight=torch.ones(7)), "needs a target"),
    (dict(target=torch.tensor([0, 1, 2, 3]), class_weight=torch.ones(7, dtype=torch.int64)), "floating"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(alpha=1.5), "alpha"),
    (dict(reduction="batchmean"), "reduction"),
    (dict(s_dtype=torch.int64), "floating point"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    s = torch.randn(kwargs.pop("s_shape", (4, 7))).to(kwargs.pop("s_dtype", torch.float32))
    t = torch.randn(kwargs.pop("t_shape", tuple(s.shape)))
    with pytest.raises(ValueError, match=match):
        kd_loss(s, t, **kwargs)


def test_explicit_backend_that_cannot_serve_lists_reasons():
    from dermfast.ops import BackendUnavailable
    with pytest.raises(BackendUnavailable, match="cuda"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")
    with pytest.raises(BackendUnavailable, match="float64"):
        kd_loss(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), backend="triton")


def test_automatic_choice_on_cpu_is_torch():
    assert kd_loss_op.select(Query(torch.device("cpu"), torch.float32, {"C": 7})).backend == "torch"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_gradient_reaches_the_teacher_and_no_grad_mode_works(backend):
    s, t, y, w, T, alpha = make_inputs(3, 5, "target", torch.float32)
    t.requires_grad_()
    sg = s.clone().requires_grad_()
    kd_loss(sg, t, y, T, alpha, backend=backend).backward()
    assert t.grad is None and sg.grad is not None
    with torch.no_grad():
        val = kd_loss(sg, t, y, T, alpha, backend=backend)
    assert val.requires_grad is False
    assert torch.allclose(val.double(), kd_loss_ref(s.double(), t.double(), y, T, alpha), atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs_int32_target_and_module(backend):
    N, C = 4, 9
    big_s = torch.randn(N, C + 3)
    s = big_s[:, :C]  # row stride C + 3
    t = torch.randn(C, N).t()  # column stride N: copied to unit stride inside
    y = torch.randint(0, C, (N,), dtype=torch.int32)
    w = torch.rand(C) + 0.1
    want = kd_loss_ref(s.double(), t.double(), y.long(), 3.0, 0.6, w.double())
    got = kd_loss(s, t, y, 3.0, 0.6, w, backend=backend)
    assert torch.allclose(got.double(), want, atol=1e-5)
    module = KDLoss(temperature=3.0, alpha=0.6, class_weight=w, backend=backend)
    assert torch.allclose(module(s, t, y), got) and torch.allclose(module(s, t).double(), kd_loss_ref(s, t, None, 3.0).double())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_few_distillation_steps_match_the_reference(backend):
    """A linear student distilled for a few SGD steps: the same losses with the fused op and the reference."""
    X, y = torch.randn(16, 6), torch.randint(0, 7, (16,))
    teacher, w = torch.nn.Linear(6, 7), torch.rand(7) + 0.5

    def train(loss_fn):
        torch.manual_seed(1)
        student = torch.nn.Linear(6, 7)
        opt = torch.optim.SGD(student.parameters(), lr=0.5)
        losses = []
        for _ in range(6):
            with torch.no_grad():
                t = teacher(X)
            loss = loss_fn(student(X), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    want = train(lambda s, t: kd_loss_ref(s, t, y, 4.0, 0.9, w))
    got = train(lambda s, t: kd_loss(s, t, y, 4.0, 0.9, w, backend=backend))
    assert got == pytest.approx(want, rel=1e-5) and want[-1] < want[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    s, t, y, w, T, alpha = make_inputs(3, 5, "target_weight", torch.float32)
    op = torch.ops.dermfast.kd_loss.default
    for args in [(s.requires_grad_(), t, y, w.float(), T, alpha, "mean", True, backend),
                 (s, t, None, None, T, alpha, "none", True, backend),
                 (s.detach(), t, y, None, T, alpha, "sum", False, backend)]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    """Dynamo traces through the custom op (fake impl) and AOT autograd uses the registered backward."""
    s, t, y, w, T, alpha = make_inputs(6, 11, "target_weight", torch.float32)
    w = w.float()

    def step(s, t, y):
        return kd_loss(s, t, y, T, alpha, w) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    eager, comp = step(s1, t, y), compiled(s2, t, y)
    eager.backward()
    comp.backward()
    assert torch.allclose(eager, comp) and torch.allclose(s1.grad, s2.grad)


# ---------------------------------------------------------------------------------------------------------
# GPU (skip here): bf16, the paper-scale shapes, the CUDA kernel.
# ---------------------------------------------------------------------------------------------------------


GPU_GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def gpu_backends():
    out = ["triton"]
    if _optional.HAS_CUDA_EXT:
        out.append("cuda")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("N,C", SHAPES + [(64, 4097), (8, 32000), (300, 7)])
def test_gpu_matches_float64_reference(backend, dtype, case, N, C):
    if backend not in gpu_backends():
        pytest.skip("the CUDA extension is not built")
    for reduction in ("mean", "none"):
        s, t, y, w, T, alpha = make_inputs(N, C, case, dtype, device="cuda")
        grad_out = torch.rand(N, device="cuda") + 0.5 if reduction == "none" else None
        want, want_g = reference(s, t, y, w, T, alpha, reduction, grad_out)
        got, got_g = run(backend, s, t, y, w, T, alpha, reduction, grad_out)
        assert got_g.dtype == dtype
        # fp32 math on the rounded inputs, but with the GPU's approximate exp/log and long reductions: a looser
        # loss tolerance than on the CPU (fp16's table entry); the gradient carries its dtype's rounding.
        assert_close(got, want, torch.float16, "loss")
        # gradients shrink like 1/N: compare against the largest entry, not element-wise with a fixed atol
        err = (got_g.double() - want_g).abs().max()
        assert err <= GPU_GRAD_RTOL[dtype] * want_g.abs().max(), f"grad: max err {err:.3g}"


@nan_math
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_non_finite_and_unchecked_targets(backend):
    if backend not in gpu_backends():
        pytest.skip("the CUDA extension is not built")
    s, t, y, w, T, alpha = make_inputs(4, 3000, "target_weight", torch.bfloat16, device="cuda")
    s[1, 2000] = float("inf")
    y[3] = 3000
    rows = kd_loss(s, t, y, T, alpha, w.float(), "none", backend, validate_target=False)
    assert torch.isnan(rows[[1, 3]]).all() and torch.isfinite(rows[[0, 2]]).all()


@pytest.mark.skipif(not (_optional.HAS_CUDA_EXT and hasattr(_optional.cuda_ext, "kd_loss_fwd")),
                    reason="dermfast._C is not built with kd_loss_fwd")
def test_cuda_binding_rejects_bad_arguments_before_touching_the_device():
    ext = _optional.cuda_ext
    base = dict(s=1, t=1, y=0, w=0, wsum=0, loss=1, grad=0, n=4, c=7, stride_s=7, stride_t=7, s_dtype=0,
                t_dtype=0, inv_t=0.25, kd_loss_scale=1.0, kd_grad_scale=1.0, ce_scale=0.0, device=0)
    for bad, match in [(dict(n=0), "n >= 1"), (dict(stride_s=3), "row strides"), (dict(s_dtype=5), "dtype codes"),
                       (dict(w=8), "need a target"), (dict(inv_t=0.0), "inv_t"), (dict(s=0), "null")]:
        with pytest.raises(ValueError, match=match):
            ext.kd_loss_fwd(**{**base, **bad})


_AOT_SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dermfast.kernels import kd_loss as k
for sdt, gdt, one_pass, rows, block, flags in [
        ("fp32", "fp32", True, 64, 16, (True, True, True, True)), ("fp16", "fp32", True, 2, 1024, (True, False, False, True)),
        ("bf16", "bf16", False, 1, 4096, (True, True, True, True)), ("bf16", "bf16", False, 1, 4096, (False, False, False, False))]:
    sig = {"s_ptr": f"*{sdt}", "t_ptr": f"*{sdt}", "y_ptr": "*i64", "w_ptr": "*fp32", "wsum_ptr": "*fp32",
           "loss_ptr": "*fp32", "g_ptr": f"*{gdt}", "N": "i32", "C": "i32", "stride_s": "i32", "stride_t": "i32",
           "stride_g": "i32", "inv_t": "fp32", "kd_loss_scale": "fp32", "kd_grad_scale": "fp32", "ce_scale": "fp32"}
    names = ("HAS_TARGET", "HAS_WEIGHT", "NORM_BY_WSUM", "WRITE_GRAD")
    const = {**dict(zip(names, flags)), "ONE_PASS": one_pass, "ROWS": rows, "BLOCK_C": block}
    sig.update({name: "constexpr" for name in const})
    ck = triton.compile(ASTSource(fn=k._kd_loss_fwd_kernel, signature=sig, constexprs=const),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4 if rows * block <= 2048 else 8})
    assert ck.asm["cubin"], "no cubin"
print("ok")
'''


@needs_triton
def test_triton_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter never compiles the kernel; this does (Triton's own ptxas, no GPU needed), so type errors
    in the compiled path fail here rather than on the first GPU run."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_strided_target_and_class_weight(backend, reduction):
    """A target or class weight that is a strided view (e.g. a column of a [N, 2] label tensor) is read with its
    stride: the kernels index them as flat arrays, so the op must hand them over contiguous."""
    N, C = 5, 7
    s, t, _, _, T, alpha = make_inputs(N, C, "kd_only")
    y = torch.randint(0, C, (N, 2))[:, 1]  # stride 2
    w = (torch.rand(C, 3) + 0.1)[:, 2]  # stride 3
    assert y.stride(0) == 2 and w.stride(0) == 3
    want, want_g = reference(s, t, y, w, T, alpha, reduction)
    got, got_g = run(backend, s, t, y, w, T, alpha, reduction)
    assert_close(got, want, torch.float32, "loss")
    assert_close(got_g, want_g, torch.float32, "grad")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_logits_on_a_non_current_device(backend):
    """Triton launches on the current device: logits on cuda:1 with cuda:0 current must still be right."""
    if backend not in gpu_backends():
        pytest.skip("the CUDA extension is not built")
    s, t, y, w, T, alpha = make_inputs(64, 1000, "target_weight", torch.float32, device="cuda:1")
    want, want_g = reference(s, t, y, w, T, alpha, "mean")
    with torch.cuda.device(0):
        got, got_g = run(backend, s, t, y, w, T, alpha, "mean")
    assert got.device == s.device and got_g.device == s.device
    assert_close(got, want, torch.float16, "loss")  # GPU exp/log: the tolerance of test_gpu_matches_float64_reference
    assert (got_g.double() - want_g).abs().max() <= GPU_GRAD_RTOL[torch.float32] * want_g.abs().max()


@nan_math
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unchecked_target_beyond_int32_is_nan(backend):
    """An int64 target of 2^32 + 3 is out of range: truncating it to int32 (3) would give a finite wrong row."""
    s, t, y, w, T, alpha = make_inputs(3, 7, "target_weight", torch.float32)
    y[1] = 2**32 + 3
    for weight in (None, w.float()):
        rows = kd_loss(s, t, y, T, alpha, weight, "none", backend, validate_target=False)
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all(), rows


@pytest.mark.parametrize("N", [1, 3])
def test_cuda_launcher_passes_row_strides_the_kernel_accepts(monkeypatch, N):
    """csrc/kd_loss.cu rejects row strides < C; an expanded student (row stride 0) or a one-row transposed view
    (row stride 1) is valid input, so the launcher must copy / normalise, not fail. Runs the launcher against a
    stub extension that records the strides and fills the outputs from the torch backend."""
    from dermfast.ops import kd_loss_op as mod
    C = 6
    seen = {}

    class Stub:
        def kd_loss_fwd(self, *a, **kw):
            seen["strides"] = (a[9], a[10])
            assert a[9] >= C and a[10] >= C, a[9:11]

    monkeypatch.setattr(_optional, "cuda_ext", Stub())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 0})())
    s = torch.randn(1, C).expand(N, C) if N > 1 else torch.randn(C, 1).t()
    t = torch.randn(C, 1).t().expand(N, C)
    assert s.stride(0) < C and t.stride(0) < C
    mod._cuda_fwd(s, t, None, None, 2.0, 0.5, "mean", True)
    assert seen["strides"] == ((C, C))
