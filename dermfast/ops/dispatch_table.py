"""The measured dispatch order: which backend is fastest for (device, op, dtype, pass, shape class).

`python -m dermfast.bench` (a full run on a GPU) times every capable registry backend of an op through the op
itself (`masked_attention(..., backend=name)`, glue included) and writes, per device name and shape class, the
backends from fastest to slowest with their medians and `ratio_to_best_peer` (the best peer's median over the
best dermfast kernel's: > 1 means dermfast's own kernel is faster). The registry (dermfast/ops/registry.py) reads
it: among the backends that are capable and proven (self-test), the first in this order serves.

File: $DERMFAST_CACHE/dispatch_table.json (`table_path()`; $DERMFAST_DISPATCH_TABLE names another file):

    {"format": 1,
     "devices": {"NVIDIA H100 80GB HBM3": {
         "written": "2026-12-05", "torch": "2.11.0", "source": "benchmarks/results/....csv",
         "entries": {"masked_attention": {"bfloat16|fwd+bwd|packed/D80/L128": {
             "order": ["flash_attn", "triton", "sdpa_nested", "flex", "torch"],
             "median_ms": {"flash_attn": 1.9, ...}, "ratio_to_best_peer": 0.87, "workload": "..."}}}}}}

Key of an entry: "<dtype>|<pass>|<shape class>", pass "fwd" (no grad wanted) or "fwd+bwd"; the shape class is
the op's own function of its Query sizes (`Op.shape_class`, e.g. layout / head dim / length bucket for
masked_attention, the class-count bucket for kd_loss), so the bench and the dispatcher compute it the same way.

Read once per process (per file path): a missing file on a GPU, an unreadable or malformed file, or a file with
no table for this device gives ONE warning (`DispatchTableWarning`) and the documented default order. On a CPU
a missing table is silent: CPU runs are never measured (the CPU order is the reference first, by design).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import threading
import warnings
from pathlib import Path

import torch

from dermfast.paths import default_cache_dir

ENV_VAR = "DERMFAST_DISPATCH_TABLE"
FORMAT = 1
FILE_NAME = "dispatch_table.json"


class DispatchTableWarning(UserWarning):
    """The dispatch table cannot be used (missing on a GPU, corrupt, or for another device)."""


def table_path() -> Path:
    """$DERMFAST_DISPATCH_TABLE, else <dermfast cache>/dispatch_table.json."""
    explicit = os.environ.get(ENV_VAR)
    return Path(explicit).expanduser() if explicit else default_cache_dir() / FILE_NAME


# ------------------------------------------------------------------------------------------ shape classes


def bucket(n: int) -> int:
    """The smallest power of two >= n (>= 1): lengths 49..64 share a class, 65..128 the next."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def entry_key(dtype: torch.dtype, grad: bool, shape_class: str) -> str:
    return f"{str(dtype).removeprefix('torch.')}|{'fwd+bwd' if grad else 'fwd'}|{shape_class}"


# ------------------------------------------------------------------------------------------ device names

_names: dict[str, str] = {}


def device_name(device: torch.device) -> str:
    """The name a table is keyed by: the GPU's name (torch.cuda.get_device_name), "cpu" for CPU tensors."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = f"cuda:{idx}"
    if key not in _names:
        _names[key] = torch.cuda.get_device_name(idx)
    return _names[key]


# ------------------------------------------------------------------------------------------ reading

_lock = threading.Lock()
_loaded: dict[str, dict | None] = {}   # path -> {"devices": ...} or None (unusable), read once per path
_warned: set[tuple[str, str]] = set()  # (path, device) already warned about
reads = 0                              # how many times a file was actually read (tests check "read once")


def reset() -> None:
    """Forget what was read (tests; a process that rewrote the table)."""
    global reads
    with _lock:
        _loaded.clear()
        _warned.clear()
        reads = 0


def _warn_once(path: Path, device: str, msg: str) -> None:
    key = (str(path), device)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"dermfast: {msg}; using the documented default backend order", DispatchTableWarning,
                  stacklevel=5)


def _load(path: Path) -> dict | str:
    """The parsed file, or why it cannot be used."""
    global reads
    reads += 1
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot read the dispatch table {path} ({type(e).__name__}: {e})"
    try:
        data = json.loads(text)
    except ValueError as e:
        return f"the dispatch table {path} is not valid JSON ({e})"
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("devices"), dict):
        return f"the dispatch table {path} is not a format-{FORMAT} table (rewrite it: python -m dermfast.bench)"
    for dev, table in data["devices"].items():
        if not isinstance(table, dict) or not isinstance(table.get("entries", {}), dict):
            return f"the dispatch table {path} has a malformed entry for {dev!r}"
    return data


def device_table(device: torch.device) -> dict | None:
    """This device's table ({"entries": ..., "written": ...}) or None, warning once when it cannot be used."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return None  # a question about a hypothetical GPU (tests, `info` on a CPU machine): nothing measured
    path = table_path()
    name = device_name(device)
    with _lock:
        if str(path) not in _loaded:
            got = _load(path)
            _loaded[str(path)] = got if isinstance(got, dict) else {"error": got}
        data = _loaded[str(path)]
        if "error" in data:
            if data["error"] == "missing":
                if torch.device(device).type == "cuda":
                    _warn_once(path, name, f"no dispatch table at {path} (measure one: python -m dermfast.bench)")
            else:
                _warn_once(path, name, data["error"])
            return None
        table = data["devices"].get(name)
        if table is None:
            _warn_once(path, name, f"the dispatch table {path} was measured on {', '.join(data['devices']) or 'no device'}"
                                   f", not on {name}")
        return table


