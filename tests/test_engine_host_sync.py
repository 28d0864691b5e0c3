"""A steady-state training step makes no host sync (issue 16, section 8).

On a GPU every read of a device value on the host (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`, `float(t)`) drains
the pipeline. The engine used to read a skip / stop flag every optimiser step. Here, on CPU, those Tensor methods
raise during steps 3-7 of an MAE run, from the start of the stage's forward to the end of the optimiser step;
the data loader (host-side by design: decoding, collation) runs outside that window. The GPU twin
(`test_steady_state_step_has_no_sync_on_gpu`) runs the same steps under torch.cuda.set_sync_debug_mode("error").
Exempt, by design, by call site (EXEMPT): reads that on a GPU are not reads of device memory.
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from dermfast.train import engine
from dermfast.train.cli import main
from dermfast.train.mae import MAEStage

ARMED = {"on": False, "window": range(3, 8), "caught": []}
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
EXEMPT = {
    # the range check of ids_keep reads CPU ids on the host; for CUDA ids it is a device-side assert instead
    ("masked_patch_embed_op.py", "_validate"),
    # ragged masking: the per-sample mask ratios are drawn on the host (a hash of seed, step, sample) and the keep
    # counts / cu_seqlens are computed from them there, then copied to the device asynchronously
    ("random_masking_op.py", "_cu_seqlens"),
    ("mae.py", "_host_keep_counts"),
}


def _exempt(frame) -> bool:
    return (frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name) in EXEMPT


@contextlib.contextmanager
def _host_reads_raise():
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guard(name, fn):
        def wrapper(self, *args, **kwargs):
            if ARMED["on"] and not _exempt(sys._getframe(1)):
                ARMED["caught"].append(name)
                raise AssertionError(f"host sync: Tensor.{name} in a steady-state step")
            return fn(self, *args, **kwargs)
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, guard(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        ARMED["on"] = False


def _arm_around_steps(monkeypatch):
    step, opt_step = MAEStage.step, engine._Trainer._optimizer_step

    def stage_step(self, batch, run):
        ARMED["on"] = run.step in ARMED["window"]
        return step(self, batch, run)

    def optimizer_step(self, loss, stop_requested):
        try:
            return opt_step(self, loss, stop_requested)
        finally:
            ARMED["on"] = False

    monkeypatch.setattr(MAEStage, "step", stage_step)
    monkeypatch.setattr(engine._Trainer, "_optimizer_step", optimizer_step)


def _mae_args(tmp_path, *extra):
    return ["--stage", "mae", "--toy-images", "64", "--toy-image-size", "32", "--img-size", "32",
            "--batch-size", "8", "--max-steps", "9", "--log-every", "100", "--checkpoint-every", "0",
            "--workers", "0", "--loader", "torch", "--no-progress", "--out", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("clip", [[], ["--clip-grad", "1.0"], ["--mask-ratio-range", "0.6", "0.9"]],
                         ids=["dense", "clip", "ragged"])
def test_steady_state_step_reads_nothing_on_the_host(tmp_path, monkeypatch, clip):
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    _arm_around_steps(monkeypatch)
    ARMED["caught"].clear()
    with _host_reads_raise():
        code = main(_mae_args(tmp_path, *clip))
    assert not ARMED["caught"], f"host reads in steady-state steps: {ARMED['caught']}"
    assert code == 0


def test_the_guard_catches_the_old_per_step_flag_read(tmp_path, monkeypatch):
    # the check itself must be able to fail: a step that reads its loss on the host is caught
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    _arm_around_steps(monkeypatch)
    step = MAEStage.step

    def reading_step(self, batch, run):
        loss, scalars = step(self, batch, run)
        float(loss)  # what a `.item()` in a step does
        return loss, scalars

    monkeypatch.setattr(MAEStage, "step", reading_step)
    ARMED["caught"].clear()
    with _host_reads_raise(), pytest.raises(AssertionError, match="host sync: Tensor.__float__"):
        main(_mae_args(tmp_path))
    assert "__float__" in ARMED["caught"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_steady_state_step_has_no_sync_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    step, opt_step = MAEStage.step, engine._Trainer._optimizer_step

    def stage_step(self, batch, run):
        if run.step in ARMED["window"]:
            torch.cuda.set_sync_debug_mode("error")
        return step(self, batch, run)

    def optimizer_step(self, loss, stop_requested):
        try:
            return opt_step(self, loss, stop_requested)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(MAEStage, "step", stage_step)
    monkeypatch.setattr(engine._Trainer, "_optimizer_step", optimizer_step)
    args = [a if a != "torch" else "auto" for a in _mae_args(tmp_path)]
    assert main([*args, "--device", "cuda"]) == 0
