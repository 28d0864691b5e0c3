"""One small case of every dermfast CUDA (csrc/) and Triton (kernels/) kernel, forward and backward: the driver that
benchmarks/run_gpu.sh runs under compute-sanitizer (memcheck, racecheck).

The cases are the op self-tests (dermfast/ops/selftest.py: a small fixed input per op, run through one backend
forward and backward and compared with the torch reference), so every launcher a training step uses is launched
here, at shapes that keep a sanitizer run short. Each (op, backend, dtype) is run once; a backend that is not
capable on this machine (no GPU, no dermfast._C, ...) is listed with its reason and skipped.

    python benchmarks/sanitize_cases.py                 # every op, backends triton and cuda, bfloat16 + float32
    python benchmarks/sanitize_cases.py --list          # what would run, and why a case is skipped
    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cases.py

Exit status: 0 when every capable case ran and matched the reference, 1 otherwise (2: bad arguments). On a
machine without a GPU every case is skipped (exit 0 with --list, 1 without: nothing was checked).
"""
from __future__ import annotations

import argparse
import sys

BACKENDS = ("triton", "cuda")
DTYPES = ("bfloat16", "float32")


def cases(ops: list[str] | None, backends: list[str], dtypes: list[str]):
    """Yields (op, backend, dtype, reason-not-capable or None)."""
    import torch
    from dermfast.ops import selftest
    from dermfast.ops.registry import Query, ops as registry
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    reg = registry()
    for name in sorted(ops or selftest.CHECKS):
        if name not in selftest.CHECKS:
            raise SystemExit(f"sanitize_cases: unknown op {name!r} (known: {', '.join(sorted(selftest.CHECKS))})")
        for backend in backends:
            for dname in dtypes:
                dtype = getattr(torch, dname)
                why = reg[name].reasons(Query(device, dtype, {})).get(backend, f"no {backend} backend")
                if why is None and device.type != "cuda":
                    why = "no CUDA GPU"
                yield name, backend, dname, why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", nargs="+", help="only these ops (default: every op with a self-test)")
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--dtype", nargs="+", choices=("bfloat16", "float16", "float32"), default=list(DTYPES))
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    import torch
    from dermfast.ops import selftest
    ran, failed = 0, []
    for name, backend, dname, why in cases(args.op, args.backend, args.dtype):
        label = f"{name:<17} {backend:<7} {dname:<9}"
        if why is not None or args.list:
            print(f"sanitize: {label} {'skip: ' + why if why else 'would run'}", flush=True)
            continue
        err, secs = selftest.run_check(name, backend, torch.device("cuda"), getattr(torch, dname))
        torch.cuda.synchronize()
        ran += 1
        print(f"sanitize: {label} {'ok' if err is None else 'FAILED: ' + err} ({secs:.2f} s)", flush=True)
        if err is not None:
            failed.append(label)
    if args.list:
        return 0
    print(f"sanitize: {ran} cases ran, {len(failed)} failed" + (f": {'; '.join(failed)}" if failed else ""))
    return 1 if failed or ran == 0 else 0


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    sys.exit(main())
