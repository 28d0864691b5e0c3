"""Stage configs: one dataclass per stage; defaults < YAML file (--config) < command-line flags.

Every stage's config subclasses `TrainConfig` (what the engine reads: schedule, checkpoints, devices) and
usually `DataConfig` (what `dermfast.data.pipeline.prepare_data` reads). Each field is documented by the
comment on its line; `dermfast.train.cliargs` turns fields, types, defaults and those comments into `--help`.
Types understood (here, in YAML and on the command line): int, float, str, bool, `X | None`, `Literal[...]`,
`list[X]`, `tuple[X, ...]`, `dict[str, Any]` (YAML only, or a YAML mapping string on the command line).

The resolved config (every derived value filled in: lr, mask ratio, image size) is written to the run
directory as config.yaml; giving that file back with --config reproduces the run.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import UnionType
from typing import Any, Literal

import yaml

from dermfast.errors import ConfigError  # defined below dermfast.train so that tools outside it can raise it


@dataclass
class TrainConfig:
    """Options the engine reads; every stage config inherits them."""
    epochs: int = 10                 # passes over the training data
    batch_size: int = 64             # images per micro-step on each rank (global batch = this x accum x ranks)
    accum_steps: int = 1             # micro-steps whose gradients add up to one optimiser step
    lr: float | None = None          # absolute learning rate; None = the stage's rule (MAE: blr * global batch / 256)
    blr: float | None = None         # base learning rate per 256 images; None = the stage's (preset's) default
    weight_decay: float = 0.05       # AdamW weight decay (not applied to biases, norms, tokens)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_epochs: float = 1.0       # linear warmup length, in epochs (capped at the run length)
    min_lr: float = 0.0              # the cosine schedule ends here
    clip_grad: float | None = None   # clip the global gradient norm to this; None = no clipping (norm still logged)
    optimizer: Literal["auto", "adamw", "apex"] = "auto"  # auto: apex FusedAdam on CUDA if installed, else fused AdamW
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0                    # seeds masking, sampling, augmentation and initialisation
    out: str = "runs/train"          # run directory (config, logs, checkpoints, figures)
    overwrite: bool = False          # replace a different or finished run already in --out
    resume: str | None = None        # a checkpoint folder or file to continue from, or 'auto' (the latest in --out)
    checkpoint_every: int = 0        # also checkpoint every N optimiser steps (0 = only at each epoch end and the end)
    epoch_checkpoints: bool = True   # checkpoint at each epoch end (off: only every --checkpoint-every steps and the end)
    keep_checkpoints: int = 2        # keep the newest K step checkpoints (the final one is always kept)
    max_steps: int | None = None     # stop after this many optimiser steps; None = epochs * steps per epoch
    max_bad_steps: int = 5           # stop after this many non-finite losses in a row (each such step is skipped)
    log_every: int = 10              # log a CSV / TensorBoard row every N optimiser steps
    eval_every: int = 0              # run the stage's evaluation every N steps (0 = at each epoch end)
    device: str = "auto"             # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    workers: int = -1                # loader workers (torch) / DALI CPU threads; -1 = from the thread budget
    threads: int = -1                # torch intra-op threads; -1 = from the thread budget (cores - loader threads)
    fsdp: bool = False               # shard parameters, grads and optimiser state over ranks (FSDP2 fully_shard)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    compile: bool = False            # torch.compile the (DDP / FSDP-wrapped) model; the first steps compile
    progress: bool = True            # show a progress bar (rank 0)

    def validate(self) -> None:
        """Raise ConfigError for a value no run could use; runs before any data is read."""
        positive = ("epochs", "batch_size", "accum_steps", "log_every", "keep_checkpoints", "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {self.max_steps}")
        for name in ("lr", "blr", "clip_grad"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{flag(name)} must be a positive number, got {v}")
        if not (self.weight_decay >= 0 and self.min_lr >= 0 and self.warmup_epochs >= 0):
            raise ConfigError("--weight-decay, --min-lr and --warmup-epochs must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"--betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.workers < -1 or self.threads < -1 or self.threads == 0:
            raise ConfigError("--workers must be >= -1 and --threads >= 1 (or -1 for the thread budget)")
        if not str(self.out).strip():
            raise ConfigError("--out must name a directory")
        if self.resume is not None and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; give one")


@dataclass
class DataConfig(TrainConfig):
    """Options of stages that read a dataset through dermfast.data (prepare_data + build_loader)."""
    data: str | None = None          # dataset folder or file (any supported format); None = the embedded dataset
    loader: Literal["auto", "dali", "dali-gpu", "dali-cpu", "torch"] = "auto"  # auto: DALI when installed, else torch
    synthetic: str | None = None     # synthesis output folder (manifest.csv + images/) joining the training split
    balance: Literal["none", "equal"] = "none"  # equal: class-balanced batches (rare classes oversampled)
    neg_keep: float | None = None    # keep this fraction (<= 1) or count (> 1) of the majority class each epoch
    synth_ratio: float | None = None  # synthetic images per real image, per class (1, 3, 15; inf = synthetic only)
    toy_images: int = 1200           # size of the embedded dataset when --data is not given
    toy_image_size: int = 128        # image side of the embedded dataset
    folds: int = 0                   # K >= 2: stratified, grouped K-fold cross-validation (one run folder per fold); 0 = off

    def validate(self) -> None:
        super().validate()
        if self.neg_keep is not None and self.neg_keep < 0:
            raise ConfigError(f"--neg-keep must be >= 0 (a fraction <= 1 or a count > 1), got {self.neg_keep}")
        if self.synth_ratio is not None and self.synth_ratio < 0:
            raise ConfigError(f"--synth-ratio must be >= 0, got {self.synth_ratio}")
        if self.synth_ratio is not None and self.synthetic is None:
            raise ConfigError("--synth-ratio needs --synthetic DIR (the synthesis output to mix in)")
        if self.folds < 0 or self.folds == 1:
            raise ConfigError(f"--folds must be 0 (off) or >= 2, got {self.folds}")
        if self.toy_images < 8 or self.toy_image_size < 16:
            raise ConfigError("--toy-images must be >= 8 and --toy-image-size >= 16")
        if self.data is not None:
            check_data_path(self.data)
        if self.synthetic is not None and not Path(self.synthetic).expanduser().is_dir():
            raise ConfigError(f"--synthetic {self.synthetic!r} is not a folder (a synthesis output: manifest.csv "
                              "+ images/)")


def check_data_path(data: str) -> None:
    """--data must exist; a file must be of a kind the adapters recognise by name. Reads no image."""
    from dermfast.data.adapters import FORMATS, detect_format
    from dermfast.data.records import DatasetError
    p = Path(data).expanduser()
    if not p.exists():
        raise ConfigError(f"data path {data!r} does not exist")
    if p.is_file():
        try:
            detect_format(p)
        except DatasetError:
            raise ConfigError(
                f"--data {data!r} is a file of no known dataset kind; give the dataset's folder, or one of: "
                "a DermaMNIST .npz, an ISIC 2024 .hdf5, HAM10000_metadata.csv, an ISIC 2019 GroundTruth .csv, "
                f"PH2_dataset.txt, a labels .csv (formats: {', '.join(FORMATS)})") from None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------------- field docs
@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field: the comment on its line in the class body}, through the class's bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^\n#]*#\s*(.+)$", src, re.M):
            docs[m.group(1)] = m.group(2).strip()
    return docs


# ----------------------------------------------------------------------------------------- YAML + types
def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check (and convert where lossless) `value` against the type `tp`; ConfigError naming the option."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(name, value, a)
            except ConfigError:
                continue  # try the next member of the union; the error below names them all
        raise ConfigError(f"option {name} must be {describe(tp)}, got {value!r}")
    if value is None:
        raise ConfigError(f"option {name} needs a value")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"option {name} must be one of: {', '.join(map(str, args))}; got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value.strip()) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"option {name} must be {describe(tp)}, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"option {name} takes {len(args)} values, got {len(value)}: {list(value)}")
            return tuple(coerce(name, v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [coerce(name, v, inner) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if isinstance(value, dict):
            return value
        raise ConfigError(f"option {name} must be a mapping, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"option {name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"option {name} must be int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"option {name} must be float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"option {name} must be str, got {value!r}")
    raise ConfigError(f"option {name}: unsupported type {tp!r}")


def describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(str, args))
    if args and type(None) in args:
        return " or ".join(describe(a) for a in args if a is not type(None)) + " or null"
    if origin in (list, tuple):
        return f"a list of {describe(args[0]) if args else 'values'}"
    return getattr(tp, "__name__", str(tp))


def build_config(cls: type, file_values: dict[str, Any], cli_values: dict[str, Any]):
    """Defaults, then values from the YAML file, then the flags given (`cli_values` holds only those); validated."""
    types = field_types(cls)
    unknown = sorted(set(file_values) - set(types))
    if unknown:
        from dermfast.cliparse import closest
        named = []
        for k in unknown:  # each with the closest accepted key, as the command line names an unknown flag
            hit = closest(k, types)
            named.append(f"{k} (did you mean {hit}?)" if hit else k)
        raise ConfigError(f"unknown option(s) in config file: {', '.join(named)}; accepted: "
                          f"{', '.join(sorted(types))}")
    values = {**file_values, **{k: v for k, v in cli_values.items() if k in types}}
    values = {k: coerce(k, v, types[k]) for k, v in values.items()}
    cfg = cls(**values)
    object.__setattr__(cfg, "_explicit", frozenset(values))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def explicit_fields(cfg) -> frozenset:
    """The option names the user set (YAML file or command line) for `cfg` as built by `build_config`; the
    defaults a stage may fill in (e.g. the small-data recipe) are the fields NOT in this set. A config built
    another way (tests, `dataclasses.replace`) reports every field as explicit, so nothing is overridden."""
    got = getattr(cfg, "_explicit", None)
    return got if got is not None else frozenset(f.name for f in dataclasses.fields(cfg))


def config_dict(cfg) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def save_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))


__all__ = ["ConfigError", "TrainConfig", "DataConfig", "field", "dataclass", "build_config", "load_yaml",
           "save_config", "config_dict", "explicit_fields", "field_docs", "field_types", "coerce", "flag"]
