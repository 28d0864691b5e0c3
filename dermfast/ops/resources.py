"""Static resource check of the Triton kernels: registers, spills and shared memory per config, no GPU needed.

Why it works this way
---------------------
* The real launchers (kernels/*.py) are called at the shapes that matter (ViT-B/16, ViT-L/16, ViT-H/14 at 224 px,
  batch 256; KD with C = 7 / 1000 / 32000) on fake CUDA tensors (torch FakeTensorMode: shapes, strides and
  storage offsets, no memory), with `kernel[grid](...)` intercepted. So the arguments, constexprs and launch
  options are exactly what a launch would pass; no launcher logic is re-declared here.
* Each intercepted launch is bound by Triton's own binder for the target (GPUTarget("cuda", 80 / 90, 32)), which
  gives the same specialization a GPU launch would get (pointer alignment, integers divisible by 16), and an
  autotuned kernel is expanded into every config of its list: the autotuner may pick any of them on a GPU.
  Launches with the same specialization (e.g. ViT-B and ViT-L attention: same head dim, same divisibility)
  compile once, so the shape list costs only what changes a constexpr or an attribute.
* Registers and spills come from ptxas's -v log (Triton's `dump_ptxas_log` knob, or ptxas run again on the PTX
  when the knob is absent); shared memory is the compiled kernel's `metadata.shared`, the dynamic shared memory
  a launch asks for, which Triton itself compares with the device's limit before a launch.
* Verdict: "FAIL smem" when shared memory exceeds the arch's per-block limit (the launch would raise
  OutOfResources), "FAIL spills" when ptxas spilled registers to local memory, "FAIL compile" when compiling
  failed; otherwise "ok".
* It runs in child processes (one per core, a shard of the compile list each) with TRITON_INTERPRET unset:
  under the interpreter (the CPU tests) @triton.jit functions are not compilable, and the interception patches
  Triton globally, which must not leak into the caller.

`python -m dermfast.info --resources [--arch sm_80 sm_90]` prints the table (this module's `table`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

# Maximum shared memory per thread block (opt-in), bytes: CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability" (163 KB on 8.0, 99 KB on 8.6 / 8.9, 227 KB on 9.0).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
BATCH = 256
MASK_RATIO = 0.75


@dataclass(frozen=True)
class Preset:
    """A model at 224 px: heads, head dim, width, patch size; L = patches + 1 class token."""
    name: str
    heads: int
    head_dim: int
    patch: int

    @property
    def patches(self) -> int:
        return (224 // self.patch) ** 2

    @property
    def lengths(self) -> tuple[int, int]:
        """(visible + cls at 75 % masking, all patches + cls): 50 / 197 for /16, 65 / 257 for /14."""
        return int(self.patches * (1 - MASK_RATIO)) + 1, self.patches + 1


PRESETS = {p.name: p for p in (Preset("vit_b16", 12, 64, 16), Preset("vit_l16", 16, 64, 16),
                               Preset("vit_h14", 16, 80, 14))}
KD_CLASSES = (7, 1000, 32000)
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class Row:
    kernel: str
    config: str   # block sizes, num_warps, num_stages
    variant: str  # the other constexprs (head-dim split, layout flags, precision)
    arch: int
    dtype: str
    regs: int | None = None
    spills: int | None = None  # bytes, spill stores + spill loads
    smem: int | None = None
    smem_limit: int = 0
    verdict: str = ""
    shapes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def verdict(row: Row) -> str:
    if row.regs is None:
        return row.verdict or "FAIL compile"
    if row.smem is not None and row.smem > row.smem_limit:
        return f"FAIL smem {row.smem} > {row.smem_limit}"
    if row.spills:
        return f"FAIL spills {row.spills} B"
    return "ok"


# ------------------------------------------------------------------------------------ the launches at the shapes


def _launch_cases(presets: list[str], dtypes: list[str]):
    """Yields (shape label, dtype name, thunk); each thunk calls real launchers on fake CUDA tensors."""
    import torch
    from dermfast.kernels import kd_loss, mae_loss, masked_attention as attn, random_masking

    B = BATCH
    for dname in dtypes:
        dt = getattr(torch, dname)
        for pname in presets:
            p = PRESETS[pname]
            H, Dh = p.heads, p.head_dim
            for L in p.lengths:
                def packed(L=L, dt=dt):  # [T, H, Dh] strided views of one qkv projection, as models/attention.py
                    T = B * L
                    q, k, v = torch.empty(T, 3, H, Dh, device="cuda", dtype=dt).unbind(1)
                    cu = torch.arange(0, T + 1, L, device="cuda", dtype=torch.int32)
                    o, lse = attn.forward(q, k, v, cu, None, Dh ** -0.5)
                    attn.backward(torch.empty_like(o), q, k, v, o, lse, None, cu, None, Dh ** -0.5)

                def padded(L=L, dt=dt, lengths=True):  # [B, H, N, Dh] permuted views
                    q, k, v = torch.empty(B, L, 3, H, Dh, device="cuda", dtype=dt).permute(2, 0, 3, 1, 4).unbind(0)
                    lens = torch.full((B,), L, device="cuda", dtype=torch.int32) if lengths else None
                    o, lse = attn.forward(q, k, v, None, lens, Dh ** -0.5)
                    attn.backward(torch.empty_like(o), q, k, v, o, lse, None, None, lens, Dh ** -0.5)

                if dname == "float32":  # masked_attention's Triton backend declines fp32 on a GPU (it spills)
                    continue
                yield f"{pname} attn packed L{L}", dname, packed
                yield f"{pname} attn lengths L{L}", dname, padded
                yield f"{pname} attn dense L{L}", dname, lambda L=L, dt=dt: padded(L, dt, lengths=False)

            def masking(p=p, dt=dt):
                L, D = p.patches, p.heads * p.head_dim
                K = int(L * (1 - MASK_RATIO))
                cu = torch.arange(0, B * K + 1, K, device="cuda", dtype=torch.int32)
                x = torch.empty(B, L, D, device="cuda", dtype=dt)
                for pos in (torch.empty(L, D, device="cuda", dtype=dt), None):
                    _, _, restore, _ = random_masking.masking_fwd(x, pos, cu, B * K, 1, 0, dt)
                random_masking.masking_bwd(torch.empty(B * K, D, device="cuda", dtype=dt), restore, cu, True, True)

            def mae(p=p, dt=dt):
                P = p.patch * p.patch * 3
                imgs = torch.empty(B, 3, 224, 224, device="cuda", dtype=torch.float32)
                pred = torch.empty(B, p.patches, P, device="cuda", dtype=dt)
                mask = torch.empty(B, p.patches, device="cuda", dtype=dt)
                mae_loss.mae_loss_fwd(imgs, pred, mask, p.patch)
                mae_loss.mae_loss_bwd(torch.empty((), device="cuda"), imgs, pred, mask, p.patch)

            yield f"{pname} random_masking", dname, masking
            yield f"{pname} mae_loss", dname, mae
        for C in KD_CLASSES:
            def kd(C=C, dt=dt):
                s, t = (torch.empty(B, C, device="cuda", dtype=dt) for _ in range(2))
                y = torch.empty(B, device="cuda", dtype=torch.int64)
                w, wsum = torch.empty(C, device="cuda"), torch.empty((), device="cuda")
                common = dict(inv_t=0.25, kd_loss_scale=8.0, kd_grad_scale=2.0, ce_scale=0.5, write_grad=True)
                kd_loss.launch(s, t, y, w, wsum, **common)   # class-weighted "mean"
                kd_loss.launch(s, t, y, None, None, **common)
            yield f"kd C{C}", dname, kd


class _Ptr:
    """What Triton's binder needs of a tensor argument: dtype and an address (CUDA allocations are 512-aligned;
    a view keeps its storage offset, so a q / k / v view of one qkv buffer specializes as it would on a GPU)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._addr = (1 << 21) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._addr


