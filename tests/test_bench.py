"""`python -m dermfast.bench` on a CPU: the harness over a fake benchmarks folder (a bench that works, one that
raises, one that does not import, a standalone script, an absent peer), the results file, and one real --quick
run of benchmarks/bench_mae_step.py. Numbers here prove the plumbing; they are never performance results.
"""
from __future__ import annotations

import csv
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dermfast import bench

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"

GOOD = '''
"""A bench that works: a torch peer, a dermfast impl, an absent peer."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import absent, main, row, time_fn


def run(quick=False):
    x = torch.randn(32, 32)
    t = time_fn(lambda: x @ x, warmup=1, rep=5)
    ours = {"median_ms": t["median_ms"] / 2, "p20_ms": t["p20_ms"] / 2, "p80_ms": t["p80_ms"] / 2}
    shape, f = "32x32x32", 2 * 32 ** 3
    return [row("good", "matmul", shape, torch.float32, "torch", "fwd", t, flops=f),
            row("good", "matmul", shape, torch.float32, "dermfast", "fwd", ours, flops=f, extra={"items": 3}),
            absent("good", "matmul", shape, torch.float32, "xformers", "fwd", "xformers is not installed")]


def summary(rows):
    return "## good\\n\\n%d rows summarised" % len(rows)


if __name__ == "__main__":
    sys.exit(main(run))
'''
RAISES = '''
"""A bench whose run() raises."""
def run(quick=False):
    raise RuntimeError("boom in run")
'''
BROKEN = '''
"""A bench that does not import."""
import dermfast_no_such_module_xyz  # noqa: F401
def run(quick=False):
    return []
'''
SCRIPT = '''
"""A standalone script without run(quick)."""
def main():
    print("hi")
'''
MALFORMED = '''
"""run() returns rows not made by _common.row."""
def run(quick=False):
    return [{"bench": "malformed"}]
'''


@pytest.fixture
def fake_dir(tmp_path: Path) -> Path:
    d = tmp_path / "benchmarks"
    d.mkdir()
    shutil.copy(BENCH_DIR / "_common.py", d / "_common.py")
    shutil.copy(BENCH_DIR / "bench_ceilings.py", d / "bench_ceilings.py")
    for name, text in {"good": GOOD, "raises": RAISES, "broken": BROKEN, "script": SCRIPT,
                       "malformed": MALFORMED}.items():
        (d / f"bench_{name}.py").write_text(textwrap.dedent(text))
    return d


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_bench(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["bench"], []).append(r)
    return out


def test_harness_reports_every_module_and_keeps_going(fake_dir, tmp_path, capsys):
    out = tmp_path / "res" / "r.csv"
    rc = bench.main(["--dir", str(fake_dir), "--quick", "--out", str(out)])
    assert rc == 1  # an error row makes the run fail, after every other module ran
    rows = by_bench(read(out))
    assert set(rows) == {"ceilings", "good", "raises", "broken", "script", "malformed"}

    good = {r["impl"]: r for r in rows["good"]}
    assert good["torch"]["status"] == "ok" and float(good["torch"]["median_ms"]) > 0
    assert float(good["dermfast"]["ratio_to_best_peer"]) == pytest.approx(2.0, rel=0.02)
    assert good["xformers"]["status"] == "absent: xformers is not installed"  # listed, not dropped
    assert good["dermfast"]["items"] == "3"  # extra columns reach the CSV
    for impl in ("torch", "dermfast"):  # read against the measured (CPU) matmul ceiling
        assert float(good[impl]["frac_of_ceiling"]) > 0
    assert {r["workload"] for r in rows["ceilings"]} == {"matmul ceiling", "copy ceiling"}

    assert rows["raises"][0]["status"].startswith("error: run() raised RuntimeError: boom in run")
    assert rows["broken"][0]["status"].startswith("error: import failed: ModuleNotFoundError")
    assert "no run(quick)" in rows["script"][0]["status"]
    assert not rows["script"][0]["status"].startswith("error")
    assert "lacks" in rows["malformed"][0]["status"]

    r0 = read(out)[0]
    for key in ("device", "driver", "torch", "triton", "cuda", "commit", "date", "mode"):
        assert r0[key], key
    assert r0["mode"] == "quick"
    md = out.with_suffix(".md").read_text()
    assert "## good" in md and "3 rows summarised" in md
    assert "not performance results" in md
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("3 error row(s)")
    if not torch.cuda.is_available():
        assert "CPU numbers are not performance results" in printed


