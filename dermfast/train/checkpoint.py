"""Checkpoints: safetensors for every tensor, JSON for everything else; nothing is ever unpickled.

    RUN/checkpoints/step_00000120/
        model.safetensors      the full model state dict (unsharded, unwrapped names)
        optimizer.safetensors  optimiser state flattened: "<param name>/<key>" (exp_avg, exp_avg_sq, step, ...)
        extra.safetensors      RNG states of every rank ("rng/<rank>/torch", "rng/<rank>/cuda") and the stage's
                               extra tensors ("stage/<name>")
        state.json             step, epoch, counters, optimiser param groups, loader / sampler state of every
                               rank, numpy and Python RNG states, the resolved config, the stage's extra JSON
    RUN/checkpoint.safetensors the final weights (+ JSON metadata) that later stages load by name

A checkpoint folder is written under a temporary name in the same directory and renamed into place, so a
folder named step_* is always complete (a kill -9 mid-write leaves only a .tmp folder, removed next time).
Every file and the folders are fsynced before and after the rename, so a power loss cannot leave a step_*
folder of empty files either; a step written again replaces the old folder by renames, never by deleting it
in place (a kill mid-delete would leave a step_* folder with state.json but no weights for --resume auto).
Files get the mode the run's other files get (0666 & ~umask), not the 0600 of a temporary file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def file_mode() -> int:
    old = os.umask(0)
    os.umask(old)
    return 0o666 & ~old


def _chmod_tree(root: Path) -> None:
    mode = file_mode()
    dir_mode = mode | ((mode & 0o444) >> 2)  # r -> x for directories
    os.chmod(root, dir_mode)
    for p in root.iterdir():
        os.chmod(p, mode)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries: a rename in it) by path."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Atomically (temp name + fsync + rename + fsync of the folder) write JSON with the run's file mode."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
    os.chmod(tmp, file_mode())
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Atomically write tensors (made contiguous, moved to CPU) with JSON-encoded metadata values."""
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    save_file(flat, str(tmp), metadata=meta)
    os.chmod(tmp, file_mode())
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_safetensors_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


# --------------------------------------------------------------------------- optimiser state <-> flat tensors
def flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """{"state": {name: {key: tensor | number}}, "param_groups": [...]} -> (tensors, JSON part)."""
    tensors, scalars = {}, {}
    for name, st in osd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}/{key}"] = v
            else:
                scalars[f"{name}/{key}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------- the folder
def step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete step checkpoints in RUN/checkpoints, oldest first."""
    d = root / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)) and
             (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def write_checkpoint(root: Path, step: int, files: dict[str, tuple[dict, dict | None]], state: dict,
                     keep: int) -> Path:
    """files: {"model.safetensors": (tensors, metadata)}; state -> state.json. Then prune to `keep` (the
    newest, plus any marked final)."""
    final = step_dir(root, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(".step_*.tmp-*"):  # left by a kill mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, (tensors, meta) in files.items():
        if not tensors and not meta:  # e.g. no optimiser state yet (every step skipped): safetensors cannot
            continue  # read back a file with no tensors and no metadata; read_checkpoint treats it as {}
        save_safetensors(tmp / name, tensors, meta)
    write_json(tmp / "state.json", state)
    _chmod_tree(tmp)
    fsync_path(tmp)
    old = None
    if final.exists():  # the same step written again (e.g. epoch end == --checkpoint-every): move it aside
        old = final.parent / f".{final.name}.tmp-old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    ckpts = list_checkpoints(root)
    for p in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def find_resume(resume: str, out: Path) -> Path:
    """--resume PATH | auto -> a complete checkpoint folder. PATH may be the folder, a file in it, or a run
    folder (its latest checkpoint). Raises FileNotFoundError with a one-line reason."""
    if resume == "auto":
        ckpts = list_checkpoints(out)
        if not ckpts:
            raise FileNotFoundError(f"--resume auto: no checkpoint in {out}/checkpoints (a run writes one every "
                                    "--checkpoint-every steps and at each epoch end)")
        return ckpts[-1]
    p = Path(resume).expanduser()
    if p.is_file():
        p = p.parent
    if (p / "state.json").is_file():
        return p
    ckpts = list_checkpoints(p)
    if ckpts:
        return ckpts[-1]
    raise FileNotFoundError(f"--resume {resume!r}: not a checkpoint folder (state.json + safetensors) or a run "
                            "folder holding checkpoints/")


def read_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({file stem: tensors}, state.json) of a checkpoint folder (safetensors only, no pickle)."""
    from safetensors.torch import load_file
    state = json.loads((path / "state.json").read_text())
    tensors = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    return tensors, state
