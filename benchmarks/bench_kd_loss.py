"""KD loss (alpha * T^2 * KL + (1 - alpha) * class-weighted CE), forward and forward + backward, with peak memory.

Workloads (issue 10's table): 256 x 7 (HAM10000-sized head: launch-bound), 4,096 x 1,000 (ImageNet head),
8,192 x 32,000 (a vocabulary-sized head: bandwidth-bound). T = 4, alpha = 0.9, class weights on. Student logits
require grad; teacher logits do not (they come from a frozen teacher under no_grad).

Implementations:
  eager            F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, batchmean) * T^2 * alpha
                   + (1 - alpha) * F.cross_entropy(s, y, weight=w): the issue's baseline, written out as a peer
  torch.compile    the same function under torch.compile (default mode)
  liger            Liger-Kernel's LigerKLDIVLoss on the same log-softmaxes + LigerCrossEntropyLoss (weighted),
                   when liger_kernel is importable (reported absent otherwise)
  dermfast-triton  dermfast.ops.kd_loss(backend="triton"): one launch forward (loss + gradient), a scale in the
                   backward
  dermfast-cuda    dermfast.ops.kd_loss(backend="cuda") when the extension has kd_loss_fwd
On a CPU (no GPU, or --quick): tiny shapes in fp32, dermfast through its torch backend (the Triton interpreter is
for tests, not timing), torch.compile skipped (minutes of CPU compile for a harness check); proves the harness
only, not performance.

Rows: pass "fwd" and "fwd+bwd" (torch.autograd.grad, so no gradient accumulation is timed); gbps from the bytes
floor (read both logit matrices; + write the gradient in the logits' dtype for fwd+bwd); peak memory above the
inputs; the note holds each implementation's loss error against dermfast.ops.kd_loss_ref in float64.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import absent, error_row, main, on_gpu, peak_mib, row, time_fn  # noqa: E402

from dermfast import _optional  # noqa: E402
from dermfast.ops import kd_loss, kd_loss_ref  # noqa: E402

BENCH = "kd_loss"
T, ALPHA = 4.0, 0.9
GPU_SHAPES = [(256, 7), (4096, 1000), (8192, 32000)]
CPU_SHAPES = [(16, 7), (64, 100)]


def eager_kd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The eager baseline (a peer, as the issue measured it; the spec is dermfast.ops.kd_loss_ref)."""
    sf, tf = s.float(), t.float()
    kd = F.kl_div(F.log_softmax(sf / T, dim=1), F.log_softmax(tf / T, dim=1), reduction="batchmean",
                  log_target=True) * (T * T)
    return ALPHA * kd + (1 - ALPHA) * F.cross_entropy(sf, y, weight=w)


def liger_impl() -> tuple[Callable | None, str]:
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except Exception as e:  # absent or broken install: reported as absent, with the reason
        return None, f"liger_kernel not importable ({type(e).__name__})"
    if not on_gpu():
        return None, "liger_kernel needs a GPU"
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    ce_cache: dict = {}

    def fn(s, t, y, w):
        ce = ce_cache.setdefault(id(w), LigerCrossEntropyLoss(weight=w))
        sf, tf = s.float(), t.float()
        return ALPHA * T * T * kl(F.log_softmax(sf / T, dim=1), F.log_softmax(tf / T, dim=1)) + (1 - ALPHA) * ce(sf, y)

    return fn, ""


def _inputs(N: int, C: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(N, C, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_()
    t = (torch.randn(N, C, generator=g) * 3).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    w = (torch.rand(C, generator=g) + 0.1).to(device)
    return s, t, y, w


def _bench_impl(name: str, fn: Callable, s, t, y, w, shape: str, dtype, ref: float) -> list[dict]:
    nbytes = s.numel() * s.element_size() + t.numel() * t.element_size()
    try:
        val = fn(s, t, y, w)
        err = abs(float(val.detach().double()) - ref)
        note = f"|loss - ref| {err:.2e}"
        fwd = time_fn(lambda: fn(s, t, y, w))

        def fwd_bwd():
            return torch.autograd.grad(fn(s, t, y, w), s)

        both = time_fn(fwd_bwd)
        mem_fwd = peak_mib(lambda: fn(s, t, y, w))
        mem_both = peak_mib(fwd_bwd)
    except Exception as e:  # one implementation failing must not lose the others' rows
        return [error_row(BENCH, f"{name}: {type(e).__name__}: {e}", workload=shape, shape=shape, dtype=dtype,
                          impl=name, pass_="fwd+bwd")]
    return [row(BENCH, shape, shape, dtype, name, "fwd", fwd, bytes_=nbytes, peak=mem_fwd, note=note),
            row(BENCH, shape, shape, dtype, name, "fwd+bwd", both, bytes_=nbytes + s.numel() * s.element_size(),
                peak=mem_both, note=note)]


def run(quick: bool = False) -> list[dict]:
    gpu = on_gpu() and not quick
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    liger, liger_why = liger_impl()
    has_cuda_ext = _optional.HAS_CUDA_EXT and hasattr(_optional.cuda_ext, "kd_loss_fwd") and device == "cuda"
    compiled = torch.compile(eager_kd) if gpu else None
    rows: list[dict] = []
    for N, C in shapes:
        shape = f"{N}x{C}"
        s, t, y, w = _inputs(N, C, dtype, device)
        ref = float(kd_loss_ref(s.detach().double(), t.double(), y, T, ALPHA, w.double()))
        impls: list[tuple[str, Callable | None, str]] = [
            ("eager", eager_kd, ""),
            ("torch.compile", compiled, "" if compiled else "skipped on CPU (compile time, not a result)"),
            ("liger", liger, liger_why),
        ]
        if device == "cuda":
            impls.append(("dermfast-triton", lambda s, t, y, w: kd_loss(s, t, y, T, ALPHA, w, backend="triton",
                                                                        validate_target=False), ""))
            impls.append(("dermfast-cuda", (lambda s, t, y, w: kd_loss(s, t, y, T, ALPHA, w, backend="cuda",
                                                                       validate_target=False))
                          if has_cuda_ext else None, "dermfast._C has no kd_loss_fwd"))
        else:
            impls.append(("dermfast-torch", lambda s, t, y, w: kd_loss(s, t, y, T, ALPHA, w, backend="torch"), ""))
        for name, fn, why in impls:
            if fn is None:
                rows += [absent(BENCH, shape, shape, dtype, name, p, why) for p in ("fwd", "fwd+bwd")]
            else:
                rows += _bench_impl(name, fn, s, t, y, w, shape, dtype, ref)
        del s, t, y, w
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main(run))
