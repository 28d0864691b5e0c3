"""Static resource check (dermfast/ops/resources*.py): every Triton kernel config and every csrc/ kernel compiled for
sm_80 and sm_90 without a GPU; no config may need more shared memory than the arch allows per block, none may spill.

What runs where (measured on the 2-core CI machine, see benchmarks/README.md):
- always: the ptxas-log parser on a real nvcc log, the verdict rules, the CLI's argument errors (< 1 s);
- always: Triton, bf16, ViT-H/14 shapes (head dim 80; L 65 and 257; packed, padded-with-lengths and dense
  attention; random masking L 256; MAE loss p 14; KD C 7 / 1000 / 32000), sm_80 + sm_90: 90 compiles;
- always (nvcc present): csrc/*.cu for sm_80 + sm_90;
- slow: Triton at every preset (ViT-B/16, ViT-L/16, ViT-H/14) and dtype (bf16, fp16, fp32).
"""
import shutil
import subprocess
import sys

import pytest

from dermfast.ops import resources
from dermfast.ops.resources import SMEM_LIMIT, Row, verdict
from dermfast.ops.resources_csrc import parse_ptxas

# Every kernel a launcher in kernels/ starts at the checked shapes (forward and backward of each op).
LAUNCHED = {"_fwd_kernel", "_bwd_kernel", "_delta_kernel", "_kd_loss_fwd_kernel", "_masking_fwd_kernel",
            "_masking_bwd_kernel", "_mae_loss_fwd_kernel", "_mae_loss_reduce_kernel", "_mae_loss_scale_kernel",
            "_mae_loss_bwd_kernel"}

