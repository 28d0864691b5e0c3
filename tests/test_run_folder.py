"""Run folders under real use (issues 16 and 22): one run per folder (an OS lock), `--resume auto` as a
preemptible job uses it (no checkpoint yet: start afresh; finished: exit 0), a killed run is called interrupted,
and a finished run is trained longer with more --epochs and --resume auto. The toy stage of test_engine.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_engine import rows, toy


def test_resume_auto_without_a_checkpoint_starts_afresh(tmp_path, capsys):
    code, out = toy(tmp_path, "fresh", "--resume", "auto")
    assert code == 0
    assert "no checkpoint in" in capsys.readouterr().out and len(rows(out / "log.csv")) == 24


def test_killed_before_the_first_checkpoint_then_resume_auto(tmp_path, capsys):
    # what SIGKILL before the first checkpoint leaves: run.json "running", config and a partial log
    out = tmp_path / "k"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"stage": "toy_engine_test", "status": "running", "step": 0}))
    (out / "config.yaml").write_text("epochs: 3\n")
    (out / "log.csv").write_text("epoch,step,loss\n0,1,9.9\n")
    assert toy(tmp_path, "k")[0] == 2
    err = capsys.readouterr().err
    assert "interrupted (killed) toy_engine_test run" in err and "--resume auto" in err
    assert toy(tmp_path, "k", "--resume", "auto")[0] == 0
    log = rows(out / "log.csv")
    assert [int(r["step"]) for r in log] == list(range(1, 25)) and log[0]["loss"] != "9.9"
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_explicit_resume_path_stays_strict(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert toy(tmp_path, "s", "--resume", str(tmp_path / "empty"))[0] == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_finished_run_resume_auto_exits_0_and_more_epochs_extend_it(tmp_path, capsys):
    assert toy(tmp_path, "x")[0] == 0
    ckpt = tmp_path / "x" / "checkpoint.safetensors"
    before = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    assert toy(tmp_path, "x", "--resume", "auto")[0] == 0
    assert "nothing to resume" in capsys.readouterr().out and ckpt.stat().st_mtime_ns == before
    # longer: 5 epochs instead of 3, from the last checkpoint, the schedule change printed
    assert toy(tmp_path, "x", "--resume", "auto", epochs=5)[0] == 0
    assert "the schedule changes from 24 to 40 steps" in capsys.readouterr().out
    log = rows(tmp_path / "x" / "log.csv")
    assert [int(r["step"]) for r in log] == list(range(1, 41))
    assert json.loads((tmp_path / "x" / "run.json").read_text())["status"] == "finished"
    # an explicit checkpoint path of a finished run stays strict, and says what works
    last = sorted((tmp_path / "x" / "checkpoints").iterdir())[-1]
    assert toy(tmp_path, "x", "--resume", str(last), epochs=5)[0] == 2
    assert "--resume auto and more --epochs" in capsys.readouterr().err


HOLDER = """
import sys, time
from dermfast.train.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_folder_held_by_a_live_run_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for flags in ((), ("--resume", "auto"), ("--overwrite",)):
            assert toy(tmp_path, "busy", *flags)[0] == 2
            err = capsys.readouterr().err
            assert f"pid {holder.pid} on " in err and "in use by a running run" in err
            assert "--resume" not in err and "--overwrite" not in err  # no advice that would clash
        assert not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the lock with the process: no stale lock
    assert toy(tmp_path, "busy")[0] == 0


def test_the_lock_is_released_after_a_run_in_process(tmp_path):
    from dermfast.train.runlock import RunLock
    assert toy(tmp_path, "rel")[0] == 0
    RunLock(tmp_path / "rel").acquire().release()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX")
def test_two_runs_started_together_one_wins(tmp_path):
    driver = tmp_path / "d.py"
    driver.write_text(
        "import sys; sys.path.insert(0, %r)\n" % str(Path(__file__).parents[1])
        + "from tests.test_engine import toy\nfrom pathlib import Path\n"
        "sys.exit(toy(Path(sys.argv[1]), 'same')[0])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(driver), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes in ([0, 2], [0, 0]), results  # [0, 0]: the second started after the first had finished
    if codes == [0, 2]:
        assert any("in use by a running run" in e for _, e in results)
    log = (tmp_path / "same" / "log.csv").read_text().splitlines()
    assert sum(line.startswith("epoch,") for line in log) == 1 and len(log) == 25


def test_resume_auto_never_wipes_a_finished_run_without_step_checkpoints(tmp_path, capsys):
    import shutil
    assert toy(tmp_path, "pruned")[0] == 0
    out = tmp_path / "pruned"
    shutil.rmtree(out / "checkpoints")  # a user saving space keeps only the final weights
    before = (out / "checkpoint.safetensors").read_bytes()
    capsys.readouterr()
    assert toy(tmp_path, "pruned", "--resume", "auto")[0] == 0
    assert "cannot be trained longer; nothing to resume" in capsys.readouterr().out
    assert (out / "checkpoint.safetensors").read_bytes() == before and len(rows(out / "log.csv")) == 24


def test_resume_auto_refuses_a_folder_of_another_stage(tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"stage": "mae", "status": "interrupted", "step": 3}))
    assert toy(tmp_path, "other", "--resume", "auto")[0] == 2
    assert "holds a mae run, not a toy_engine_test run" in capsys.readouterr().err
    assert (out / "run.json").is_file()


def test_a_checkpoint_older_than_an_option_resumes_with_its_default(tmp_path):
    # an option added after the checkpoint was written (here clip_grad, as init_partial / ss_ratio were) was at
    # its default then: that is no change of settings
    assert toy(tmp_path, "old", signal_at=5)[0] == 143
    for state in (tmp_path / "old" / "checkpoints").glob("step_*/state.json"):
        data = json.loads(state.read_text())
        del data["config"]["clip_grad"]
        state.write_text(json.dumps(data))
    assert toy(tmp_path, "old", "--resume", "auto", signal_at=5)[0] == 0
