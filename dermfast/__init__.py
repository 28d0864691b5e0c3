"""dermfast: fast skin-lesion pipelines (synthesis, MAE pretraining, distillation) on custom kernels.

`import dermfast` needs torch and numpy only: Triton, DALI, diffusers and the compiled extension are optional
and reported by `python -m dermfast.info`.
"""
from dermfast._optional import HAS_CUDA_EXT, HAS_DALI, HAS_DIFFUSERS, HAS_TRITON

__version__ = "0.1.0"
__all__ = ["HAS_CUDA_EXT", "HAS_DALI", "HAS_DIFFUSERS", "HAS_TRITON", "__version__"]


def __getattr__(name: str):
    # `dermfast.patch_timm` imports timm (patch_transformers: transformers) only when it is first used, so
    # `import dermfast` stays light.
    if name == "patch_timm":
        from dermfast.models.attention import patch_timm
        return patch_timm
    if name == "patch_transformers":
        from dermfast.models.patch_transformers import patch_transformers
        return patch_transformers
    if name == "patch_report":
        from dermfast.models.patch import patch_report
        return patch_report
    raise AttributeError(f"module 'dermfast' has no attribute {name!r}")
