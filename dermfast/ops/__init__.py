"""Public op API. Each op: torch reference (the spec), functional form dispatched by backend capability."""
from dermfast.ops.mae_loss import MAELoss, mae_loss, mae_loss_ref, patchify, unpatchify
from dermfast.ops.random_masking import random_masking, random_masking_ref
from dermfast.ops.registry import (BACKENDS, BackendUnavailable, Query, get_backend, ops, set_backend,
                                   use_backend)

__all__ = [
    "BACKENDS", "BackendUnavailable", "MAELoss", "Query", "get_backend", "mae_loss", "mae_loss_ref", "ops",
    "patchify", "random_masking", "random_masking_ref", "set_backend", "unpatchify", "use_backend",
]
