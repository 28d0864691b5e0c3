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
    import dermfast.kernels.kd_loss

    assert dermfast.kernels.__name__ == "dermfast.kernels"
    # a namespace package (kernels/ has no __init__.py): editable install and source checkout reach the repo's
    # kernels/ through the dermfast/kernels symlink; a wheel has the files in site-packages/dermfast/kernels/
    locations = [Path(p) for p in dermfast.kernels.__path__]
    assert len(locations) == 1 and locations[0].name == "kernels", locations
    assert locations[0].parent.name == "dermfast", locations
    source = Path(dermfast.kernels.kd_loss.__file__)
    assert source.parent == locations[0] and source.is_file()


def test_fresh_interpreter_outside_repo_sees_no_top_level_kernels(tmp_path):
    _distribution()
    code = (
        "import importlib.util, json, dermfast, dermfast.kernels.kd_loss\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'kernels': None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or []))),"
        " 'dermfast': dermfast.__file__, 'dermfast.kernels': dermfast.kernels.kd_loss.__file__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # test the install, not a path hack
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["dermfast.kernels"]).parent.name == "kernels", found
    if found["kernels"] is not None:  # Hugging Face's `kernels` (transformers depends on it); ours must not be it
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
            # a path-entry .pth pointing at the repository root would expose everything at the root top-level
            for line in located.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith(("#", "import ")):
                    assert not _same(line, REPO), f"{f} puts the repository root on sys.path"
        if f.name.startswith("__editable__") and f.name.endswith("_finder.py") and located.is_file():
            mapping = _finder_literal(located, "MAPPING")
            assert set(mapping) == {"dermfast"}, mapping
            namespaces = _finder_literal(located, "NAMESPACES")
            assert "kernels" not in namespaces, namespaces


def _finder_literal(path: Path, name: str) -> dict:
    """A module-level dict literal (MAPPING: top-level package -> source dir; NAMESPACES) of setuptools' editable
    finder module."""
    for node in ast.parse(path.read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == name and node.value is not None:
            return ast.literal_eval(node.value)
    pytest.fail(f"no {name} in {path}")


def test_every_package_dir_has_init():
    # find_packages() skips directories without __init__.py, so their modules would be missing from wheels
    # (an editable install hides this: there they still import as namespace packages). kernels/ is the one
    # deliberate namespace package (test_kernels_dir_is_no_regular_package).
    missing = []
    top = REPO / "dermfast"
    for d in [top, *(p for p in top.rglob("*") if p.is_dir() and not p.is_symlink())]:
        if "__pycache__" in d.parts or any(part.startswith(".") for part in d.relative_to(REPO).parts):
            continue
        if d.resolve().parent != d.parent.resolve() or (REPO / "kernels") in d.resolve().parents:
            continue  # reached through the kernels symlink
        if any(d.glob("*.py")) and not (d / "__init__.py").is_file():
            missing.append(str(d.relative_to(REPO)))
    assert not missing, f"add __init__.py to: {missing}"


# --------------------------------------------------------------------------- nothing at the root shadows a dependency


def test_kernels_dir_is_no_regular_package():
    # A regular package (a directory with __init__.py) at the repository root is imported by `python -m ...` run
    # from the root before anything in site-packages: kernels/__init__.py hid Hugging Face's `kernels`, which
    # transformers imports, and broke every synthesis stage (issue 16). Without __init__.py the directory is
    # at most a namespace portion, which Python ranks below any regular package or module of the same name.
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert not [p for p in (REPO / "kernels").rglob("__init__.py")]
    link = REPO / "dermfast" / "kernels"
    assert link.is_symlink() and link.resolve() == (REPO / "kernels").resolve()


def _root_import_names() -> dict[str, Path]:
    """Top-level names that `python -m` from the repository root could import from the root itself."""
    names = {}
    for p in REPO.iterdir():
        if p.name.startswith(".") or p.name == "dermfast":
            continue
        if p.is_dir() and (p / "__init__.py").is_file():
            names[p.name] = p
        elif p.is_file() and p.suffix in (".py", ".so", ".pyd"):
            names[p.name.split(".")[0]] = p
    return names


def test_repository_root_shadows_no_installed_package():
    provided = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    clashes = {name: (str(path.relative_to(REPO)), provided[name]) for name, path in _root_import_names().items()
               if name in provided and set(provided[name]) - {"dermfast"}}
    assert not clashes, f"these files at the repository root hide installed packages: {clashes}"


def _run_from_root(args: list[str], env_extra: dict[str, str] | None = None, timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_from_repository_root_hf_kernels_and_diffusers_peft_import():
    # The README runs every command from the repository root, so the root is sys.path[0]. transformers 5.25
    # (through diffusers' peft integration) does `from kernels import CUDAProperties`.
    pytest.importorskip("kernels")
    pytest.importorskip("diffusers")
    code = ("import json, kernels, dermfast.kernels.kd_loss, diffusers.loaders.peft\n"
            "from kernels import CUDAProperties\n"
            "print(json.dumps({'kernels': kernels.__file__, 'ours': dermfast.kernels.kd_loss.__file__}))\n")
    proc = _run_from_root(["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["kernels"] and not _same(Path(found["kernels"]).parent, REPO / "kernels"), found
    assert Path(found["ours"]).parent.name == "kernels", found


@pytest.mark.slow
def test_stage_synth_runs_from_repository_root(tmp_path):
    pytest.importorskip("kernels")
    pytest.importorskip("diffusers")
    out = tmp_path / "synth"
    proc = _run_from_root(["-m", "dermfast.train", "--stage", "synth", "--max-steps", "2", "--vae-steps", "1",
                           "--toy-images", "112", "--toy-image-size", "32", "--img-size", "16", "--batch-size", "8",
                           "--loader", "torch", "--workers", "0", "--no-progress", "--sample-steps", "2",
                           "--grid-per-class", "1", "--out", str(out)],
                          env_extra={"DERMFAST_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


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
    assert "dermfast.kernels" in setup_module_.PACKAGES  # a namespace package: find_packages() cannot see it
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
