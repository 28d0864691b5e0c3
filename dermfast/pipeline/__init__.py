"""`python -m dermfast.pipeline [--data PATH] [--recipe demo|paper] [--out DIR] [--stages ...] [--set G.KEY=VALUE ...]
[--ablate synthetic,mae] [--launcher inprocess|subprocess|torchrun] [--nproc N]`: the whole DerMAE chain, one report.

synth (latent diffusion) -> synth_set (class-balanced samples on disk) -> mae (real + synthetic) -> finetune (the
teacher, from the MAE) -> distill (the student, from the teacher) -> eval_teacher, eval_student (the test split) ->
export (the student, ONNX with its parity check and CPU latency); `--ablate synthetic,mae` adds mae_nosynth ->
finetune_nosynth -> eval_nosynth and finetune_nomae -> eval_nomae (the same options, one thing left out).
Each stage's run folder is OUT/<stage>; OUT/report.html compares every model.

Resumable: every training stage runs with `--resume auto` (a finished run exits at once, an interrupted one
continues from its newest checkpoint, a run killed before its first checkpoint starts afresh), synthesize keeps
the images already written, and evaluate / export rerun only when their input checkpoint or options changed
(OUT/pipeline.json). So the same command after a kill or a preemption continues where it stopped.
Every --set is checked (group, key with a did-you-mean, value) before anything runs: one line, exit 2.
Exit codes: 0 done; 2 bad input; otherwise the failing stage's code (130 / 143: interrupted, rerun to continue).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dermfast.errors import ConfigError
from dermfast.pipeline.options import TOOL_MODULES, PipelineError, parse_sets, tool_argv, train_values
from dermfast.pipeline.recipes import ABLATIONS, GROUPS, RECIPES, STAGE_NAMES, StageSpec, plan

STATE = "pipeline.json"


# ------------------------------------------------------------------------------------------ the run
def _run_info(folder: Path) -> dict:
    try:
        return json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _fingerprint(out: Path, spec: StageSpec) -> list:
    """What a tool stage's result depends on besides its options: its inputs' final checkpoints."""
    fp = []
    for up in spec.needs:
        p = out / up / "checkpoint.safetensors"
        if not p.is_file():
            p = out / up / "manifest.csv"
        st = p.stat() if p.is_file() else None
        fp.append([up, st.st_size if st else None, st.st_mtime_ns if st else None])
    return fp


def _call(module: str, argv: list[str], launcher: str, nproc: int, training: bool) -> int:
    if launcher == "inprocess" or (launcher == "torchrun" and not training):
        import importlib
        try:
            return int(importlib.import_module(module).main(argv) or 0)
        except SystemExit as e:  # argparse inside a tool
            return int(e.code or 0) if not isinstance(e.code, str) else 2
    module = module.removesuffix(".cli")  # dermfast.train.cli's command is `python -m dermfast.train`
    if launcher == "torchrun" and training:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", module, *argv]
    else:
        cmd = [sys.executable, "-m", module, *argv]
    return _wait_forwarding(subprocess.Popen(cmd))


def _wait_forwarding(proc: subprocess.Popen) -> int:
    """Wait for a stage's process, passing SIGINT / SIGTERM on to it (a preempted job's SIGTERM must reach the
    training processes, which then write a checkpoint and exit 143), so no stage outlives the pipeline. After a
    forwarded signal the result is 128 + its number whatever the launcher made of it (torchrun exits 1)."""
    import signal
    import threading
    old, got = {}, []

    def forward(signum, frame):
        got.append(signum)
        proc.send_signal(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, forward)
    try:
        rc = proc.wait()
        return 128 + got[0] if got and rc != 0 else rc
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class Pipeline:
    def __init__(self, out: Path, recipe_name: str, data: str | None, sets: dict, ablate: tuple[str, ...],
                 only: tuple[str, ...] | None, launcher: str = "inprocess", nproc: int = 1):
        self.out, self.recipe_name, self.recipe = out, recipe_name, RECIPES[recipe_name]
        self.data = str(Path(data).expanduser().resolve()) if data is not None else None
        self.sets, self.ablate = sets, ablate
        self.launcher, self.nproc = launcher, nproc
        self.steps = plan(ablate)
        self.selected = [s for s in self.steps if only is None or s.name in only]
        self.commands: dict[str, tuple[str, list[str], dict | None]] = {}

    def prepare(self) -> None:
        """Build every selected stage's command (validating every option); reads and writes nothing in --out."""
        if self.recipe_name == "paper" and self.data is None:
            raise PipelineError("--recipe paper needs --data (the paper's dataset, HAM10000); the embedded "
                                "dataset is for --recipe demo")
        if self.data is not None:
            from dermfast.train.config import check_data_path
            check_data_path(self.data)
        names = {s.name for s in self.selected}
        for group in self.sets:  # a group no selected stage reads is a mistake too
            if group not in ("all", "data") and not any(s.group == group for s in self.steps):
                raise PipelineError(f"--set {group}.*: no stage of this plan takes {group} options")
        if "data" in self.sets:
            raise PipelineError("--set data.*: use all.KEY=VALUE (every training stage) or --data PATH")
        placeholder = str(self.out.parent if self.out.parent.is_dir() else Path.cwd())
        for s in self.selected:
            for up in s.needs:
                if up not in names and not (self.out / up).exists():
                    raise PipelineError(f"stage {s.name} needs {up} (OUT/{up} does not exist): add it to --stages")
        for s in self.steps:  # every stage, selected or not: a bad --set is refused whatever --stages says
            if s.kind == "train":
                values, _ = train_values(s, self.recipe, self.sets, self.out, self.data, placeholder)
                self.commands[s.name] = ("dermfast.train.cli", [], values)  # argv: _train_argv, at run time
            else:
                self.commands[s.name] = (TOOL_MODULES[s.kind], tool_argv(s, self.recipe, self.sets, self.out,
                                                                            self.data), None)

    # --- state
    def _state(self) -> dict:
        try:
            return json.loads((self.out / STATE).read_text())
        except (OSError, ValueError):
            return {"stages": {}}

    def _save_state(self, state: dict) -> None:
        tmp = self.out / f".{STATE}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.out / STATE)

    def _train_argv(self, s: StageSpec, values: dict) -> list[str]:
        """--config OUT/pipeline/<stage>.yaml (every option, typed, read as the CLI reads YAML), --out, --resume."""
        import yaml
        d = self.out / "pipeline"
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / f"{s.name}.yaml"
        body = {k: v for k, v in values.items() if k != "out"}
        cfg.write_text(yaml.safe_dump(body, sort_keys=False))
        return ["--stage", s.train_stage, "--config", str(cfg), "--out", values["out"], "--resume", "auto"]

    def _warn_stale(self, s: StageSpec) -> None:
        mine = self.out / s.name / "checkpoint.safetensors"
        for up in s.needs:
            theirs = self.out / up / ("checkpoint.safetensors" if up != "synth_set" else "manifest.csv")
            if mine.is_file() and theirs.is_file() and theirs.stat().st_mtime_ns > mine.stat().st_mtime_ns:
                print(f"pipeline: warning: {up} changed after {s.name} finished; {s.name} is kept as it is "
                      f"(delete {self.out / s.name} to train it again from the new {up})", flush=True)

    def describe(self) -> str:
        """The commands the pipeline runs (--dry-run), one a line."""
        lines = []
        for s in self.selected:
            module, argv, values = self.commands[s.name]
            if s.kind == "train":
                opts = " ".join(f"{k}={v}" for k, v in values.items() if k != "out")
                lines.append(f"{s.name}: python -m dermfast.train --stage {s.train_stage} --out {values['out']} "
                             f"--resume auto  [{opts}]")
            else:
                lines.append(f"{s.name}: python -m {module} {' '.join(argv)}")
        return "\n".join(lines)

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._state()
        state.update(recipe=self.recipe_name, data=self.data, ablate=list(self.ablate), argv=sys.argv[1:])
        n = len(self.selected)
        for i, s in enumerate(self.selected, 1):
            module, argv, values = self.commands[s.name]
            rec = state["stages"].setdefault(s.name, {})
            tag = f"pipeline: [{i}/{n}] {s.name}"
            folder = self.out / s.name
            if s.kind == "train":
                argv = self._train_argv(s, values)
                before = _run_info(folder)
                if before.get("status") == "finished":
                    self._warn_stale(s)
                    what = None  # decided after the call: --resume auto exits at once unless the schedule grew
                elif before:
                    what = f"resumed ({before.get('status')} at step {before.get('step', '?')})"
                else:
                    what = "starting"
            else:
                fp = _fingerprint(self.out, s)
                if rec.get("status") == "done" and rec.get("argv") == argv and rec.get("inputs") == fp:
                    print(f"{tag}: skipped (finished)", flush=True)
                    continue
                what = "resumed" if folder.exists() and s.kind == "synthesize" else "starting"
                if s.kind == "synthesize" and rec.get("inputs") not in (None, fp):
                    argv = [*argv, "--overwrite"]  # the diffusion run changed: its old samples are stale
                    what = "starting (the synth run changed: replacing its samples)"
                rec["inputs"] = fp
            if what:
                print(f"{tag}: {what}", flush=True)
            t0 = time.perf_counter()
            rc = _call(module, argv, self.launcher, self.nproc, s.kind == "train")
            secs = time.perf_counter() - t0
            if rc != 0:
                rec.update(status="failed", rc=rc)
                self._save_state(state)
                hint = ("interrupted: rerun the same command to continue" if rc in (130, 143)
                        else "fix the cause and rerun the same command (finished stages are skipped)")
                print(f"{tag}: failed (exit {rc}) after {secs:.0f} s; {hint}", file=sys.stderr, flush=True)
                return rc
            if s.kind == "train":
                after = _run_info(folder)
                if what is None and after.get("step") == before.get("step"):
                    print(f"{tag}: skipped (finished)", flush=True)
                    continue
                if what is None:
                    print(f"{tag}: resumed (finished at step {before.get('step')}, schedule now longer)")
                rec.update(status="done", step=after.get("step"))
            else:
                rec.update(status="done", argv=self.commands[s.name][1], inputs=_fingerprint(self.out, s))
            rec["seconds"] = round(rec.get("seconds", 0.0) + secs, 1)
            self._save_state(state)
            print(f"{tag}: done in {secs:.0f} s", flush=True)
        from dermfast.pipeline.report import write_report
        path = write_report(self.out, self.steps, state)
        print(f"pipeline: report {path}", flush=True)
        return 0


