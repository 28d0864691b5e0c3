"""Where dermfast keeps what it computes once per machine (the embedded dataset, image validation verdicts,
converted images, backend self-test verdicts): $DERMFAST_CACHE if set, else $XDG_CACHE_HOME/dermfast, else
~/.cache/dermfast. Below every package, so dermfast.ops and dermfast.data share it."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$DERMFAST_CACHE if set, else $XDG_CACHE_HOME/dermfast, else ~/.cache/dermfast."""
    if os.environ.get("DERMFAST_CACHE"):
        return Path(os.environ["DERMFAST_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "dermfast"
