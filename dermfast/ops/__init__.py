"""Public op API. Each op: torch reference (the spec), functional form dispatched by backend capability.

Naming: the op `<name>` is the function `dermfast.ops.<name>`; its module is `dermfast/ops/<name>_op.py`
(kernels/<name>.py, csrc/<name>.cu, tests/test_<name>.py, benchmarks/bench_<name>.py mirror the name). The
`_op` suffix keeps modules and functions distinguishable: with a module of the same name as the function it
exports, `import dermfast.ops.<name>` would hand back the function, not the module.
"""
from dermfast.ops.attention_bias_op import AttentionBias, attention_bias, attention_bias_ref
from dermfast.ops.kd_loss_op import KDLoss, kd_loss, kd_loss_ref
from dermfast.ops.mae_loss_op import MAELoss, mae_loss, mae_loss_ref, patchify, unpatchify
from dermfast.ops.masked_attention_op import masked_attention, masked_attention_ref
from dermfast.ops.masked_patch_embed_op import masked_patch_embed, masked_patch_embed_ref
from dermfast.ops.random_masking_op import (MaskingResult, random_masking, random_masking_indices,
                                            random_masking_ref)
from dermfast.ops import selftest  # noqa: F401  (installs the self-test into automatic dispatch)
from dermfast.ops import dispatch_table  # noqa: F401  (the measured order automatic dispatch reads)
from dermfast.ops.registry import (BACKENDS, PEERS, BackendUnavailable, Query, get_backend, ops, set_backend,
                                   use_backend)

__all__ = [
    "BACKENDS", "BackendUnavailable", "MAELoss", "Query", "get_backend", "mae_loss", "mae_loss_ref", "ops",
    "patchify", "random_masking", "random_masking_ref",
    "set_backend", "unpatchify", "use_backend",
    "MaskingResult", "masked_patch_embed", "masked_patch_embed_ref", "random_masking_indices",
    "KDLoss", "kd_loss", "kd_loss_ref",
    "masked_attention", "masked_attention_ref",
    "AttentionBias", "attention_bias", "attention_bias_ref", "PEERS",
]
