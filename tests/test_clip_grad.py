"""`--clip-grad` clips: the gradient the optimiser steps with is torch.nn.utils.clip_grad_norm_'s, on one process,
under DDP and under FSDP2 (the global norm over all shards).

Issue 16: the engine handed the gradient tensors themselves to clip_grads_with_norm_, which scales the `.grad` of
what it is given; a gradient has no `.grad`, so nothing was ever clipped (a run with --clip-grad 1e-12 left
bit-identical weights). The peer here is torch's own clip_grad_norm_ (torch/nn/utils/clip_grad.py): with
total = ||(||g_1||, ..., ||g_n||)||_2 over every parameter's gradient, each g_i *= min(1, max_norm / (total + 1e-6)).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests import test_engine  # registers the toy stage
from dermfast.train.cli import main

SEEN: list[dict] = []  # what AdamW.step saw: the gradients (full tensors) and the parameters before the step


def _record_first_step(monkeypatch):
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if not SEEN:
            params = [p for g in self.param_groups for p in g["params"]]
            SEEN.append({"grads": [p.grad.detach().clone() for p in params],
                         "params": [p.detach().clone() for p in params]})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    SEEN.clear()


class _Probe(test_engine.ToyStage):
    """The toy regression with its loss scaled by `scale`, keeping the model and first batch for the reference."""

    def build(self, run):
        parts = super().build(run)
        self.model0 = copy.deepcopy(parts.model)
        self.batches = []
        return parts

    def step(self, batch, run):
        if not self.batches:
            self.batches.append(batch)
        loss, scalars = super().step(batch, run)
        return loss * run.cfg.scale, scalars


from dataclasses import dataclass  # noqa: E402

from dermfast.train.stages import register_stage  # noqa: E402


@dataclass
class _ProbeConfig(test_engine.ToyConfig):
    scale: float = 1.0               # multiplies the loss (and so the gradient norm)


_Probe.Config = _ProbeConfig
register_stage("clip_probe_test", help="toy regression recording its first batch")(_Probe)
PROBES: list[_Probe] = []


@pytest.fixture
def probe(monkeypatch):
    original = _Probe.build

    def build(self, run):
        PROBES.append(self)
        return original(self, run)

    monkeypatch.setattr(_Probe, "build", build)
    PROBES.clear()
    _record_first_step(monkeypatch)
    return PROBES


def _run(tmp_path: Path, name: str, *flags: str) -> int:
    conf = tmp_path / f"{name}.yaml"
    conf.write_text(yaml.safe_dump({"epochs": 1, "batch_size": 8, "log_every": 1, "scale": 40.0, "max_steps": 2}))
    return main(["--stage", "clip_probe_test", "--config", str(conf), "--out", str(tmp_path / name),
                 "--no-progress", *flags])


@pytest.mark.parametrize("max_norm", [1.0, 1e-12])
def test_clip_grad_steps_with_torchs_clipped_gradient(tmp_path, probe, max_norm):
    assert _run(tmp_path, "clip", "--clip-grad", str(max_norm)) == 0
    stage = probe[0]
    model = stage.model0
    batch = stage.batches[0]
    loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]) * 40.0
    loss.backward()
    params = [p for p in model.parameters()]
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)  # the peer: torch's own clipping
    assert float(total) > 2 * max_norm, f"the test needs a gradient norm above --clip-grad, got {float(total)}"
    seen = SEEN[0]
    assert len(seen["grads"]) == len(params)
    # param_groups order (decay / no-decay) differs from model.parameters(): match by the initial values
    for p in params:
        i = next(i for i, q in enumerate(seen["params"]) if q.shape == p.shape and torch.equal(q, p.detach()))
        torch.testing.assert_close(seen["grads"][i], p.grad, rtol=1e-5, atol=1e-12)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen["grads"]]))
    assert float(clipped) == pytest.approx(max_norm, rel=1e-4)


def test_clip_grad_changes_the_weights(tmp_path):
    # Adam's first step is nearly scale-free, but with a norm of 1e-12 its eps dominates: weights must differ
    from safetensors.torch import load_file
    assert _run(tmp_path, "plain") == 0
    assert _run(tmp_path, "tiny", "--clip-grad", "1e-12") == 0
    a = load_file(str(tmp_path / "plain" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "tiny" / "checkpoint.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


DRIVER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import tests.test_clip_grad  # registers clip_probe_test
from dermfast.train.cli import main
out, dump, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
original = torch.optim.AdamW.step
state = {{"done": False}}
def step(self, *a, **k):
    if not state["done"]:
        state["done"] = True
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for g in self.param_groups for p in g["params"]]
        if os.environ.get("RANK", "0") == "0":
            torch.save([g.detach().clone() for g in grads], dump)
    return original(self, *a, **k)
torch.optim.AdamW.step = step
conf = out + ".yaml"
import yaml
open(conf, "w").write(yaml.safe_dump({{"epochs": 1, "batch_size": 8, "log_every": 1, "scale": 40.0, "max_steps": 2}}))
sys.exit(main(["--stage", "clip_probe_test", "--config", conf, "--out", out, "--no-progress", "--device", "cpu",
               *extra]))
"""


def _torchrun(tmp_path: Path, name: str, nproc: int, port: int, *extra: str) -> list[torch.Tensor]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(Path(__file__).parents[1])))
    dump = tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           str(driver), str(tmp_path / name), str(dump), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(dump)


@pytest.mark.slow
def test_clip_grad_under_ddp_and_fsdp_uses_the_global_norm(tmp_path, monkeypatch):
    # Every rank of the toy stage sees the same batch, so the averaged gradient of 2 ranks is the 1-process one,
    # and so is its clipped version; under FSDP2 each rank holds half of each gradient and the norm must be
    # the global one (a per-shard norm would clip each half differently).
    _record_first_step(monkeypatch)
    assert _run(tmp_path, "none") == 0
    unclipped = SEEN[0]["grads"]
    SEEN.clear()
    assert _run(tmp_path, "one", "--clip-grad", "1.0") == 0
    one = SEEN[0]["grads"]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in unclipped]))
    assert float(total) > 2.0
    expect = [g * min(1.0, 1.0 / (float(total) + 1e-6)) for g in unclipped]  # clip_grad_norm_'s formula
    for a, b in zip(one, expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    for name, port, flags in (("ddp", 29633, ()), ("fsdp", 29634, ("--fsdp",))):
        got = _torchrun(tmp_path, name, 2, port, "--clip-grad", "1.0", *flags)
        assert len(got) == len(one)
        for a, b in zip(got, one):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"{name}: clipped gradient differs")
