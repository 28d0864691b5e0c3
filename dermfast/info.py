"""`python -m dermfast.info`: versions, devices, optional parts, and which backend serves each op and why.

`--selftest` also runs every op's self-test (dermfast/ops/selftest.py) on every capable backend now and prints
one table, op x backend: capable / passed / failed (why) / chosen, with the time each took; it exits 1 if a
capable backend failed. On a CPU the torch backend runs, and with `--interpret` the Triton kernels too, under
the Triton interpreter (TRITON_INTERPRET=1, set here before any kernel is defined).

`--resources [--arch sm_80 sm_90]` compiles every Triton kernel config (dermfast/ops/resources.py) and every csrc/
kernel (dermfast/ops/resources_csrc.py, needs nvcc) for those archs without a GPU and prints one table: kernel,
config, arch, dtype, registers, spills, shared memory, the arch's limit, verdict; it exits 1 if a row fails.
"""
from __future__ import annotations

import os
import platform
import sys

import torch

import dermfast
from dermfast.cliparse import OneLineParser
from dermfast import _optional as opt
from dermfast.ops.registry import Query, get_backend, ops


def _version(mod_name: str) -> str:
    try:
        from importlib.metadata import version
        return version(mod_name)
    except Exception:
        return "not installed"


def report() -> str:
    lines = [f"dermfast {dermfast.__version__}  python {platform.python_version()}  {platform.machine()}"]
    lines.append(f"torch {torch.__version__}  (CUDA build: {torch.version.cuda or 'none'})")
    for name in ("triton", "timm", "torchvision", "numba", "nvidia-dali-cuda130", "diffusers", "safetensors"):
        lines.append(f"  {name:<22} {_version(name)}")
    lines.append("optional parts:")
    lines.append(f"  triton        {'yes' if opt.HAS_TRITON else 'no  (' + opt.TRITON_REASON + ')'}")
    lines.append(f"  cuda ext (_C) {'yes' if opt.HAS_CUDA_EXT else 'no  (' + opt.CUDA_EXT_REASON + ')'}")
    lines.append(f"  dali          {'yes' if opt.HAS_DALI else 'no  (' + opt.DALI_REASON + ')'}")
    lines.append(f"  diffusers     {'yes' if opt.HAS_DIFFUSERS else 'no  (' + opt.DIFFUSERS_REASON + ')'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
        device = torch.device("cuda")
    else:
        lines.append("device: no CUDA GPU visible; ops run on the CPU")
        device = torch.device("cpu")
    if opt.HAS_CUDA_EXT:
        ext = opt.cuda_ext
        lines.append(f"cuda ext: runtime {ext.cuda_runtime_version()}, driver {ext.cuda_driver_version()}, "
                     f"archs {ext.compiled_cuda_archs()}, {ext.device_count()} device(s)")
    requested = get_backend()
    lines.append(f"backend requested: {requested or 'auto'} (DERMFAST_BACKEND)")
    from dermfast.ops import dispatch_table
    lines.append(dispatch_table.describe(device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines.append(f"op dispatch for {device.type} / {str(dtype).removeprefix('torch.')}:")
    for name, op in sorted(ops().items()):
        q = Query(device, dtype, {})
        reasons = op.reasons(q)
        try:
            chosen = op.select(q).backend
        except Exception as e:  # an explicit DERMFAST_BACKEND that cannot serve: show it, do not crash
            chosen = f"none ({e.__class__.__name__})"
        lines.append(f"  {name:<16} -> {chosen}")
        for b in op.backends():
            why = reasons[b]
            if why is None and b == "triton" and device.type == "cpu":
                why = "fits when asked for explicitly (interpreter on CPU); automatic choice skips it"
            lines.append(f"      {b:<11} {'fits' if why is None else why}")
    return "\n".join(lines)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def selftest_table(device: torch.device, dtypes: list[torch.dtype]) -> tuple[str, bool]:
    """Run every self-test on every capable backend now; (the table, whether all capable backends passed).
    Fresh verdicts are written to the self-test cache, as automatic dispatch would write them."""
    from dermfast.ops import selftest
    registry = ops()
    rows = [f"self-test on {selftest._device_str(device)} ({selftest.device_name(device)})"
            + (", Triton interpreted (TRITON_INTERPRET=1)" if device.type == "cpu" and
               os.environ.get("TRITON_INTERPRET") == "1" else "") + ":",
            f"  {'op':<17} {'dtype':<9} {'backend':<11} {'result':<60} {'time':>8}"]
    all_ok = True
    cache = selftest._cache_file(device)
    for name in sorted(selftest.CHECKS):
        op = registry.get(name)
        if op is None:
            continue
        for dtype in dtypes:
            q = Query(device, dtype, {})
            reasons = op.reasons(q)
            verdicts: dict[str, str | None] = {}
            cells: dict[str, tuple[str, str]] = {}
            for b in op.backends():
                if reasons[b] is not None:
                    cells[b] = (f"not capable: {reasons[b]}", "")
                    continue
                why, secs = selftest.run_check(name, b, device, dtype)
                verdicts[b] = why
                if b != "torch":
                    selftest._write_cache(cache, selftest.fingerprint(device),
                                          f"{name}|{b}|{str(dtype).removeprefix('torch.')}", why)
                all_ok &= why is None
                cells[b] = ("passed" if why is None else f"FAILED: {why}", f"{secs:7.2f}s")
            chosen = next((b for b in op.order(Query(device, dtype, {}, True))[0] if b in verdicts
                           and verdicts[b] is None and not (b == "triton" and device.type == "cpu")), None)
            for b in op.backends():
                result, secs = cells[b]
                if b == chosen:
                    result += "  <- chosen"
                elif b == "triton" and device.type == "cpu" and verdicts.get(b, 1) is None:
                    result += "  (automatic choice skips interpreted Triton)"
                rows.append(f"  {name:<17} {str(dtype).removeprefix('torch.'):<9} {b:<11} {result:<60} {secs:>8}")
    return "\n".join(rows), all_ok


def resources_table(archs: list[int], dtypes: list[str]) -> tuple[str, bool]:
    """(the table of every Triton config and csrc kernel for `archs`, whether every row is ok)."""
    import time
    from dermfast.ops import resources, resources_csrc
    t0 = time.perf_counter()
    rows = resources.triton_rows(archs, dtypes, sorted(resources.PRESETS))
    t_triton = time.perf_counter() - t0
    try:
        rows += resources_csrc.csrc_rows(archs)
        csrc_note = f"csrc/ compiled by nvcc ({time.perf_counter() - t0 - t_triton:.0f} s)"
    except RuntimeError as e:  # no nvcc: the Triton half is still worth printing
        csrc_note = f"csrc/ not checked: {e}"
    ok = all(r.verdict == "ok" for r in rows)
    head = (f"static resources for {', '.join(f'sm_{a}' for a in archs)}; Triton at ViT-B/16, ViT-L/16, ViT-H/14 "
            f"224 px, batch {resources.BATCH}, KD C {'/'.join(map(str, resources.KD_CLASSES))}, "
            f"{', '.join(dtypes)} ({t_triton:.0f} s); {csrc_note}; "
            f"{sum(r.verdict != 'ok' for r in rows)} of {len(rows)} rows fail")
    return head + "\n" + resources.format_table(rows), ok


def _arch(text: str) -> int:
    from dermfast.ops.resources import SMEM_LIMIT
    num = text.lower().removeprefix("sm_")
    if not num.isdigit() or int(num) not in SMEM_LIMIT:
        raise ValueError(f"{text!r}: expected one of {', '.join(f'sm_{a}' for a in SMEM_LIMIT)}")
    return int(num)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dermfast.info", description=__doc__.splitlines()[0],
                           allow_abbrev=False)
    parser.add_argument("--selftest", action="store_true",
                        help="run every op's self-test on every capable backend now and print the table")
    parser.add_argument("--interpret", action="store_true",
                        help="with --selftest on a CPU: run the Triton kernels under the Triton interpreter")
    parser.add_argument("--dtype", action="append", choices=sorted(_DTYPES),
                        help="with --selftest: dtype to test (repeatable; default float32, float16 and "
                             "bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--resources", action="store_true",
                        help="compile every Triton kernel config and csrc/ kernel for --arch (no GPU needed) and "
                             "print registers, spills and shared memory per config")
    parser.add_argument("--arch", nargs="+", default=None, metavar="SM",
                        help="with --resources: target archs (default sm_80 sm_90)")
    args = parser.parse_args(argv)
    if args.dtype and not (args.selftest or args.resources):
        parser.error("--dtype goes with --selftest or --resources")
    if args.interpret and not args.selftest:
        parser.error("--interpret goes with --selftest")
    if args.arch and not args.resources:
        parser.error("--arch goes with --resources")
    if args.resources:
        try:
            archs = [_arch(a) for a in (args.arch or ["sm_80", "sm_90"])]
        except ValueError as e:
            parser.error(f"--arch {e}")
        table, ok = resources_table(archs, args.dtype or ["bfloat16", "float16", "float32"])
        print(table)
        return 0 if ok else 1
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when it is imported, and `import dermfast` (which `python -m` runs before
        # this module) imports it: run again in a child process with the variable set from the start.
        import subprocess
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "dermfast.info", *argv], env=env).returncode
    print(report())
    if not args.selftest:
        return 0
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtypes = [_DTYPES[d] for d in args.dtype] if args.dtype else (
        [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32])
    table, ok = selftest_table(device, dtypes)
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
