"""Two ranks under torchrun (gloo, CPU): SIGTERM on every rank finishes the step, rank 0 checkpoints while the
other waits at the barrier, both exit 143, and `--resume auto` continues to the same loss curve as an
uninterrupted two-rank run. The toy stage is the one of tests/test_engine.py."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DRIVER = """
import os, sys, time, yaml
sys.path.insert(0, {tests!r})
import test_engine  # registers toy_engine_test
from dermfast.train.cli import main
out, extra = sys.argv[1], sys.argv[2:]
conf = out + ".yaml"
if os.environ["RANK"] == "0" and not os.path.exists(conf):
    cfg = {{"epochs": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 4}}
    if os.environ.get("TOY_SIGNAL_AT"):
        cfg["signal_at"] = int(os.environ["TOY_SIGNAL_AT"])
    open(conf + ".tmp", "w").write(yaml.safe_dump(cfg)); os.replace(conf + ".tmp", conf)
while not os.path.exists(conf):
    time.sleep(0.05)
sys.exit(main(["--stage", "toy_engine_test", "--config", conf, "--out", out, "--no-progress", "--device", "cpu",
               *extra]))
"""


def _torchrun(tmp_path: Path, out: str, port: int, *extra: str, signal_at: int | None = None) -> int:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TOY_SIGNAL_AT", None)
    if signal_at is not None:
        env["TOY_SIGNAL_AT"] = str(signal_at)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(driver), str(tmp_path / out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300).returncode


def _losses(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [r["loss"] for r in csv.DictReader(f)]


def test_two_ranks_interrupt_checkpoint_and_resume_exactly(tmp_path):
    assert _torchrun(tmp_path, "ref", 29611) == 0
    assert _torchrun(tmp_path, "cut", 29612, signal_at=6) != 0  # torchrun reports the ranks' 143
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts[-1] == "step_00000007"  # finished step 7 (0-based 6), then checkpointed
    assert _torchrun(tmp_path, "cut", 29613, "--resume", "auto", signal_at=6) == 0
    ref, res = _losses(tmp_path / "ref" / "log.csv"), _losses(tmp_path / "cut" / "log.csv")
    assert len(ref) == 32 and res == ref
