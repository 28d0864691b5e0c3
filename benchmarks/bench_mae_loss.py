"""MAE reconstruction loss (norm-pix MSE on removed patches): forward, backward and both, with peak memory.

Workloads (issue 7): ViT-H/14 at 224 px, B 64, mask ratio 0.75 (L 256, P 588),
pred bf16 with imgs bf16, and with imgs fp32 (the loader's output under bf16 autocast); ViT-B/16, B 256 (P 768).
Each row of the mask removes exactly 75 % of its patches; the mask has pred's dtype, as the model's does.

Implementations:
  mae-official          facebookresearch/mae `forward_loss` (patchify, normalise, error on all patches, then
                        masked), written out below as the peer
  mae-official+compile  the same function under torch.compile (default mode)
  dermfast-torch        dermfast.ops.mae_loss(backend="torch"): the reference behind the custom op
  dermfast-triton       dermfast.ops.mae_loss(backend="triton"): kernels/mae_loss.py
  dermfast-cuda         dermfast.ops.mae_loss(backend="cuda") when dermfast._C has mae_loss_fwd
On a CPU (no GPU, or --quick): a tiny fp32 shape, torch implementations only (the Triton interpreter is for tests,
not timing; compile skipped for its CPU compile time): it proves the harness, not performance.

Passes: "fwd" (pred requires grad, as in training), "bwd" (torch.autograd.grad of a retained graph), "fwd+bwd"
(torch.autograd.grad, so no gradient accumulation is timed). gbps is against the bytes floor: only removed
patches need reading (imgs and pred, (1 - keep) of each) plus the mask; the backward also writes the whole
gradient [B, L, P] in pred's dtype (zeros on kept patches). The note holds |loss - reference| (float64 spec).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import absent, error_row, main, on_gpu, peak_mib, row, time_fn  # noqa: E402

from dermfast import _optional  # noqa: E402
from dermfast.ops import mae_loss, mae_loss_ref  # noqa: E402

BENCH = "mae_loss"
RATIO = 0.75
# (workload, B, image px, patch, imgs dtype, pred dtype)
GPU_CASES = [("vit_h14", 64, 224, 14, torch.bfloat16, torch.bfloat16),
             ("vit_h14 imgs-fp32", 64, 224, 14, torch.float32, torch.bfloat16),
             ("vit_b16", 256, 224, 16, torch.bfloat16, torch.bfloat16)]
CPU_CASES = [("quick", 2, 32, 8, torch.float32, torch.float32)]
PASSES = ("fwd", "bwd", "fwd+bwd")


# ---- the peer: facebookresearch/mae models_mae.py, patchify + forward_loss (as published, C = 3) ----
def official_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(shape=(imgs.shape[0], h * w, p ** 2 * 3))


def official_forward_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int,
                          norm_pix_loss: bool = True) -> torch.Tensor:
    target = official_patchify(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
    loss = (loss * mask).sum() / mask.sum()  # mean loss on removed patches
    return loss


def _inputs(B: int, px: int, p: int, imgs_dtype, pred_dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    L, P = (px // p) ** 2, p * p * 3
    imgs = torch.randn(B, 3, px, px, generator=g).to(device=device, dtype=imgs_dtype)
    pred = torch.randn(B, L, P, generator=g).to(device=device, dtype=pred_dtype).requires_grad_()
    removed = L - max(1, int(L * (1 - RATIO)))
    ids = torch.rand(B, L, generator=g).argsort(dim=1)
    mask = torch.zeros(B, L).scatter_(1, ids[:, :removed], 1.0).to(device=device, dtype=pred_dtype)
    return imgs, pred, mask, removed / L


def _floor_bytes(imgs, pred, mask, frac_removed: float) -> dict[str, float]:
    reads = frac_removed * (imgs.numel() * imgs.element_size() + pred.numel() * pred.element_size())
    reads += mask.numel() * mask.element_size()
    grad = pred.numel() * pred.element_size()
    return {"fwd": reads, "bwd": reads + grad, "fwd+bwd": 2 * reads + grad}


def _bench_impl(name: str, fn: Callable, imgs, pred, mask, p: int, workload: str, shape: str, dtype,
                floor: dict, ref: float) -> list[dict]:
    try:
        loss = fn(imgs, pred, mask, p)
        note = f"|loss - ref| {abs(float(loss.detach().double()) - ref):.2e}"
        retained = fn(imgs, pred, mask, p)
        calls = {
            "fwd": lambda: fn(imgs, pred, mask, p),
            "bwd": lambda: torch.autograd.grad(retained, pred, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(fn(imgs, pred, mask, p), pred),
        }
        out = []
        for pass_ in PASSES:
            timing = time_fn(calls[pass_])
            out.append(row(BENCH, workload, shape, dtype, name, pass_, timing, bytes_=floor[pass_],
                           peak=peak_mib(calls[pass_]), note=note))
        return out
    except Exception as e:  # one implementation failing must not lose the others' rows
        return [error_row(BENCH, f"{name}: {type(e).__name__}: {e}", workload=workload, shape=shape, dtype=dtype,
                          impl=name, pass_="fwd+bwd")]


def _ours(backend: str) -> Callable:
    return lambda imgs, pred, mask, p: mae_loss(imgs, pred, mask, p, True, backend=backend)


def run(quick: bool = False) -> list[dict]:
    gpu = on_gpu() and not quick
    device = "cuda" if gpu else "cpu"
    cases = GPU_CASES if gpu else CPU_CASES
    compiled = torch.compile(official_forward_loss) if gpu else None
    cuda_ok = gpu and _optional.HAS_CUDA_EXT and hasattr(_optional.cuda_ext, "mae_loss_fwd")
    no_gpu = "no GPU (or --quick): the Triton interpreter is for tests, not timing"
    rows: list[dict] = []
    for workload, B, px, p, imgs_dtype, pred_dtype in cases:
        imgs, pred, mask, frac = _inputs(B, px, p, imgs_dtype, pred_dtype, device)
        shape = f"B{B} {px}px p{p} imgs-{str(imgs_dtype).removeprefix('torch.')}"
        floor = _floor_bytes(imgs, pred, mask, frac)
        ref = float(mae_loss_ref(imgs.double(), pred.detach().double(), mask.double(), p))
        impls: list[tuple[str, Callable | None, str]] = [
            ("mae-official", lambda i, pr, m, p_: official_forward_loss(i, pr, m, p_), ""),
            ("mae-official+compile", (lambda i, pr, m, p_: compiled(i, pr, m, p_)) if compiled else None,
             "skipped on CPU (compile time, not a result)"),
            ("dermfast-torch", _ours("torch"), ""),
            ("dermfast-triton", _ours("triton") if gpu and _optional.HAS_TRITON else None,
             no_gpu if not gpu else f"triton not importable ({_optional.TRITON_REASON})"),
            ("dermfast-cuda", _ours("cuda") if cuda_ok else None,
             "no GPU (or --quick)" if not gpu else "dermfast._C has no mae_loss_fwd (rebuild csrc/)"),
        ]
        for name, fn, why in impls:
            if fn is None:
                rows += [absent(BENCH, workload, shape, pred_dtype, name, ps, why) for ps in PASSES]
            else:
                rows += _bench_impl(name, fn, imgs, pred, mask, p, workload, shape, pred_dtype, floor, ref)
        del imgs, pred, mask
        if gpu:
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main(run))
