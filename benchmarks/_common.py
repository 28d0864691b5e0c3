"""What every benchmarks/bench_<op>.py shares: timing, peak memory, the environment row, the results file.

The contract between a bench module and `python -m dermfast.bench`:

    def run(quick: bool = False) -> list[dict]      # one row per (workload, implementation)
    if __name__ == "__main__": main(run)             # a bench file also runs on its own

Rows are made with `row(...)`: workload, shape, dtype, impl, pass ("fwd" | "bwd" | "fwd+bwd" | "step"),
median / p20 / p80 ms, and optional throughput (`tflops` or `gbps`), `peak_mib`, `status` ("ok", or
"absent: <why>" for a peer that is not importable here, never dropped) and `note`.

Timing: on CUDA `triton.testing.do_bench` (CUDA events, median and quantiles, cache flushed between runs);
on CPU a perf_counter loop, only to prove the harness works: CPU numbers are not performance results.
"""
from __future__ import annotations

import csv
import datetime as dt
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"
FIELDS = ["bench", "workload", "shape", "dtype", "impl", "pass", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps",
          "peak_mib", "ratio_to_best_peer", "status", "note"]


def on_gpu() -> bool:
    return torch.cuda.is_available()


def time_fn(fn: Callable[[], object], *, warmup: int = 5, rep: int = 30) -> dict:
    """Median and 20 / 80 % quantiles of fn() in ms (device events on CUDA; wall clock on CPU)."""
    if on_gpu():
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=warmup * 5, rep=rep * 5, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(max(1, warmup // 2)):
        fn()
    times = []
    for _ in range(max(3, rep // 5)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def peak_mib(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory allocated while fn() runs, above what was allocated before (MiB); None on CPU."""
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def row(bench: str, workload: str, shape: str, dtype, impl: str, pass_: str, timing: dict | None = None, *,
        flops: float | None = None, bytes_: float | None = None, peak: float | None = None,
        status: str = "ok", note: str = "") -> dict:
    """One result row; throughput is derived from the median time when flops or bytes_ are given."""
    r = {k: "" for k in FIELDS}
    r.update(bench=bench, workload=workload, shape=shape, dtype=str(dtype).removeprefix("torch."), impl=impl,
             status=status, note=note)
    r["pass"] = pass_
    if timing:
        r.update({k: f"{v:.4f}" for k, v in timing.items()})
        ms = timing["median_ms"]
        if flops:
            r["tflops"] = f"{flops / ms / 1e9:.1f}"
        if bytes_:
            r["gbps"] = f"{bytes_ / ms / 1e6:.1f}"
    if peak is not None:
        r["peak_mib"] = f"{peak:.1f}"
    return r


def absent(bench: str, workload: str, shape: str, dtype, impl: str, pass_: str, why: str) -> dict:
    """A peer that cannot run here is reported, not dropped."""
    return row(bench, workload, shape, dtype, impl, pass_, status=f"absent: {why}")


def fill_ratios(rows: list[dict], ours_prefix: str = "dermfast") -> list[dict]:
    """ratio_to_best_peer for dermfast rows: best peer median / ours (> 1 means faster than every peer)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok" and r["median_ms"]:
            groups.setdefault((r["bench"], r["workload"], r["shape"], r["dtype"], r["pass"]), []).append(r)
    for group in groups.values():
        peers = [float(r["median_ms"]) for r in group if not r["impl"].startswith(ours_prefix)]
        for r in group:
            if r["impl"].startswith(ours_prefix) and peers:
                r["ratio_to_best_peer"] = f"{min(peers) / float(r['median_ms']):.2f}"
    return rows


def environment() -> dict:
    """GPU name, driver, versions and git commit: written beside every result."""
    def version(name: str) -> str:
        try:
            from importlib.metadata import version as v
            return v(name)
        except Exception:
            return "absent"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:
        commit = ""
    env = {"date": dt.date.today().isoformat(), "torch": torch.__version__, "triton": version("triton"),
           "cuda": torch.version.cuda or "none", "commit": commit or "unknown", "python": platform.python_version()}
    if on_gpu():
        env["device"] = torch.cuda.get_device_name()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
            env["driver"] = out[0] if out else "unknown"
        except Exception:
            env["driver"] = "unknown"
    else:
        env["device"] = f"cpu-{platform.machine()}"
        env["driver"] = "none"
    return env


def device_slug(env: dict) -> str:
    return "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")


def write_rows(rows: list[dict], out: Path | None = None) -> Path:
    """Append rows (with the environment) to benchmarks/results/<device>-<date>.csv or `out`."""
    env = environment()
    out = out or RESULTS / f"{device_slug(env)}-{env['date']}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = FIELDS + list(env)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**r, **env})
    return out


def format_table(rows: list[dict]) -> str:
    cols = ["bench", "workload", "shape", "dtype", "impl", "pass", "median_ms", "tflops", "gbps", "peak_mib",
            "ratio_to_best_peer", "status"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols} if rows else {}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)] if rows else []
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main(run: Callable[[bool], list[dict]], argv: list[str] | None = None) -> int:
    """Entry point of a bench file: `python benchmarks/bench_<op>.py [--quick] [--out FILE]`."""
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny shapes: proves the harness, not a result")
    p.add_argument("--out", type=Path, help="results CSV (default benchmarks/results/<device>-<date>.csv)")
    args = p.parse_args(argv)
    rows = fill_ratios(run(args.quick))
    print(format_table(rows))
    if not on_gpu():
        print("note: no GPU here; CPU numbers are not performance results", file=sys.stderr)
    print(f"wrote {write_rows(rows, args.out)}")
    return 0
