"""End to end: `python -m dermfast.train --stage mae` on a small embedded dataset, and its bad-input errors."""
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
    run_cli(tmp_path, "run", "--epochs", "5", "--seed", "1")
    run = tmp_path / "run"
    for name in ("config.yaml", "log.csv", "checkpoint.safetensors", "reconstruction.png", "splits.csv"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["epochs"] == 5 and resolved["seed"] == 1 and resolved["preset"] == "demo"
    curve = losses(run)
    assert len(curve) >= 4
    assert curve[-1] < 0.85 * curve[0], curve  # the loss falls

    from PIL import Image
    with Image.open(run / "reconstruction.png") as im:
        assert im.mode == "RGB" and im.height > 0 and im.width > im.height  # rows of images side by side

    from safetensors import safe_open
    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
        assert "patch_embed.proj.weight" in f.keys() and json.loads(f.metadata()["stage"]) == "mae"
        sampler = json.loads(f.metadata()["sampler"])
        assert sampler["seed"] == 1 and sampler["epoch"] == 4 and sampler["position"] > 0
    assert (run / "data_report.csv").is_file()  # written even when nothing was skipped


@pytest.mark.slow
def test_same_seed_same_run(tmp_path):
    run_cli(tmp_path, "a", "--max-steps", "4", "--seed", "3")
    run_cli(tmp_path, "b", "--max-steps", "4", "--seed", "3")
    run_cli(tmp_path, "c", "--max-steps", "4", "--seed", "4")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "a/checkpoint.safetensors")), load_file(str(tmp_path / "b/checkpoint.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("argv,expected", [
    (["--stage", "pretrain"], "unknown stage 'pretrain'; accepted: mae"),
    (["--stage", "distill"], "'distill' is planned but not implemented yet"),
    (["--stage", "mae", "--preset", "vit_giant"], "unknown preset 'vit_giant'; accepted: demo, vit_b16"),
    (["--stage", "mae", "--data", "/no/such/dir"], "data path '/no/such/dir' does not exist"),
    (["--stage", "mae", "--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
    (["--stage", "mae", "--epochs", "0"], "epochs must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_data_folder_and_bad_config_keys(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--stage", "mae", "--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "holds no images" in err and len(err.strip().splitlines()) == 1
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochz: 3\n")
    assert main(["--stage", "mae", "--config", str(cfg)]) == 2
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