def measured_order(op: str, device: torch.device, key: str) -> list[str] | None:
    """Backends from fastest to slowest for `op` / `key` on this device, or None (no table, no entry)."""
    table = device_table(device)
    if table is None:
        return None
    entry = table.get("entries", {}).get(op, {}).get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("order"), list):
        return None
    return [b for b in entry["order"] if isinstance(b, str)]


# ------------------------------------------------------------------------------------------ writing


def entries_from_rows(rows: list[dict], native: tuple[str, ...] = ("cuda", "triton")) -> dict:
    """{op: {key: entry}} from benchmark rows that name a registry backend (columns `op`, `backend`,
    `dispatch_key`, status ok). Order: by median time; `ratio_to_best_peer`: the fastest peer's median over the
    fastest native (dermfast kernel) median, absent when either side was not measured. `torch` (the reference)
    is ordered with the others but is neither a peer nor dermfast's kernel in the ratio."""
    groups: dict[tuple[str, str], dict[str, tuple[float, str]]] = {}
    for r in rows:
        if r.get("status") != "ok" or not r.get("backend") or not r.get("dispatch_key") or not r.get("median_ms"):
            continue
        ms = float(r["median_ms"])
        g = groups.setdefault((r["op"], r["dispatch_key"]), {})
        if r["backend"] not in g or ms < g[r["backend"]][0]:
            g[r["backend"]] = (ms, r.get("workload", ""))
    out: dict[str, dict] = {}
    for (op, key), times in sorted(groups.items()):
        order = sorted(times, key=lambda b: times[b][0])
        entry = {"order": order, "median_ms": {b: round(times[b][0], 6) for b in order},
                 "workload": times[order[0]][1]}
        ours = [times[b][0] for b in order if b in native]
        peers = [times[b][0] for b in order if b not in native and b != "torch"]
        if ours and peers:
            entry["ratio_to_best_peer"] = round(min(peers) / min(ours), 3)
        out.setdefault(op, {})[key] = entry
    return out


def write_table(entries: dict, device: str, *, source: str = "", path: Path | None = None) -> Path:
    """Merge `entries` ({op: {key: entry}}) into the table of `device` and write the file atomically
    (temporary name, then rename). Other devices' tables in the file are kept."""
    path = Path(path) if path is not None else table_path()
    data: dict = {"format": FORMAT, "devices": {}}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(old, dict) and old.get("format") == FORMAT and isinstance(old.get("devices"), dict):
            data = old
    except (OSError, ValueError):
        pass
    table = data["devices"].setdefault(device, {"entries": {}})
    table.update(written=dt.date.today().isoformat(), torch=torch.__version__, source=str(source))
    for op, by_key in entries.items():
        table.setdefault("entries", {}).setdefault(op, {}).update(by_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    with _lock:
        _loaded.pop(str(path), None)
    return path


def describe(device: torch.device) -> str:
    """Lines for `python -m dermfast.info`: the table in use for this device, one line per entry."""
    path = table_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DispatchTableWarning)
        table = device_table(device)
    name = device_name(device)
    if table is None:
        err = (_loaded.get(str(path)) or {}).get("error")
        why = "missing" if err == "missing" else (err or f"no table for {name} in it")
        return f"dispatch table: {path}: {why}; documented default order"
    lines = [f"dispatch table: {path} for {name} (written {table.get('written', '?')}, torch {table.get('torch', '?')})"]
    for op, by_key in sorted(table.get("entries", {}).items()):
        for key, e in sorted(by_key.items()):
            ratio = e.get("ratio_to_best_peer")
            lines.append(f"  {op:<17} {key:<36} {' > '.join(e.get('order', []))}"
                         + (f"  (ratio_to_best_peer {ratio})" if ratio is not None else ""))
    return "\n".join(lines)
