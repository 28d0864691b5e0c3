"""Packaging and build checks: kernels/ ships only as dermfast.kernels, setup.py's build switches, and the compiled
extension dermfast._C (its CPU-safe surface everywhere, its kernel launch on a GPU).

Most checks need dermfast installed (`pip install -e .` or a wheel): pytest's own sys.path handling can make a
source checkout importable without an install, so the layout checks look at the installed distribution and at a
fresh interpreter started outside the repository.
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRUTHY = {"1", "true", "yes", "on", "force"}

try:
    import torch

    HAS_GPU = bool(torch.cuda.is_available())
except Exception:  # torch missing or broken: the GPU tests skip
    torch = None
    HAS_GPU = False


def _distribution() -> importlib.metadata.Distribution:
    """The installed dermfast distribution. Not the dermfast.egg-info that setuptools leaves in the repo root: with
    the repo on sys.path (python -m pytest) importlib.metadata finds that first, and its SOURCES.txt lists the
    source tree (kernels/ included), not what was installed."""
    installed = [d for d in importlib.metadata.distributions(name="dermfast") if not _same(d.locate_file(""), REPO)]
    if not installed:
        pytest.fail("dermfast is not installed: run `pip install -e .` (or `uv pip install -e .`) first")
    return installed[0]


def _same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# --------------------------------------------------------------------------- layout: kernels/ -> dermfast.kernels


def test_kernels_imports_as_subpackage():
    _distribution()
    import dermfast.kernels

    assert dermfast.kernels.__name__ == "dermfast.kernels"
    init = Path(dermfast.kernels.__file__).resolve()
    assert init.name == "__init__.py"
    # editable install: the repo's kernels/ itself; wheel install: site-packages/dermfast/kernels/
    import dermfast

    assert init.parent.name == "kernels"
    assert init.parent.parent.name == "dermfast" or _same(init.parent, Path(dermfast.__file__).parent.parent / "kernels")


def test_fresh_interpreter_outside_repo_sees_no_top_level_kernels(tmp_path):
    _distribution()
    code = (
        "import importlib.util, json, dermfast, dermfast.kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'kernels': None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or []))),"
        " 'dermfast': dermfast.__file__, 'dermfast.kernels': dermfast.kernels.__file__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # test the install, not a path hack
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["dermfast.kernels"]).parent.name == "kernels", found
    if found["kernels"] is not None:  # some unrelated `kernels` distribution may exist; ours must not be it
        assert str(REPO / "kernels") not in found["kernels"], f"top-level `kernels` resolves into this repo: {found}"


def test_distribution_ships_no_top_level_kernels():
    dist = _distribution()
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert "kernels" not in top_level, top_level
    files = [Path(str(f)) for f in (dist.files or [])]
    assert not [f for f in files if f.parts and f.parts[0] == "kernels"], "RECORD lists a top-level kernels/"

    for f in files:
        located = Path(str(dist.locate_file(f)))
        if f.suffix == ".pth" and located.is_file():
            # a path-entry .pth pointing at a directory that contains kernels/ would expose it top-level
            for line in located.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith(("#", "import ")):
                    assert not (Path(line) / "kernels" / "__init__.py").is_file(), f"{f} puts {line} on sys.path"
        if f.name.startswith("__editable__") and f.name.endswith("_finder.py") and located.is_file():
            mapping = _finder_mapping(located)
            assert "kernels" not in mapping, mapping
            assert "dermfast.kernels" in mapping, mapping
            assert Path(mapping["dermfast.kernels"]).name == "kernels"
            assert _same(Path(mapping["dermfast.kernels"]).parent, Path(mapping["dermfast"]).parent), mapping


def _finder_mapping(path: Path) -> dict[str, str]:
    """The MAPPING literal of setuptools' editable finder module (top-level package -> source dir)."""
    for node in ast.parse(path.read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "MAPPING" and node.value is not None:
            return ast.literal_eval(node.value)
    pytest.fail(f"no MAPPING in {path}")


def test_every_package_dir_has_init():
    # find_packages() skips directories without __init__.py, so their modules would be missing from wheels
    # (an editable install hides this: there they still import as namespace packages).
    missing = []
    for top in (REPO / "dermfast", REPO / "kernels"):
        for d in [top, *(p for p in top.rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or any(part.startswith(".") for part in d.relative_to(REPO).parts):
                continue
            if any(d.glob("*.py")) and not (d / "__init__.py").is_file():
                missing.append(str(d.relative_to(REPO)))
    assert not missing, f"add __init__.py to: {missing}"


# --------------------------------------------------------------------------- build configuration


def test_build_requirements_exclude_torch():
    tomllib = pytest.importorskip("tomllib")
    build_system = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    assert build_system["build-backend"] == "setuptools.build_meta"
    names = [r.split(";")[0].replace(" ", "").lower() for r in build_system["requires"]]
    assert not [n for n in names if n.startswith("torch")], names
    for needed in ("setuptools", "pybind11", "cmake", "ninja"):
        assert any(n.startswith(needed) for n in names), (needed, names)


@pytest.fixture(scope="module")
def setup_module_():
    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location("_dermfast_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, "auto"), ("", "auto"), ("auto", "auto"), ("1", "force"), ("ON", "force"), ("0", "skip"), ("false", "skip")],
)
def test_cuda_build_mode(setup_module_, value, mode):
    env = {} if value is None else {"DERMFAST_BUILD_CUDA": value}
    assert setup_module_.cuda_build_mode(env) == mode


def test_cuda_build_mode_rejects_garbage(setup_module_):
    with pytest.raises(ValueError, match="DERMFAST_BUILD_CUDA"):
        setup_module_.cuda_build_mode({"DERMFAST_BUILD_CUDA": "maybe"})


def test_find_nvcc_prefers_cuda_home(setup_module_, tmp_path):
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert setup_module_.find_nvcc({"CUDA_HOME": str(tmp_path / "cuda"), "PATH": ""}) == str(nvcc)
    assert setup_module_.find_nvcc({"CUDACXX": str(nvcc), "PATH": ""}) == str(nvcc)


def test_setup_packages_map_kernels_under_dermfast(setup_module_):
    assert "dermfast.kernels" in setup_module_.PACKAGES
    assert not [p for p in setup_module_.PACKAGES if p == "kernels" or p.startswith("kernels.")]


# --------------------------------------------------------------------------- the compiled extension


@pytest.fixture(scope="module")
def ext():
    try:
        return importlib.import_module("dermfast._C")
    except ImportError as e:
        if os.environ.get("DERMFAST_BUILD_CUDA", "").strip().lower() in TRUTHY:
            pytest.fail(f"DERMFAST_BUILD_CUDA=1 but dermfast._C does not import: {e}")
        pytest.skip(f"dermfast._C is not built ({e}); it needs nvcc at install time")


def test_ext_versions_and_device_count(ext):
    assert isinstance(ext.cuda_runtime_version(), int) and ext.cuda_runtime_version() > 0
    assert isinstance(ext.cuda_driver_version(), int) and ext.cuda_driver_version() >= 0
    n = ext.device_count()
    assert isinstance(n, int) and n >= 0
    assert ext.device_count() == n  # a failed query (no driver) must not leave a sticky error behind
    assert isinstance(ext.device_query_error(), str)
    if n > 0:
        assert ext.device_query_error() == ""
    assert ext.compiled_cuda_archs()


def test_ext_rejects_bad_device_ordinals(ext):
    with pytest.raises(IndexError):
        ext.device_name(-1)
    with pytest.raises(IndexError):
        ext.compute_capability(ext.device_count())


def test_fill_iota_validates_arguments(ext):
    ext.fill_iota_u32(0, 0, 0)  # n == 0: no-op, touches nothing
    with pytest.raises(ValueError, match="n must be >= 0"):
        ext.fill_iota_u32(0, -1, 0)
    with pytest.raises(ValueError, match="null"):
        ext.fill_iota_u32(0, 4, 0)
    with pytest.raises(ValueError, match="aligned"):
        ext.fill_iota_u32(4096 + 2, 4, 0)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        ext.fill_iota_u32(4096, 2**32 + 1, 0)
    with pytest.raises(TypeError):
        ext.fill_iota_u32(-4096, 4, 0)


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU path")
def test_fill_iota_without_gpu_raises_not_crashes(ext):
    with pytest.raises((RuntimeError, ValueError)):
        ext.fill_iota_u32(4096, 4, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_device_queries_match_torch(ext):
    assert ext.device_count() == torch.cuda.device_count()
    assert ext.device_query_error() == ""
    assert ext.cuda_driver_version() > 0
    for i in range(ext.device_count()):
        assert ext.compute_capability(i) == torch.cuda.get_device_capability(i)
        assert ext.device_name(i) == torch.cuda.get_device_name(i)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("n", [1, 255, 256, 257, (1 << 20) + 3, (1 << 24) + 1])  # last one exercises the grid-stride loop
def test_fill_iota_u32_on_gpu(ext, n):
    guard = 64
    out = torch.full((n + guard,), -0x21524111, dtype=torch.int32, device="cuda")  # 0xDEADBEEF poison
    stream = torch.cuda.current_stream()
    ext.fill_iota_u32(out.data_ptr(), n, stream.cuda_stream)
    stream.synchronize()
    expected = torch.arange(n, dtype=torch.int64, device="cuda").to(torch.int32)
    assert torch.equal(out[:n], expected)
    assert bool((out[n:] == -0x21524111).all()), "wrote past n"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_fill_iota_u32_on_side_stream(ext):
    n = 10_000
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out = torch.full((n,), -1, dtype=torch.int32, device="cuda")
        ext.fill_iota_u32(out.data_ptr(), n, side.cuda_stream)
    side.synchronize()
    assert torch.equal(out.cpu(), torch.arange(n, dtype=torch.int32))


# Host memory is refused on every driver: the GPU machine's driver (HMM) reports pageable memory as reachable,
# and the kernel launched on it crashed the process instead of raising.
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned"])
def test_fill_iota_u32_refuses_host_memory(ext, pinned):
    n = 10_000
    host = torch.full((n,), -1, dtype=torch.int32, pin_memory=pinned)
    with pytest.raises(ValueError, match="not CUDA device memory of the current device"):
        ext.fill_iota_u32(host.data_ptr(), n, 0)
    torch.cuda.synchronize()
    assert bool((host == -1).all()), "host memory was written"
    out = torch.full((n,), -1, dtype=torch.int32, device="cuda")  # the runtime is still healthy afterwards
    ext.fill_iota_u32(out.data_ptr(), n, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), torch.arange(n, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_fill_iota_u32_refuses_managed_memory(ext):
    cupy = pytest.importorskip("cupy")
    mem = cupy.cuda.malloc_managed(4 * 1024)
    with pytest.raises(ValueError, match="not CUDA device memory of the current device"):
        ext.fill_iota_u32(int(mem.ptr), 1024, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_fill_iota_u32_refuses_memory_of_another_device(ext):
    other = torch.full((1000,), -1, dtype=torch.int32, device="cuda:1")
    with torch.cuda.device(0):
        with pytest.raises(ValueError, match="not of the current device"):
            ext.fill_iota_u32(other.data_ptr(), 1000, torch.cuda.current_stream(0).cuda_stream)
    assert bool((other == -1).all())
