"""Checks and settings decided before any data is read: the thread budget, the run folder (refuse another run,
writability), the resume point (same settings), signal handling, the resume hint. Nothing here writes."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from dermfast.train import checkpoint as ckpt
from dermfast.train.config import ConfigError, config_dict
from dermfast.train.distributed import World

# Options that may differ between a run and its resumption (they change neither the math nor the data; except
# --threads on CPU: see `resume_threads`).
RESUMABLE_CHANGES = {"resume", "overwrite", "progress", "device", "workers", "threads", "checkpoint_every",
                     "epoch_checkpoints", "keep_checkpoints", "log_every", "eval_every", "max_bad_steps", "compile"}
# Options that lengthen (or shorten) a run resumed with --resume auto: the schedule is recomputed (printed).
SCHEDULE_CHANGES = {"epochs", "max_steps"}


class NothingToDo(Exception):
    """--resume auto on a run that already finished its schedule: the CLI prints this and exits 0."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_threads(cores: int, loader_kind: str) -> int:
    """Default loader workers / DALI CPU threads for a process with `cores` cores.

    dali-gpu (a GPU run): DALI gets three quarters of the cores. Its CPU threads still read files, parse JPEG
    headers and feed nvJPEG, while the training process needs only a few threads to launch GPU work; the
    loader measurements needed 12 DALI threads on 16 cores for ~10k img/s (torch keeps the other 4).
    CPU loaders (torch, dali-cpu): a quarter of the cores decode (at least one, at most 8), the rest run the
    model on the CPU; with a single core, the torch loader decodes in the main process (0 workers).
    """
    if loader_kind == "dali-gpu":
        return max(1, cores * 3 // 4) if cores > 1 else 1
    if cores == 1:
        return 0 if loader_kind == "torch" else 1
    return max(1, min(8, cores // 4))


def thread_budget(cfg, world: World, loader_kind: str | None) -> tuple[int, int, str]:
    """(torch intra-op threads, loader workers / DALI threads, the line to print). Cores are split between
    the processes of a node; within a process, torch threads + loader threads <= its cores, because
    oversubscribed cores collapse throughput under contention (a 2-core box fell from 330 to 20 img/s; with
    one busy neighbour, 2 torch threads ran the demo at 15 img/s where 1 torch + 1 DALI thread ran 130)."""
    cores = max(1, available_cores() // max(1, world.local_world_size))
    if loader_kind is None:
        workers = 0
    elif cfg.workers >= 0:
        workers = cfg.workers
    else:
        workers = loader_threads(cores, loader_kind)
    threads = cfg.threads if cfg.threads > 0 else max(1, cores - workers)
    what = {"torch": "DataLoader workers", None: "loader threads"}.get(loader_kind, "DALI CPU threads")
    line = f"threads: {cores} core(s) per process -> torch {threads} + {what} {workers}"
    if threads + workers > cores:
        line += f" (over the {cores} cores: expect contention; lower --threads or --workers)"
    return threads, workers, line


def resume_threads(resume_from: Path | None, threads: int, cfg, device) -> tuple[int, str | None]:
    """(torch intra-op threads, a note or None) for a run resuming from `resume_from`.

    On the CPU the thread count is part of the arithmetic: a reduction or GEMM split over 2 threads adds in
    another order than over 1, so the losses differ in the last ulp, and AdamW turns ulp noise in parameters
    whose true gradient is zero (the key part of qkv.bias) into steps of about lr either way. A resumed process
    whose budget differs (fewer cores visible, another machine) therefore takes the count the checkpoint was
    written with (state.json "threads"); an explicit --threads that differs is obeyed, with a note that the
    resumption is not bit-exact. On CUDA the model's math is on the GPU: the budget stands."""
    if resume_from is None or device.type != "cpu":
        return threads, None
    saved = json.loads((resume_from / "state.json").read_text()).get("threads")
    if saved is None or saved == threads:
        return threads, None
    if cfg.threads > 0:
        return threads, (f"resume: --threads {threads}, the checkpoint was written with {saved} torch threads: "
                         "CPU reductions add in another order, so the resumed run is not bit-exact")
    return saved, (f"resume: torch {saved} threads as in the checkpoint (this budget gives {threads}), so the "
                   "CPU arithmetic of the resumed run is bit-exact")


def _run_info(run_dir: Path) -> dict | None:
    p = run_dir / "run.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {"status": "unreadable"}
    if any((run_dir / n).exists() for n in ("config.yaml", "log.csv", "checkpoint.safetensors")):
        return {"status": "unknown (an earlier dermfast)"}
    return None


def check_out_path(run_dir: Path) -> None:
    """Refuse an --out that is a file or not writable. Writes nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {str(run_dir)!r} is a file, not a folder; give a folder name")
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(run_dir)!r}: cannot write in {str(probe)!r} (permission denied); "
                          "choose a folder you can write to")


def check_out(run_dir: Path, stage: str, resuming: bool, overwrite: bool) -> bool:
    """Refuse an --out that cannot hold this run; returns whether the folder must be created. Writes nothing.
    The caller holds the folder's lock (runlock.py), so a run.json saying "running" is a killed run."""
    check_out_path(run_dir)
    info = _run_info(run_dir) if run_dir.is_dir() else None
    if info is not None and not resuming and not overwrite:
        status = info.get("status", "?")
        if status == "running":  # the caller holds the folder's lock, so nobody runs there: it was killed
            status = "interrupted (killed)"
        what = f"a {status} {info.get('stage', '')} run".replace("  ", " ")
        at = f" (step {info['step']})" if "step" in info else ""
        advice = ("pass --resume auto with more --epochs to train it longer" if info.get("status") == "finished"
                  else "pass --resume auto to continue it")
        raise ConfigError(f"--out {str(run_dir)!r} already holds {what}{at}; {advice}, --overwrite to replace "
                          "it, or another --out")
    if info is not None and resuming and info.get("stage", stage) != stage:
        raise ConfigError(f"--out {str(run_dir)!r} holds a {info.get('stage')} run, not a {stage} run")
    return not run_dir.exists()


def resume_point(cfg, stage: str, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start.

    --resume auto is what a preemptible job re-runs after every preemption: the newest checkpoint in --out if
    there is one, else a fresh start in that folder (a run killed before its first checkpoint); a run that
    finished its schedule raises NothingToDo (exit 0), unless --epochs / --max-steps now ask for more.
    --resume PATH is strict: PATH must be a checkpoint of an unfinished run with the same settings."""
    if cfg.resume is None:
        return None
    auto = cfg.resume == "auto"
    if auto and not ckpt.list_checkpoints(run_dir):
        _fresh_start_allowed(run_dir, stage)
        return None
    try:
        path = ckpt.find_resume(cfg.resume, run_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    state = json.loads((path / "state.json").read_text())
    if state.get("stage") != stage:
        raise ConfigError(f"--resume {str(path)!r} is a {state.get('stage')} checkpoint, not {stage}")
    saved, now = state.get("config", {}), config_dict(cfg)
    longer = sorted(k for k in SCHEDULE_CHANGES if saved.get(k) != now.get(k))
    if state.get("finished") and not auto:
        raise ConfigError(f"--resume {str(path)!r}: that run finished at step {state['step']}; to train it "
                          f"longer give its --out with --resume auto and more --epochs (--overwrite trains again)")
    if state.get("finished") and not longer:
        raise NothingToDo(f"{run_dir}: the {stage} run finished at step {state['step']}; nothing to resume "
                          "(more --epochs with --resume auto trains it longer)")
    allowed = RESUMABLE_CHANGES | (SCHEDULE_CHANGES if auto else set())
    defaults = _defaults(cfg)  # an option newer than the checkpoint was at its default then
    diff = sorted(k for k in set(saved) | set(now)
                  if k not in allowed and saved.get(k, defaults.get(k)) != now.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"--resume: options differ from the checkpoint's ({shown}); an exact resume needs the "
                          f"same settings (give the run's config.yaml with --config)")
    return path


def _defaults(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _fresh_start_allowed(run_dir: Path, stage: str) -> None:
    """--resume auto found no step checkpoint: starting afresh (which clears the folder's run files) is right
    only for a run killed before its first checkpoint. A finished run whose checkpoints/ was pruned raises
    NothingToDo; anything else there is refused."""
    info = _run_info(run_dir) if run_dir.is_dir() else None
    if info is None:
        return
    status = info.get("status")
    if info.get("stage") != stage:
        raise ConfigError(f"--out {str(run_dir)!r} holds a {info.get('stage', 'unrecognised')} run, not a {stage} "
                          "run; give another --out")
    if status == "finished" or (run_dir / "checkpoint.safetensors").is_file():
        raise NothingToDo(f"{run_dir}: the {stage} run finished (checkpoint.safetensors) and keeps no step "
                          "checkpoint, so it cannot be trained longer; nothing to resume")
    if status not in ("running", "interrupted", "diverged"):
        raise ConfigError(f"--out {str(run_dir)!r} holds a {status} run and no checkpoint to resume; "
                          "--overwrite replaces it, or give another --out")


class Signals:
    """SIGINT / SIGTERM set a flag the loop reads after each step; a second Ctrl-C quits at once."""

    def __init__(self, verbose: bool):
        self.signum: int | None = None
        self.verbose, self._old = verbose, {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                  "(Ctrl-C again quits without one)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def resume_command(argv: list[str] | None) -> str:
    args, skip = [], False
    for a in argv or []:
        if skip:
            skip = False
            continue
        if a in ("--resume",):
            skip = True
            continue
        if a.startswith("--resume=") or a in ("--overwrite", "--no-overwrite"):
            continue
        args.append(a)
    return shlex.join(["python", "-m", "dermfast.train", *args, "--resume", "auto"])
