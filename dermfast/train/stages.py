"""The Stage API: what a training stage supplies; the engine (`dermfast.train.engine.train`) does the rest.

A stage is a config dataclass (subclass of `TrainConfig`, usually `DataConfig`) and a `Stage` subclass
registered by name:

    @register_stage("mae", help="masked-autoencoder pretraining of a ViT")
    class MAEStage(Stage):
        Config = MAEConfig
        def build(self, run): ...              -> Parts(model=..., loader=...)
        def step(self, batch, run): ...        -> (loss, {"name": scalar tensor, ...})

Optional hooks: `resolve` (fill derived config values, check them; before any data is read), `param_groups`
(e.g. layer-wise lr decay), `evaluate` (metrics at eval points; `selection` names the metric that picks the
best checkpoint), `after_step` (EMA, periodic sample grids), `extra_state` / `load_extra_state` (tensors and
JSON the checkpoint keeps besides model and optimiser), `finish` (figures at the end; returns the files
written), `final_weights` / `final_meta` (what `checkpoint.safetensors` holds for downstream stages),
`blocks` (the units --fsdp shards and --activation-checkpointing wraps).

Registration needs no edit of cli.py: `discover()` imports every public module of the packages in
`STAGE_PACKAGES` (so keep heavy imports such as diffusers inside `build`), plus entry points in the
`dermfast.stages` group for plug-ins installed from elsewhere.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from dermfast.train.context import Run

STAGE_PACKAGES = ("dermfast.train", "dermfast.synth")
_ENGINE_MODULES = {"cli", "cliargs", "config", "context", "engine", "checkpoint", "distributed", "logs",
                   "optim", "preflight", "sharding", "stages", "__main__"}


@dataclass
class Parts:
    """What `Stage.build` returns.

    model: the trained module (parameters with requires_grad are optimised; frozen ones are not). The engine
      moves nothing: build it on `run.device`. It wraps it for DDP / FSDP; `run.model` is the wrapped one
      (call that in `step`), `run.raw_model` the unwrapped one.
    loader: the training loader (dermfast.data.loader.build_loader contract: `len()` batches per epoch,
      `set_epoch(e)`, iteration yields batch dicts, and `state_dict()` / `load_state_dict()` for exact
      resume). `run.train_loader(...)` builds one with the rank, device and thread budget filled in.
    sampler: the loader's sampler (`run.sampler(...)`), if any: the engine reads the epoch size from it (for
      the tiny-epoch warning) and, for a loader without `state_dict`, saves / restores its position.
    summary: one line the engine prints at the start (model size is added).
    """
    model: "nn.Module"
    loader: Any
    sampler: Any = None
    summary: str = ""


class Stage:
    """Base class of every stage; one instance per run (attributes set in `build` live for the run)."""

    name: str = ""                 # set by @register_stage
    help: str = ""
    Config: type = None            # the stage's config dataclass (a TrainConfig subclass)
    default_out: str | None = None  # default --out (None: runs/<name>)

    # --- before any data is read (every rank; cheap; raise ConfigError for bad values) -------------------
    def resolve(self, cfg, world) -> Any:
        """Return `cfg` with derived values filled in; they are what config.yaml records. The default fills
        `lr` from the MAE rule: lr = blr * global batch / 256 (global batch = batch * accum * world size),
        with `blr` from `self.default_blr(cfg)` when not given."""
        if cfg.lr is None:
            if cfg.blr is None:
                cfg.blr = self.default_blr(cfg)
            cfg.lr = cfg.blr * cfg.batch_size * cfg.accum_steps * world.world_size / 256
        return cfg

    def default_blr(self, cfg) -> float:
        return 1e-3

    # --- building (every rank, process group up, after `resolve`) ----------------------------------------
    def build(self, run: "Run") -> Parts:
        raise NotImplementedError

    def param_groups(self, model: "nn.Module", cfg) -> list[dict] | None:
        """Optimiser parameter groups; None = AdamW weight decay on >= 2-D weights, none on biases / norms /
        tokens. A group may carry "lr_scale" (multiplies the scheduled lr: layer-wise decay)."""
        return None

    def blocks(self, model: "nn.Module") -> list["nn.Module"]:
        """The repeated blocks that --fsdp shards one by one and --activation-checkpointing wraps; default: the
        children of every nn.ModuleList of the model."""
        from dermfast.train.distributed import repeated_blocks
        return repeated_blocks(model)

    # --- the loop ------------------------------------------------------------------------------------------
    def step(self, batch: dict, run: "Run") -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        """One micro-batch -> (loss, scalars to log). Runs under autocast; the engine does backward,
        accumulation, clipping, the optimiser and the schedule. Keep values on the device (no .item())."""
        raise NotImplementedError

    def after_step(self, run: "Run") -> None:
        """After each optimiser step that was applied (not after skipped ones): EMA, periodic images."""

    def trains(self, cfg) -> bool:
        """False for a config that trains nothing (segment's Otsu baseline): the engine takes the run folder's lock,
        makes its folder checks, then calls `run_without_training` instead of the training loop."""
        return True

    def run_without_training(self, cfg, run_dir: Path) -> str:
        """Write the run's files for a config `trains` declines (run.json finished among them); returns the line
        the CLI prints (exit 0)."""
        raise NotImplementedError

    def uses_after_step(self, cfg) -> bool:
        """Whether `after_step` runs for this config. Knowing whether a step was applied costs the engine one
        host sync per step, so a stage whose hook does nothing for some configs (MAE without TEDMAE) says so here."""
        return type(self).after_step is not Stage.after_step

    def evaluate(self, run: "Run") -> dict[str, float] | None:
        """Metrics at eval points (every --eval-every steps, else each epoch end); every rank calls it, rank 0's
        dict is logged (eval_<key> columns). The model is in eval mode, under autocast, not under no_grad."""
        return None

    def selection(self, cfg) -> tuple[str, str] | None:
        """(metric key of `evaluate`, "max" | "min"): the engine keeps the best checkpoint in best/."""
        return None

    # --- checkpoint extras -----------------------------------------------------------------------------------
    def extra_state(self) -> tuple[dict[str, "torch.Tensor"], dict]:
        """(tensors, JSON-able dict) saved in every checkpoint besides model / optimiser (e.g. EMA weights)."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, "torch.Tensor"], meta: dict) -> None:
        """Restore what `extra_state` saved (called after `build`, before the first step of a resumed run)."""

    def final_meta(self, run: "Run") -> dict:
        """JSON-able facts stored (as JSON strings) in the metadata of RUN/checkpoint.safetensors besides the
        engine's (stage, step, epoch, config): e.g. the model preset, so later stages rebuild the model."""
        return {}

    def final_weights(self, run: "Run") -> dict[str, "torch.Tensor"]:
        """The tensors of RUN/checkpoint.safetensors (what later stages load by name); default: the model's."""
        return run.model_state_dict()

    def finish(self, run: "Run") -> list:
        """At the end, on every rank (write files on rank 0 only: `run.is_main`); returns the paths written."""
        return []


@dataclass
class StageInfo:
    name: str
    cls: type
    help: str
    module: str


_REGISTRY: dict[str, StageInfo] = {}
_BROKEN: dict[str, str] = {}  # module -> why it failed to import
_discovered = False


def register_stage(name: str, help: str = "") -> Callable[[type], type]:
    """Class decorator: `@register_stage("mae", help=...)` on a Stage subclass with a `Config` dataclass."""
    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise TypeError(f"@register_stage({name!r}) decorates Stage subclasses, got {cls!r}")
        if cls.Config is None:
            raise TypeError(f"stage {name!r}: {cls.__name__}.Config must name the stage's config dataclass")
        old = _REGISTRY.get(name)
        if old is not None and old.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"stage {name!r} is registered twice ({old.module} and {cls.__module__})")
        cls.name, cls.help = name, help or cls.help or (cls.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = StageInfo(name, cls, cls.help, cls.__module__)
        return cls
    return deco


def discover() -> dict[str, StageInfo]:
    """Import the stage modules (once) and return the registry {name: StageInfo}."""
    global _discovered
    if not _discovered:
        _discovered = True
        for pkg_name in STAGE_PACKAGES:
            try:
                pkg = importlib.import_module(pkg_name)
            except ImportError as e:
                _BROKEN[pkg_name] = str(e)
                continue
            for mod in pkgutil.iter_modules(pkg.__path__):
                if mod.name.startswith("_") or (pkg_name == "dermfast.train" and mod.name in _ENGINE_MODULES):
                    continue
                full = f"{pkg_name}.{mod.name}"
                try:
                    importlib.import_module(full)
                except Exception as e:  # a broken optional stage must not take the other stages down
                    _BROKEN[full] = f"{type(e).__name__}: {e}"
        try:
            from importlib.metadata import entry_points
            for ep in entry_points(group="dermfast.stages"):
                try:
                    ep.load()
                except Exception as e:
                    _BROKEN[ep.value] = f"{type(e).__name__}: {e}"
        except Exception as e:  # metadata unreadable: plug-ins are optional
            print(f"dermfast: could not read dermfast.stages entry points: {e}", file=sys.stderr)
    return dict(_REGISTRY)


def broken_modules() -> dict[str, str]:
    """Stage modules that failed to import during `discover()`, with the reason."""
    return dict(_BROKEN)


def get_stage(name: str) -> StageInfo:
    stages = discover()
    if name not in stages:
        raise KeyError(name)
    return stages[name]
