"""(atol, rtol) per dtype, kept as data: the one table that the tests and the on-device self-test compare with.

An op's result in `dtype` is compared against the float64 torch reference. The tests use these directly (or a
stated multiple, e.g. the attention tests' 10x for fp32); the self-test (dermfast/ops/selftest.py) scales the
absolute part by the largest reference value (gradients of a mean are ~1/N small), multiplies both parts by
`SELFTEST_FACTOR[op]`, and accepts a low-precision result whose error is at most twice PyTorch's own error in
the same dtype (the flash-attention rule, tests/test_masked_attention.py).
"""
from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

# Multiples of TOLERANCES per op, as its tests use them (tests/test_masked_attention.py: 10x for fp32).
SELFTEST_FACTOR: dict[str, float] = {"masked_attention": 10.0}


def tolerance(op: str, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for `op`'s results in `dtype`, against a float64 reference."""
    atol, rtol = TOLERANCES[dtype]
    f = SELFTEST_FACTOR.get(op, 1.0)
    return atol * f, rtol * f