def _jobs(presets, dtypes, archs):
    """Every distinct (arch, kernel specialization): [(key, arch, fn, signature, constexprs, attrs, options, shapes)]."""
    import torch
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    captured: list[tuple[object, tuple, dict, str, str]] = []
    original = triton.runtime.KernelInterface.__getitem__
    label = dname = ""
    triton.runtime.KernelInterface.__getitem__ = lambda kernel, grid: (
        lambda *a, **kw: captured.append((kernel, a, kw, label, dname)))
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            for label, dname, thunk in _launch_cases(presets, dtypes):
                thunk()
    finally:
        triton.runtime.KernelInterface.__getitem__ = original

    jobs: dict[str, list] = {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binders: dict[int, object] = {}
        for kernel, args, kwargs, label, dname in captured:
            configs = getattr(kernel, "configs", None)  # an Autotuner: every config it may pick
            fn = getattr(kernel, "fn", kernel) if configs is not None else kernel
            args = [_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args]
            for cfg in (configs or [None]):
                kw = {**kwargs, **(cfg.all_kwargs() if cfg is not None else {})}
                binder = binders.setdefault(id(fn), create_function_from_signature(fn.signature, fn.params, backend))
                bound, spec, opts = binder(*args, **kw)
                options, sig, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
                key = repr((arch, fn.__name__, sig, sorted(constexprs.items()), sorted(attrs.items()),
                            sorted(options.__dict__.items())))
                if key not in jobs:
                    names = {path[0]: fn.arg_names[path[0]] for path in constexprs}
                    cex = {names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
                    tuned = set(cfg.kwargs) if cfg is not None else {n for n in cex if n.startswith(("BLOCK", "ROWS"))}
                    config = " ".join([f"{n}={cex[n]}" for n in cex if n in tuned] +
                                      [f"w{options.num_warps}", f"s{options.num_stages}"])
                    variant = " ".join(f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in cex.items()
                                       if n not in tuned)
                    jobs[key] = [key, arch, fn, sig, constexprs, attrs, options, dname, config, variant, []]
                if label not in jobs[key][-1]:
                    jobs[key][-1].append(label)
    return list(jobs.values())


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v on a PTX text (used when this Triton has no dump_ptxas_log knob)."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        return subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                               "-o", os.path.join(d, "k.o")], capture_output=True, text=True, check=True).stderr


def _compile(job) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as tcompile

    key, arch, fn, sig, constexprs, attrs, options, dname, config, variant, shapes = job
    row = Row(fn.__name__, config, variant, arch, dname, smem_limit=SMEM_LIMIT[arch], shapes=shapes)
    t0 = time.perf_counter()
    knob = hasattr(triton.knobs.nvidia, "dump_ptxas_log")
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            if knob:
                triton.knobs.nvidia.dump_ptxas_log = True
            compiled = tcompile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options=options.__dict__)
        log = buf.getvalue() if knob else _ptxas_log(compiled.asm["ptx"], arch)
        regs, spill = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log)
        if regs is None or spill is None:
            raise RuntimeError(f"no register / spill line in the ptxas log: {log[-300:]!r}")
        row.regs, row.spills = int(regs.group(1)), int(spill.group(1)) + int(spill.group(2))
        row.smem = int(compiled.metadata.shared)
    except Exception as e:  # a config that does not compile is a finding, reported in the row
        row.verdict = f"FAIL compile: {type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e) else ''}"
    row.seconds = time.perf_counter() - t0
    row.verdict = verdict(row)
    return row


