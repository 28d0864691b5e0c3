"""benchmarks/run_gpu.sh --dry-run: every command, script, module, flag and file the GPU run needs is there and wired
(each python entry point accepts the flags the script passes, every bench it names exists, every MAE variant and
preset it asks for is known), without running the heavy parts. ~25 s of CPU (it starts python a few times)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"


def _run(*args, **env):
    full = {**os.environ, "PYTHON": sys.executable, **env}
    full.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=600)


def test_dry_run_every_step_wired():
    r = _run("--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MISSING" not in r.stdout and "dry-run: every step is wired" in r.stdout
    for what in ("sanitize_cases.py --list runs", "bench mae_step", "bench loader", "bench masked_attention",
                 "mae_step variant dermfast+compile", "dermfast.info --selftest", "pytest marker gpu"):
        assert f"dry-run: ok      {what}" in r.stdout, what


@pytest.mark.slow
def test_dry_run_catches_an_unwired_step():
    r = _run("--dry-run", DERMFAST_BENCH_MAE_VARIANTS="official,dermfast+nonexistent")
    assert r.returncode == 1
    assert "dry-run: MISSING mae_step variant dermfast+nonexistent" in r.stdout


def test_unknown_option_is_one_line_error():
    r = _run("--dryrun")
    assert r.returncode == 2 and "unknown option --dryrun" in r.stderr