# Real `nvcc -gencode arch=compute_80,code=sm_80 --resource-usage` output (CUDA 13.0), one kernel of kd_loss.cu
# and one of random_masking.cu (dynamic shared memory: added by the check at L = 256).
NVCC_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN8dermfast43_GLOBAL__N__b770a5dc_10_kd_loss_cu_3b540fe920kd_loss_block_kernelI13__nv_bfloat16S2_S2_EEvPKT_PKT0_PT1_NS0_6ParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN8dermfast43_GLOBAL__N__b770a5dc_10_kd_loss_cu_3b540fe920kd_loss_block_kernelI13__nv_bfloat16S2_S2_EEvPKT_PKT0_PT1_NS0_6ParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 512 bytes smem
ptxas info    : Compile time = 205.727 ms
ptxas info    : Compiling entry function '_ZN8dermfast50_GLOBAL__N__057c2c31_17_random_masking_cu_b8ddb2a125random_masking_fwd_kernelI13__nv_bfloat16S2_EEvPKT_S5_PS3_PT0_PlS9_PKiiiljm' for 'sm_80'
ptxas info    : Function properties for _ZN8dermfast50_GLOBAL__N__057c2c31_17_random_masking_cu_b8ddb2a125random_masking_fwd_kernelI13__nv_bfloat16S2_EEvPKT_S5_PS3_PT0_PlS9_PKiiiljm
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 440 bytes cmem[0]
"""


def test_parse_nvcc_resource_log():
    kd, rm = parse_ptxas(NVCC_LOG, "x.cu")
    if not shutil.which("c++filt"):
        pytest.skip("c++filt absent: names stay mangled")
    assert (kd.kernel, kd.variant, kd.arch, kd.regs, kd.spills, kd.smem, kd.verdict) == (
        "kd_loss_block_kernel", "bfloat16,bfloat16,bfloat16", 90, 32, 0, 512, "ok")
    assert (rm.kernel, rm.arch, rm.regs, rm.spills, rm.smem, rm.smem_limit) == (
        "random_masking_fwd_kernel", 80, 32, 8, 8 * 256, 163 * 1024)
    assert rm.verdict == "FAIL spills 8 B"


def test_verdict_rules():
    base = dict(kernel="k", config="c", variant="", arch=80, dtype="bfloat16", regs=128, spills=0)
    assert verdict(Row(**base, smem=SMEM_LIMIT[80], smem_limit=SMEM_LIMIT[80])) == "ok"
    assert verdict(Row(**base, smem=SMEM_LIMIT[80] + 1, smem_limit=SMEM_LIMIT[80])).startswith("FAIL smem")
    # 200 KB launches on sm_90 (227 KB per block) but not on sm_80 (163 KB)
    assert verdict(Row(**{**base, "arch": 90}, smem=200 * 1024, smem_limit=SMEM_LIMIT[90])) == "ok"
    assert verdict(Row(**{**base, "spills": 4}, smem=0, smem_limit=SMEM_LIMIT[80])) == "FAIL spills 4 B"
    assert verdict(Row(**{**base, "regs": None}, verdict="FAIL compile: boom")) == "FAIL compile: boom"


@pytest.mark.parametrize("argv, msg", [(["--resources", "--arch", "sm_70"], "--arch 'sm_70': expected one of"),
                                       (["--arch", "sm_80"], "--arch goes with --resources")])
def test_info_resources_bad_arguments(argv, msg):
    r = subprocess.run([sys.executable, "-m", "dermfast.info", *argv], capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def _failures(rows):
    return "\n".join(f"{r.kernel} [{r.config}] [{r.variant}] sm_{r.arch} {r.dtype}: {r.verdict} "
                     f"(regs {r.regs}, smem {r.smem}; shapes {', '.join(r.shapes)})"
                     for r in rows if r.verdict != "ok")


def _check_triton(rows, archs, dtypes):
    assert {r.kernel for r in rows} == LAUNCHED
    from dermfast.kernels import masked_attention as attn
    per_layout = len(archs) * len(dtypes) * 3  # packed, padded with lengths, dense
    # every autotune config is compiled, for every layout (head dims 64 and 80 add a factor where both are present)
    n_fwd = sum(r.kernel == "_fwd_kernel" for r in rows)
    assert n_fwd % (len(attn._FWD_CONFIGS) * per_layout) == 0 and n_fwd >= len(attn._FWD_CONFIGS) * per_layout
    assert {r.config for r in rows if r.kernel == "_bwd_kernel"} == {
        " ".join([*(f"{k}={v}" for k, v in c.kwargs.items()), f"w{c.num_warps}", f"s{c.num_stages}"])
        for c in attn._BWD_CONFIGS}
    assert {r.arch for r in rows} == set(archs) and {r.dtype for r in rows} == set(dtypes)
    assert not _failures(rows), "configs that cannot launch or that spill:\n" + _failures(rows)


def test_triton_configs_bf16_vit_h():
    """bf16 and ViT-H/14 shapes (head dim 80, the heaviest tiles), sm_80 and sm_90: no config over the shared
    memory limit, no spills (the autotuner may pick any config in the list)."""
    rows = resources.triton_rows([80, 90], ["bfloat16"], ["vit_h14"])
    _check_triton(rows, [80, 90], ["bfloat16"])


@pytest.mark.slow
def test_triton_configs_every_preset_and_dtype():
    rows = resources.triton_rows([80, 90], list(resources.DTYPES), sorted(resources.PRESETS))
    _check_triton(rows, [80, 90], list(resources.DTYPES))


def test_csrc_kernels():
    from dermfast.ops.resources_csrc import csrc_rows, find_nvcc
    if find_nvcc() is None:
        pytest.skip("nvcc not found")
    rows = csrc_rows([80, 90])
    names = {r.kernel for r in rows}
    assert {"kd_loss_block_kernel", "kd_loss_warp_kernel", "mae_loss_fwd_kernel", "mae_loss_bwd_kernel",
            "random_masking_fwd_kernel", "fill_iota_u32_kernel"} <= names, names
    assert {r.arch for r in rows} == {80, 90}
    assert not _failures(rows), "csrc kernels that cannot launch or that spill:\n" + _failures(rows)
