"""`python -m dermfast.train --stage STAGE [options]`: the front door for every training stage.

Stages register themselves (`dermfast.train.stages.register_stage`); their options come from their config
dataclass (`--stage X --help` lists all of them with defaults). Exit codes: 0 done; 2 bad input (one line on
stderr, no traceback, nothing left behind); 1 a run that failed while training (diverged, out of memory);
130 / 143 interrupted by Ctrl-C / SIGTERM (after writing a checkpoint; the message says how to resume).
`--folds K` (finetune, distill) runs a K-fold cross-validation instead of one run: dermfast/train/cv.py.
"""
from __future__ import annotations

import argparse
import sys

from dermfast.train.config import ConfigError, build_config, load_yaml

PLANNED_STAGES = ("synth", "finetune", "distill", "dreambooth")
OTHER_TOOLS = {"eval": "dermfast.evaluate", "evaluate": "dermfast.evaluate", "export": "dermfast.export",
               "synthesize": "dermfast.synthesize", "sample": "dermfast.synthesize"}


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _base_parser(stages: dict, add_help: bool) -> argparse.ArgumentParser:
    from dermfast.cliparse import OneLineParser  # no prefix matching: --stag is not --stage
    listing = "; ".join(f"{n}: {i.help}" for n, i in sorted(stages.items()))
    p = OneLineParser(prog="python -m dermfast.train", add_help=add_help,
                description=__doc__.splitlines()[0] + f"  Stages: {listing}.",
                epilog="`--stage STAGE --help` lists that stage's options with their defaults.")
    p.add_argument("--stage", help=f"training stage; accepted: {', '.join(sorted(stages))}")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (flags given here win)")
    return p


def main(argv: list[str] | None = None) -> int:
    from dermfast.train.cliargs import add_config_arguments, parsed_values
    from dermfast.train.stages import broken_modules, discover

    argv = list(sys.argv[1:] if argv is None else argv)
    stages = discover()
    pre, _ = _base_parser(stages, add_help=False).parse_known_args(argv)
    if pre.stage is None:
        if any(a in ("-h", "--help") for a in argv):
            _base_parser(stages, add_help=True).print_help()
            return 0
        return _fail(f"--stage is required; accepted: {', '.join(sorted(stages))}")
    stage = pre.stage.strip().lower()
    if stage not in stages:
        planned = f" ('{stage}' is planned but not implemented yet)" if stage in PLANNED_STAGES else ""
        if stage in OTHER_TOOLS:
            planned = f" ('{stage}' is not a training stage: run `python -m {OTHER_TOOLS[stage]}`)"
        broken = [f"{m} ({why})" for m, why in broken_modules().items() if stage in m]
        extra = f"; stage module failed to import: {broken[0]}" if broken else ""
        return _fail(f"unknown stage {pre.stage!r}{planned}; accepted: {', '.join(sorted(stages))}{extra}")
    info = stages[stage]
    parser = _base_parser(stages, add_help=True)
    add_config_arguments(parser, info.cls.Config)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a malformed flag (2, already printed as one line)
        return int(e.code or 0)

    from dermfast.data.loader import LoaderUnavailable
    from dermfast.data.records import DatasetError
    from dermfast.train.engine import Interrupted, TrainingError, train
    from dermfast.train.preflight import NothingToDo
    try:
        file_values = load_yaml(args.config) if args.config else {}
        cli_values = parsed_values(args, info.cls.Config)
        if "out" not in file_values and "out" not in cli_values and info.cls.default_out:
            cli_values["out"] = info.cls.default_out
        cfg = build_config(info.cls.Config, file_values, cli_values)
        if getattr(cfg, "folds", 0) >= 2:  # K-fold cross-validation: one run folder per fold (dermfast.train.cv)
            from dermfast.train.cv import run_cv
            run_cv(info.cls, cfg, argv=argv)
        else:
            train(info.cls, cfg, argv=argv)
    except (ConfigError, DatasetError, LoaderUnavailable) as e:
        return _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except NothingToDo as e:  # --resume auto on a finished run: what a re-run preemptible job meets
        print(str(e))
        return 0
    except TrainingError as e:
        return _fail(str(e), 1)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before the engine installed its handler, or a second Ctrl-C
        print("interrupted", file=sys.stderr)
        return 130
    return 0
