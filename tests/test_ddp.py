"""Many processes: 2 torchrun ranks (gloo, CPU) of batch b train the same weights as 1 process of batch 2b,
with DDP and with FSDP2 (`--fsdp`, plus `--activation-checkpointing`).

That equality needs every multi-GPU detail right, so this test catches the bugs found in review:
- the sampler's rank left at 0: both ranks train on the same images -> different weights;
- `sample_offset` not passed to the model: both ranks draw the same masks -> different weights;
- a bare `cuda` device: every rank on GPU 0. No GPU here, so `test_each_rank_gets_its_own_gpu` checks with a
  faked CUDA that rank r resolves cuda:r and hands cuda:r to the loader (DALI decodes on that index).
The MAE stage runs with `augment: none` (full image, no flip), so the data is identical however it is split.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

BASE = {"toy_images": 64, "toy_image_size": 64, "epochs": 1, "max_steps": 3, "log_every": 1, "workers": 0,
        "loader": "torch", "augment": "none", "seed": 3, "warmup_epochs": 0.0, "blr": 0.05}


def _run(tmp: Path, name: str, nproc: int, batch: int, *extra: str) -> Path:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "batch_size": batch}))
    train = ["-m", "dermfast.train", "--stage", "mae", "--config", str(cfg), "--out", str(tmp / name),
             "--no-progress", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *train]
    else:
        cmd = [sys.executable, *train]
    env = {**os.environ, "DERMFAST_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    (tmp / name / "stdout.txt").write_text(r.stdout)
    return tmp / name


@pytest.mark.slow
def test_two_ranks_of_batch_b_equal_one_rank_of_batch_2b_ddp_and_fsdp(tmp_path):
    from safetensors.torch import load_file
    one = _run(tmp_path, "one", 1, 8)
    two = _run(tmp_path, "two", 2, 4)
    sharded = _run(tmp_path, "fsdp", 2, 4, "--fsdp", "--activation-checkpointing")
    a, b = load_file(str(one / "checkpoint.safetensors")), load_file(str(two / "checkpoint.safetensors"))
    c = load_file(str(sharded / "checkpoint.safetensors"))  # FSDP2 gathers the full state dict on rank 0
    assert a.keys() == b.keys() == c.keys()
    # Correct: max |diff| ~4e-5 (reduction order, amplified by Adam's normalised step; lr 1.6e-3). Either bug
    # (rank left at 0, or sample_offset 0) gives ~6e-3 on 15-25 % of the weights.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=2e-4, msg=lambda m: f"DDP {k}: {m}")
        torch.testing.assert_close(c[k], a[k], rtol=1e-3, atol=2e-4, msg=lambda m: f"FSDP {k}: {m}")
    # rank 0 alone wrote the run folder, and printed the global batch and the lr rule
    import csv
    losses = [[float(r["loss"]) for r in csv.DictReader(open(d / "log.csv"))] for d in (one, two)]
    assert len(losses[1]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)  # the global mean loss
    assert losses[0][-1] < losses[0][0]  # it trained
    out = (two / "stdout.txt").read_text()
    assert out.count("batch: 4 per rank x 1 accum x 2 rank(s) = 8 global; lr 0.00156 = blr 0.05 x 8 / 256") == 1
    assert out.count(" done in ") == 1  # rank 0 alone prints
    cfg = yaml.safe_load((two / "config.yaml").read_text())
    assert cfg["lr"] == pytest.approx(0.05 * 8 / 256)  # blr * global batch / 256, global batch = 2 x 4


def test_global_batch_sharding_gives_each_rank_its_block():
    from dermfast.train.sharding import GlobalBatchSampler
    labels = np.arange(50) % 3
    single = GlobalBatchSampler(labels, per_rank_batch=8, seed=1)
    ranks = [GlobalBatchSampler(labels, per_rank_batch=4, seed=1, rank=r, world_size=2) for r in range(2)]
    s = single.rank_indices(0)
    r0, r1 = ranks[0].rank_indices(0), ranks[1].rank_indices(0)
    assert len(r0) == len(r1) == 25
    for k in range(len(s) // 8):  # global batch k == rank 0's batch k followed by rank 1's batch k
        assert list(s[8 * k:8 * k + 8]) == list(r0[4 * k:4 * k + 4]) + list(r1[4 * k:4 * k + 4])
    assert set(r0) | set(r1) == set(range(50))
    assert list(r0) == list(iter(ranks[0]))


def test_each_rank_gets_its_own_gpu(monkeypatch):
    from dermfast.train import distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for rank in (0, 1):
        world = distributed.World(rank, 2, rank, 2)
        for name in ("auto", "cuda"):
            assert distributed.resolve_device(name, world) == torch.device("cuda", rank)
        with pytest.raises(ValueError, match="must use cuda:1"):
            distributed.resolve_device("cuda:0", distributed.World(1, 2, 1, 2))
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.world_from_env(env) == distributed.World(1, 2, 1, 2)

    # The engine's loader helper hands the loader cuda:LOCAL_RANK; the DALI loader decodes on that index.
    from dermfast.data import loader as loader_mod
    from dermfast.train.context import Run
    from dermfast.train.mae import MAEConfig
    seen = {}

    class FakeDali:
        def __init__(self, *a, **kw):
            seen.update(kw)
            self.backend = "dali-gpu"

    import dermfast.data.dali_loader as dali_mod
    monkeypatch.setattr(dali_mod, "DaliLoader", FakeDali)
    monkeypatch.setattr(loader_mod, "resolve_loader", lambda name, device: "dali-gpu")
    world = distributed.World(1, 2, 1, 2)
    run = Run(MAEConfig(loader="dali-gpu"), Path("."), distributed.resolve_device("auto", world), world, 1, 1, False)
    run.train_loader(records=[], aug=None)
    assert seen["device_id"] == 1
