"""End to end: `python -m dermfast.train --stage mae` on a small embedded dataset, and its bad-input errors.
Same seed, same run: tests/test_resume.py (the killed run replays the reference run's losses exactly)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dermfast.train.cli import main

SMALL = {"toy_images": 192, "toy_image_size": 64, "batch_size": 32, "log_every": 2, "workers": 0,
         "loader": "torch"}


def run_cli(tmp_path: Path, out: str, *flags: str, **overrides) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"{out}.yaml"
    cfg.write_text(yaml.safe_dump({**SMALL, **overrides}))
    env = {**os.environ, "DERMFAST_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "dermfast.train", "--stage", "mae", "--config", str(cfg),
           "--out", str(tmp_path / out), "--no-progress", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_mae_run_learns_and_writes_every_artefact(tmp_path):
    r = run_cli(tmp_path, "run", "--epochs", "4", "--seed", "1")
    run = tmp_path / "run"
    names = ("config.yaml", "run.json", "log.csv", "checkpoint.safetensors", "reconstruction.png", "splits.csv",
             "data_report.csv", "plots.png")
    last = r.stdout.strip().splitlines()[-1]
    for name in names:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
        assert name in last, (name, last)  # the final line lists every file written
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["epochs"] == 4 and resolved["seed"] == 1 and resolved["preset"] == "demo"
    assert resolved["lr"] == pytest.approx(5e-3 * 32 / 256) and resolved["mask_ratio"] == 0.75
    assert resolved["img_size"] == 64  # derived values are written, not null
    curve = losses(run)
    assert len(curve) >= 4
    assert curve[-1] < 0.85 * curve[0], curve  # the loss falls

    from PIL import Image
    with Image.open(run / "reconstruction.png") as im:
        assert im.mode == "RGB" and im.height > 0 and im.width > im.height  # rows of images side by side

    from safetensors import safe_open
    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        assert "patch_embed.proj.weight" in f.keys() and meta["stage"] == "mae"
        assert meta["preset"]["img_size"] == 64 and meta["config"]["seed"] == 1 and meta["step"] == len(curve) * 2
    state = json.loads(next((run / "checkpoints").iterdir()).joinpath("state.json").read_text())
    assert state["finished"] and state["config"]["seed"] == 1


@pytest.mark.parametrize("argv,expected", [
    (["--stage", "pretrain"], "unknown stage 'pretrain'; accepted: "),
    (["--stage", "export"], "'export' is not a training stage: run `python -m dermfast.export`"),
    (["--stage", "mae", "--preset", "vit_giant"], "unknown preset 'vit_giant'; accepted: demo, vit_b16"),
    (["--stage", "mae", "--data", "/no/such/dir"], "data path '/no/such/dir' does not exist"),
    (["--stage", "mae", "--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
    (["--stage", "mae", "--epochs", "0"], "epochs must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, expected, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_data_folder_and_bad_config_keys(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--stage", "mae", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "holds no images" in err and len(err.strip().splitlines()) == 1
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochz: 3\n")
    assert main(["--stage", "mae", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "unknown option(s) in config file: epochz" in capsys.readouterr().err


@pytest.mark.parametrize("yaml_text,expected", [
    ("epochs: ten\n", "option epochs must be int, got 'ten'"),
    ("neg_keep: -1\n", "neg-keep must be >= 0"),
    ("balance: most\n", "balance must be one of: none, equal"),
    ("loader: pil\n", "option loader must be one of: auto, dali"),
    ("device: tpu\n", "bad --device 'tpu'"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, capsys, yaml_text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    data = tmp_path / "d"
    (data / "a").mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 120, 90)).save(data / "a" / "x.jpg")
    assert main(["--stage", "mae", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
