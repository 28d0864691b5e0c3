"""The two ceilings every other number is read against, measured in the same run on the present device.

- bf16 matmul, 8192 x 8192 x 8192, random normal data (never zeros: a product on zeros ran 13 % faster on an
  H200 here), through torch.matmul (cuBLAS): the compute ceiling for TFLOP/s rows.
- device-to-device copy of 2 GiB (`Tensor.copy_`), counting bytes read + bytes written: the memory ceiling
  for GB/s rows. Both are far larger than L2, and do_bench flushes the cache between runs.

`measure(quick)` returns ({"matmul_tflops", "copy_gbps"}, rows); `python -m dermfast.bench` calls it first.
On a CPU (only to prove the harness) the shapes are tiny and fp32: CPU numbers are not performance results.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import main, on_gpu, row, time_fn  # noqa: E402

BENCH = "ceilings"


def measure(quick: bool = False) -> tuple[dict, list[dict]]:
    gpu = on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    n = 8192 if gpu else (256 if quick else 1024)
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t_mm = time_fn(lambda: torch.matmul(a, b, out=c), warmup=5 if gpu else 2, rep=40 if gpu else 10)
    flops = 2.0 * n ** 3
    del a, b, c

    nbytes = (2 << 30) if gpu else ((8 << 20) if quick else (64 << 20))
    src = torch.randn(nbytes // 4, device=device, dtype=torch.float32, generator=g)
    dst = torch.empty_like(src)
    t_cp = time_fn(lambda: dst.copy_(src), warmup=5 if gpu else 2, rep=40 if gpu else 10)
    del src, dst
    if gpu:
        torch.cuda.empty_cache()

    note = "" if gpu else "CPU: not a performance result"
    rows = [row(BENCH, "matmul ceiling", f"{n}x{n}x{n}", dtype, "torch.matmul", "fwd", t_mm, flops=flops,
                note=note),
            row(BENCH, "copy ceiling", f"{nbytes / 2**20:.0f} MiB", torch.float32, "Tensor.copy_", "fwd", t_cp,
                bytes_=2.0 * nbytes, note=note)]
    ceilings = {"matmul_tflops": flops / t_mm["median_ms"] / 1e9, "copy_gbps": 2.0 * nbytes / t_cp["median_ms"] / 1e6}
    return ceilings, rows


def run(quick: bool = False) -> list[dict]:
    return measure(quick)[1]


if __name__ == "__main__":
    sys.exit(main(run, [*sys.argv[1:], "--no-ceilings"]))
