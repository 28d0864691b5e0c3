"""Stage configs: one dataclass per stage; defaults < YAML file (--config) < command-line flags.

The resolved config is written to the run directory as config.yaml, and reloading that file reproduces the run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value or file: reported as one line by the CLI (exit code 2)."""


@dataclass
class MAEConfig:
    data: str | None = None          # dataset path; None = the embedded procedural dataset
    preset: str = "demo"             # model preset (dermfast.models.mae presets)
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None          # absolute LR; None = blr * batch_size / 256 (MAE rule)
    blr: float | None = None         # None = the preset's
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    accum_steps: int = 1
    mask_ratio: float | None = None  # None = the preset's (0.75)
    img_size: int | None = None      # None = the preset's
    seed: int = 0
    out: str = "runs/mae"
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    workers: int = -1                # -1 = min(cores, 8)
    loader: str = "auto"             # auto | dali | dali-gpu | dali-cpu | torch
    synthetic: str | None = None     # synthesis output folder (manifest.csv + images/), joins the train split
    balance: str = "none"            # none | equal: class-balanced batches (rare classes oversampled)
    neg_keep: float | None = None    # keep this fraction (<= 1) or count (> 1) of the majority class per epoch
    synth_ratio: float | None = None  # synthetic images per real image, per class (1, 3, 15; inf = synthetic only)
    toy_images: int = 1200           # size of the embedded dataset when data is None
    toy_image_size: int = 128
    log_every: int = 10
    max_steps: int | None = None     # stop early (smoke tests); None = epochs * steps per epoch
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size must be >= 1, got {self.batch_size}")
        if self.accum_steps < 1:
            raise ConfigError(f"accum-steps must be >= 1, got {self.accum_steps}")
        if self.neg_keep is not None and self.neg_keep < 0:
            raise ConfigError(f"neg-keep must be >= 0 (a fraction <= 1 or a count > 1), got {self.neg_keep}")
        if self.synth_ratio is not None and self.synth_ratio < 0:
            raise ConfigError(f"synth-ratio must be >= 0, got {self.synth_ratio}")
        if self.balance not in ("none", "equal"):
            raise ConfigError(f"balance must be one of: none, equal; got {self.balance!r}")
        from dermfast.data.loader import LOADERS
        if self.loader not in LOADERS:
            raise ConfigError(f"unknown loader {self.loader!r}; accepted: {', '.join(LOADERS)}")
        if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask-ratio must be in [0, 1), got {self.mask_ratio}")


STAGE_CONFIGS: dict[str, type] = {"mae": MAEConfig}


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type, file_values: dict[str, Any], cli_values: dict[str, Any]):
    """Defaults, then values from the YAML file, then explicit CLI flags (those not None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) in config file: {', '.join(unknown)}; accepted: "
                          f"{', '.join(sorted(names))}")
    values = {**file_values, **{k: v for k, v in cli_values.items() if v is not None and k in names}}
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for k, v in values.items():
        values[k] = _coerce(k, v, types[k])
    cfg = cls(**values)
    cfg.validate()
    return cfg


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Check a value against its field's annotation ('int', 'float | None', 'str | None', ...)."""
    kinds = {t.strip() for t in annotation.split("|")}
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"option {name} needs a value")
    if "bool" in kinds and isinstance(value, bool):
        return value
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if "float" in kinds and isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return float("inf")
    if "str" in kinds and isinstance(value, str):
        return value
    if kinds & {"dict[str, Any]"} and isinstance(value, dict):
        return value
    wanted = " or ".join(sorted(kinds - {"None"}))
    raise ConfigError(f"option {name} must be {wanted}, got {value!r}")


def save_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
