"""Capability, then proof, then dispatch (dermfast/ops/selftest.py, dermfast/ops/registry.py).

Toy ops with a fake "cuda" backend on CPU tensors stand in for a GPU backend: automatic dispatch proves any
non-torch backend it is about to pick, whatever the device, so the whole path runs here.
"""
import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from dermfast import _optional
from dermfast.ops import registry, selftest
from dermfast.ops.registry import BackendUnavailable, Op, Query
from dermfast.ops.selftest import Compare, SelfTestWarning

CPU32 = Query(torch.device("cpu"), torch.float32)


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DERMFAST_SELFTEST", raising=False)
    selftest.reset()
    yield
    selftest.reset()


def toy_op(monkeypatch, name, cuda_fn):
    """An op `name` = x.sum(0) * 2 with a torch backend and the given "cuda" backend, and its check."""
    op = Op(name)
    op.register("cuda")(cuda_fn)
    op.register("torch")(lambda x: x.sum(0) * 2)
    calls = []

    def check(backend, device, dtype, gen):
        calls.append(backend)
        x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        return [Compare("out", op.impls[backend].fn(x.to(dtype)), op.impls["torch"].fn(x))]

    monkeypatch.setitem(selftest.CHECKS, name, check)
    return op, calls


def selftest_warnings(record):
    return [w for w in record if issubclass(w.category, SelfTestWarning)]


def test_wrong_values_exclude_the_backend_with_one_warning(monkeypatch):
    op, calls = toy_op(monkeypatch, "toy_wrong", lambda x: x.sum(0) * 2 + 1e-3)  # off by a little
    x = torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first, second = op(CPU32, x), op(CPU32, x)
    assert torch.equal(first, x.sum(0) * 2) and torch.equal(second, first)  # the torch backend served
    assert calls == ["cuda"]  # proven (and failed) once per process
    [w] = selftest_warnings(record)
    msg = str(w.message)
    assert "toy_wrong backend cuda on cpu" in msg and "out: max abs error" in msg, msg


