"""Binary lesion segmenters: [B, 3, S, S] normalised images -> [B, 1, S, S] logits (sigmoid = lesion probability).

Two families, one description (`SegmenterSpec`) that checkpoints carry so `load_segmenter` rebuilds the model:
- `unet` (the small-data default): a U-Net decoder on a timm CNN's feature pyramid (`features_only`, from
  scratch: nothing is downloaded). Each decoder stage upsamples x2 (bilinear), concatenates the encoder feature
  of that scale and applies two conv3x3-BN-ReLU; a last stage at full resolution, then a 1x1 conv to one logit.
- `vit`: a ViT encoder (an MAE / TEDMAE preset's, `encoder="mae_vit"`, or a timm ViT by name) with a
  UNETR-style progressive-upsampling head: the patch-grid features of 4 blocks spread over the depth
  (timm's `forward_intermediates`) are projected, the deepest is upsampled x2 at a time and fused with the
  next shallower block's features (resized to that scale) by conv3x3-BN-ReLU, and a conv stem on the raw image
  gives the full-resolution skip (as UNETR's first skip). The encoder is `self.encoder`, a timm
  VisionTransformer with the MAE encoder's state-dict names, so an MAE / TEDMAE checkpoint loads into it
  (`dermfast.models.classifier.load_init(model.encoder, ...)`).
`--model otsu` has no network (`dermfast.eval.otsu`); its spec exists so that its runs are described alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dermfast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dermfast.models.classifier import ModelSpecJSON

ARCHS = ("unet", "vit", "otsu")
DEFAULT_ENCODER = {"unet": "resnet10t", "vit": "mae_vit"}


@dataclass(frozen=True)
class SegmenterSpec(ModelSpecJSON):
    arch: str                        # unet | vit | otsu
    encoder: str | None = None       # unet: a timm CNN name; vit: "mae_vit" (MAE preset) or a timm ViT name
    img_size: int = 128
    mae_preset: dict | None = None   # vit with encoder mae_vit: the MAE preset's fields
    decoder_width: int = 32          # channels of the first (full-resolution) decoder stage; doubled per scale
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD



def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Fuse(nn.Module):
    """Upsample x to the skip's size, concatenate, two conv3x3-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(_conv_bn_relu(cin + cskip, cout), _conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], 1))


