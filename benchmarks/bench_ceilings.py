"""The two ceilings every other number is read against, measured in the same run on the present device.

- bf16 matmul, 8192 x 8192 x 8192, random normal data, through torch.matmul (cuBLAS): the compute ceiling for
  TFLOP/s rows.
- device-to-device copy of 2 GiB (`Tensor.copy_`), counting bytes read + bytes written: the memory ceiling
  for GB/s rows.

The measurement is `_common.measure_ceilings` (every bench file's `main` and `python -m dermfast.bench` run it
first, so it lives in the module they all import); this file reports the ceilings on their own:
`python benchmarks/bench_ceilings.py [--quick]`.
On a CPU (only to prove the harness) the shapes are tiny and fp32: CPU numbers are not performance results.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import main, measure_ceilings  # noqa: E402


def run(quick: bool = False) -> list[dict]:
    return measure_ceilings(quick)[1]


if __name__ == "__main__":
    sys.exit(main(run, [*sys.argv[1:], "--no-ceilings"]))
