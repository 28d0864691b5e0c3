"""Command-line options generated from a stage's config dataclass: every field is a flag, with its default and
the comment on its line as help, so `--stage X --help` lists every option a YAML file could set.

Mapping: `name_with_underscores` -> `--name-with-underscores`; bool -> `--flag / --no-flag`; Literal -> choices;
list / tuple -> several values (`--betas 0.9 0.95`); `X | None` -> a value, or `none` / `null` for None;
dict -> a YAML mapping string. Parsed values are strings checked by `config.coerce`, so the YAML file and the
command line go through one checker. Flags left out parse to None ("not given"), so YAML values survive.

`OneLineParser`: the parser every dermfast tool uses: no prefix matching (argparse would take `--epoch 1` for
`--epochs 1` silently), errors as one line on stderr with exit code 2, an unknown flag named with the closest
known one ("did you mean --epochs?", `closest`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from typing import Any, Iterable, Literal

from dermfast.train.config import describe, field_docs, field_types, flag

_NONE_WORDS = {"none", "null"}
_UNRECOGNIZED = "unrecognized arguments: "


def closest(word: str, known: Iterable[str]) -> str | None:
    """The known name most like `word` (difflib ratio >= 0.6), or None."""
    hits = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return hits[0] if hits else None


class OneLineParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with `allow_abbrev=False` by default and one-line errors (exit 2): an unknown
    flag is named with the closest known flag, e.g. "unknown option --epoch (did you mean --epochs?)"."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if message.startswith(_UNRECOGNIZED):
            flags = [a.split("=", 1)[0] for a in message[len(_UNRECOGNIZED):].split() if a.startswith("--")]
            if flags:
                known = [o for o in self._option_string_actions if o.startswith("--")]
                parts = []
                for f in flags:
                    hit = closest(f, known)
                    parts.append(f"{f} (did you mean {hit}?)" if hit else f)
                message = f"unknown option{'s' if len(parts) > 1 else ''} {', '.join(parts)}"
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


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