class UNet(nn.Module):
    """U-Net decoder on a timm CNN encoder (features_only, all its stages; from scratch)."""

    def __init__(self, encoder: str, width: int = 32):
        super().__init__()
        import timm
        self.encoder = timm.create_model(encoder, features_only=True, pretrained=False)
        chans = list(self.encoder.feature_info.channels())
        widths = [width * 2 ** min(i, 3) for i in range(len(chans))]  # decoder width per encoder scale
        self.stem = _conv_bn_relu(3, width)  # full-resolution skip
        self.ups = nn.ModuleList()
        cin = chans[-1]
        for i in range(len(chans) - 2, -1, -1):
            self.ups.append(_Fuse(cin, chans[i], widths[i]))
            cin = widths[i]
        self.final = _Fuse(cin, width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            y = up(y, skip)
        return self.head(self.final(y, self.stem(x)))


class ViTSegmenter(nn.Module):
    """UNETR-style progressive upsampling head on a ViT encoder (4 blocks spread over its depth)."""

    def __init__(self, encoder: nn.Module, width: int = 32, n_layers: int = 4):
        super().__init__()
        self.encoder = encoder
        depth = len(encoder.blocks)
        self.indices = sorted({max(0, round(depth * (k + 1) / n_layers) - 1) for k in range(n_layers)})
        # the final norm, pooling norm and head are never used: removed (DDP refuses unused parameters)
        encoder.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        dim = encoder.embed_dim
        widths = [width * 2 ** max(0, 3 - i) for i in range(len(self.indices))]  # deepest (widest) first
        self.proj = nn.ModuleList(nn.Conv2d(dim, w, 1) for w in widths)
        self.ups = nn.ModuleList(_Fuse(cin, cout, cout) for cin, cout in zip(widths, widths[1:]))
        cin = widths[-1]
        self.stem = _conv_bn_relu(3, width)
        self.final = _Fuse(cin, width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder.forward_intermediates(x, indices=self.indices, output_fmt="NCHW",
                                                   intermediates_only=True)
        feats = [p(f) for p, f in zip(self.proj, feats[::-1])]  # deepest first
        y, size = feats[0], feats[0].shape[-1]
        for up, skip in zip(self.ups, feats[1:]):
            size = min(size * 2, x.shape[-1])
            y = up(y, F.interpolate(skip, size=(size, size), mode="bilinear", align_corners=False))
        return self.head(self.final(y, self.stem(x)))


def _vit_encoder(spec: SegmenterSpec) -> nn.Module:
    from dermfast.models.classifier import ClassifierSpec, build_classifier
    arch = spec.encoder or "mae_vit"
    enc = build_classifier(ClassifierSpec(arch, 1, spec.img_size, mae_preset=spec.mae_preset))
    if hasattr(enc, "reset_classifier"):
        enc.reset_classifier(0)  # no classification head: its weights would be unused (and unloadable)
    if not (hasattr(enc, "forward_intermediates") and hasattr(enc, "blocks") and hasattr(enc, "patch_embed")):
        raise ValueError(f"--encoder {arch!r} is not a ViT (no blocks / patch_embed): --model vit takes mae_vit "
                         "or a timm ViT name (vit_*, deit*_*)")
    return enc


def build_segmenter(spec: SegmenterSpec) -> nn.Module:
    """A freshly initialised segmenter (no weights downloaded); for `vit`, `load_init(model.encoder, ...)`."""
    if spec.arch == "unet":
        import timm
        name = spec.encoder or DEFAULT_ENCODER["unet"]
        if not timm.is_model(name):
            raise ValueError(f"unknown --encoder {name!r}: not a timm model name (e.g. resnet10t, regnetx_002)")
        return UNet(name, spec.decoder_width)
    if spec.arch == "vit":
        return ViTSegmenter(_vit_encoder(spec), spec.decoder_width)
    raise ValueError(f"arch {spec.arch!r} has no network; accepted: unet, vit")


def segmenter_metadata(spec: SegmenterSpec, **extra) -> dict:
    """What every segmentation checkpoint carries (JSON values), so `load_segmenter` rebuilds it."""
    return {"stage": "segment", "task": "segmentation", "model": spec.to_dict(), "img_size": spec.img_size,
            "mean": list(spec.mean), "std": list(spec.std), **extra}


def is_segmentation_checkpoint(path) -> bool:
    """True for a `--stage segment` run directory or checkpoint file (reads the header only)."""
    from dermfast.models.classifier import CheckpointError, checkpoint_shapes, resolve_checkpoint
    try:
        return checkpoint_shapes(str(resolve_checkpoint(path)))[1].get("stage") == "segment"
    except (CheckpointError, OSError, ValueError):
        return False


def load_segmenter(path, device="cpu") -> tuple[nn.Module | None, dict]:
    """(model in eval mode, or None for an Otsu run; metadata) from a --stage segment checkpoint.
    Raises CheckpointError (one line) for another stage's checkpoint or weights that do not fit."""
    from dermfast.models.classifier import CheckpointError, read_checkpoint, resolve_checkpoint
    p = resolve_checkpoint(path)
    tensors, meta = read_checkpoint(p)
    if meta.get("stage") != "segment" or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{p} is a '{meta.get('stage')}' checkpoint; this needs a --stage segment run")
    meta["checkpoint_path"] = str(p)
    spec = SegmenterSpec.from_dict(meta["model"])
    if spec.arch == "otsu":
        return None, meta
    try:
        model = build_segmenter(spec)
    except ValueError as e:
        raise CheckpointError(f"{p}: {e}") from None
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{p}: weights do not match {spec.arch} / {spec.encoder}: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), meta
