"""Frozen feature networks for the perceptual loss and FID, from local files only (nothing is downloaded).

Specs (strings, as on the command line):
  mae:RUN          a dermfast MAE run folder (RUN/checkpoint.safetensors) or that file: the ViT encoder with no
                   masking; per-token features (perceptual) or their mean (FID). Domain features: the encoder
                   was pretrained on skin images.
  vgg:PATH | PATH  a torchvision VGG16 state dict (.pth / .safetensors): relu1_2, relu2_2, relu3_3 maps
                   (LPIPS-style, channel-normalised) for the perceptual loss.
  inception:PATH   a torchvision inception_v3 state dict: the 2048-d pool features FID is defined on.
Every net takes images [B, 3, H, W] in [-1, 1] (resized to its own input size inside) and returns
[B, ...] float32 features. `describe(spec)` is the line the run config / FID output records.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureError(ValueError):
    """An unusable feature-network spec (one line, exit 2)."""


def _imagenet(x: torch.Tensor, size: int) -> torch.Tensor:
    x = (x.float() + 1) / 2
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


class MAEFeatures(nn.Module):
    def __init__(self, model, pooled: bool):
        super().__init__()
        self.model, self.pooled, self.size = model, pooled, model.cfg.img_size

    def forward(self, x):
        tokens, _, _ = self.model.forward_encoder(_imagenet(x, self.size), seed=0, step=0, mask_ratio=0.0)
        tokens = tokens[:, 1:].float()
        return tokens.mean(1) if self.pooled else tokens


class VGGFeatures(nn.Module):
    def __init__(self, vgg):
        super().__init__()
        self.features = vgg.features[:16]  # up to relu3_3
        self.taps = {3, 8, 15}             # relu1_2, relu2_2, relu3_3

    def forward(self, x):
        h, outs = _imagenet(x, max(64, x.shape[-1])), []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                n = h.float() / (h.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-6)
                outs.append(n.flatten(1) / n[0].numel() ** 0.5)
        return torch.cat(outs, 1)


class InceptionFeatures(nn.Module):
    def __init__(self, net):
        super().__init__()
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x):
        return self.net(_imagenet(x, 299)).float()


def describe(spec: str | None) -> str:
    if spec is None or spec == "off":
        return "off"
    kind, _, path = spec.partition(":") if ":" in spec and spec.split(":")[0] in ("mae", "vgg", "inception") \
        else ("vgg", "", spec)
    return {"mae": f"dermfast MAE encoder features ({path})", "vgg": f"VGG16 features ({path})",
            "inception": f"Inception-v3 pool features ({path})"}[kind]


def load_mae(run: str):
    """A dermfast MaskedAutoencoderViT from a run folder or its checkpoint.safetensors (preset in metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dermfast.models.mae import MAEPreset, MaskedAutoencoderViT
    p = Path(run).expanduser()
    f = p / "checkpoint.safetensors" if p.is_dir() else p
    if not f.is_file():
        raise FeatureError(f"mae:{run}: no checkpoint.safetensors (give a dermfast MAE run folder)")
    with safe_open(str(f), "pt") as h:
        meta = h.metadata() or {}
    if "preset" not in meta:
        raise FeatureError(f"mae:{run}: {f} has no 'preset' metadata (not a dermfast MAE checkpoint)")
    model = MaskedAutoencoderViT(MAEPreset(**json.loads(meta["preset"])))
    missing, unexpected = model.load_state_dict(load_file(str(f)), strict=False)
    if [k for k in missing if not k.startswith("decoder")] or unexpected:
        raise FeatureError(f"mae:{run}: weights do not match the preset ({len(missing)} missing, "
                           f"{len(unexpected)} unexpected keys)")
    return model


def load_feature_net(spec: str, pooled: bool, device) -> nn.Module:
    """The frozen net of `spec` (module docstring) on `device`, eval mode, requires_grad off."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("mae", "vgg", "inception"):
        kind, path = "vgg", spec
    if kind == "mae":
        net = MAEFeatures(load_mae(path), pooled)
    else:
        import torchvision
        p = Path(path).expanduser()
        if not p.is_file():
            raise FeatureError(f"feature checkpoint {path!r} does not exist (a local {kind} state dict file)")
        try:
            if kind == "vgg":
                vgg = torchvision.models.vgg16(weights=None)
                vgg.load_state_dict(_state_dict(p))
                net = VGGFeatures(vgg)
            else:
                inc = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
                inc.load_state_dict(_state_dict(p), strict=False)
                net = InceptionFeatures(inc)
        except (RuntimeError, OSError, ValueError) as e:
            raise FeatureError(f"{path!r} is not a torchvision {kind} state dict: {str(e).splitlines()[0]}") from None
    return net.to(device).eval().requires_grad_(False)
