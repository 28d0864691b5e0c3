"""Flags as a new user types them (issue 22): no argparse prefix matching in any dermfast tool (`--epoch 1` is
an unknown flag, never `--epochs 1`), and an unknown flag or YAML key gets one line naming the closest known
option, exit 2, before any data is read."""
from __future__ import annotations

import pytest

from dermfast.train.cli import main as train_main


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_prefix_of_a_flag_is_not_that_flag(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--stage", "mae", "--epoch", "1", "--out", str(out)]) == 2
    msg = one_line(capsys)
    assert "--epoch" in msg and "did you mean --epochs?" in msg
    assert not out.exists()  # refused before anything was written


def test_prefix_of_the_stage_flag_is_not_the_stage_flag(capsys):
    # the pre-parser that finds --stage must not take --stag for it either
    assert train_main(["--stag", "mae"]) == 2
    assert "--stage is required" in one_line(capsys)


def test_unknown_flag_with_equals_and_no_close_match(tmp_path, capsys):
    assert train_main(["--stage", "mae", "--batchsize=8", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean --batch-size?" in one_line(capsys)
    assert train_main(["--stage", "mae", "--zzzzqqq", "--out", str(tmp_path / "r")]) == 2
    msg = one_line(capsys)
    assert "--zzzzqqq" in msg and "did you mean" not in msg


def test_unknown_yaml_key_gets_a_suggestion(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epoch: 1\nbatch-size: 8\n")
    assert train_main(["--stage", "mae", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    msg = one_line(capsys)
    assert "unknown option(s) in config file: epoch (did you mean epochs?)" in msg
    assert not (tmp_path / "r").exists()


def test_build_config_suggests_for_each_unknown_key():
    from dermfast.train.config import ConfigError, TrainConfig, build_config
    with pytest.raises(ConfigError, match=r"epoch \(did you mean epochs\?\), zzzz;"):
        build_config(TrainConfig, {"epoch": 1, "zzzz": 2}, {})


@pytest.mark.parametrize("module,argv,typo,meant", [
    ("evaluate", ["--checkpoint", "run"], "--tt", "--tta"),
    ("export", ["--checkpoint", "run", "--format", "onnx"], "--exporte", "--exporter"),
    ("predict", ["--checkpoint", "run", "--data", "d"], "--tt", "--tta"),
    ("synthesize", ["--checkpoint", "c", "--out", "o", "--per-class", "1"], "--step", "--steps"),
    ("bench", [], "--lis", "--list"),
])
def test_every_tool_refuses_abbreviations_naming_the_flag(capsys, module, argv, typo, meant):
    # under argparse's prefix matching each typo would have been taken as `meant` without a word
    import importlib
    main = importlib.import_module(f"dermfast.{module}").main
    with pytest.raises(SystemExit) as e:
        main([*argv, typo, *(["3"] if typo == "--step" else [])])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: unknown option {typo} (did you mean {meant}?) (see --help)"], err


def test_info_takes_no_flags_and_no_prefixes(capsys):
    from dermfast.info import main as info_main
    with pytest.raises(SystemExit) as e:
        info_main(["--verbose"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        info_main(["--help"])
    assert e.value.code == 0
