"""A resumed CPU run uses the torch thread count its checkpoint was written with (issue 16 section 9).

Why: on the CPU, a float32 reduction or GEMM split over 2 threads adds in another order than over 1, so the
same step on the same state gives other last bits. A resumed process that computed its own thread budget on a
machine (or cgroup) with fewer cores continued the run with other arithmetic: the losses drifted in the last
ulp and AdamW turned that noise in zero-gradient parameters (the key part of qkv.bias) into steps of about lr.
The end-to-end check (kill -9, resume on one core, `torch.equal` weights) is tests/test_resume.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from dermfast.train.preflight import resume_threads


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_sums_depend_on_the_thread_count(threads_restored):
    """The fact the fix rests on: the same float32 sum and GEMM over 1 and 2 threads differ in the last bits."""
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(1 << 20, generator=g), torch.randn(64, 4096, generator=g), torch.randn(4096, 64, generator=g)
    out = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        out[n] = (x.sum(), a @ b)
    assert not (torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][1], out[2][1]))
    torch.testing.assert_close(out[1][0], out[2][0], rtol=1e-5, atol=1e-3)  # only the rounding differs


class _Cfg:
    def __init__(self, threads: int = -1):
        self.threads = threads


def _checkpoint(tmp_path, threads):
    state = {"stage": "mae", "step": 6}
    if threads is not None:
        state["threads"] = threads
    (tmp_path / "state.json").write_text(json.dumps(state))
    return tmp_path


def test_resume_takes_the_checkpoint_thread_count_over_the_budget(tmp_path):
    ckpt = _checkpoint(tmp_path, 2)
    threads, note = resume_threads(ckpt, 1, _Cfg(), torch.device("cpu"))  # budget on one core: 1
    assert threads == 2 and "as in the checkpoint" in note


def test_an_explicit_different_threads_is_obeyed_and_named_not_bit_exact(tmp_path):
    threads, note = resume_threads(_checkpoint(tmp_path, 2), 3, _Cfg(threads=3), torch.device("cpu"))
    assert threads == 3 and "not bit-exact" in note


@pytest.mark.parametrize("case", ["fresh run", "same count", "older checkpoint", "cuda"])
def test_nothing_changes_where_nothing_differs(tmp_path, case):
    saved = {"fresh run": None, "same count": 4, "older checkpoint": None, "cuda": 2}[case]
    ckpt = None if case == "fresh run" else _checkpoint(tmp_path, saved)
    device = torch.device("cuda" if case == "cuda" else "cpu")  # only .type is read: no GPU needed
    assert resume_threads(ckpt, 4, _Cfg(), device) == (4, None)