def test_an_exception_excludes_the_backend(monkeypatch):
    def boom(x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    op, calls = toy_op(monkeypatch, "toy_boom", boom)
    with pytest.warns(SelfTestWarning, match="RuntimeError: CUDA error: an illegal memory access"):
        out = op(CPU32, torch.ones(2, 3))
    assert torch.equal(out, torch.full((3,), 4.0))
    assert calls == ["cuda"]


def test_a_correct_backend_passes_and_serves(monkeypatch):
    op, calls = toy_op(monkeypatch, "toy_good", lambda x: (x.double().sum(0) * 2).to(x.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelfTestWarning)
        assert op.select(CPU32).backend == "cuda"
        assert op.select(CPU32).backend == "cuda"
    assert calls == ["cuda"]


def test_verdicts_are_cached_on_disk_and_reused(monkeypatch, tmp_path):
    op, calls = toy_op(monkeypatch, "toy_cached", lambda x: x.sum(0) * 3)
    with pytest.warns(SelfTestWarning):
        assert op.select(CPU32).backend == "torch"
    [path] = (tmp_path / "cache" / "selftest").glob("*.json")
    data = json.loads(path.read_text())
    assert data["verdicts"]["toy_cached|cuda|float32"].startswith("out: max abs error")
    assert data["fingerprint"]["device"] and data["fingerprint"]["dermfast"]
    selftest.reset()  # as a new process: the memo is gone, the file is not
    with pytest.warns(SelfTestWarning, match="failed its self-test"):  # still said once per process
        assert op.select(CPU32).backend == "torch"
    assert calls == ["cuda"]  # not rerun
    # a new process on the same machine reads the same file (same fingerprint)
    code = ("import torch; from dermfast.ops import selftest; from dermfast.ops.registry import Query\n"
            "q = Query(torch.device('cpu'), torch.float32)\n"
            "selftest.CHECKS['toy_cached'] = lambda *a: 1 / 0\n"  # would fail differently if it ran
            "print(selftest.verdict('toy_cached', 'cuda', q))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DERMFAST_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert "failed its self-test on this device: out: max abs error" in r.stdout


def test_selftest_off_serves_unproven(monkeypatch):
    monkeypatch.setenv("DERMFAST_SELFTEST", "0")
    op, calls = toy_op(monkeypatch, "toy_off", lambda x: x.sum(0) * 3)
    assert op.select(CPU32).backend == "cuda"
    assert calls == []


def test_an_explicit_backend_is_not_second_guessed(monkeypatch):
    op, calls = toy_op(monkeypatch, "toy_explicit", lambda x: x.sum(0) * 3)
    x = torch.ones(2, 3)
    assert torch.equal(op(CPU32, x, backend="cuda"), torch.full((3,), 6.0))
    with registry.use_backend("cuda"):
        assert op.select(CPU32).backend == "cuda"
    assert calls == []


def test_nothing_runs_while_torch_compile_traces(monkeypatch):
    op, calls = toy_op(monkeypatch, "toy_trace", lambda x: (x.double().sum(0) * 2).to(x.dtype))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert op.select(CPU32).backend == "torch"  # unproven: passed over, not tested inside tracing
    assert calls == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert op.select(CPU32).backend == "cuda"  # proven eagerly at the next eager call
    assert calls == ["cuda"]


def test_no_backend_left_lists_the_failure(monkeypatch):
    op = Op("toy_alone")
    op.register("cuda")(lambda x: x * 0)
    monkeypatch.setitem(selftest.CHECKS, "toy_alone", lambda b, d, t, g: [
        Compare("out", op.impls[b].fn(torch.ones(3)), torch.ones(3, dtype=torch.float64))])
    with pytest.warns(SelfTestWarning), pytest.raises(BackendUnavailable, match="cuda: failed its self-test"):
        op.select(CPU32)


def test_the_selftest_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    for name in sorted(selftest.CHECKS):
        why, _ = selftest.run_check(name, "torch", torch.device("cpu"), torch.float32)
        assert why is None, f"{name}: {why}"
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", ["kd_loss", "mae_loss", "masked_attention", "random_masking"])
def test_real_checks_pass_the_triton_kernels_and_catch_a_wrong_one(name, monkeypatch):
    """The checks of the real ops pass the Triton kernels (interpreted here) and fail them when one output is 1%
    off: the backward op for the ops that have one, so the check really runs the backward."""
    if not registry.triton_interpreter_on() or not _optional.HAS_TRITON:
        pytest.skip("needs the Triton interpreter (CPU) or a GPU run")
    why, _ = selftest.run_check(name, "triton", torch.device("cpu"), torch.float32)
    assert why is None, why
    target = {"kd_loss": "kd_loss", "mae_loss": "mae_loss_backward", "masked_attention": "masked_attention_bwd",
              "random_masking": "random_masking_backward"}[name]
    impl = registry.ops()[target].impls["triton"]
    right = impl.fn

    def wrong(*args, **kwargs):
        out = right(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        first.mul_(1.01)
        return out

    monkeypatch.setattr(impl, "fn", wrong)
    why, _ = selftest.run_check(name, "triton", torch.device("cpu"), torch.float32)
    assert why is not None and "max abs error" in why, why


# ---------------------------------------------------------------------------------------------- capability


def fake_ext(monkeypatch, archs="80,90", runtime=13000, driver=13000):
    ext = types.SimpleNamespace(compiled_cuda_archs=lambda: archs, cuda_runtime_version=lambda: runtime,
                                cuda_driver_version=lambda: driver, kd_loss_fwd=None, mae_loss_fwd=None,
                                random_masking_fwd=None)
    monkeypatch.setattr(_optional, "cuda_ext", ext)
    monkeypatch.setattr(_optional, "HAS_CUDA_EXT", True)


def on_gpu(monkeypatch, cap):
    monkeypatch.setattr(registry, "device_capability", lambda device: cap)


GPU16 = Query(torch.device("cuda", 0), torch.float16)


def test_cuda_backend_refused_for_an_arch_not_compiled(monkeypatch):
    fake_ext(monkeypatch, archs="80,90")
    on_gpu(monkeypatch, (7, 5))
    reason = registry.ops()["kd_loss"].reasons(GPU16)["cuda"]
    assert reason == ("dermfast._C was compiled for CUDA archs 80,90, which cannot run on this sm_75 GPU "
                      "(rebuild with DERMFAST_CUDA_ARCHS=75)")
    on_gpu(monkeypatch, (9, 0))
    assert registry.ops()["kd_loss"].reasons(GPU16)["cuda"] is None
    with pytest.raises(BackendUnavailable, match="cannot run on this sm_75"):
        on_gpu(monkeypatch, (7, 5))
        registry.ops()["mae_loss"].select(GPU16, "cuda")  # explicit: refused too, with the reason


@pytest.mark.parametrize("archs,cap,ok", [
    ("80", (8, 6), True),        # SASS of sm_80 runs on sm_86 (same major, higher minor)
    ("86-real", (8, 0), False),  # ... not on a lower minor
    ("90a", (9, 0), True),       # arch-specific: exactly that GPU
    ("90a", (10, 0), False),
    ("90", (10, 0), True),       # a plain number embeds PTX: the driver JIT-compiles it for newer GPUs
    ("90-real", (10, 0), False),  # SASS only
    ("80-virtual", (9, 0), True),
    ("native", (12, 0), True),   # the build could not name it: trusted
])
def test_arch_rules(archs, cap, ok):
    assert (registry.arch_reason(cap, archs) is None) == ok


def test_cuda_backend_refused_for_an_old_driver(monkeypatch):
    fake_ext(monkeypatch, archs="90", runtime=13000, driver=12040)
    on_gpu(monkeypatch, (9, 0))
    assert registry.needs_cuda_ext(GPU16) == ("the driver supports CUDA 12.4 but dermfast._C links the CUDA 13.0 "
                                              "runtime (update the driver)")
    fake_ext(monkeypatch, archs="90", runtime=13020, driver=13000)  # minor-version compatibility, no PTX JIT
    assert registry.needs_cuda_ext(GPU16) is None
    on_gpu(monkeypatch, (10, 0))
    assert "cannot run on this sm_100" in registry.needs_cuda_ext(GPU16)
    fake_ext(monkeypatch, driver=0)
    assert registry.needs_cuda_ext(GPU16) == "no CUDA driver was found by dermfast._C"


def test_triton_refused_where_it_cannot_target(monkeypatch):
    if not _optional.HAS_TRITON:
        pytest.skip("triton is not installed")
    on_gpu(monkeypatch, (7, 0))
    assert "Triton needs compute capability >= 7.5, this GPU is sm_70" in registry.needs_triton_device(GPU16)
    on_gpu(monkeypatch, (7, 5))
    assert registry.needs_triton_device(GPU16) is None
    bf16 = Query(torch.device("cuda", 0), torch.bfloat16)
    assert "bfloat16 needs compute capability >= 8.0" in registry.needs_triton_device(bf16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "Triton interpreter" in registry.needs_triton_device(Query(torch.device("cpu"), torch.bfloat16))


# ---------------------------------------------------------------------------------------------- info


def test_info_selftest_interpret_prints_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DERMFAST_BACKEND")}
    env["DERMFAST_CACHE"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-m", "dermfast.info", "--selftest", "--interpret"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {tuple(line.split()[:3]): line for line in r.stdout.splitlines() if line.startswith("  ")}
    for name in ("kd_loss", "mae_loss", "masked_attention", "random_masking"):
        assert "passed  <- chosen" in rows[(name, "float32", "torch")]
        assert "passed  (automatic choice skips interpreted Triton)" in rows[(name, "float32", "triton")]
        assert rows[(name, "float32", "cuda")].split()[3:5] == ["not", "capable:"]
    assert "Triton interpreted (TRITON_INTERPRET=1)" in r.stdout
    r = subprocess.run([sys.executable, "-m", "dermfast.info", "--interpret"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "--interpret goes with --selftest" in r.stderr
