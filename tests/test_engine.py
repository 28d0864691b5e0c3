"""The engine on a tiny in-memory stage (a linear regression): files, resume, signals, NaN steps, accumulation,
checkpoints, evaluation. In-process and fast; the real-subprocess kill test is tests/test_resume.py."""
from __future__ import annotations

import csv
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from dermfast.train.cli import main
from dermfast.train.config import TrainConfig
from dermfast.train.stages import Parts, Stage, register_stage


class ToyLoader:
    """n samples of x [dim] -> y = x @ w + noise; epoch order a pure function of (seed, epoch); resumable."""

    backend = "toy"

    def __init__(self, n: int, dim: int, batch: int, seed: int, device):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
        self.n, self.batch, self.seed, self.device = n, batch, seed, device
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self.n // self.batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        start, self.position = self.position, 0
        for i in range(start // self.batch, len(self)):
            idx = torch.as_tensor(order[i * self.batch:(i + 1) * self.batch])
            self.position = (i + 1) * self.batch
            yield {"x": self.x[idx].to(self.device), "y": self.y[idx].to(self.device)}
        self.epoch, self.position = self.epoch + 1, 0


@dataclass
class ToyConfig(TrainConfig):
    n: int = 64                      # samples
    dim: int = 6                     # features
    nan_at: list[int] = field(default_factory=list)  # optimiser steps whose loss is NaN
    signal_at: int | None = None     # send this process `signal_name` during this step
    signal_name: str = "SIGTERM"     # which signal
    with_eval: bool = False          # evaluate (and keep best.safetensors by -loss)
    oom_at: int | None = None        # raise torch.OutOfMemoryError in this step
    out: str = "runs/toy"            # run directory


@register_stage("toy_engine_test", help="a linear regression for the engine's tests")
class ToyStage(Stage):
    Config = ToyConfig

    def default_blr(self, cfg):
        return 0.05 * 256 / 16

    def build(self, run):
        cfg = run.cfg
        self.loader = ToyLoader(cfg.n, cfg.dim, run.batch_size, cfg.seed, run.device)
        model = nn.Sequential(nn.Linear(cfg.dim, 16), nn.LayerNorm(16), nn.Linear(16, 1)).to(run.device)
        return Parts(model=model, loader=self.loader, summary="toy")

    def step(self, batch, run):
        if run.cfg.signal_at is not None and run.step == run.cfg.signal_at:
            os.kill(os.getpid(), getattr(signal, run.cfg.signal_name))
        if run.step == run.cfg.oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        loss = nn.functional.mse_loss(run.model(batch["x"]), batch["y"])
        if run.step in run.cfg.nan_at:
            loss = loss * float("nan")
        return loss, {"half_loss": loss.detach() / 2}

    def evaluate(self, run):
        if not run.cfg.with_eval:
            return None
        with torch.no_grad():
            loss = nn.functional.mse_loss(run.model(self.loader.x), self.loader.y)
        return {"neg_loss": -float(loss)}

    def selection(self, cfg):
        return ("neg_loss", "max") if cfg.with_eval else None


def toy(tmp_path: Path, name: str, *flags: str, **cfg) -> tuple[int, Path]:
    out = tmp_path / name
    conf = tmp_path / f"{name}.yaml"
    conf.write_text(yaml.safe_dump({"epochs": 3, "batch_size": 8, "log_every": 1, **cfg}))
    return main(["--stage", "toy_engine_test", "--config", str(conf), "--out", str(out), "--no-progress",
                 *flags]), out


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_writes_every_file_and_lists_them(tmp_path, capsys):
    code, out = toy(tmp_path, "a")
    assert code == 0
    text = capsys.readouterr().out
    for name in ("run.json", "config.yaml", "log.csv", "plots.png", "checkpoint.safetensors"):
        assert (out / name).is_file(), name
        assert name in text.strip().splitlines()[-1], name  # the final line lists what was written
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lr"] == pytest.approx(0.025) and resolved["blr"] == pytest.approx(0.8)  # lr rule filled in
    log = rows(out / "log.csv")
    assert [int(r["step"]) for r in log] == list(range(1, 25))
    assert {"loss", "lr", "grad_norm", "images_per_s", "data_wait", "gpu_mem_gib", "skipped",
            "half_loss"} <= set(log[0])
    assert float(log[-1]["loss"]) < float(log[0]["loss"])
    assert "warning: an epoch is 8 optimiser step(s)" in text  # fewer than ~10 steps per epoch
    assert "threads:" in text and "batch: 8 per rank x 1 accum x 1 rank(s) = 8 global" in text


def test_checkpoints_are_safetensors_and_json_with_the_run_file_mode(tmp_path):
    code, out = toy(tmp_path, "m", "--checkpoint-every", "5", "--keep-checkpoints", "2")
    assert code == 0
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_00000020", "step_00000024"]  # the last K kept
    umask = os.umask(0)
    os.umask(umask)
    for p in ckpts:
        assert sorted(f.name for f in p.iterdir()) == ["extra.safetensors", "model.safetensors",
                                                        "optimizer.safetensors", "state.json"]
        for f in p.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f  # not a temporary file's 0600
    assert (out / "checkpoint.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list((out / "checkpoints").glob(".*tmp*"))


@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_finishes_the_step_checkpoints_and_resume_is_exact(tmp_path, capsys, name, code):
    assert toy(tmp_path, "ref")[0] == 0
    got, out = toy(tmp_path, "cut", signal_at=10, signal_name=name)
    assert got == code
    err = capsys.readouterr().err
    assert f"{name} at step 11" in err and "--resume auto" in err
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    # the same config (resuming at step 11, the signal at step 10 does not come again)
    assert toy(tmp_path, "cut", "--resume", "auto", signal_at=10, signal_name=name)[0] == 0
    ref, res = rows(tmp_path / "ref" / "log.csv"), rows(out / "log.csv")
    assert [r["step"] for r in res] == [r["step"] for r in ref]
    assert [r["loss"] for r in res] == [r["loss"] for r in ref]
    assert [r["lr"] for r in res] == [r["lr"] for r in ref]


def test_nan_steps_are_skipped_and_counted_then_the_run_stops(tmp_path, capsys):
    code, out = toy(tmp_path, "n", nan_at=[4])
    assert code == 0
    log = rows(out / "log.csv")
    assert int(log[-1]["skipped"]) == 1 and int(log[3]["skipped"]) == 0 and int(log[4]["skipped"]) == 1
    code, out = toy(tmp_path, "d", "--max-bad-steps", "3", "--checkpoint-every", "2", nan_at=list(range(5, 30)))
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not finite for 3 steps in a row (steps 6-8)" in err[0]
    assert "last good checkpoint is" in err[0] and "step_00000004" in err[0]


def test_grad_accumulation_matches_the_larger_batch(tmp_path):
    from safetensors.torch import load_file
    assert toy(tmp_path, "big", batch_size=16, epochs=2)[0] == 0
    assert toy(tmp_path, "acc", "--accum-steps", "2", batch_size=8, epochs=2)[0] == 0
    a = load_file(str(tmp_path / "big/checkpoint.safetensors"))
    b = load_file(str(tmp_path / "acc/checkpoint.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert rows(tmp_path / "big/log.csv")[-1]["step"] == rows(tmp_path / "acc/log.csv")[-1]["step"] == "8"


def test_an_existing_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    assert toy(tmp_path, "r")[0] == 0
    capsys.readouterr()
    assert toy(tmp_path, "r")[0] == 2
    err = capsys.readouterr().err
    assert "already holds a finished toy_engine_test run" in err and "--overwrite" in err
    assert "--resume auto with more --epochs" in err  # advice that works (test_run_folder.py runs it)
    assert toy(tmp_path, "r", "--resume", "auto")[0] == 0  # a re-run preemptible job: finished, exit 0
    assert "finished at step 24; nothing to resume" in capsys.readouterr().out
    assert toy(tmp_path, "r", "--overwrite", epochs=1)[0] == 0
    assert len(rows(tmp_path / "r" / "log.csv")) == 8


def test_resume_refuses_changed_settings(tmp_path, capsys):
    assert toy(tmp_path, "c", signal_at=3)[0] == 143
    capsys.readouterr()
    assert toy(tmp_path, "c", "--resume", "auto", "--lr", "0.5", signal_at=3)[0] == 2
    assert "options differ from the checkpoint's (blr: 0.8 -> None, lr: 0.025 -> 0.5)" in capsys.readouterr().err


def test_eval_hook_logs_and_keeps_the_best_weights(tmp_path):
    code, out = toy(tmp_path, "e", "--eval-every", "4", with_eval=True)
    assert code == 0
    ev = rows(out / "eval.csv")
    assert [int(r["step"]) for r in ev] == [4, 8, 12, 16, 20, 24]
    from safetensors import safe_open
    with safe_open(str(out / "best.safetensors"), framework="pt") as f:
        best = json.loads(f.metadata()["best"])["neg_loss"]
    assert best == pytest.approx(max(float(r["neg_loss"]) for r in ev), rel=1e-5)


def test_thread_budget_never_oversubscribes(monkeypatch):
    from dermfast.train import preflight as engine
    from dermfast.train.distributed import World
    monkeypatch.setattr(engine, "available_cores", lambda: 8)
    cfg = ToyConfig()
    for kind in ("torch", "dali-cpu", "dali-gpu", None):
        for world in (World(), World(0, 4, 0, 4)):
            threads, workers, line = engine.thread_budget(cfg, world, kind)
            assert threads >= 1 and threads + workers <= 8 // world.local_world_size, (kind, world)
            assert "threads:" in line and "over the" not in line
    cfg.workers, cfg.threads = 6, 6
    assert "over the 8 cores" in engine.thread_budget(cfg, World(), "torch")[2]


def test_out_of_memory_is_one_line_naming_batch_size_and_remedies(tmp_path, capsys):
    assert toy(tmp_path, "o", oom_at=2)[0] == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of GPU memory" in err[0] and "--batch-size 8 per GPU" in err[0]
    assert "--batch-size 4 --accum-steps 2" in err[0] and "--activation-checkpointing" in err[0]


def test_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    code, out = toy(tmp_path, "tb", epochs=1)
    assert code == 0 and list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.fixture
def tiny_mae_preset():
    """A one-block MAE preset (Inductor's C++ compile dominates on 2 CPU cores: keep the graph small)."""
    from dermfast.models import mae as mae_models
    name = "tiny_compile_test"
    mae_models.register_preset(name)(lambda: mae_models.MAEPreset(
        img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
        decoder_num_heads=2, blr=1e-2))
    yield name
    mae_models._PRESETS.pop(name, None)


def test_compile_mae_matches_eager_losses_without_recompiling(tmp_path, monkeypatch, capsys, tiny_mae_preset):
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    args = ["--stage", "mae", "--preset", tiny_mae_preset, "--max-steps", "3", "--batch-size", "4",
            "--toy-images", "32", "--toy-image-size", "16", "--workers", "0", "--loader", "torch",
            "--augment", "none", "--log-every", "1", "--device", "cpu", "--no-progress", "--warmup-epochs", "0"]
    curves = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        torch._dynamo.reset()
        counters.clear()
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
        with open(tmp_path / name / "log.csv") as f:
            curves[name] = [float(r["loss"]) for r in csv.DictReader(f)]
    out = capsys.readouterr().out
    assert "compile: on" in out
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # step changes, no recompilation
    assert len(curves["eager"]) == 3 and all(np.isfinite(curves["compiled"]))
    np.testing.assert_allclose(curves["compiled"], curves["eager"], rtol=1e-4, atol=1e-5)


def test_loader_thread_defaults_gpu_decoding_gets_most_cores_cpu_unchanged(monkeypatch):
    from dermfast.train import preflight
    from dermfast.train.distributed import World
    assert preflight.loader_threads(16, "dali-gpu") == 12  # the loader's measured need for ~10k img/s
    assert preflight.loader_threads(2, "torch") == 1 and preflight.loader_threads(2, "dali-cpu") == 1
    assert preflight.loader_threads(1, "torch") == 0 and preflight.loader_threads(16, "torch") == 4
    monkeypatch.setattr(preflight, "available_cores", lambda: 16)
    threads, workers, line = preflight.thread_budget(ToyConfig(), World(), "dali-gpu")
    assert (threads, workers) == (4, 12) and "DALI CPU threads 12" in line
    monkeypatch.setattr(preflight, "available_cores", lambda: 2)
    assert preflight.thread_budget(ToyConfig(), World(), "torch")[:2] == (1, 1)
    assert preflight.thread_budget(ToyConfig(), World(), "dali-cpu")[:2] == (1, 1)


def test_every_checkpoint_write_is_followed_by_a_barrier(tmp_path, monkeypatch):
    """Rank 0 writes; the other ranks must wait at a barrier after each write (on an interrupt they would exit
    first and torchrun would kill rank 0 mid-write). Recorded here as: at each barrier, which steps are on disk."""
    from dermfast.train import checkpoint as ckpt
    from dermfast.train import distributed as dist
    out = tmp_path / "barrier"
    seen = []
    monkeypatch.setattr(dist, "barrier", lambda: seen.append(len(ckpt.list_checkpoints(out))))
    code, _ = toy(tmp_path, "barrier", epochs=2, checkpoint_every=3, keep_checkpoints=10)
    assert code == 0
    written = len(ckpt.list_checkpoints(out))
    assert written >= 3
    assert seen[1:] == list(range(1, written + 1))  # the start-up barrier, then one after each write


def test_log_shows_the_base_lr_not_a_layer_decayed_group(tmp_path, monkeypatch):
    from dermfast.train.optim import param_groups as default_groups
    assert toy(tmp_path, "plain")[0] == 0

    def decayed(self, model, cfg):
        return [{**g, "lr_scale": 0.25} for g in default_groups(model, cfg.weight_decay)]

    monkeypatch.setattr(ToyStage, "param_groups", decayed)
    assert toy(tmp_path, "decayed")[0] == 0
    plain, dec = rows(tmp_path / "plain" / "log.csv"), rows(tmp_path / "decayed" / "log.csv")
    assert [r["lr"] for r in dec] == [r["lr"] for r in plain] and float(dec[5]["lr"]) > 0


def test_a_bad_streak_between_two_log_points_still_stops_the_run(tmp_path, capsys):
    # the streak counter resets on the first finite step; the check at the next log point must still see it
    code, out = toy(tmp_path, "between", "--max-bad-steps", "3", log_every=10, nan_at=[3, 4, 5])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not finite for 3 steps in a row (steps 4-6); stopped at step 10" in err[0], err
    assert json.loads((out / "run.json").read_text())["status"] == "diverged"
    # two shorter streaks are no divergence
    assert toy(tmp_path, "two", "--max-bad-steps", "3", log_every=10, nan_at=[2, 3, 6, 7])[0] == 0
