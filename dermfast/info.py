"""`python -m dermfast.info`: versions, devices, optional parts, and which backend serves each op and why."""
from __future__ import annotations

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
        lines.append(f"cuda ext: runtime {ext.cuda_runtime_version()}, {ext.device_count()} device(s)")
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


def main(argv: list[str] | None = None) -> int:
    OneLineParser(prog="python -m dermfast.info", description=__doc__.splitlines()[0],
                            allow_abbrev=False).parse_args(argv)  # takes no options: --help, or exit 2
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