def _parser():
    from dermfast.cliparse import OneLineParser
    p = OneLineParser(prog="python -m dermfast.pipeline", description=__doc__.splitlines()[0].split(":", 1)[-1])
    p.add_argument("--data", help="dataset (any adapter format); default: the embedded procedural dataset")
    p.add_argument("--recipe", default="demo", choices=sorted(RECIPES), help="settings of every stage (default demo)")
    p.add_argument("--out", default="runs/pipeline", help="folder of every stage's run and report.html")
    p.add_argument("--stages", help=f"comma-separated subset to run, in plan order; stages: {', '.join(STAGE_NAMES)}")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE",
                   help=f"an option of a stage (groups: {', '.join(GROUPS)}; all = every training stage)")
    p.add_argument("--ablate", default="", help=f"comma-separated ablation runs to add: {', '.join(ABLATIONS)}")
    p.add_argument("--launcher", default="inprocess", choices=("inprocess", "subprocess", "torchrun"),
                   help="how stages run: in this process, one process each, or training stages under torchrun")
    p.add_argument("--nproc", type=int, default=1, help="--launcher torchrun: processes (GPUs) per node")
    p.add_argument("--dry-run", action="store_true", help="check every option, print the stages' commands, run nothing")
    return p


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from dermfast.cliparse import closest
    try:
        ablate = _csv(args.ablate)
        for a in ablate:
            if a not in ABLATIONS:
                hit = closest(a, ABLATIONS)
                raise PipelineError(f"--ablate: unknown ablation {a!r}" + (f" (did you mean {hit}?)" if hit else "")
                                    + f"; accepted: {', '.join(ABLATIONS)}")
        only = _csv(args.stages) or None
        known = [s.name for s in plan(ablate)]
        for name in only or ():
            if name not in known:
                hit = closest(name, known)
                raise PipelineError(f"--stages: unknown stage {name!r}" + (f" (did you mean {hit}?)" if hit else "")
                                    + f"; this plan's stages: {', '.join(known)}")
        if args.nproc < 1:
            raise PipelineError(f"--nproc must be >= 1, got {args.nproc}")
        pipe = Pipeline(Path(args.out).expanduser(), args.recipe, args.data, parse_sets(args.set), ablate, only,
                        args.launcher, args.nproc)
        pipe.prepare()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(pipe.describe())
        return 0
    try:
        return pipe.run()
    except KeyboardInterrupt:
        print("pipeline: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


__all__ = ["main", "Pipeline", "PipelineError", "parse_sets", "train_values", "tool_argv"]
