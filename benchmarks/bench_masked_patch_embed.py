"""Masked patch embedding (pixels -> visible tokens): forward, backward and both, with peak memory.

Workloads (issue 7): ViT-H/14 at 224 px (L 256, C*p*p 588, D 1280), B 256, bf16, mask ratio 0.75; ViT-B/16
(L 196, 768 -> 768), B 256. Gradients flow to the projection weight and bias (imgs and the fixed sin-cos
pos_embed need none), as in MAE pretraining.

Implementations:
  patch-embed-then-mask          the MAE encoder's order, written out below as the peer: Conv2d(stride p)
                                 over every patch, flatten, + pos_embed, gather of the kept tokens
  patch-embed-then-mask+compile  the same under torch.compile (default mode)
  dermfast-torch                 dermfast.ops.masked_patch_embed: gather the kept pixel patches, one GEMM
                                 (4x fewer patch-embed FLOPs at 0.75); a custom op, so compiling it runs the same
On a CPU (no GPU, or --quick): a tiny fp32 shape, compile skipped: the harness works, the numbers mean nothing.
Nothing here has been measured on a GPU yet.

tflops counts the FLOPs each implementation performs (the peer projects all L patches, ours K); gbps is against
the bytes floor: read the kept pixels, the weight and pos rows, write the [B, K, D] tokens (backward: read the
token gradient and the kept pixels again, write the weight gradient).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import absent, error_row, main, on_gpu, peak_mib, row, time_fn  # noqa: E402

from dermfast.ops import masked_patch_embed, random_masking_indices  # noqa: E402

BENCH = "masked_patch_embed"
RATIO = 0.75
# (workload, B, image px, patch, D, dtype)
GPU_CASES = [("vit_h14", 256, 224, 14, 1280, torch.bfloat16), ("vit_b16", 256, 224, 16, 768, torch.bfloat16)]
CPU_CASES = [("quick", 4, 32, 8, 64, torch.float32)]
PASSES = ("fwd", "bwd", "fwd+bwd")


# ---- the peer: the MAE encoder's patch embedding, then masking of the tokens (keep-set given) ----
def patch_embed_then_mask(imgs, weight, bias, p: int, ids_keep, pos):
    x = F.conv2d(imgs, weight, bias, stride=p)  # timm PatchEmbed: Conv2d(C, D, p, stride=p)
    x = x.flatten(2).transpose(1, 2) + pos  # [B, L, D]
    D = x.shape[-1]
    return torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))


def _bench_impl(name, fn, params, workload, shape, dtype, flops, floor) -> list[dict]:
    try:
        retained = fn()
        g = torch.randn_like(retained)
        calls = {
            "fwd": fn,
            "bwd": lambda: torch.autograd.grad(retained, params, g, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(fn(), params, g),
        }
        return [row(BENCH, workload, shape, dtype, name, ps, time_fn(calls[ps]), flops=flops[ps],
                    bytes_=floor[ps], peak=peak_mib(calls[ps])) for ps in PASSES]
    except Exception as e:  # one implementation failing must not lose the others' rows
        return [error_row(BENCH, f"{name}: {type(e).__name__}: {e}", workload=workload, shape=shape, dtype=dtype,
                          impl=name, pass_="fwd+bwd")]


def run(quick: bool = False) -> list[dict]:
    gpu = on_gpu() and not quick
    device = "cuda" if gpu else "cpu"
    cases = GPU_CASES if gpu else CPU_CASES
    compiled = torch.compile(patch_embed_then_mask) if gpu else None
    rows: list[dict] = []
    for workload, B, px, p, D, dtype in cases:
        g = torch.Generator(device="cpu").manual_seed(0)
        L, cpp = (px // p) ** 2, 3 * p * p
        imgs = torch.randn(B, 3, px, px, generator=g).to(device=device, dtype=dtype)
        weight = (torch.randn(D, 3, p, p, generator=g) * 0.02).to(device=device, dtype=dtype).requires_grad_()
        bias = torch.randn(D, generator=g).to(device=device, dtype=dtype).requires_grad_()
        pos = torch.randn(1, L, D, generator=g).to(device=device, dtype=dtype)
        ids = random_masking_indices(B, L, RATIO, seed=0, step=1, device=device).ids_keep
        K = ids.shape[1]
        shape = f"B{B} {px}px p{p} D{D}"
        es = imgs.element_size()
        fwd_bytes = (B * K * cpp + D * cpp + K * B * D * 2) * es + B * K * 8
        bwd_bytes = (B * K * D + B * K * cpp + D * cpp) * es
        floor = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}

        def flops(n_tokens: int) -> dict:
            f = 2.0 * B * n_tokens * cpp * D
            return {"fwd": f, "bwd": f, "fwd+bwd": 2 * f}  # bwd: the weight gradient GEMM only

        impls: list[tuple[str, Callable | None, dict, str]] = [
            ("patch-embed-then-mask", lambda: patch_embed_then_mask(imgs, weight, bias, p, ids, pos), flops(L), ""),
            ("patch-embed-then-mask+compile",
             (lambda: compiled(imgs, weight, bias, p, ids, pos)) if compiled else None, flops(L),
             "skipped on CPU (compile time, not a result)"),
            ("dermfast-torch", lambda: masked_patch_embed(imgs, weight, bias, p, ids, pos), flops(K), ""),
        ]
        for name, fn, fl, why in impls:
            if fn is None:
                rows += [absent(BENCH, workload, shape, dtype, name, ps, why) for ps in PASSES]
            else:
                rows += _bench_impl(name, fn, (weight, bias), workload, shape, dtype, fl, floor)
        del imgs, weight, bias, pos, ids
        if gpu:
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main(run))
