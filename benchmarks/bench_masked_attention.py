"""Masked-patch attention: dermfast's Triton kernels against every SDPA backend, SDPA with a boolean key mask,
FlexAttention and xformers, forward / backward / both, dense and ragged.

Workloads (issue 11; B 256, H 16, bf16 on a GPU):
  vit_h_encoder  L 65,  hd 80   ViT-H/14 MAE encoder at mask ratio 0.75 (64 visible patches + cls)
  vit_h_dense    L 257, hd 80   ViT-H/14 on all 256 patches + cls (fine-tuning, inference)
  mae_decoder    L 257, hd 32   the MAE decoder (512 wide, 16 heads)
Each in two modes:
  dense   every sample has L tokens: q, k, v [B, H, L, hd].
  ragged  per-sample lengths with the same mean as far as possible: for L 65, MAE with a per-sample mask
          ratio r ~ U(0.6, 0.9) over the 256 patches, length 1 + round(256 (1 - r)) (26..103 tokens, mean 65);
          for L 257, a per-sample kept fraction f ~ U(0.6, 0.9) of the 256 patches, length 1 + round(256 f).
          dermfast runs packed (cu_seqlens) and padded (lengths); SDPA runs on the zero-padded batch with a
          boolean key mask [B, 1, 1, Lmax] (auto choice and each backend that takes a mask); FlexAttention on
          the packed tokens with a document block mask (compiled); xformers with BlockDiagonalMask.
TFLOP/s counts useful work only, 4 H hd sum_b(L_b^2) for the forward (x2.5 backward, x3.5 both), the same for
every implementation, so padded peers pay for their padding in TFLOP/s; `python -m dermfast.bench` relates it
to the measured bf16 matmul ceiling (benchmarks/bench_ceilings.py). Each row's note gives its max abs error
against the float32 reference on the valid rows (a wrong fast number is caught here, not later).

`summary(rows)` states each of the issue's speed targets as met / missed / unmeasured.

--quick (and any run without a GPU): B 2, H 2, tiny lengths, fp32 on the CPU, dermfast through its torch
backend (the Triton interpreter is for tests, not timing); proves the harness only.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import absent, main, on_gpu, peak_mib, row, time_fn  # noqa: E402

from dermfast.ops import masked_attention, masked_attention_ref  # noqa: E402
from dermfast.ops.masked_attention_op import _pack_index, _to_packed, _to_padded  # noqa: E402

BENCH = "masked_attention"
WORKLOADS = [("vit_h_encoder", 65, 80), ("vit_h_dense", 257, 80), ("mae_decoder", 257, 32)]
PASSES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def ragged_lengths(L: int, B: int, gen: torch.Generator) -> list[int]:
    """L 65: 1 + round(256 (1 - r)), mask ratio r ~ U(0.6, 0.9); L 257: 1 + round(256 f), kept f ~ U(0.6, 0.9)."""
    u = 0.6 + 0.3 * torch.rand(B, generator=gen, dtype=torch.float64)
    kept = (1 - u) if L == 65 else u
    return [1 + round(256 * float(f)) for f in kept]


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:160]


class Case:
    """One batch in every layout the implementations want: packed [T, H, D], padded [B, H, Lmax, D]."""

    def __init__(self, lengths: list[int], H: int, D: int, dtype, device):
        self.lengths, self.H, self.D, self.dtype, self.device = lengths, H, D, dtype, device
        self.B, self.Lmax, self.T = len(lengths), max(lengths), sum(lengths)
        self.dense = all(n == self.Lmax for n in lengths)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        self.cu = torch.tensor(cu, dtype=torch.int32, device=device)
        self.lens = torch.tensor(lengths, dtype=torch.int32, device=device)
        self.seg, self.pos = _pack_index(self.cu, self.T)
        gen = torch.Generator(device=device).manual_seed(0)
        self.packed = [torch.randn(self.T, H, D, device=device, dtype=dtype, generator=gen) for _ in range(4)]
        self.padded = [_to_padded(x, self.seg, self.pos, self.B, self.Lmax).contiguous() for x in self.packed]
        self.key_mask = (torch.arange(self.Lmax, device=device)[None, :] < self.lens[:, None])[:, None, None, :]
        self.flops = 4.0 * H * D * sum(n * n for n in lengths)
        q, k, v, _ = self.packed
        self.ref = masked_attention_ref(q.float(), k.float(), v.float(), cu_seqlens=self.cu, max_seqlen=self.Lmax)

    def error(self, out: torch.Tensor, layout: str) -> float:
        """Max abs error of an implementation's output (in its layout) on the valid rows."""
        if layout == "padded":  # [B, H, Lmax, D]
            out = _to_packed(out, self.seg, self.pos)
        elif layout == "1htd":  # flex on packed tokens [1, H, T, D]
            out = out[0].transpose(0, 1)
        elif layout == "blhd":  # xformers: [1, T, H, D] ragged, [B, L, H, D] dense
            out = _to_packed(out.transpose(1, 2), self.seg, self.pos) if self.dense else out[0]
        return (out.float() - self.ref).abs().max().item()


