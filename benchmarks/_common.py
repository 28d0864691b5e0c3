"""What every benchmarks/bench_<op>.py shares: timing, peak memory, the environment row, the results file.

The contract between a bench module and `python -m dermfast.bench`:

    def run(quick: bool = False) -> list[dict]      # one row per (workload, implementation)
    def summary(rows: list[dict]) -> str            # optional: a markdown section for the summary file
    if __name__ == "__main__": sys.exit(main(run))   # a bench file also runs on its own

Rows are made with `row(...)`: workload, shape, dtype, impl, pass ("fwd" | "bwd" | "fwd+bwd" | "step"),
median / p20 / p80 ms, and optional throughput (`tflops` or `gbps`), `peak_mib`, `status` ("ok", or
"absent: <why>" for a peer that is not importable here, never dropped; "error: <why>" for a failure) and
`note`. `extra={...}` adds bench-specific columns (the results CSV takes the union of every row's keys).

A row's `bench` is the file's name without `bench_`. A run() that is interrupted (SIGTERM from the harness's
time limit) may attach the rows it measured so far to the exception as `e.partial_rows`: they are kept.

The harness fills two columns afterwards: `ratio_to_best_peer` (`fill_ratios`: best peer's median over ours, for
impls named dermfast*) and `frac_of_ceiling` (`fill_ceiling_fracs`: TFLOP/s over the measured bf16 matmul
ceiling, or GB/s over the measured device-copy ceiling; `measure_ceilings` measures both, and
benchmarks/bench_ceilings.py is the bench file that reports them on their own).

Timing: on CUDA `triton.testing.do_bench` (CUDA events, median and quantiles, cache flushed between runs);
on CPU a perf_counter loop, only to prove the harness works: CPU numbers are not performance results.
"""
from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

RESULTS = Path(__file__).parent / "results"   # the committed GPU results (benchmarks/run_gpu.sh: --out RESULTS)
DEFAULT_OUT = Path("runs") / "bench"             # default results folder, under the working directory (runs/ is
                                                 # where training runs go, and git ignores it): a checkout stays clean
CONSOLE_WIDTH = 120                              # the printed table fits this many columns
CONSOLE_HEADERS = {"frac_of_ceiling": "of_ceil", "ratio_to_best_peer": "vs_peer"}  # short console names
CONSOLE_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
# the console's columns: tflops and gbps (a row has one at most) share one column, "12.3 TFLOP/s" or "456 GB/s"
CONSOLE_COLS = ["bench", "workload", "shape", "dtype", "impl", "pass", "median_ms", "throughput", "frac_of_ceiling",
                "ratio_to_best_peer", "peak_mib", "status"]
FIELDS = ["bench", "workload", "shape", "dtype", "impl", "pass", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps",
          "peak_mib", "ratio_to_best_peer", "frac_of_ceiling", "status", "note"]
TABLE_COLS = ["bench", "workload", "shape", "dtype", "impl", "pass", "median_ms", "tflops", "gbps",
              "frac_of_ceiling", "ratio_to_best_peer", "peak_mib", "status"]
CPU_WARNING = "note: no GPU here; CPU numbers are not performance results"
CEILINGS_BENCH = "ceilings"  # the `bench` of the two ceiling rows (`measure_ceilings`)


def on_gpu() -> bool:
    return torch.cuda.is_available()


def time_fn(fn: Callable[[], object], *, warmup: int = 5, rep: int = 30, host: bool = False) -> dict:
    """Median and 20 / 80 % quantiles of fn() in ms (device events on CUDA; wall clock on CPU, or for host-only
    work such as the sampler's numpy code when `host=True`: device events would not see it)."""
    if on_gpu() and not host:
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
    return summarize_ms(times)


def summarize_ms(times: list[float]) -> dict:
    """{median_ms, p20_ms, p80_ms} of a list of per-run times in ms."""
    if not times:
        raise ValueError("summarize_ms: no times")
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
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


def _num(x: float) -> str:
    """One decimal for device-sized numbers, three significant digits for small (CPU) ones."""
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def _ms(x: float) -> str:
    """Four decimals, or four significant digits below 1 ms (microsecond kernels keep their precision)."""
    return f"{x:.4f}" if abs(x) >= 1 else f"{x:.4g}"


