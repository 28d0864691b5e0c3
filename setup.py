"""Build script for dermfast.

Layout: the Python package is dermfast/; the top-level kernels/ directory (Triton kernels, no __init__.py) is
reached through the symlink dermfast/kernels and installed as the namespace subpackage ``dermfast.kernels``, never
as a top-level ``kernels`` package (that name is Hugging Face's, and transformers imports it). csrc/ holds CUDA
C++ built by CMake (CMakeLists.txt) into one pybind11 module, ``dermfast._C``; nothing links libtorch, so torch
is a run-time dependency only, never a build one.

Environment variables read at build time:
  DERMFAST_BUILD_CUDA   unset/"auto": build dermfast._C if nvcc is found, else skip it with a message;
                        "1": build it, and fail if nvcc is missing; "0": skip it.
                        A build that is attempted and fails is always an error (set DERMFAST_BUILD_CUDA=0 to skip).
  DERMFAST_CUDA_ARCHS   CUDA architectures, e.g. "90" or "80;90" (default "80;90"); passed to CMake as
                        CMAKE_CUDA_ARCHITECTURES.
  DERMFAST_BUILD_TYPE   CMake build type (default Release).
  DERMFAST_CMAKE_ARGS   extra arguments for the CMake configure step (split like a shell would).
  CUDACXX, CUDA_HOME, CUDA_PATH
                        where nvcc is looked for, before PATH and /usr/local/cuda/bin.
  CMAKE_BUILD_PARALLEL_LEVEL
                        compile jobs (default: build_ext -j, else all cores).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXT_NAME = "dermfast._C"
SKIP_HINT = "Set DERMFAST_BUILD_CUDA=0 to install dermfast without its CUDA extension (dermfast._C)."

_TRUE = {"1", "true", "yes", "on", "force"}
_FALSE = {"0", "false", "no", "off", "skip"}


def cuda_build_mode(env: dict[str, str] | None = None) -> str:
    """'auto', 'force' or 'skip', from DERMFAST_BUILD_CUDA."""
    env = os.environ if env is None else env
    raw = env.get("DERMFAST_BUILD_CUDA", "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in _TRUE:
        return "force"
    if raw in _FALSE:
        return "skip"
    raise ValueError(f"DERMFAST_BUILD_CUDA={env['DERMFAST_BUILD_CUDA']!r}: expected 1, 0 or auto (unset)")


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_nvcc(env: dict[str, str] | None = None) -> str | None:
    """nvcc from $CUDACXX, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, then /usr/local/cuda/bin; None if absent."""
    env = os.environ if env is None else env
    cudacxx = env.get("CUDACXX")
    if cudacxx and _executable(Path(cudacxx)):
        return str(Path(cudacxx))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home and _executable(Path(home, "bin", "nvcc")):
            return str(Path(home, "bin", "nvcc"))
    on_path = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if on_path:
        return on_path
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if _executable(default) else None


def _tool(module: str, attr: str, name: str) -> str | None:
    """A build tool from its PyPI package (what build isolation installs), else from PATH."""
    try:
        mod = __import__(module)
        candidate = Path(getattr(mod, attr), name)
        if _executable(candidate):
            return str(candidate)
    except Exception:
        pass
    return shutil.which(name)


def _log(msg: str) -> None:
    # stderr: pip and uv show it with -v, and always when the build fails.
    print(f"dermfast: {msg}", file=sys.stderr, flush=True)


class CMakeExtension(Extension):
    """An extension that CMakeLists.txt builds; `depends` puts its sources into the sdist."""

    def __init__(self, name: str) -> None:
        depends = ["CMakeLists.txt", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*")
                                                if p.suffix in {".cpp", ".cu", ".h", ".cuh", ".hpp"})]
        super().__init__(name, sources=[], depends=depends)


class CMakeBuildExt(build_ext):
    """Runs CMake for CMakeExtension, decides whether to build at all (DERMFAST_BUILD_CUDA), and places the module
    at get_ext_fullpath() so setuptools packs it into wheels and copies it into the tree for editable installs."""

    def run(self) -> None:
        mode = cuda_build_mode()
        self._nvcc = None if mode == "skip" else find_nvcc()
        cmake_exts = [e for e in self.extensions if isinstance(e, CMakeExtension)]
        if cmake_exts and self._nvcc is None:
            if mode == "force":
                raise RuntimeError(
                    "DERMFAST_BUILD_CUDA=1 but nvcc was not found (looked at $CUDACXX, $CUDA_HOME/bin, "
                    "$CUDA_PATH/bin, PATH and /usr/local/cuda/bin). " + SKIP_HINT
                )
            why = "DERMFAST_BUILD_CUDA=0" if mode == "skip" else "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
            _log(f"{why}: skipping the CUDA extension {EXT_NAME}; dermfast works without it "
                 "(`python -m dermfast.info` reports it as absent).")
            self.extensions = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
            if self.inplace or getattr(self, "editable_mode", False):
                for ext in cmake_exts:
                    self._remove_stale_inplace(ext)
        super().run()

    def _remove_stale_inplace(self, ext: Extension) -> None:
        # An editable install keeps the module in the source tree: a skipped build must not leave an old one there.
        build_py = self.get_finalized_command("build_py")
        package, _, _ = ext.name.rpartition(".")
        stale = Path(build_py.get_package_dir(package), Path(self.get_ext_filename(ext.name)).name)
        if stale.exists():
            _log(f"removing stale {stale} from an earlier build")
            stale.unlink()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            self._build_cmake(ext)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
            bar = "=" * 78
            _log(f"\n{bar}\nbuilding the CUDA extension {EXT_NAME} FAILED: {e}\n{SKIP_HINT}\n{bar}")
            raise

    def _build_cmake(self, ext: CMakeExtension) -> None:
        try:
            import pybind11
        except ImportError as e:
            raise RuntimeError("pybind11>=2.10 is needed to build the CUDA extension (pip install pybind11)") from e
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        if cmake is None:
            raise RuntimeError("cmake>=3.24 is needed to build the CUDA extension (pip install cmake)")
        ninja = None if os.environ.get("CMAKE_GENERATOR") else _tool("ninja", "BIN_DIR", "ninja")

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        suffix = out.name[len(ext.name.rpartition(".")[2]):]  # e.g. ".cpython-311-x86_64-linux-gnu.so"
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("DERMFAST_BUILD_TYPE", "").strip() or ("Debug" if self.debug else "Release")

        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "--fresh",  # the isolated build env (and its cmake/pybind11 paths) differs between builds
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_CUDA_COMPILER={self._nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDERMFAST_OUTPUT_DIR={out.parent}",
            f"-DDERMFAST_EXT_SUFFIX={suffix}",
        ]
        archs = os.environ.get("DERMFAST_CUDA_ARCHS", "").strip()
        if archs:
            configure.append("-DCMAKE_CUDA_ARCHITECTURES=" + ";".join(re.split(r"[;,\s]+", archs)).strip(";"))
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        configure += shlex.split(os.environ.get("DERMFAST_CMAKE_ARGS", ""))

        build = [cmake, "--build", str(build_dir), "--config", build_type]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            jobs = self.parallel if isinstance(self.parallel, int) and not isinstance(self.parallel, bool) else 0
            build += ["-j", str(jobs or os.cpu_count() or 1)]

        start = time.perf_counter()
        for cmd in (configure, build):
            _log("$ " + shlex.join(cmd))
            subprocess.run(cmd, cwd=ROOT, check=True)
        if not out.is_file():
            raise RuntimeError(f"CMake finished but {out} was not produced")
        _log(f"built {out.name} in {time.perf_counter() - start:.1f}s")


def _version() -> str:
    text = (ROOT / "dermfast" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    if not match:
        raise RuntimeError("__version__ not found in dermfast/__init__.py")
    return match.group(1)


# kernels/ holds the Triton sources and has no __init__.py, so from the repository root it is at most a namespace
# portion named `kernels`, which Python ranks below any regular package of that name (Hugging Face's `kernels`,
# which transformers imports). dermfast/kernels is a symlink to it, so the sources import as the namespace
# subpackage dermfast.kernels in a source checkout, an editable install and a wheel alike (build_py follows it).
KERNEL_PACKAGES = ["dermfast.kernels"]
PACKAGES = find_packages(include=["dermfast", "dermfast.*"]) + KERNEL_PACKAGES


def with_all(extras: dict[str, list[str]]) -> dict[str, list[str]]:
    """Add "all": everything the README uses but DALI (pick dali or dali-cuda12 for your CUDA) and the tests."""
    union = {r for name, reqs in extras.items() if not name.startswith("dali") and name != "test" for r in reqs}
    return {**extras, "all": sorted(union)}


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it for the helpers
    setup(
        name="dermfast",
        version=_version(),
        description="Fast skin-lesion pipelines (synthesis, MAE pretraining, distillation) on custom kernels",
        long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").is_file() else "",
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=PACKAGES,
        ext_modules=[CMakeExtension(EXT_NAME)],
        cmdclass={"build_ext": CMakeBuildExt},
        install_requires=[
            "torch>=2.4",
            "numpy>=1.24",
            "timm>=1.0",
            "safetensors>=0.4",
            "pyyaml>=6",
            "tqdm>=4.60",
            "pillow>=9",
            "triton>=3.0; platform_system == 'Linux'",
        ],
        extras_require=with_all({
            # DALI wheels exist for Linux only; tested with 2.4 (the loader relies on the 2.x dynamic executor).
            # Use dali-cuda12 with a CUDA 12 driver / torch cu12x build.
            "dali": ["nvidia-dali-cuda130>=2.0; platform_system == 'Linux'"],
            "dali-cuda12": ["nvidia-dali-cuda120>=2.0; platform_system == 'Linux'"],
            "synth": ["diffusers>=0.30", "peft>=0.10", "transformers>=4.40", "scipy>=1.10"],  # scipy: FID sqrtm
            "isic2024": ["h5py>=3"],  # the ISIC 2024 (SLICE-3D) HDF5 of JPEG bytes
            # metrics, the HTML report, ONNX export + parity (onnxscript: torch.onnx's dynamo exporter)
            "eval": ["scikit-learn>=1.3", "matplotlib>=3.7", "onnx>=1.15", "onnxruntime>=1.17", "onnxscript>=0.2"],
            "tensorboard": ["tensorboard>=2.14"],  # RUN/tensorboard/ (torch.utils.tensorboard's SummaryWriter)
            # kernels: Hugging Face's package of that name (transformers imports it); installed so that the test
            # that nothing at the repository root shadows it always runs
            "test": ["pytest>=7", "numba>=0.58", "kernels", "h5py>=3", "scikit-learn>=1.3", "matplotlib>=3.7",
                     "onnx>=1.15", "onnxruntime>=1.17"],
        }),
        zip_safe=False,
    )
