"""Guarded optional dependencies. Each import is tried once; the reason for a miss is kept and reported
by `python -m dermfast.info`, never swallowed."""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def _try(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as e:  # any import-time failure (missing, ABI mismatch, no driver) means "absent"
        return None, f"{type(e).__name__}: {e}".strip()


triton, TRITON_REASON = _try("triton")
HAS_TRITON = triton is not None

# The compiled csrc/ extension: built by setup.py when nvcc is found.
cuda_ext, CUDA_EXT_REASON = _try("dermfast._C")
HAS_CUDA_EXT = cuda_ext is not None


def _has_spec(name: str) -> tuple[bool, str]:
    # DALI and diffusers are heavy: find them without importing them at `import dermfast` time.
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package (e.g. `nvidia`) is missing
        found = False
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"
    return found, "" if found else f"{name} is not installed"


HAS_DALI, DALI_REASON = _has_spec("nvidia.dali")
HAS_DIFFUSERS, DIFFUSERS_REASON = _has_spec("diffusers")
