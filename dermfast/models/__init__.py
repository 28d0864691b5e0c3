"""Models: the MAE ViT (dermfast.models.mae), the timm drop-in attention (dermfast.models.attention) and the
classifiers of fine-tuning / evaluation / export (dermfast.models.classifier).

`MaskedAttention`, `patch_timm` and the classifier helpers are resolved lazily: importing dermfast.models does not import timm.
"""


_CLASSIFIER = ("ClassifierSpec", "build_classifier", "load_classifier", "load_init", "classifier_metadata",
               "CheckpointError")  # dermfast.models.classifier: fine-tune / evaluate / export models


def __getattr__(name: str):
    if name in _CLASSIFIER:
        from dermfast.models import classifier
        return getattr(classifier, name)
    if name in ("MaskedAttention", "patch_timm"):
        from dermfast.models import attention
        return getattr(attention, name)
    raise AttributeError(f"module 'dermfast.models' has no attribute {name!r}")
