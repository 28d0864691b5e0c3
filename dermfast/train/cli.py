"""`python -m dermfast.train --stage STAGE [options]`: the front door for every training stage.

Bad input (unknown stage or preset, missing or empty data path, bad config file) is one line on stderr and
exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import sys

from dermfast.data.loader import LoaderUnavailable
from dermfast.data.records import DatasetError
from dermfast.train.config import STAGE_CONFIGS, ConfigError, build_config, load_yaml

PLANNED_STAGES = ("synth", "finetune", "distill", "eval", "export")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dermfast.train", description=__doc__.splitlines()[0])
    p.add_argument("--stage", required=True, help=f"training stage; accepted: {', '.join(STAGE_CONFIGS)}")
    p.add_argument("--config", help="YAML file of options (flags given on the command line win)")
    p.add_argument("--data", help="dataset directory (default: the embedded procedural dataset)")
    p.add_argument("--preset", help="model preset (mae: demo, vit_b16, vit_l16, vit_h14)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float, help="absolute learning rate (default: blr * batch / 256)")
    p.add_argument("--blr", type=float, help="base learning rate per 256 images")
    p.add_argument("--accum-steps", type=int, dest="accum_steps")
    p.add_argument("--mask-ratio", type=float, dest="mask_ratio")
    p.add_argument("--img-size", type=int, dest="img_size")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory (default: runs/<stage>)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="data loader workers (default: cores, at most 8)")
    p.add_argument("--loader", help="auto (default: DALI when installed), dali, dali-gpu, dali-cpu or torch")
    p.add_argument("--synthetic", help="synthesis output folder (manifest.csv + images/) to add to training")
    p.add_argument("--balance", help="none (default) or equal: class-balanced batches")
    p.add_argument("--neg-keep", type=float, dest="neg_keep",
                   help="keep this fraction (<= 1) or count (> 1) of the majority class each epoch")
    p.add_argument("--synth-ratio", type=float, dest="synth_ratio",
                   help="synthetic images per real image (1, 3, 15; inf = synthetic only)")
    p.add_argument("--max-steps", type=int, dest="max_steps", help="stop after this many optimiser steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stage = args.stage.strip().lower()
    if stage not in STAGE_CONFIGS:
        planned = f" ('{stage}' is planned but not implemented yet)" if stage in PLANNED_STAGES else ""
        return _fail(f"unknown stage {args.stage!r}{planned}; accepted: {', '.join(STAGE_CONFIGS)}")
    try:
        file_values = load_yaml(args.config) if args.config else {}
        cli_values = {k: v for k, v in vars(args).items() if k not in ("stage", "config", "no_progress")}
        cfg = build_config(STAGE_CONFIGS[stage], file_values, cli_values)
        if stage == "mae":
            from dermfast.models.mae import presets
            if cfg.preset not in presets():
                return _fail(f"unknown preset {cfg.preset!r}; accepted: {', '.join(presets())}")
            from dermfast.train.mae import run_mae
            run_mae(cfg, progress=not args.no_progress)
    except (ConfigError, DatasetError, LoaderUnavailable) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted")
    return 0
