"""The argument parser every dermfast command uses (train, evaluate, export, predict, synthesize, bench, info).

argparse, with prefix matching off (it would take `--epoch 1` for `--epochs 1` silently) and errors as one line on
stderr with exit code 2, an unknown flag named with the closest known one ("did you mean --epochs?"). Below every
package, so the tools need not import dermfast.train for it.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Iterable

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