def _child(presets, dtypes, archs, shard: int, n_shards: int) -> None:
    """Compile this shard of the job list; one JSON row per line on stdout."""
    import triton
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    jobs = sorted(_jobs(presets, dtypes, archs), key=lambda j: j[0])
    out = sys.stdout
    for job in jobs[shard::n_shards]:
        out.write(json.dumps(asdict(_compile(job))) + "\n")
        out.flush()


def triton_rows(archs: list[int], dtypes: list[str], presets: list[str], jobs: int | None = None) -> list[Row]:
    """Compile every Triton kernel config at the presets' shapes for `archs` in child processes; one Row each."""
    for a in archs:
        if a not in SMEM_LIMIT:
            raise ValueError(f"resources: arch sm_{a} not known (known: {', '.join(f'sm_{x}' for x in SMEM_LIMIT)})")
    n = max(1, jobs or len(os.sched_getaffinity(0)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="dermfast-resources-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default today, stated (silences its warning)
        cmd = [sys.executable, "-m", "dermfast.ops.resources", "--arch", *map(str, archs), "--dtype", *dtypes,
               "--preset", *presets]
        procs = [subprocess.Popen([*cmd, "--shard", f"{i}/{n}"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(n)]
        rows: list[Row] = []
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"resources: compile child failed (exit {p.returncode}): {err.strip()[-2000:]}")
            rows += [Row(**json.loads(line)) for line in out.splitlines() if line.strip()]
    return sorted(rows, key=lambda r: (r.kernel, r.variant, r.dtype, r.config, r.arch))


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "config", "variant", "arch", "dtype", "regs", "spills", "smem", "limit", "verdict")
    cells = [head] + [(r.kernel, r.config, r.variant, f"sm_{r.arch}", r.dtype, "-" if r.regs is None else str(r.regs),
                       "-" if r.spills is None else str(r.spills), "-" if r.smem is None else str(r.smem),
                       str(r.smem_limit), r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(head) - 1)) + "  " + c[-1] for c in cells)


def main(argv: list[str] | None = None) -> int:
    from dermfast.cliparse import OneLineParser
    parser = OneLineParser(prog="python -m dermfast.ops.resources",
                           description="compile child of the static resource check (see the module docstring)")
    parser.add_argument("--arch", nargs="+", type=int, required=True)
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, required=True)
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), required=True)
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th job starting at i")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    i, n = (int(x) for x in args.shard.split("/"))
    _child(args.preset, args.dtype, args.arch, i, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
