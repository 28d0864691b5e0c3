"""`python -m dermfast.bench`: every benchmarks/bench_<name>.py in one run, one table, one results file.

    python -m dermfast.bench [--quick] [--only NAME ...] [--out DIR|FILE.csv] [--list] [--dir DIR] [--no-ceilings]
                             [--budget-s S]

Order of a run: the two ceilings first (`_common.measure_ceilings`, rows of bench "ceilings", as
benchmarks/bench_ceilings.py reports them: bf16 matmul 8192^3 and a 2 GiB device copy, on the device present),
then each module's `run(quick)`. Every row is then read against its best peer
(`ratio_to_best_peer`) and against the measured ceiling (`frac_of_ceiling`). A module that fails to import,
raises, or returns malformed rows becomes an error row and the others still run; the exit status is 1 when any
row is an error. A file without `run` is listed as skipped (it is a standalone script, not a harness bench).
Op benches run in name order, the end-to-end ones (loader, mae_step) last.

Time limits: `--budget-s` starts no module past that many seconds (the rest are listed as skipped); SIGTERM
(what `timeout` sends) stops the run but still writes every row measured so far, including the rows a
module's run() had measured when it was interrupted, if it attached them to the exception as `partial_rows`.

Results: <--out>/<device>-<date>.csv, --out a folder (default runs/bench/ under the working directory, which
git ignores, so a checkout stays clean) or a .csv file; benchmarks/run_gpu.sh passes `--out benchmarks/results`
to add to the committed results. Each row has the device, driver, torch / Triton / CUDA versions and git commit
(`_common.environment`); a markdown summary goes beside it (same name, .md): the table plus each module's
optional `summary(rows)` section. The console output fits 120 columns: the table (`_common.format_table`: short
headers, empty columns left out, long cells wrapped in their column, a long status on its own lines under its
row) and the summaries (long lines wrapped, markdown table rows cut; the .md file has them whole). The
benchmarks/ folder is found next to the package (a source checkout or an editable install); `--dir` or
$DERMFAST_BENCH_DIR point elsewhere.

Dispatch table: a full run (not --quick) on a GPU also writes the measured backend order of each op to the
dispatch table that automatic dispatch reads ($DERMFAST_CACHE/dispatch_table.json, dermfast/ops/dispatch_table.py):
the rows that name a registry backend (columns op, backend, dispatch_key: the bench ran it through the op with
`backend=`) are ranked by median time per device, dtype, pass and shape class, with `ratio_to_best_peer`.
`--no-dispatch-table` leaves the table alone. CPU and --quick rows never become a table.

On a CPU only `--quick` makes sense: tiny shapes that prove the harness works (CI runs it). CPU numbers are
not performance results, and the output says so.
"""
from __future__ import annotations

import ast
import gc
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch
from dermfast.cliparse import OneLineParser

ENV_DIR = "DERMFAST_BENCH_DIR"
CEILINGS = "ceilings"
RUN_LAST = ("loader", "mae_step")  # end-to-end benches run after the op benches: they take the longest


class Stopped(BaseException):
    """SIGTERM (e.g. `timeout`) arrived: stop starting modules, still write what was measured."""


def _on_sigterm(signum, frame):
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not interrupt writing the results
    raise Stopped(f"signal {signum}")


class BenchDirError(RuntimeError):
    """benchmarks/ cannot be found or is not a benchmarks folder."""


def find_bench_dir(explicit: str | os.PathLike | None = None) -> Path:
    """--dir, else $DERMFAST_BENCH_DIR, else <package root>/benchmarks (a source checkout / editable install)."""
    if explicit is None:
        explicit = os.environ.get(ENV_DIR) or None
    if explicit is not None:
        d = Path(explicit).expanduser().resolve()
        where = f"--dir / ${ENV_DIR} = {d}"
    else:
        import dermfast
        d = Path(dermfast.__file__).resolve().parent.parent / "benchmarks"
        where = f"{d} (next to the dermfast package)"
    if not d.is_dir():
        raise BenchDirError(f"benchmarks folder not found at {where}: the benchmarks live in the source checkout, "
                            "not in an installed wheel; run from a checkout (pip install -e .) or pass --dir")
    if not (d / "_common.py").is_file():
        raise BenchDirError(f"{d} has no _common.py: not a dermfast benchmarks folder")
    return d


def discover(bench_dir: Path) -> dict[str, Path]:
    """{name: path} for every bench_<name>.py, sorted by name (the ceilings included)."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(bench_dir.glob("bench_*.py"))}


def describe(path: Path) -> str:
    """First line of a bench file's docstring, read without importing it."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (SyntaxError, UnicodeDecodeError, OSError) as e:
        return f"(unreadable: {type(e).__name__})"
    return (doc or "").strip().splitlines()[0] if doc else ""


