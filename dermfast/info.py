"""`python -m dermfast.info`: versions, devices, optional parts, and which backend serves each op and why.

`--selftest` also runs every op's self-test (dermfast/ops/selftest.py) on every capable backend now and prints
one table, op x backend: capable / passed / failed (why) / chosen, with the time each took; it exits 1 if a
capable backend failed. On a CPU the torch backend runs, and with `--interpret` the Triton kernels too, under
the Triton interpreter (TRITON_INTERPRET=1, set here before any kernel is defined).
"""
from __future__ import annotations

import os
import platform
import sys

import torch

import dermfast
from dermfast.cliparse import OneLineParser
from dermfast import _optional as opt
from dermfast.ops.registry import BACKENDS, Query, get_backend, ops


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
        for b in BACKENDS:
            why = reasons[b]
            if why is None and b == "triton" and device.type == "cpu":
                why = "fits when asked for explicitly (interpreter on CPU); automatic choice skips it"
            lines.append(f"      {b:<7} {'fits' if why is None else why}")
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
            f"  {'op':<17} {'dtype':<9} {'backend':<7} {'result':<60} {'time':>8}"]
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
            for b in BACKENDS:
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
            chosen = next((b for b in BACKENDS if b in verdicts and verdicts[b] is None
                           and not (b == "triton" and device.type == "cpu")), None)
            for b in BACKENDS:
                result, secs = cells[b]
                if b == chosen:
                    result += "  <- chosen"
                elif b == "triton" and device.type == "cpu" and verdicts.get(b, 1) is None:
                    result += "  (automatic choice skips interpreted Triton)"
                rows.append(f"  {name:<17} {str(dtype).removeprefix('torch.'):<9} {b:<7} {result:<60} {secs:>8}")
    return "\n".join(rows), all_ok


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
    args = parser.parse_args(argv)
    if (args.interpret or args.dtype) and not args.selftest:
        parser.error("--interpret and --dtype go with --selftest")
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
