"""Models: the MAE ViT (dermfast.models.mae), the timm drop-in attention (dermfast.models.attention) and the
classifiers of fine-tuning / evaluation / export (dermfast.models.classifier).

`MaskedAttention`, `patch_timm`, `patch_transformers`, `patch_report` and the classifier helpers are resolved lazily:
importing dermfast.models imports neither timm nor transformers.
"""


_CLASSIFIER = ("ClassifierSpec", "build_classifier", "load_classifier", "load_init", "classifier_metadata",
               "CheckpointError")  # dermfast.models.classifier: fine-tune / evaluate / export models


def __getattr__(name: str):
    if name in _CLASSIFIER:
        from dermfast.models import classifier
        return getattr(classifier, name)
    if name in ("MaskedAttention", "MaskedEvaAttention", "MaskedAttentionRope", "patch_timm"):
        from dermfast.models import attention
        return getattr(attention, name)
    if name in ("PatchReport", "patch_report"):
        from dermfast.models import patch
        return getattr(patch, name)
    if name == "MaskedBeitAttention":
        from dermfast.models.patch_beit import MaskedBeitAttention
        return MaskedBeitAttention
    if name == "patch_transformers":
        from dermfast.models.patch_transformers import patch_transformers
        return patch_transformers
    raise AttributeError(f"module 'dermfast.models' has no attribute {name!r}")