def test_only_list_and_bad_names(fake_dir, tmp_path, capsys):
    assert bench.main(["--dir", str(fake_dir), "--list"]) == 0
    listed = capsys.readouterr().out
    assert "good" in listed and "A bench that works" in listed and "ceilings" in listed

    out = tmp_path / "only.csv"
    assert bench.main(["--dir", str(fake_dir), "--quick", "--only", "bench_good.py", "--no-ceilings",
                       "--out", str(out)]) == 0
    assert {r["bench"] for r in read(out)} == {"good"}

    assert bench.main(["--dir", str(fake_dir), "--only", "nope"]) == 2
    assert "unknown benchmark(s) nope" in capsys.readouterr().err


def test_missing_bench_dir_is_a_clear_error(tmp_path, capsys):
    assert bench.main(["--dir", str(tmp_path / "nowhere"), "--quick"]) == 2
    assert "benchmarks folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert bench.main(["--dir", str(tmp_path / "empty")]) == 2
    assert "no _common.py" in capsys.readouterr().err


def test_default_dir_is_the_checkout():
    assert bench.find_bench_dir() == BENCH_DIR.resolve()
    assert {"ceilings", "mae_step"} <= set(bench.discover(BENCH_DIR))


def test_results_file_widens_its_header(tmp_path):
    common = bench.load_common(BENCH_DIR)
    out = tmp_path / "r.csv"
    env = {"date": "2026-01-01", "device": "cpu-test", "commit": "abc"}
    common.write_rows([common.row("a", "w", "s", torch.float32, "torch", "fwd", {"median_ms": 1.0})], out, env)
    common.write_rows([common.row("b", "w", "s", torch.float32, "torch", "fwd", {"median_ms": 2.0},
                                  extra={"images_per_s": 5.0})], out, env)
    rows = read(out)
    assert [r["bench"] for r in rows] == ["a", "b"]
    assert rows[0]["images_per_s"] == "" and rows[1]["images_per_s"] == "5"
    assert rows[0]["median_ms"] == "1.0000" and rows[1]["device"] == "cpu-test"


def test_default_out_leaves_the_checkout_clean(fake_dir, tmp_path, monkeypatch, capsys):
    """No --out: the results go to runs/bench/<device>-<date>.csv under the working directory (git ignores
    /runs/), never into the benchmarks folder; --out DIR puts the same file name in DIR (run_gpu.sh:
    --out benchmarks/results); --out FILE.csv is that file."""
    before = sorted(p.name for p in (BENCH_DIR / "results").glob("*")) if (BENCH_DIR / "results").is_dir() else []
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["--dir", str(fake_dir), "--quick", "--only", "good", "--no-ceilings"]
    assert bench.main(args) == 0
    made = list((work / "runs" / "bench").glob("*.csv"))
    assert len(made) == 1 and made[0].with_suffix(".md").is_file()
    assert {r["bench"] for r in read(made[0])} == {"good"}
    assert not (fake_dir / "results").exists()
    after = sorted(p.name for p in (BENCH_DIR / "results").glob("*")) if (BENCH_DIR / "results").is_dir() else []
    assert after == before
    assert f"wrote {Path('runs') / 'bench' / made[0].name}" in capsys.readouterr().out

    assert bench.main([*args, "--out", str(tmp_path / "committed")]) == 0
    assert [p.name for p in (tmp_path / "committed").glob("*.csv")] == [made[0].name]
    script = (BENCH_DIR / "run_gpu.sh").read_text()
    assert "RESULTS=benchmarks/results" in script and '--out "$RESULTS"' in script


