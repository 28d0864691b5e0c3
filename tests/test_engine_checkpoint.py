"""checkpoint.write_checkpoint: durable (fsync of files and folders) and never leaves a step_* folder that
--resume auto would pick but cannot load, even when killed while replacing a checkpoint of the same step."""
import os
import shutil
import stat

import pytest
import torch

from dermfast.train import checkpoint as ckpt

FILES = ("model.safetensors", "state.json")


def _write(root, step, value):
    return ckpt.write_checkpoint(root, step, {"model.safetensors": ({"w": torch.full((3,), float(value))}, None),
                                              "optimizer.safetensors": ({}, None)}, {"step": step, "v": value},
                                 keep=3)


def test_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    _write(tmp_path, 1, 1.0)
    assert synced.count("file") >= len(FILES)  # every file before its rename
    assert synced.count("dir") >= 2  # the checkpoint folder before the rename, checkpoints/ after it


def test_kill_while_replacing_the_same_step_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    _write(tmp_path, 1, 1.0)
    _write(tmp_path, 2, 2.0)
    real = shutil.rmtree

    def killed_mid_delete(path, *a, **k):  # deletes the weights of that folder, then the process dies
        if "step_00000002" in str(path):
            os.unlink(os.path.join(path, "model.safetensors"))
            raise SystemExit("killed")
        return real(path, *a, **k)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(SystemExit):
        _write(tmp_path, 2, 3.0)  # the same step again (epoch end == --checkpoint-every)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    for p in ckpt.list_checkpoints(tmp_path):
        assert all((p / f).is_file() for f in FILES), f"{p} is listed but incomplete"
    latest = ckpt.find_resume("auto", tmp_path)
    tensors, state = ckpt.read_checkpoint(latest)
    assert tensors["model"]["w"].tolist() == [state["v"]] * 3
    _write(tmp_path, 3, 4.0)  # the next write clears what the kill left behind
    assert not list((tmp_path / "checkpoints").glob(".step_*"))


def test_an_empty_optimizer_state_reads_back(tmp_path):
    """Before any optimiser step (every step so far skipped) the optimiser has no tensors to save."""
    tensors, state = ckpt.read_checkpoint(_write(tmp_path, 1, 1.0))
    assert tensors.get("optimizer", {}) == {} and state["v"] == 1.0
