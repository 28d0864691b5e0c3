"""MAE random masking (+ position embedding): forward, backward and both, with peak memory and the bytes floor.

Workloads (issue 7): ViT-H/14 at 224 px, B 256, L 256, D 1280, bf16, mask ratio 0.75; ViT-B/16, B 256, L 196,
D 768; a ragged ViT-H case (per-sample ratios in [0.6, 0.9], packed output: ours only, the peer has no such mode).
x requires grad (the patch embedding's output), pos_embed is the fixed sin-cos buffer, as in the MAE encoder.

Implementations:
  mae-official          facebookresearch/mae `random_masking` after `x + pos_embed` (torch.rand noise, two
                        argsorts, gather), written out below as the peer
  mae-official+compile  the same under torch.compile (default mode)
  dermfast-torch        dermfast.ops.random_masking(backend="torch"): the hash-keyed reference behind the custom op
  dermfast-triton       backend="triton": kernels/random_masking.py (in-kernel sort, gather + add in one launch)
  dermfast-cuda         backend="cuda" when dermfast._C has random_masking_fwd (csrc/random_masking.cu)
  dermfast-*+compile    not separate rows: the op is opaque to Inductor, so compiling it runs the same kernel.
On a CPU (no GPU, or --quick): a tiny fp32 shape, torch implementations only, compile skipped: the harness works,
the numbers mean nothing. Nothing here has been measured on a GPU yet.

gbps is against the bytes floor: forward reads the kept rows of x and pos_embed and writes the visible tokens,
the mask and the indices; backward reads the visible gradient and writes grad_x [B, L, D] (zeros included).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import absent, error_row, main, on_gpu, peak_mib, row, time_fn  # noqa: E402

from dermfast import _optional  # noqa: E402
from dermfast.ops import random_masking  # noqa: E402
from dermfast.ops.random_masking_op import keep_count  # noqa: E402

BENCH = "random_masking"
RATIO = 0.75
# (workload, B, L, D, dtype, ragged)
GPU_CASES = [("vit_h14", 256, 256, 1280, torch.bfloat16, False), ("vit_b16", 256, 196, 768, torch.bfloat16, False),
             ("vit_h14 ragged", 256, 256, 1280, torch.bfloat16, True)]
CPU_CASES = [("quick", 4, 16, 32, torch.float32, False), ("quick ragged", 4, 16, 32, torch.float32, True)]
PASSES = ("fwd", "bwd", "fwd+bwd")


# ---- the peer: facebookresearch/mae models_mae.py `random_masking` (as published), after the pos-embed add ----
def official_random_masking(x: torch.Tensor, mask_ratio: float):
    N, L, D = x.shape  # batch, length, dim
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def official_encoder_masking(x: torch.Tensor, pos: torch.Tensor, mask_ratio: float):
    return official_random_masking(x + pos, mask_ratio)


def _floor_bytes(B: int, L: int, D: int, total: int, esize: int) -> dict[str, float]:
    fwd = (2 * total * D + L * D) * esize + B * L * (esize + 8) + total * 8
    bwd = total * D * esize + B * L * D * esize + B * L * 8
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _bench_impl(name: str, fn: Callable, x, workload, shape, dtype, floor) -> list[dict]:
    try:
        retained = fn(x)
        g = torch.randn_like(retained)
        calls = {
            "fwd": lambda: fn(x),
            "bwd": lambda: torch.autograd.grad(retained, x, g, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(fn(x), x, g),
        }
        return [row(BENCH, workload, shape, dtype, name, ps, time_fn(calls[ps]), bytes_=floor[ps],
                    peak=peak_mib(calls[ps])) for ps in PASSES]
    except Exception as e:  # one implementation failing must not lose the others' rows
        return [error_row(BENCH, f"{name}: {type(e).__name__}: {e}", workload=workload, shape=shape, dtype=dtype,
                          impl=name, pass_="fwd+bwd")]


def _ours(backend: str, pos, ratio) -> Callable:
    return lambda x: random_masking(x, ratio, seed=0, step=1, pos_embed=pos, backend=backend).visible


def run(quick: bool = False) -> list[dict]:
    gpu = on_gpu() and not quick
    device = "cuda" if gpu else "cpu"
    cases = GPU_CASES if gpu else CPU_CASES
    compiled = torch.compile(official_encoder_masking) if gpu else None
    cuda_ok = gpu and _optional.HAS_CUDA_EXT and hasattr(_optional.cuda_ext, "random_masking_fwd")
    no_gpu = "no GPU (or --quick): the Triton interpreter is for tests, not timing"
    rows: list[dict] = []
    for workload, B, L, D, dtype, ragged in cases:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
        pos = torch.randn(1, L, D, generator=g).to(device=device, dtype=dtype)
        ratio = (0.6 + 0.3 * torch.rand(B, generator=g)) if ragged else RATIO  # ragged ratios stay on the CPU
        total = int(sum(keep_count(L, float(r)) for r in ratio.double())) if ragged else B * keep_count(L, ratio)
        shape = f"B{B} L{L} D{D}" + (" ragged" if ragged else "")
        floor = _floor_bytes(B, L, D, total, x.element_size())
        peer_why = "the official function has no per-sample ratios" if ragged else ""
        impls: list[tuple[str, Callable | None, str]] = [
            ("mae-official", None if ragged else (lambda x_: official_encoder_masking(x_, pos, RATIO)[0]), peer_why),
            ("mae-official+compile", (lambda x_: compiled(x_, pos, RATIO)[0]) if compiled and not ragged else None,
             peer_why or "skipped on CPU (compile time, not a result)"),
            ("dermfast-torch", _ours("torch", pos, ratio), ""),
            ("dermfast-triton", _ours("triton", pos, ratio) if gpu and _optional.HAS_TRITON else None,
             no_gpu if not gpu else f"triton not importable ({_optional.TRITON_REASON})"),
            ("dermfast-cuda", _ours("cuda", pos, ratio) if cuda_ok else None,
             "no GPU (or --quick)" if not gpu else "dermfast._C has no random_masking_fwd (rebuild csrc/)"),
        ]
        for name, fn, why in impls:
            if fn is None:
                rows += [absent(BENCH, workload, shape, dtype, name, ps, why) for ps in PASSES]
            else:
                rows += _bench_impl(name, fn, x, workload, shape, dtype, floor)
        del x, pos
        if gpu:
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main(run))