def test_console_fits_120_columns(fake_dir, tmp_path, capsys):
    assert bench.main(["--dir", str(fake_dir), "--quick", "--out", str(tmp_path / "r.csv")]) == 1
    printed = capsys.readouterr().out
    wide = [line for line in printed.splitlines() if len(line) > 120]
    assert not wide, wide
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("bench "))
    assert lines[head].split() == ["bench", "workload", "shape", "dtype", "impl", "pass", "median_ms", "throughput",
                                   "of_ceil", "vs_peer", "status"]  # peak_mib: empty on a CPU, left out
    # a long status is not cut: it goes whole on its own indented line(s) under its row
    status = next(r["status"] for r in read(tmp_path / "r.csv") if r["bench"] == "broken")
    i = lines.index("broken")
    assert len(status) > 100 and lines[i + 1] == "    " + status


def test_format_table_fits_and_wraps():
    common = bench.load_common(BENCH_DIR)
    status = "error: " + " ".join(f"word{i}" for i in range(40))
    rows = [common.row("b" * 30, "w" * 70, "s", torch.bfloat16, "impl", "fwd", {"median_ms": 1.0}, status=status),
            common.row("short", "x", "s", torch.float32, "impl", "fwd", {"median_ms": 2.0}, flops=4e9)]
    lines = common.format_table(rows, width=120).splitlines()
    assert all(len(line) <= 120 for line in lines) and len(lines) > 4
    assert "peak_mib" not in lines[0] and "throughput" in lines[0]  # empty in every row: left out
    # nothing is cut: the long workload wraps within its column, the long status goes on its own lines
    assert "".join(line[len("b" * 24) + 2:].split()[0] for line in lines[1:4]) == "w" * 70
    assert "bf16" in lines[1] and "2 TFLOP/s" in lines[-1] and lines[-1].startswith("short")
    i = next(i for i, line in enumerate(lines) if line.startswith("    error:"))
    assert " ".join(line.strip() for line in lines[i:-1]) == status and i >= 3  # after the row's wrapped lines
    cut = common.format_table(rows, width=None).splitlines()[1]
    assert "w" * 57 + "..." in cut  # no width: one line per row, cells cut at max_width
    fitted = common.fit_lines("x " * 100 + "\n| " + "a | " * 60)
    assert all(len(line) <= 120 for line in fitted.splitlines())


@pytest.fixture
def mae_step():
    sys.path.insert(0, str(BENCH_DIR))
    import bench_mae_step
    return bench_mae_step


