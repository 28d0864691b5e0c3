"""`python -m dermfast.pipeline`: the whole chain on tiny settings, a finished rerun doing nothing, a stage killed
(SIGKILL) in the middle and continued by the same command, a bad --set refused before anything runs.

(tests/test_pipeline.py is about the data pipeline, dermfast.data.pipeline.)
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")

from dermfast.pipeline import main as pipeline_main  # noqa: E402

# every stage a few steps on a 112-image embedded dataset of 32 px images
TINY = ["all.toy_images=112", "all.toy_image_size=32", "all.workers=0", "all.threads=1", "all.batch_size=16",
        "all.log_every=1", "all.max_steps=2",
        "synth.vae_steps=1", "synth.max_steps=3", "synth.img_size=16", "synth.sample_steps=2",
        "synth_set.per_class=2", "synth_set.steps=2",
        "mae.img_size=32", "finetune.img_size=32", "distill.img_size=32", "distill.student=test_vit",
        "eval.bootstrap=20", "eval.explain=0"]


def sets(items):
    return [a for s in items for a in ("--set", s)]


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet (or being replaced)
        return {}


def progress(text):
    """{stage: its last progress word} from the pipeline's own lines."""
    out = {}
    for m in re.finditer(r"^pipeline: \[\d+/\d+\] (\w+): (.+)$", text, re.M):
        out[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("bad, says", [
    ("mae.epoch=3", "unknown option 'epoch' (did you mean epochs?)"),
    ("mea.epochs=3", "unknown stage 'mea' (did you mean mae?)"),
    ("mae.epochs=many", "option epochs must be int, got 'many'"),
    ("finetune.select=f1", "option select must be one of"),
    ("synth_set.stps=3", "unknown option 'stps' (did you mean steps?)"),
    ("export.format=tflite", "export.format must be one of: onnx, torchscript"),
    ("eval.bootstrap=x", "bad value 'x'"),
    ("mae.out=elsewhere", "out is set by the pipeline"),
    ("distill.teacher=x", "teacher is set by the pipeline"),
    ("mae.epochs", "expected GROUP.KEY=VALUE"),
    ("all.preset=demo", "synth has none of that name"),
    ("synth_set.balance_to=.", "argument --balance-to: not allowed with argument --per-class"),
])
def test_bad_set_refused_before_anything_runs(bad, says, tmp_path, capsys):
    out = tmp_path / "pipe"
    # a good --set of a later stage beside the bad one: nothing runs, not even the stages before the bad one
    assert pipeline_main(["--out", str(out), "--set", "synth.max_steps=1", "--set", bad]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_stage_and_ablation_names_refused(tmp_path, capsys):
    out = tmp_path / "pipe"
    assert pipeline_main(["--out", str(out), "--ablate", "synthetc"]) == 2
    assert "unknown ablation 'synthetc' (did you mean synthetic?)" in capsys.readouterr().err
    assert pipeline_main(["--out", str(out), "--stages", "finetune_nomae"]) == 2  # only with --ablate mae
    assert "unknown stage 'finetune_nomae'" in capsys.readouterr().err
    assert pipeline_main(["--out", str(out), "--stages", "finetune"]) == 2  # its MAE run is neither there nor run
    assert "stage finetune needs mae" in capsys.readouterr().err
    assert pipeline_main(["--out", str(out), "--stages", "synth", "--set", "export.format=tflite"]) == 2
    assert "export.format must be one of" in capsys.readouterr().err  # every stage's options, run or not
    assert pipeline_main(["--out", str(out), "--recipe", "paper"]) == 2
    assert "--recipe paper needs --data" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_whole_pipeline_then_rerun_does_nothing(cache, tmp_path, capsys):
    out = tmp_path / "pipe"
    argv = ["--out", str(out), "--ablate", "synthetic,mae", *sets(TINY)]
    assert pipeline_main(argv) == 0
    printed = capsys.readouterr().out
    names = ["synth", "synth_set", "mae", "finetune", "distill", "eval_teacher", "eval_student", "export",
             "mae_nosynth", "finetune_nosynth", "eval_nosynth", "finetune_nomae", "eval_nomae"]
    assert list(progress(printed)) == names
    assert all(re.fullmatch(r"done in \d+ s", w) for w in progress(printed).values()), printed
    assert printed.index("synth: starting") < printed.index("synth: done") < printed.index("synth_set: starting")

    # the chain: each stage read the previous stage's output
    cfg = {n: (out / n / "config.yaml").read_text() for n in ("mae", "finetune", "distill", "mae_nosynth",
                                                               "finetune_nosynth", "finetune_nomae")}
    assert f"synthetic: {out / 'synth_set'}" in cfg["mae"] and "synthetic: null" in cfg["mae_nosynth"]
    assert f"init: {out / 'mae'}" in cfg["finetune"] and f"init: {out / 'mae_nosynth'}" in cfg["finetune_nosynth"]
    assert "init: null" in cfg["finetune_nomae"] and f"teacher: {out / 'finetune'}" in cfg["distill"]
    for n in ("mae", "finetune", "distill", "finetune_nomae"):  # --set all.max_steps=2 reached every stage
        assert json.loads((out / n / "run.json").read_text())["step"] == 2
    # equal steps: the from-scratch ablation has the teacher's settings but --init
    def strip(text):
        return sorted(line for line in text.splitlines() if not line.startswith(("init:", "out:", "preset:")))
    assert strip(cfg["finetune"]) == strip(cfg["finetune_nomae"])
    manifest = (out / "synth_set" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 2 * 7  # per_class 2, seven classes
    side = json.loads((out / "export" / "model.json").read_text())
    assert side["arch"] == "test_vit" and side["cpu_latency_ms_per_image"]["1"] > 0

    report = (out / "report.html").read_text()
    for n in ("eval_teacher", "eval_student", "eval_nosynth", "eval_nomae"):
        m = json.loads((out / n / "metrics.json").read_text())
        row = re.search(rf"<tr><td>{n}</td>.*?</tr>", report).group(0)
        assert f"{m['balanced_accuracy']:.3f}" in row and f"{m['auroc']:.3f}" in row and f"{m['ece']:.3f}" in row
        lo, hi = m["ci"]["auroc"]
        assert f"[{lo:.3f}, {hi:.3f}]" in row
        assert f"href='{n}/report.html'" in row and (out / n / "report.html").is_file()
    from safetensors import safe_open
    with safe_open(str(out / "distill" / "checkpoint.safetensors"), framework="pt") as f:
        n_student = sum(f.get_tensor(k).numel() for k in f.keys())
    assert f"{n_student / 1e6:.2f} M" in re.search(r"<tr><td>eval_student</td>.*?</tr>", report).group(0)
    assert f"{side['cpu_latency_ms_per_image']['1']:.2f} ms at batch 1" in report
    assert "src='synth_set/grid.png'" in report and "src='mae/plots.png'" in report
    assert "<td>chance</td>" in report

    # rerun: every stage skipped, nothing rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in ("report.html", ".lock")
              and p.parent.name != "pipeline" and p.name != "pipeline.json"}
    assert pipeline_main(argv) == 0
    again = progress(capsys.readouterr().out)
    assert list(again) == names and set(again.values()) == {"skipped (finished)"}
    changed = [str(p) for p, t in stamps.items() if not p.exists() or p.stat().st_mtime_ns != t]
    assert changed == []


@pytest.mark.slow
def test_killed_stage_continues_on_rerun(cache, tmp_path):
    """SIGKILL the pipeline while a training stage runs (after its first step checkpoint), rerun the same command:
    that stage resumes from its checkpoint (not from step 0) and finishes its schedule."""
    out = tmp_path / "pipe"
    cmd = [sys.executable, "-m", "dermfast.pipeline", "--out", str(out), "--ablate", "mae", "--stages",
           "finetune_nomae,eval_nomae", *sets([*TINY, "all.max_steps=40", "finetune.checkpoint_every=1",
                                                "finetune.epochs=20",
                                                "finetune.keep_checkpoints=50"])]
    env = {**os.environ, "DERMFAST_CACHE": str(cache)}
    run = out / "finetune_nomae"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and "checkpoint" not in read_json(run / "run.json"):  # a step checkpoint is done
            assert time.monotonic() < deadline, "no step checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "running" and 1 <= info["step"] < 40, info  # killed mid-run, no clean exit
    assert not (out / "eval_nomae").exists()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = progress(done.stdout)
    assert lines["finetune_nomae"].startswith("done in")
    assert re.search(r"finetune_nomae: resumed \(running at step \d+\)", done.stdout)
    m = re.search(r"resumed from \S+step_0*(\d+) at step (\d+)", done.stdout)
    assert m and int(m.group(2)) >= 1, done.stdout[-3000:]  # continued, not restarted from step 0
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 40
    assert (out / "eval_nomae" / "metrics.json").is_file() and (out / "report.html").is_file()
