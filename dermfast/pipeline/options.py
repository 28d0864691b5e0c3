"""Options of the pipeline's stages: `--set GROUP.KEY=VALUE` parsed and every stage's options checked before
anything runs, as the stage's own command checks them (training stages: dermfast.train.config.build_config on
the stage's Config, as `python -m dermfast.train` does; synthesize / evaluate / export: their argparse parsers).
Reads and writes nothing in --out."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from dermfast.errors import ConfigError
from dermfast.pipeline.recipes import GROUPS, StageSpec

# options the pipeline itself sets; --set cannot change them (they chain the stages together)
WIRED_TRAIN = {"out", "resume", "overwrite", "data"}
WIRED_TOOL = {"checkpoint", "out"}
TOOL_MODULES = {"synthesize": "dermfast.synthesize", "evaluate": "dermfast.evaluate", "export": "dermfast.export"}


class PipelineError(ConfigError):
    """Bad pipeline input: one line on stderr, exit 2, nothing run or written."""


# ------------------------------------------------------------------------------------------ --set parsing
def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """["mae.epochs=400", ...] -> {"mae": {"epochs": "400"}}; refuses a malformed item or an unknown group."""
    from dermfast.cliparse import closest
    out: dict[str, dict[str, str]] = {}
    for item in items:
        head, eq, value = item.partition("=")
        group, dot, key = head.partition(".")
        if not eq or not dot or not group or not key:
            raise PipelineError(f"--set {item!r}: expected GROUP.KEY=VALUE (e.g. mae.epochs=400)")
        group, key = group.strip().lower(), key.strip().replace("-", "_")
        if group not in GROUPS:
            hit = closest(group, GROUPS)
            raise PipelineError(f"--set {item!r}: unknown stage {group!r}" + (f" (did you mean {hit}?)" if hit else "")
                                + f"; accepted: {', '.join(GROUPS)}")
        out.setdefault(group, {})[key] = value
    return out


def _unknown_key(item: str, key: str, known) -> PipelineError:
    from dermfast.cliparse import closest
    hit = closest(key, known)
    return PipelineError(f"--set {item}: unknown option {key!r}" + (f" (did you mean {hit}?)" if hit else ""))


# ------------------------------------------------------------------------------------------ stage options
def _stage_cls(stage: str):
    from dermfast.train.stages import broken_modules, discover
    stages = discover()
    if stage not in stages:
        why = "; ".join(f"{m}: {w}" for m, w in broken_modules().items() if stage in m)
        raise PipelineError(f"training stage {stage!r} is unavailable" + (f" ({why})" if why else ""))
    return stages[stage].cls


def train_values(spec: StageSpec, recipe: dict, sets: dict, out: Path, data: str | None,
                 placeholder: str | None) -> tuple[dict, object]:
    """The options of a training stage ({key: typed value}, recipe < --set all < --set GROUP, chain wiring last)
    and its config built as `python -m dermfast.train` builds it (dermfast.train.config.build_config). Upstream
    folders that do not exist yet are validated as `placeholder` (an existing folder): they are made first."""
    from dermfast.train.config import build_config, field_types
    from dermfast.train.cliargs import _strip_optional
    cls = _stage_cls(spec.train_stage).Config
    types = field_types(cls)
    raw: dict = {}
    for src, group in ((recipe, "data"), (recipe, spec.group)):
        raw.update({k: v for k, v in src.get(group, {}).items() if k in types})
    for group in ("all", spec.group):
        for k, v in sets.get(group, {}).items():
            item = f"{group}.{k}={v}"
            if k not in types:
                err = _unknown_key(item, k, types)
                raise PipelineError(f"{err} (all.* sets an option of every training stage; {spec.name} "
                                    "has none of that name)") if group == "all" else err
            if k in WIRED_TRAIN or k in spec.wired:
                raise PipelineError(f"--set {item}: {k} is set by the pipeline (it chains the stages); "
                                    + ("use --data" if k == "data" else "choose --out for the pipeline"))
            _, optional = _strip_optional(types[k])
            raw[k] = None if optional and v.strip().lower() in ("none", "null") else v
    if data is not None:
        raw["data"] = data
    for key, up in spec.wired.items():
        folder = out / up
        raw[key] = str(folder) if folder.exists() or placeholder is None else placeholder
    raw["out"] = str(out / spec.name)
    try:
        cfg = build_config(cls, {}, raw)
    except ConfigError as e:
        named = [f"{g}.{k}" for g in ("all", spec.group) for k in sets.get(g, {})]
        raise PipelineError(f"{spec.name}: {str(e).strip().splitlines()[0]}"
                            + (f" (options given: {', '.join(named)})" if named else "")) from None
    values = {k: getattr(cfg, k) for k in raw}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    for key, up in spec.wired.items():  # the real path, not the placeholder
        values[key] = str(out / up)
    return values, cfg


def _tool_parser(module):
    """The argparse parser of a tool (evaluate, export, synthesize each expose `_parser()`)."""
    return module._parser()


def tool_argv(spec: StageSpec, recipe: dict, sets: dict, out: Path, data: str | None) -> list[str]:
    """The command line of synthesize / evaluate / export, every option checked against the tool's parser."""
    import importlib
    from dermfast.train.config import coerce
    module = importlib.import_module(TOOL_MODULES[spec.kind])
    parser = _tool_parser(module)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    values: dict = dict(recipe.get(spec.group, {}))
    for k, v in sets.get(spec.group, {}).items():
        item = f"{spec.group}.{k}={v}"
        if k not in actions:
            raise _unknown_key(item, k, actions)
        if k in WIRED_TOOL:
            raise PipelineError(f"--set {item}: {k} is set by the pipeline (it chains the stages)")
        values[k] = v
    argv: list[str] = []
    for k, v in values.items():
        if isinstance(v, str) and "{data}" in v:
            if data is None:
                raise PipelineError(f"{spec.name}: option {k} needs --data (the recipe sets it from the dataset)")
            v = v.replace("{data}", data)
        a = actions[k]
        opt = a.option_strings[-1]
        try:
            if a.nargs == 0:  # store_true
                if coerce(f"{spec.group}.{k}", v, bool):
                    argv.append(opt)
                continue
            v = a.type(v) if a.type is not None else str(v)
        except (ValueError, TypeError, ConfigError) as e:
            raise PipelineError(f"--set {spec.group}.{k}: bad value {v!r} ({e})") from None
        if a.choices is not None and v not in a.choices:
            raise PipelineError(f"{spec.group}.{k} must be one of: {', '.join(map(str, a.choices))}; got {v!r}")
        argv += [opt, str(v)]
    for key, up in spec.wired.items():
        argv += [f"--{key}", str(out / up)]
    if spec.kind == "export":
        fmt = values.get("format", "onnx")
        argv += ["--out", str(out / spec.name / ("model.onnx" if fmt == "onnx" else "model.pt"))]
    else:
        argv += ["--out", str(out / spec.name)]
    if spec.kind == "synthesize" and "no_progress" not in values:
        argv.append("--no-progress")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(argv)  # what the tool will parse: mutually exclusive options, required ones
    except SystemExit:
        raise PipelineError(f"{spec.name}: {err.getvalue().strip().removeprefix('error: ')}") from None
    return argv
