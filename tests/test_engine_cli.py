"""The command line as a new user meets it: one-line errors (exit 2) checked before any data is read, nothing
left behind by a failed start, per-stage --help generated from the config dataclass, Ctrl-C exit code."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from dermfast.train.cli import main


def one_line_error(capsys, code: int = 2) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def dataset(tmp_path) -> Path:
    from PIL import Image
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (40 * i, 100, 90)).save(root / c / f"{i}.jpg")
    return root


def test_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["--stage", "mae", "--out", str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)


def test_out_without_write_permission(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == locked else real(p, m))  # root ignores chmod
    assert main(["--stage", "mae", "--out", str(locked / "run")]) == 2
    assert "cannot write in" in one_line_error(capsys) and not (locked / "run").exists()


def test_img_size_is_checked_before_the_data_is_read(tmp_path, capsys, dataset):
    out = tmp_path / "run"
    assert main(["--stage", "mae", "--img-size", "50", "--data", str(dataset), "--out", str(out)]) == 2
    msg = one_line_error(capsys)
    assert "--img-size 50 is not a multiple of preset demo's patch size 8; try one of 32, 40" in msg
    assert not out.exists()  # no run folder, no data_report.csv: validation came first


def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    assert main(["--stage", "mae", "--data", str(tmp_path / "empty"), "--out", str(out), "--no-progress"]) == 2
    assert "holds no images" in one_line_error(capsys)
    assert not out.exists()


def test_data_naming_a_file_speaks_of_the_cli(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["--stage", "mae", "--data", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "r")]) == 2
    msg = one_line_error(capsys)
    assert "--data" in msg and "format=" not in msg and "give the dataset's folder" in msg


def test_invalid_yaml_names_line_and_column(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\nbatch_size: [8\n")
    assert main(["--stage", "mae", "--config", str(cfg)]) == 2
    assert "is not valid YAML at line 3, column 1" in one_line_error(capsys)


@pytest.mark.parametrize("argv,expected", [
    (["--resume", "auto", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--epoch", "1"], "unknown option --epoch (did you mean --epochs?)"),  # no prefix matching (issue 22)
    (["--optimizer", "sgd"], "option optimizer must be one of: auto, adamw, apex; got 'sgd'"),
    (["--betas", "0.9"], "expected 2 arguments"),
    (["--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1), got 1.5"),
    (["--precision", "bf16", "--device", "cpu"], "--precision bf16 needs a CUDA device"),
    (["--synth-ratio", "3"], "--synth-ratio needs --synthetic DIR"),
    (["--lr", "-1"], "--lr must be a positive number"),
])
def test_more_one_line_errors(tmp_path, capsys, argv, expected):
    assert main(["--stage", "mae", "--out", str(tmp_path / "r"), *argv]) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_ctrl_c_before_training_exits_130(tmp_path, capsys, monkeypatch):
    import dermfast.train.engine as engine

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "train", interrupted)
    assert main(["--stage", "mae", "--out", str(tmp_path / "r")]) == 130


def test_stage_help_lists_every_option_with_its_default(capsys):
    from dermfast.train.mae import MAEConfig
    assert main(["--stage", "mae", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(MAEConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    for fragment in ("--weight-decay FLOAT AdamW weight decay", "(default: 0.05)", "--toy-images INT",
                     "--augment {mae,none}", "--betas FLOAT FLOAT AdamW betas (the MAE paper's) (default: 0.9 0.95)",
                     "--progress, --no-progress", "--warmup-epochs FLOAT", "--min-lr", "--log-every"):
        assert fragment in text, fragment


def test_no_stage_lists_the_stages(capsys):
    assert main([]) == 2
    assert "--stage is required; accepted: " in one_line_error(capsys)
    assert main(["--help"]) == 0
    assert "mae: masked-autoencoder pretraining" in " ".join(capsys.readouterr().out.split())


@dataclass
class _Every:
    n: int = 1                        # an int
    x: float | None = None            # maybe a float
    mode: Literal["a", "b"] = "a"     # a choice
    sizes: list[int] = field(default_factory=lambda: [1, 2])  # a list
    pair: tuple[float, float] = (0.5, 0.25)  # a pair
    flag: bool = False                # a switch
    extra: dict[str, Any] = field(default_factory=dict)  # a mapping


def test_generated_options_handle_every_field_type():
    import argparse
    from dermfast.train.cliargs import add_config_arguments, parsed_values
    from dermfast.train.config import ConfigError, build_config
    p = argparse.ArgumentParser()
    add_config_arguments(p, _Every)
    ns = p.parse_args(["--n", "3", "--x", "none", "--mode", "b", "--sizes", "4", "5", "6", "--pair", "1", "2",
                       "--flag", "--extra", "{k: 1}"])
    cfg = build_config(_Every, {"x": 2.0}, parsed_values(ns, _Every))
    assert cfg == _Every(n=3, x=None, mode="b", sizes=[4, 5, 6], pair=(1.0, 2.0), flag=True, extra={"k": 1})
    assert build_config(_Every, {"sizes": [7], "mode": "b"}, {}) == _Every(sizes=[7], mode="b")
    for bad, msg in (({"mode": "c"}, "must be one of: a, b"), ({"sizes": ["x"]}, "option sizes must be int"),
                     ({"pair": [1]}, "takes 2 values"), ({"flag": "maybe"}, "true or false")):
        with pytest.raises(ConfigError, match=msg):
            build_config(_Every, bad, {})