def _impls(case: Case, gpu: bool) -> list[tuple[str, str, Callable | str]]:
    """(name, layout, fn(q, k, v) -> out) per implementation; a str instead of fn means absent (the reason)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    ours_backend = "triton" if gpu else "torch"
    out: list[tuple[str, str, Callable | str]] = []
    if case.dense:
        out.append((f"dermfast-{ours_backend}", "padded", lambda q, k, v: masked_attention(q, k, v,
                                                                                            backend=ours_backend)))
    else:
        out.append((f"dermfast-{ours_backend} padded", "padded", lambda q, k, v: masked_attention(
            q, k, v, lengths=case.lens, backend=ours_backend)))
    out.append((f"dermfast-{ours_backend} packed", "packed", lambda q, k, v: masked_attention(
        q, k, v, cu_seqlens=case.cu, max_seqlen=case.Lmax, backend=ours_backend)))
    if not gpu:
        out.append(("dermfast-triton", "padded", "needs a CUDA GPU (the interpreter is for tests only)"))

    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}

    def sdpa(backend, mask):
        def fn(q, k, v):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return fn

    if case.dense:
        for name, b in backends.items():
            out.append((f"sdpa-{name}", "padded", sdpa(b, None)))
        out.append(("sdpa+bool mask", "padded", sdpa(None, case.key_mask)))
    else:
        out.append(("sdpa+bool mask", "padded", sdpa(None, case.key_mask)))
        for name in ("math", "efficient", "cudnn"):
            out.append((f"sdpa-{name}+bool mask", "padded", sdpa(backends[name], case.key_mask)))

    if not gpu:
        out.append(("flex_attention", "padded", "timed on CUDA only (compiling it on a CPU takes minutes)"))
    else:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
            if case.dense:
                out.append(("flex_attention", "padded", lambda q, k, v: flex(q, k, v)))
            else:
                seg = case.seg.to(torch.int32)
                bm = create_block_mask(lambda b, h, qi, ki: seg[qi] == seg[ki], None, None, case.T, case.T,
                                       device=case.device)
                out.append(("flex_attention (doc mask)", "1htd", lambda q, k, v: flex(q, k, v, block_mask=bm)))
        except Exception as e:  # an old torch without FlexAttention
            out.append(("flex_attention", "padded", _first_line(e)))

    try:
        import xformers.ops as xops
        if case.dense:
            out.append(("xformers", "blhd", lambda q, k, v: xops.memory_efficient_attention(q, k, v)))
        else:
            bias = xops.fmha.BlockDiagonalMask.from_seqlens(case.lengths)
            out.append(("xformers BlockDiagonalMask", "blhd",
                        lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias)))
    except Exception as e:
        out.append(("xformers", "blhd", f"not importable ({_first_line(e)})"))
    return out


def _backend_impls(case: Case, gpu: bool) -> list[tuple[str, str, Callable | str, dict]]:
    """Every registry backend of masked_attention (dermfast's and the peers) run through the op itself,
    `masked_attention(..., backend=name)`, glue included: what automatic dispatch would run. Their rows carry
    `op`, `backend` and `dispatch_key` (dtype | pass | shape class), from which `python -m dermfast.bench`
    writes the dispatch table (dermfast/ops/dispatch_table.py)."""
    from dermfast.ops.masked_attention_op import masked_attention_fwd_op as op
    from dermfast.ops.registry import Query
    out = []
    cu = None if case.dense else case.cu
    code = int(cu is not None)  # the op's layout code: 0 dense, 1 packed
    for name in op.backends():
        if name not in op.impls or (name == "triton" and not gpu):
            continue
        query = Query(case.device, case.dtype, {"D": case.D, "packed": code, "layout": code, "L": case.Lmax}, True)
        why = op.impls[name].supports(query)
        if why is not None:
            out.append((f"backend:{name}", "padded", f"not capable here: {why}", {}))
            continue
        if cu is None:
            fn = (lambda b: lambda q, k, v: masked_attention(q, k, v, backend=b))(name)
        else:
            fn = (lambda b: lambda q, k, v: masked_attention(q, k, v, cu_seqlens=case.cu, max_seqlen=case.Lmax,
                                                             backend=b))(name)
        out.append((f"backend:{name}", "packed" if cu is not None else "padded", fn,
                    {"op": "masked_attention", "backend": name, "shape_class": op.shape_class(query)}))
    return out


def _inputs(case: Case, layout: str, grad: bool):
    if layout == "packed":
        src = case.packed
    elif layout == "padded":
        src = case.padded
    elif layout == "1htd":
        src = [x.transpose(0, 1)[None] for x in case.packed]
    else:  # blhd
        src = [x[None] for x in case.packed] if not case.dense else [x.transpose(1, 2) for x in case.padded]
    q, k, v, g = (x.detach().contiguous().clone().requires_grad_(grad and i < 3) for i, x in enumerate(src))
    return q, k, v, g


def _bench_case(workload: str, mode: str, case: Case, gpu: bool) -> list[dict]:
    rows = []
    shape = (f"B{case.B} H{case.H} L{case.Lmax} hd{case.D}" if case.dense else
             f"B{case.B} H{case.H} L{min(case.lengths)}..{case.Lmax} (mean {case.T / case.B:.0f}) hd{case.D}")
    wl = f"{workload} {mode}"
    cpu_note = "" if gpu else "CPU: not a performance result; "
    impls = [(*i, {}) for i in _impls(case, gpu)] + _backend_impls(case, gpu)
    for name, layout, fn, extra in impls:
        if isinstance(fn, str):
            rows += [absent(BENCH, wl, shape, case.dtype, name, p, fn) for p in PASSES]
            continue
        try:
            q, k, v, g = _inputs(case, layout, grad=False)
            with torch.no_grad():
                err = case.error(fn(q, k, v), layout)
            qg, kg, vg, _ = _inputs(case, layout, grad=True)
            o = fn(qg, kg, vg)
            torch.autograd.grad(o, (qg, kg, vg), g, retain_graph=True)
        except Exception as e:  # a backend that declines this shape / mask / dtype
            rows += [absent(BENCH, wl, shape, case.dtype, name, p, f"cannot run this case: {_first_line(e)}")
                     for p in PASSES]
            continue

        def fwd():
            with torch.no_grad():
                fn(q, k, v)

        def bwd():
            torch.autograd.grad(o, (qg, kg, vg), g, retain_graph=True)

        def both():
            out = fn(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), g)

        for p, f in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", both)):
            t = time_fn(f, warmup=5 if gpu else 2, rep=30 if gpu else 5)
            ex = {}
            if extra and p != "bwd":
                ex = {"op": extra["op"], "backend": extra["backend"],
                      "dispatch_key": f"{str(case.dtype).removeprefix('torch.')}|{p}|{extra['shape_class']}"}
            rows.append(row(BENCH, wl, shape, case.dtype, name, p, t, flops=case.flops * FLOP_FACTOR[p],
                            peak=peak_mib(f) if p == "fwd+bwd" else None,
                            note=f"{cpu_note}max|err| vs fp32 ref {err:.2e}", extra=ex))
        del o
    return rows


def run(quick: bool = False) -> list[dict]:
    gpu = on_gpu()
    small = quick or not gpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    B, H = (2, 2) if small else (256, 16)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for workload, L, D in WORKLOADS:
        if small:
            L = 17 if L == 65 else 33  # tiny stand-ins, same head dims
        dense = [L] * B
        ragged = ragged_lengths(L, B, gen) if not small else [max(1, L - 5 * (b + 1)) for b in range(B)]
        for mode, lengths in (("dense", dense), ("ragged", ragged)):
            rows += _bench_case(workload, mode, Case(lengths, H, D, dtype, device), gpu)
            if gpu:
                torch.cuda.empty_cache()
    return rows


# The targets (H100, fwd+bwd): (workload prefix, mode, our impl, peer, minimum speed-up of ours).
TARGETS = [
    ("vit_h_encoder", "ragged", "dermfast-triton packed", "sdpa+bool mask", 1.5),
    ("vit_h_encoder", "ragged", "dermfast-triton packed", "flex_attention (doc mask)", 3.0),
    ("vit_h_encoder", "dense", "dermfast-triton", "sdpa-cudnn", 0.9),
    ("vit_h_encoder", "dense", "dermfast-triton", "sdpa-flash", 1.2),
    ("vit_h_dense", "dense", "dermfast-triton", "sdpa-cudnn", 0.9),
    ("vit_h_dense", "dense", "dermfast-triton", "sdpa-flash", 1.2),
]


def summary(rows: list[dict]) -> str:
    """Markdown: each target of the issue as met / missed / unmeasured, from the fwd+bwd rows."""
    ms = {(r["workload"], r["impl"]): float(r["median_ms"]) for r in rows
          if r["pass"] == "fwd+bwd" and r["status"] == "ok" and r["median_ms"]}
    lines = ["### masked_attention targets (fwd+bwd)", ""]
    for workload, mode, ours, peer, need in TARGETS:
        a, b = ms.get((f"{workload} {mode}", ours)), ms.get((f"{workload} {mode}", peer))
        if a is None or b is None or not on_gpu():
            verdict = "unmeasured" + ("" if on_gpu() else " (no GPU: CPU rows are not results)")
        else:
            verdict = f"{b / a:.2f}x: {'met' if b / a >= need else 'MISSED'}"
        lines.append(f"- {workload} {mode}: {ours} vs {peer} >= {need}x -> {verdict}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(run))
