import os
import subprocess
import sys

import pytest
import torch

from dermfast.ops import BackendUnavailable, random_masking, use_backend
from dermfast.ops.registry import BACKENDS, Op, Query, dtype_in, needs_cuda_device, ops, set_backend


def _env(**extra):
    env = dict(os.environ)
    env.pop("DERMFAST_BACKEND", None)
    env.update(extra)
    return env


def test_builtin_ops_are_registered_with_a_torch_reference():
    names = set(ops())
    assert {"random_masking", "mae_loss"} <= names
    for op in ops().values():
        assert "torch" in op.impls, f"{op.name} has no torch reference"


def test_automatic_choice_falls_back_in_priority_order():
    op = Op("toy_op")
    op.register("cuda", dtype_in(torch.float32))(lambda x: "cuda")
    op.register("triton", dtype_in(torch.float16, torch.float32))(lambda x: "triton")
    op.register("torch")(lambda x: "torch")
    gpu32 = Query(torch.device("cuda"), torch.float32)
    gpu16 = Query(torch.device("cuda"), torch.float16)
    gpu64 = Query(torch.device("cuda"), torch.float64)
    assert op(gpu32, 1) == "cuda"
    assert op(gpu16, 1) == "triton"
    assert op(gpu64, 1) == "torch"
    assert [b for b in BACKENDS] == ["cuda", "triton", "torch"]


def test_automatic_choice_never_picks_triton_for_cpu_tensors():
    op = Op("toy_op")
    op.register("triton")(lambda x: "triton")  # accepts anything, as an interpreted kernel would
    op.register("torch")(lambda x: "torch")
    cpu = Query(torch.device("cpu"), torch.float32)
    assert op(cpu, 1) == "torch"
    assert op(cpu, 1, backend="triton") == "triton"


def test_explicit_backend_is_refused_with_every_reason():
    op = Op("toy_op")
    op.register("cuda", needs_cuda_device)(lambda x: "cuda")
    op.register("torch")(lambda x: "torch")
    q = Query(torch.device("cpu"), torch.float32, {"L": 7})
    with pytest.raises(BackendUnavailable) as e:
        op(q, 1, backend="cuda")
    msg = str(e.value)
    assert "'cuda' was requested" in msg
    assert "needs a CUDA tensor, got a cpu tensor" in msg
    assert "no triton implementation of toy_op yet" in msg
    assert "torch: would fit" in msg


def test_explicit_backend_on_a_real_op_and_the_global_setter():
    x = torch.randn(2, 9, 8)
    with pytest.raises(BackendUnavailable, match="random_masking: backend 'cuda' was requested"):
        random_masking(x, 0.5, seed=0, step=0, backend="cuda")
    with use_backend("cuda"):
        with pytest.raises(BackendUnavailable, match="cuda: "):
            random_masking(x, 0.5, seed=0, step=0)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, dermfast.ops as o\n"
            "try:\n    o.random_masking(torch.randn(1, 4, 4), 0.5, 0, 0, backend='triton')\n"
            "except o.BackendUnavailable as e:\n    print('REFUSED', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "REFUSED" in r.stdout and "TRITON_INTERPRET=1" in r.stdout, r.stdout + r.stderr
    out = random_masking(x, 0.5, seed=0, step=0)  # restored to automatic
    assert out[0].shape == (2, 4, 8)
    with pytest.raises(ValueError, match="accepted: auto, cuda, triton, torch"):
        set_backend("tpu")


def test_env_var_requests_a_backend():
    code = ("import torch, dermfast.ops as o\n"
            "try:\n    o.random_masking(torch.randn(1, 4, 4), 0.5, 0, 0)\n"
            "except o.BackendUnavailable as e:\n    print('REFUSED', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_env(DERMFAST_BACKEND="cuda"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "REFUSED" in r.stdout and "backend 'cuda' was requested" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import dermfast.ops"], capture_output=True, text=True,
                       env=_env(DERMFAST_BACKEND="bogus"), timeout=120)
    assert r.returncode != 0 and "DERMFAST_BACKEND='bogus' is not a backend" in r.stderr


def test_import_without_triton_dali_or_extension():
    code = ("import sys\nfor m in ('triton', 'dermfast._C', 'nvidia', 'nvidia.dali', 'diffusers'):\n"
            "    sys.modules[m] = None\n"
            "import dermfast, dermfast.ops, dermfast.models.mae, dermfast.train.cli\n"
            "print(dermfast.HAS_TRITON, dermfast.HAS_CUDA_EXT, dermfast.HAS_DALI)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False"]


def test_info_reports_the_backend_per_op():
    r = subprocess.run([sys.executable, "-m", "dermfast.info"], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "torch " in out and "op dispatch" in out
    assert "random_masking   -> torch" in out and "mae_loss         -> torch" in out
    assert "triton      fits when asked for explicitly (interpreter on CPU)" in out
    assert "cuda        the compiled extension" in out or "cuda        needs a CUDA tensor" in out
    assert "sdpa_nested " in out and "flash_attn " in out  # the peers of masked_attention are listed too
