"""Test set-up shared by every test file.

- No GPU: Triton kernels run under the interpreter, which must be switched on before any @triton.jit is defined.
- An autouse fixture seeds every RNG, so each test draws the same "fresh random" inputs on every run.
- The CPU torchvision fix (`.ci/torchvision_cpu_fix.py`) is installed into the venv by `.ci/setup`, not here,
  so that subprocesses started by the tests (the CLI) get it too.
"""
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (atol, rtol) per dtype, kept as data: tests compare against float64 references with these.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
