"""`dermfast.ops._device.on_device`: the one helper that makes a Triton launch run on its input's GPU.

Triton launches on the *current* CUDA device, not on the device of the tensors it is given; every op's Triton
backend wraps its launch in `on_device(<an input>)`. One helper, imported by every op module: a copy per module
is how one of them ends up without the fix.
"""
import ast
import contextlib
from pathlib import Path

import pytest
import torch

from dermfast.ops._device import on_device

OPS_DIR = Path(__file__).resolve().parents[1] / "dermfast" / "ops"


def test_cpu_tensor_touches_no_cuda_state():
    cm = on_device(torch.zeros(2))
    assert isinstance(cm, contextlib.nullcontext)
    with cm:
        pass
    with on_device(torch.empty(2, device="meta")):
        pass


def test_no_op_module_keeps_its_own_copy():
    """No module of dermfast/ops defines `_on_device` or `on_device` again; the ones that launch Triton
    (`from dermfast.kernels import ...` inside a function) import the shared one."""
    for path in sorted(OPS_DIR.glob("*.py")):
        if path.name == "_device.py" or path.name.startswith("resources"):
            continue  # resources*.py compiles kernels on fake tensors (info --resources) and never launches one
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                   and n.name in ("on_device", "_on_device")]
        assert not defined, f"{path.name} defines its own {defined[0]}: import dermfast.ops._device.on_device"
        launches = any(isinstance(n, ast.ImportFrom) and n.module == "dermfast.kernels" for n in ast.walk(tree))
        imported = any(isinstance(n, ast.ImportFrom) and n.module == "dermfast.ops._device"
                       and any(a.name == "on_device" for a in n.names) for n in ast.walk(tree))
        assert imported or not launches, f"{path.name} launches Triton kernels without on_device"


@pytest.mark.gpu
def test_cuda_tensor_makes_its_device_current():
    last = torch.cuda.device_count() - 1
    before = torch.cuda.current_device()
    t = torch.zeros(2, device=f"cuda:{last}")
    with on_device(t):
        assert torch.cuda.current_device() == last
    assert torch.cuda.current_device() == before
    if last > 0:  # the case the helper exists for: an input on another GPU than the current one
        with torch.cuda.device(0), on_device(t):
            assert torch.cuda.current_device() == last