def row(bench: str, workload: str, shape: str, dtype, impl: str, pass_: str, timing: dict | None = None, *,
        flops: float | None = None, bytes_: float | None = None, peak: float | None = None,
        status: str = "ok", note: str = "", extra: dict | None = None) -> dict:
    """One result row; throughput is derived from the median time when flops or bytes_ are given.

    `extra`: bench-specific columns (e.g. images_per_s); they go to the CSV, not to the printed table.
    """
    r = {k: "" for k in FIELDS}
    r.update(bench=bench, workload=workload, shape=shape, dtype=str(dtype).removeprefix("torch."), impl=impl,
             status=status, note=note)
    r["pass"] = pass_
    if timing:
        r.update({k: _ms(v) for k, v in timing.items() if k in ("median_ms", "p20_ms", "p80_ms")})
        ms = timing["median_ms"]
        if flops:
            r["tflops"] = _num(flops / ms / 1e9)
        if bytes_:
            r["gbps"] = _num(bytes_ / ms / 1e6)
    if peak is not None:
        r["peak_mib"] = f"{peak:.1f}"
    for k, v in (extra or {}).items():
        if k in ("bench", "workload", "shape", "dtype", "impl", "pass", "status"):
            raise ValueError(f"row: extra column {k!r} would overwrite a core column")
        r[k] = v if isinstance(v, str) else ("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
    return r


def absent(bench: str, workload: str, shape: str, dtype, impl: str, pass_: str, why: str) -> dict:
    """A peer that cannot run here is reported, not dropped."""
    return row(bench, workload, shape, dtype, impl, pass_, status=f"absent: {why}")


def error_row(bench: str, why: str, *, workload: str = "", shape: str = "", dtype="", impl: str = "",
              pass_: str = "") -> dict:
    """A benchmark (or one of its cases) that failed: reported as a row, so the rest of the run still counts."""
    one_line = " ".join(str(why).split())
    return row(bench, workload, shape, dtype, impl, pass_, status=f"error: {one_line}")


def is_error(r: dict) -> bool:
    return str(r.get("status", "")).startswith("error")


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


def fill_ceiling_fracs(rows: list[dict], ceilings: dict | None) -> list[dict]:
    """frac_of_ceiling = TFLOP/s / measured matmul ceiling, else GB/s / measured copy ceiling.

    `ceilings`: {"matmul_tflops": float, "copy_gbps": float} (`measure_ceilings`); rows of
    the ceilings themselves are left blank.
    """
    if not ceilings:
        return rows
    mm, cp = ceilings.get("matmul_tflops"), ceilings.get("copy_gbps")
    for r in rows:
        if r.get("bench") == CEILINGS_BENCH or r.get("status") != "ok":
            continue
        if r.get("tflops") and mm:
            r["frac_of_ceiling"] = f"{float(r['tflops']) / mm:.3f}"
        elif r.get("gbps") and cp:
            r["frac_of_ceiling"] = f"{float(r['gbps']) / cp:.3f}"
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
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
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
    env["cores"] = str(os.cpu_count() or "")
    return env


def device_slug(env: dict) -> str:
    return "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")


def results_path(out: Path | str | None, env: dict) -> Path:
    """Where the rows go: `out` itself when it names a .csv file; else <out>/<device>-<date>.csv, `out` a folder
    (default DEFAULT_OUT, runs/bench/ under the working directory; pass RESULTS, benchmarks/results, to add to
    the committed results as benchmarks/run_gpu.sh does)."""
    name = f"{device_slug(env)}-{env['date']}.csv"
    if out is None:
        return DEFAULT_OUT / name
    out = Path(out).expanduser()
    return out if out.suffix.lower() == ".csv" and not out.is_dir() else out / name


