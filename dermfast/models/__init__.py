"""Models: the MAE ViT (dermfast.models.mae) and the timm drop-in attention (dermfast.models.attention).

`MaskedAttention` and `patch_timm` are resolved lazily: importing dermfast.models does not import timm.
"""


def __getattr__(name: str):
    if name in ("MaskedAttention", "patch_timm"):
        from dermfast.models import attention
        return getattr(attention, name)
    raise AttributeError(f"module 'dermfast.models' has no attribute {name!r}")