def load_common(bench_dir: Path) -> ModuleType:
    """The folder's _common.py, registered as `_common` so its bench files import this very one."""
    if str(bench_dir) in sys.path:  # first on the path, so `import _common` and siblings resolve to this folder
        sys.path.remove(str(bench_dir))
    sys.path.insert(0, str(bench_dir))
    return _load(bench_dir / "_common.py", "_common")


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # before exec: dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def _why(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def _check_rows(rows, common: ModuleType) -> str | None:
    """None if `rows` is a list of row dicts, else what is wrong with it."""
    if not isinstance(rows, list):
        return f"run() returned {type(rows).__name__}, expected a list of rows"
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            return f"row {i} is a {type(r).__name__}, expected a dict from _common.row()"
        missing = [k for k in common.FIELDS if k not in r]
        if missing:
            return f"row {i} lacks {', '.join(missing)} (make rows with _common.row())"
    return None


def _partial(e: BaseException, common: ModuleType) -> list[dict]:
    """Rows a run() measured before it was interrupted, if it attached them as `e.partial_rows`."""
    rows = getattr(e, "partial_rows", None)
    return rows if rows and _check_rows(rows, common) is None else []


def _free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_module(name: str, path: Path, quick: bool, common: ModuleType) -> tuple[list[dict], ModuleType | None]:
    """Rows of one bench file; any failure becomes one error row."""
    bench = name
    try:
        mod = _load(path, f"bench_{name}")
    except BaseException as e:  # noqa: BLE001  (SystemExit at import too: one file must not stop the run)
        if isinstance(e, (KeyboardInterrupt, Stopped)):
            raise
        traceback.print_exc()
        return [common.error_row(bench, f"import failed: {_why(e)}")], None
    run = getattr(mod, "run", None)
    if not callable(run):
        return [common.row(bench, "", "", "", "", "", status="skipped: no run(quick) function: a standalone "
                           f"script (python {path.name}), not a harness bench")], mod
    try:
        rows = run(quick=quick)
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, (KeyboardInterrupt, Stopped)):
            raise
        traceback.print_exc()
        return _partial(e, common) + [common.error_row(bench, f"run() raised {_why(e)}")], mod
    finally:
        _free_device()
    bad = _check_rows(rows, common)
    if bad:
        return [common.error_row(bench, bad)], mod
    return rows, mod