@pytest.mark.parametrize("names, group", [
    (["void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", "aten::mm", "aten::linear"], "matmul"),
    (["nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "aten::addmm"], "matmul"),
    (["sm90_xmma_gemm_bf16bf16_bf16f32", "aten::mm"], "matmul"),
    (["pytorch_flash::flash_fwd_kernel<...>", "aten::_flash_attention_forward"], "attention"),
    (["void at::native::vectorized_layer_norm_kernel<float>", "aten::native_layer_norm"], "norm"),
    (["triton_red_fused_native_layer_norm_3", "Torch-Compiled Region"], "norm"),
    (["void at::native::unrolled_elementwise_kernel<copy>", "aten::copy_", "aten::_to_copy", "aten::linear"],
     "elementwise/casts"),
    (["void multi_tensor_apply_kernel<...>", "aten::_fused_adamw_", "Optimizer.step#AdamW.step"], "optimiser"),
    (["void at::native::vectorized_elementwise_kernel<mul>", "aten::mul", "Optimizer.step#AdamW.step"], "optimiser"),
    (["void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel", "aten::sort", "aten::argsort", "masking"],
     "masking"),
    (["_random_masking_kernel", "dermfast::random_masking"], "masking"),
    (["void at::native::reduce_kernel<sum>", "aten::sum", "dermfast::mae_loss"], "loss"),
    (["aten::mul", "loss"], "loss"),
    (["triton_poi_fused_gelu_7"], "elementwise/casts"),
])
def test_kernel_groups(mae_step, names, group):
    assert mae_step.classify(names) == group


def test_model_flops_match_the_closed_form(mae_step):
    """flop_counter on the meta device against a hand count: fwd matmuls (patch embed, qkv/proj/mlp, QK^T and PV,
    decoder embed/pred) x 3 for fwd + bwd, minus the patch embedding's input gradient (images need none)."""
    from dermfast.models.mae import get_preset
    c = get_preset("demo")
    L, P = (c.img_size // c.patch_size) ** 2, c.patch_size ** 2 * c.in_chans
    n, nd, D, Dd = int(L * (1 - c.mask_ratio)) + 1, L + 1, c.embed_dim, c.decoder_embed_dim
    conv = 2 * L * P * D
    block = lambda t, d: 2 * t * d * d * 4 + 2 * t * d * int(d * c.mlp_ratio) * 2 + 4 * t * t * d  # noqa: E731
    fwd = conv + c.depth * block(n, D) + c.decoder_depth * block(nd, Dd) + 2 * n * D * Dd + 2 * nd * Dd * P
    assert mae_step.flops_per_image(c) == 3 * fwd - conv


def test_datasheet_peaks(mae_step):
    assert mae_step.datasheet_peak("NVIDIA H100 80GB HBM3") == ("H100", 989.4)
    assert mae_step.datasheet_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756.5)
    assert mae_step.datasheet_peak("NVIDIA H200") == ("H200", 989.4)
    assert mae_step.datasheet_peak("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert mae_step.datasheet_peak("NVIDIA GeForce RTX 4090") is None


def test_mae_step_quick_real_run(tmp_path, monkeypatch, capsys):
    """The real benchmark, --quick: demo preset, batch 2, one timed step per variant, the breakdown filled."""
    gpu = torch.cuda.is_available()
    monkeypatch.setenv("DERMFAST_BENCH_MAE_VARIANTS",
                       "official,dermfast" + ("" if gpu else ",dermfast+compile+cudagraphs"))
    monkeypatch.setenv("DERMFAST_BENCH_MAE_PRESETS", "demo")
    monkeypatch.setenv("DERMFAST_BENCH_MAE_BATCHES", "2")
    monkeypatch.setenv("DERMFAST_BENCH_MAE_STEPS", "1")
    out = tmp_path / "mae.csv"
    assert bench.main(["--quick", "--only", "mae_step", "--no-ceilings", "--out", str(out)]) == 0
    rows = {r["impl"]: r for r in read(out)}
    for impl in ("official", "dermfast"):
        r = rows[impl]
        assert r["status"] == "ok" and r["pass"] == "step"
        assert r["batch"] == "2" and r["shape"].startswith("b2 ")
        assert float(r["images_per_s"]) > 0 and float(r["tflops"]) > 0
        parts = dict(kv.split("=") for kv in r["breakdown_ms"].split(";"))
        assert {"matmul", "attention", "norm", "elementwise/casts", "optimiser", "masking", "loss"} <= set(parts)
        assert float(parts["matmul"]) > 0 and float(parts["optimiser"]) > 0
    assert rows["dermfast"]["ratio_to_best_peer"]
    if not gpu:
        assert rows["dermfast+compile+cudagraphs"]["status"] == "absent: needs a CUDA GPU"
    md = out.with_suffix(".md").read_text()
    assert "## MAE step" in md and "| demo | 2 | official |" in md


SIGTERM_SELF = '''
"""A bench that is stopped from outside (as `timeout` does) while it runs."""
import os
import signal
import time


import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import row


def run(quick=False):
    rows = [row("zz_stopped", "w", "s", "float32", "torch", "fwd", {"median_ms": 1.0})]
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    except BaseException as e:
        e.partial_rows = rows
        raise
    return rows
'''


def test_sigterm_still_writes_results(fake_dir, tmp_path):
    (fake_dir / "bench_zz_stopped.py").write_text(textwrap.dedent(SIGTERM_SELF))
    (fake_dir / "bench_zzz_later.py").write_text(textwrap.dedent(GOOD))
    out = tmp_path / "stopped.csv"
    assert bench.main(["--dir", str(fake_dir), "--quick", "--only", "good", "zz_stopped", "zzz_later",
                       "--no-ceilings", "--out", str(out)]) == 1
    rows = by_bench(read(out))
    assert [r["status"] for r in rows["good"]][:2] == ["ok", "ok"]  # measured before the signal: kept
    stopped = {r["status"][:24] for r in rows["zz_stopped"]}
    assert stopped == {"ok", "error: stopped by signal"}  # its measured row kept, and the stop reported
    assert rows["zzz_later"][0]["status"] == "skipped: the run was stopped before it"


def test_budget_skips_the_rest(fake_dir, tmp_path):
    out = tmp_path / "budget.csv"
    assert bench.main(["--dir", str(fake_dir), "--quick", "--only", "good", "raises", "--no-ceilings",
                       "--budget-s", "0", "--out", str(out)]) == 0
    assert all(r["status"].startswith("skipped: past the 0 s budget") for r in read(out))


@pytest.mark.gpu
def test_ceilings_on_gpu(tmp_path):
    """bf16 8192^3 matmul and the 2 GiB copy on the GPU present; rows read against them (no speed asserted)."""
    out = tmp_path / "c.csv"
    assert bench.main(["--only", "ceilings", "--out", str(out)]) == 0
    rows = {r["workload"]: r for r in read(out)}
    assert rows["matmul ceiling"]["dtype"] == "bfloat16" and float(rows["matmul ceiling"]["tflops"]) > 0
    assert float(rows["copy ceiling"]["gbps"]) > 0 and rows["copy ceiling"]["device"].startswith("NVIDIA")


@pytest.mark.gpu
def test_mae_step_on_gpu_breakdown_sees_real_kernels(tmp_path, monkeypatch):
    """vit_b16 at batch 32, eager variants: GPU kernels land in the matmul / attention / optimiser groups."""
    monkeypatch.setenv("DERMFAST_BENCH_MAE_VARIANTS", "official,dermfast")
    monkeypatch.setenv("DERMFAST_BENCH_MAE_PRESETS", "vit_b16")
    monkeypatch.setenv("DERMFAST_BENCH_MAE_BATCHES", "32")
    monkeypatch.setenv("DERMFAST_BENCH_MAE_STEPS", "3")
    out = tmp_path / "g.csv"
    assert bench.main(["--only", "mae_step", "--out", str(out)]) == 0
    rows = {r["impl"]: r for r in read(out) if r["bench"] == "mae_step"}
    for impl in ("official", "dermfast"):
        r = rows[impl]
        assert r["status"] == "ok" and r["dtype"] == "bf16-autocast" and float(r["peak_mib"]) > 0
        parts = {k: float(v) for k, v in (kv.split("=") for kv in r["breakdown_ms"].split(";"))}
        assert parts["matmul"] > 0 and parts["attention"] > 0 and parts["optimiser"] > 0, parts
        assert 0 < float(r["frac_of_ceiling"]) < 1.5
        assert r["mfu_datasheet"]


@pytest.mark.gpu
def test_mae_step_oom_moves_to_the_next_batch(tmp_path, monkeypatch, mae_step):
    """A batch that cannot fit (10^6 demo images) is skipped for the next candidate, and memory is given back."""
    batch, res, why = mae_step.run_variant("official", "demo", [1_000_000, 8], 1, 1, 1, torch.device("cuda"))
    assert batch == 8 and res is not None and why == ""
    assert torch.cuda.memory_allocated() < 2**30
