"""Command-line options generated from a stage's config dataclass: every field is a flag, with its default and
the comment on its line as help, so `--stage X --help` lists every option a YAML file could set.

Mapping: `name_with_underscores` -> `--name-with-underscores`; bool -> `--flag / --no-flag`; Literal -> choices;
list / tuple -> several values (`--betas 0.9 0.95`); `X | None` -> a value, or `none` / `null` for None;
dict -> a YAML mapping string. Parsed values are strings checked by `config.coerce`, so the YAML file and the
command line go through one checker. Flags left out parse to None ("not given"), so YAML values survive.

The parser itself is dermfast/cliparse.py's `OneLineParser`, shared by every dermfast tool.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal

from dermfast.train.config import describe, field_docs, field_types, flag

_NONE_WORDS = {"none", "null"}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if args and type(None) in args and typing.get_origin(tp) is not Literal:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _default_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass `cls` (fields in `skip` left out)."""
    docs, types = field_docs(cls), field_types(cls)
    group = parser.add_argument_group(f"{cls.__name__} options (YAML keys are the same names)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        tp, optional = _strip_optional(types[f.name])
        help_text = docs.get(f.name, "")
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = f"{help_text} (default: {_default_text(default)})"
            group.add_argument(flag(f.name), **kw)
            continue
        if origin is Literal:
            choices = [str(a) for a in typing.get_args(tp)] + (["none"] if optional else [])
            kw["metavar"] = "{" + ",".join(choices) + "}"
        elif origin in (list, tuple):
            args = typing.get_args(tp)
            kw["nargs"] = len(args) if origin is tuple and args and args[-1] is not Ellipsis else "+"
            kw["metavar"] = describe(args[0] if args else str).upper()
        elif origin is dict or tp is dict:
            kw["metavar"] = "YAML"
        else:
            kw["metavar"] = describe(tp).split(" ")[0].upper()
        kw["help"] = f"{help_text} (default: {_default_text(default)})"
        group.add_argument(flag(f.name), **kw)


def parsed_values(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags actually given, as {field: raw value}; 'none' / 'null' give None for optional fields (and then
    override the YAML file's value)."""
    types = field_types(cls)
    out: dict[str, Any] = {}
    for name, tp in types.items():
        value = getattr(ns, name, None)
        if value is None:
            continue
        _, optional = _strip_optional(tp)
        if optional and isinstance(value, str) and value.lower() in _NONE_WORDS:
            out[name] = None
            continue
        out[name] = value
    return out