def summary_markdown(rows: list[dict], env: dict, sections: list[str], quick: bool, common: ModuleType,
                     ceilings: dict) -> str:
    """Header (device, versions, commit), ceilings, each module's summary, the measured rows as a table, and the
    peers absent here condensed to one line each (bench, impl, why)."""
    head = [f"# Benchmarks on {env['device']} ({env['date']})", "",
            f"driver {env['driver']}, torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, "
            f"python {env['python']}, commit {env['commit']}, {'--quick' if quick else 'full'} run.", ""]
    if not torch.cuda.is_available():
        head += ["**No GPU: CPU numbers are not performance results.** This file only proves the harness ran.", ""]
    if ceilings:
        head += [f"Measured ceilings: bf16 matmul {ceilings['matmul_tflops']:.4g} TFLOP/s, device copy "
                 f"{ceilings['copy_gbps']:.4g} GB/s (fp32 and tiny on a CPU).", ""]
    head += [s.rstrip() + "\n" for s in sections if s and s.strip()]
    measured = [r for r in rows if not str(r.get("status", "")).startswith("absent")]
    head += ["## All rows", "", "`frac_of_ceiling`: TFLOP/s over the measured bf16 matmul ceiling, or GB/s over "
             "the measured device-copy ceiling. `ratio_to_best_peer`: best peer's time over dermfast's "
             "(> 1: dermfast faster).", "", common.markdown_table(measured), ""]
    absent = {(r["bench"], r["impl"], r["status"].removeprefix("absent: ")): None
              for r in rows if str(r.get("status", "")).startswith("absent")}
    if absent:
        head += ["## Absent here", ""] + [f"- {b} `{i}`: {why}" for b, i, why in absent] + [""]
    return "\n".join(head)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m dermfast.bench", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="tiny shapes, seconds: proves the harness, not a result")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these (mae_step or bench_mae_step.py)")
    p.add_argument("--out", type=Path, help="results folder (default runs/bench/: <device>-<date>.csv in it) or "
                                            "a .csv file; the markdown summary goes beside it. "
                                            "--out benchmarks/results adds to the committed results")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--dir", help=f"benchmarks folder (default: next to the package, or ${ENV_DIR})")
    p.add_argument("--no-ceilings", action="store_true", help="do not measure the matmul / copy ceilings")
    p.add_argument("--budget-s", type=float, help="start no module after this many seconds (the rest: skipped)")
    p.add_argument("--no-dispatch-table", action="store_true",
                   help="do not write the measured backend order (a full GPU run writes it by default)")
    args = p.parse_args(argv)

    try:
        bench_dir = find_bench_dir(args.dir)
    except BenchDirError as e:
        print(f"dermfast.bench: {e}", file=sys.stderr)
        return 2
    found = discover(bench_dir)
    if args.list:
        for name, path in found.items():
            print(f"{name:<22} {describe(path)}"[:120])
        return 0
    names = sorted((n for n in found if n != CEILINGS), key=lambda n: (n in RUN_LAST, RUN_LAST.index(n)
                                                                       if n in RUN_LAST else 0, n))
    if args.only:
        wanted = [w.removesuffix(".py").removeprefix("bench_") for w in args.only]
        unknown = [w for w in wanted if w not in found]
        if unknown:
            print(f"dermfast.bench: unknown benchmark(s) {', '.join(unknown)}; available: "
                  f"{', '.join(found) or '(none)'}", file=sys.stderr)
            return 2
        names = [w for w in dict.fromkeys(wanted) if w != CEILINGS]

    common = load_common(bench_dir)
    gpu = torch.cuda.is_available()
    import signal
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return _run_all(args, found, names, common, gpu)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def write_dispatch_table(rows: list[dict], device: str, source: str = "", path: Path | None = None) -> Path | None:
    """Rank the registry-backend rows (op, backend, dispatch_key) into the dispatch table of `device`; None when
    no row names a backend (nothing measured to dispatch by)."""
    from dermfast.ops import dispatch_table
    entries = dispatch_table.entries_from_rows(rows)
    if not entries:
        return None
    return dispatch_table.write_table(entries, device, source=source, path=path)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _run_all(args, found: dict[str, Path], names: list[str], common: ModuleType, gpu: bool) -> int:
    start = time.perf_counter()
    if not gpu:
        print(common.CPU_WARNING + ("" if args.quick else " (use --quick on a CPU)"), file=sys.stderr)
    rows: list[dict] = []
    ceilings: dict = {}
    modules: dict[str, ModuleType] = {}
    stopped = ""
    try:
        if not args.no_ceilings:
            print("measuring ceilings ...", file=sys.stderr, flush=True)
            try:
                ceilings, ceiling_rows = common.measure_ceilings(args.quick)
                rows += ceiling_rows
            except Exception as e:  # noqa: BLE001  (reported as a row; the other benches still run)
                traceback.print_exc()
                rows.append(common.error_row(CEILINGS, f"measure_ceilings() raised {_why(e)}"))
            _free_device()
        for i, name in enumerate(names):
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                rows += [common.row(n, "", "", "", "", "", status=f"skipped: past the {args.budget_s:.0f} s "
                                    "budget (--budget-s)") for n in names[i:]]
                break
            print(f"running {name} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            try:
                got, mod = run_module(name, found[name], args.quick, common)
            except Stopped as e:
                e.bench = name
                raise
            print(f"  {name}: {len(got)} rows in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            rows += got
            if mod is not None:
                modules[name] = mod
    except Stopped as e:
        stopped = f"stopped by {e} while running; rows measured so far were kept"
        print(f"dermfast.bench: {stopped}", file=sys.stderr, flush=True)
        rows += _partial(e, common)
        done = {r["bench"] for r in rows}
        for n in names:
            if n == getattr(e, "bench", None):
                rows.append(common.error_row(n, stopped))
            elif n not in done:
                rows.append(common.row(n, "", "", "", "", "", status="skipped: the run was stopped before it"))
    for r in rows:
        r["mode"] = "quick" if args.quick else "full"
    rows = common.fill_ceiling_fracs(common.fill_ratios(rows), ceilings)

    sections = []
    for name, mod in modules.items():
        fn = getattr(mod, "summary", None)
        if callable(fn):
            try:
                sections.append(fn([r for r in rows if r["bench"] == name]))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append(common.error_row(name, f"summary() raised {_why(e)}"))
    env = common.environment()
    out = common.write_rows(rows, args.out, env=env)
    md = out.with_suffix(".md")
    md.write_text(summary_markdown(rows, env, sections, args.quick, common, ceilings), encoding="utf-8")

    if gpu and not args.quick and not args.no_dispatch_table:
        table = write_dispatch_table(rows, env["device"], source=str(out))
        if table is not None:
            print(f"dispatch table for {env['device']} written to {table}")
    # the table first, the short summaries last (a terminal, or a log's tail, shows the end)
    print("\n" + common.format_table(rows))
    for s in sections:
        print("\n" + common.fit_lines(s.rstrip()))
    print(f"\nwrote {out} and {md.name}")
    if ceilings:
        print(f"ceilings on {env['device']}: matmul {ceilings['matmul_tflops']:.4g} TFLOP/s, "
              f"copy {ceilings['copy_gbps']:.4g} GB/s")
    errors = [r for r in rows if common.is_error(r)]
    if not gpu:
        print(common.CPU_WARNING)
    if errors:
        print(f"{len(errors)} error row(s): " + ", ".join(sorted({r['bench'] for r in errors})))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