def write_rows(rows: list[dict], out: Path | None = None, env: dict | None = None) -> Path:
    """Append rows (with the environment) to `results_path(out)`: runs/bench/<device>-<date>.csv by default.

    Columns are the union of the file's existing header and the new rows' keys: when they differ the file is
    rewritten with the wider header, so rows from earlier runs stay aligned with their columns.
    """
    env = env or environment()
    out = results_path(out, env)
    out.parent.mkdir(parents=True, exist_ok=True)
    new_rows = [{**r, **env} for r in rows]
    old_rows: list[dict] = []
    old_fields: list[str] = []
    if out.exists() and out.stat().st_size:
        with open(out, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            old_rows = list(reader)
    fields = list(dict.fromkeys([*old_fields, *FIELDS, *(k for r in rows for k in r), *env]))
    if old_fields == fields:
        with open(out, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerows(new_rows)
        return out
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(old_rows)
        w.writerows(new_rows)
    os.replace(tmp, out)
    return out


def _cell(r: dict, c: str, width: int | None = None) -> str:
    if c == "throughput" and "throughput" not in r:
        s = f"{r['tflops']} TFLOP/s" if r.get("tflops") else f"{r['gbps']} GB/s" if r.get("gbps") else ""
    else:
        s = str(r.get(c, "") if r.get(c) is not None else "")
    return s if width is None or len(s) <= width else s[: width - 3] + "..."


def format_table(rows: list[dict], cols: Iterable[str] | None = None, max_width: int = 60,
                 width: int | None = CONSOLE_WIDTH) -> str:
    """Plain-text table of `cols`.

    width=None: TABLE_COLS by default, one line per row, cells longer than max_width cut with "...". With
    `width` (the console's 120): CONSOLE_COLS by default (short headers CONSOLE_HEADERS, dtypes as fp32 / bf16),
    columns empty in every row left out (the CSV keeps them), and every line fits `width`: a last-column cell
    (the status) longer than a short word goes on its own indented lines under its row, the other columns are
    narrowed (widest first, never below their header) when they do not fit, and a cell wider than its column
    wraps onto the next lines of its row. Nothing is cut."""
    import textwrap
    if not rows:
        return ""
    if width is None:
        cols = list(cols or TABLE_COLS)
        cells = [{c: _cell(r, c, max_width) for c in cols} for r in rows]
        heads = {c: c for c in cols}
    else:
        cols = list(cols or CONSOLE_COLS)
        cells = [{c: CONSOLE_DTYPES.get(_cell(r, c), _cell(r, c)) if c == "dtype" else _cell(r, c) for c in cols}
                 for r in rows]
        cols = [c for c in cols if any(x[c] for x in cells)] or cols
        heads = {c: CONSOLE_HEADERS.get(c, c) for c in cols}
    last = cols[-1]
    short = max(len(heads[last]), 8) if width is not None else None  # a longer status: its own lines
    widths = {c: max([len(heads[c]), *(len(x[c]) for x in cells if c != last or short is None or len(x[c]) <= short)])
              for c in cols}
    if width is not None:
        for c in cols[:-1]:
            widths[c] = min(widths[c], max(len(heads[c]), 24))
        while sum(widths.values()) + 2 * (len(cols) - 1) > width:
            c = max((c for c in cols if widths[c] > len(heads[c])), key=lambda c: widths[c], default=None)
            if c is None:
                break
            widths[c] -= 1
    lines = ["  ".join(heads[c].ljust(widths[c]) for c in cols).rstrip()]
    for x in cells:
        own = width is not None and len(x[last]) > short
        parts = {c: ([""] if c == last and own else textwrap.wrap(x[c], widths[c], break_on_hyphens=False) or [""])
                 for c in cols}
        for i in range(max(len(p) for p in parts.values())):
            lines.append("  ".join((parts[c][i] if i < len(parts[c]) else "").ljust(widths[c])
                                   for c in cols).rstrip())
        if own:
            lines += textwrap.wrap(x[last], width, initial_indent="    ", subsequent_indent="      ",
                                   break_on_hyphens=False)
    return "\n".join(lines)


def fit_lines(text: str, width: int = CONSOLE_WIDTH) -> str:
    """Text for the console, every line at most `width` columns: a markdown table row is cut (the .md file
    has it whole), other lines wrap with a two-space indent."""
    import textwrap
    out = []
    for line in text.splitlines():
        if len(line) <= width:
            out.append(line)
        elif line.lstrip().startswith("|"):
            out.append(line[: width - 3] + "...")
        else:
            lead = line[: len(line) - len(line.lstrip())]
            out += textwrap.wrap(line, width, initial_indent="", subsequent_indent=lead + "  ",
                                 break_on_hyphens=False, break_long_words=True) or [""]
    return "\n".join(out)


def markdown_table(rows: list[dict], cols: Iterable[str] | None = None) -> str:
    cols = list(cols or TABLE_COLS)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, c).replace("|", "/") for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def measure_ceilings(quick: bool = False) -> tuple[dict, list[dict]]:
    """The two ceilings every other number is read against, measured in the same run on the present device:
    ({"matmul_tflops", "copy_gbps"}, their two rows, bench "ceilings").

    - bf16 matmul, 8192 x 8192 x 8192, random normal data (never zeros: a product on zeros ran 13 % faster on an
      H200 here), through torch.matmul (cuBLAS): the compute ceiling for TFLOP/s rows.
    - device-to-device copy of 2 GiB (`Tensor.copy_`), counting bytes read + bytes written: the memory ceiling
      for GB/s rows. Both are far larger than L2, and do_bench flushes the cache between runs.

    On a CPU (only to prove the harness) the shapes are tiny and fp32: CPU numbers are not performance results.
    Here, not in bench_ceilings.py, because `main` below measures them before any bench file's rows: the bench
    files import this module, never the other way round.
    """
    gpu = on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    n = 8192 if gpu else (256 if quick else 1024)
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t_mm = time_fn(lambda: torch.matmul(a, b, out=c), warmup=5 if gpu else 2, rep=40 if gpu else 10)
    flops = 2.0 * n ** 3
    del a, b, c

    nbytes = (2 << 30) if gpu else ((8 << 20) if quick else (64 << 20))
    src = torch.randn(nbytes // 4, device=device, dtype=torch.float32, generator=g)
    dst = torch.empty_like(src)
    t_cp = time_fn(lambda: dst.copy_(src), warmup=5 if gpu else 2, rep=40 if gpu else 10)
    del src, dst
    if gpu:
        torch.cuda.empty_cache()

    note = "" if gpu else "CPU: not a performance result"
    rows = [row(CEILINGS_BENCH, "matmul ceiling", f"{n}x{n}x{n}", dtype, "torch.matmul", "fwd", t_mm, flops=flops,
                note=note),
            row(CEILINGS_BENCH, "copy ceiling", f"{nbytes / 2**20:.0f} MiB", torch.float32, "Tensor.copy_", "fwd",
                t_cp, bytes_=2.0 * nbytes, note=note)]
    ceilings = {"matmul_tflops": flops / t_mm["median_ms"] / 1e9, "copy_gbps": 2.0 * nbytes / t_cp["median_ms"] / 1e6}
    return ceilings, rows


def main(run: Callable[[bool], list[dict]], argv: list[str] | None = None) -> int:
    """Entry point of a bench file: `python benchmarks/bench_<op>.py [--quick] [--out FILE] [--no-ceilings]`.

    On a GPU the two ceilings are measured first so `frac_of_ceiling` is filled. Returns 1 if a row is an error.
    """
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny shapes: proves the harness, not a result")
    p.add_argument("--out", type=Path, help=f"results folder (default {DEFAULT_OUT}/, the file <device>-<date>.csv "
                                            f"in it) or a .csv file; --out {RESULTS.parent.name}/{RESULTS.name} "
                                            "adds to the committed results")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the matmul and copy ceilings")
    args = p.parse_args(argv)
    ceilings, ceiling_rows = ({}, [])
    if on_gpu() and not args.no_ceilings:
        ceilings, ceiling_rows = measure_ceilings(args.quick)
    rows = fill_ceiling_fracs(fill_ratios(ceiling_rows + run(args.quick)), ceilings)
    print(format_table(rows))
    summary = getattr(sys.modules.get(getattr(run, "__module__", "")), "summary", None)
    if callable(summary):
        print("\n" + fit_lines(summary(rows).rstrip()))
    if not on_gpu():
        print(CPU_WARNING, file=sys.stderr)
    print(f"wrote {write_rows(rows, args.out)}")
    return 1 if any(is_error(r) for r in rows) else 0
