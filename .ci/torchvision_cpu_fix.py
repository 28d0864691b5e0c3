"""CPU-test-environment fix: let the index's CUDA torchvision wheel import on CPU-only torch.

Why: PyPI's torchvision 0.28 wheel is a CUDA build; with the CPU torch wheel its compiled ops do not load and
`import torchvision` (so `import timm`) fails with "operator torchvision::nms does not exist", raised while
torchvision registers fake kernels for ops whose schemas were never defined. Defining the two schemas
`torchvision::nms` and `torchvision::qnms` through torch.library before torchvision imports lets it import;
its compiled ops (nms, roi_align, ...) stay unavailable, and dermfast does not use them.

This is a matter of the CPU test / dev environment only (see ../shared/DESIGN.md, "Testing without a GPU"): it is
never on dermfast's import path. `.ci/setup` installs it into the venv as `_dermfast_tv_fix.py` plus a `.pth`
line, and only when a plain `import torchvision` fails with that error. The `.pth` line imports nothing heavy:
it puts a finder on sys.meta_path that defines the schemas the first time torchvision is imported.
Users with CUDA torch, or CPU torch from PyTorch's own CPU index, never need it.
"""
import importlib.abc
import sys


class _DefineTorchvisionSchemas(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # once only
        import torch

        try:
            torch.ops.torchvision.nms  # noqa: B018 - already defined (a CPU torchvision build, or defined again)
        except (AttributeError, RuntimeError):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _keep.append(lib)  # the Library object must outlive the import, or its definitions are dropped
        return None  # let the normal finders import torchvision


_keep = []


def install() -> None:
    if not any(isinstance(f, _DefineTorchvisionSchemas) for f in sys.meta_path):
        sys.meta_path.insert(0, _DefineTorchvisionSchemas())
