"""Static resource check of csrc/: every CUDA kernel compiled by nvcc for each arch, with ptxas's resource usage.

Each csrc/*.cu is compiled on its own (`nvcc -c --resource-usage`, the flags CMakeLists.txt uses: C++17,
-O3, csrc/ on the include path) for every requested arch in one nvcc call, in parallel over files. The ptxas
report gives per kernel (every template instance) registers, spill stores / loads and static shared memory.
Dynamic shared memory is added where a launcher asks for it (random_masking_fwd_kernel: 8 bytes per key, P =
next power of two >= L keys; at the largest shape checked, L = 256 patches of ViT-H/14, P = 256). A row's verdict
follows dermfast.ops.resources.verdict (shared memory over the arch's per-block limit, or any spill, fails).

No GPU is needed, only nvcc (CI has it). Used by `python -m dermfast.info --resources`.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from dermfast.ops.resources import SMEM_LIMIT, Row, verdict

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
# Dynamic shared memory (bytes) a launcher requests, at the largest shape the check covers (see the docstring).
DYNAMIC_SMEM = {"random_masking_fwd_kernel": 8 * 256}

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_DTYPE = {"__nv_bfloat16": "bfloat16", "__half": "float16", "float": "float32", "double": "float64"}


def find_nvcc() -> str | None:
    """nvcc from $CUDACXX, $CUDA_HOME/bin, PATH, then /usr/local/cuda/bin (as setup.py looks for it)."""
    for cand in (os.environ.get("CUDACXX"), os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"],
                 "bin", "nvcc"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(demangled: str) -> tuple[str, str]:
    """'void dermfast::(anonymous namespace)::kd_loss_warp_kernel<__nv_bfloat16, float, ...>(...)' ->
    ('kd_loss_warp_kernel', 'bfloat16,float32,...')."""
    s = demangled.replace("(anonymous namespace)::", "").removeprefix("void ")
    head = s.split("(")[0]
    name = head.split("<")[0].split("::")[-1].strip()
    targs = head[head.index("<") + 1:head.rindex(">")] if "<" in head else ""
    types = [_DTYPE.get(t.strip(), t.strip()) for t in targs.split(",") if t.strip()]
    return name, ",".join(types)


def parse_ptxas(log: str, source: str) -> list[Row]:
    """Rows from an nvcc --resource-usage log (one per kernel and arch)."""
    blocks = _ENTRY.split(log)  # [pre, name, arch, body, name, arch, body, ...]
    found = [(blocks[i], int(blocks[i + 1]), blocks[i + 2]) for i in range(1, len(blocks) - 2, 3)]
    names = _demangle(sorted({f[0] for f in found}))
    rows = []
    for mangled, arch, body in found:
        name, types = _short(names[mangled])
        spill, used = _SPILL.search(body), _USED.search(body)
        row = Row(name, f"{source}", types, arch, types.split(",")[0] if types else "-",
                  smem_limit=SMEM_LIMIT.get(arch, 0))
        if spill is None or used is None:
            row.verdict = "FAIL: no resource line in the ptxas log"
        else:
            row.regs = int(used.group(1))
            row.spills = int(spill.group(1)) + int(spill.group(2))
            row.smem = int(used.group(2) or 0) + DYNAMIC_SMEM.get(name, 0)
        row.verdict = verdict(row)
        rows.append(row)
    return rows


def csrc_rows(archs: list[int], jobs: int | None = None) -> list[Row]:
    """Compile every csrc/*.cu for `archs`; one Row per kernel instance and arch. Raises if nvcc is missing or a
    file does not compile (the error names the file and nvcc's last lines)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("resources: nvcc not found (set CUDA_HOME or put nvcc on PATH) for the csrc/ check")
    files = sorted(CSRC.glob("*.cu"))
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    rows: list[Row] = []
    n = max(1, jobs or len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(prefix="dermfast-csrc-") as tmp:
        pending = list(files)
        while pending:
            batch, pending = pending[:n], pending[n:]
            procs = [(f, subprocess.Popen([nvcc, "-std=c++17", "-O3", f"-I{CSRC}", *gencode, "--resource-usage",
                                           "-c", str(f), "-o", os.path.join(tmp, f.stem + ".o")],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                     for f in batch]
            for f, p in procs:
                log = p.communicate()[0]
                if p.returncode != 0:
                    raise RuntimeError(f"resources: nvcc failed on {f.name}: {log.strip()[-1500:]}")
                rows += parse_ptxas(log, f.name)
    return sorted(rows, key=lambda r: (r.config, r.kernel, r.variant, r.arch))
