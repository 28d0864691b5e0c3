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

# (atol, rtol) per dtype, kept as data in the library (the on-device self-test uses the same table).
from dermfast.ops.tolerances import TOLERANCES  # noqa: E402,F401  (tests import it from here)


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


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh DERMFAST_CACHE for the test module (embedded dataset, validation verdicts, self-test verdicts)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("DERMFAST_CACHE", str(path))
        yield path
