"""Classifiers for fine-tuning, evaluation and export: the MAE encoder with a new head, or any timm model by name.

A classifier is described by a `ClassifierSpec` (JSON-able), written into every classifier checkpoint's
metadata beside the class names and the normalisation, so `load_classifier(path)` rebuilds it without the
config that trained it.

- `arch="mae_vit"`: a timm `VisionTransformer` shaped like an MAE preset's encoder (same patch size, width,
  depth, heads, qkv bias, LayerNorm eps 1e-6), so the MAE checkpoint's encoder weights load by name
  (`patch_embed.*`, `cls_token`, `blocks.*`). Position embeddings start as the MAE's fixed 2-D sin-cos (zero for
  the class token) and are learnt from there, as MAE fine-tuning does. `global_pool="avg"` (the MAE paper's
  fine-tuning default) uses `fc_norm` on the mean patch token and leaves the MAE's final `norm` unused;
  `"token"` classifies from the class token through `norm`.
- any other `arch`: `timm.create_model(arch, pretrained=False, ...)`. Nothing is ever downloaded; local weights
  come through `load_init`.

`load_init` loads weights by name and returns what it did: every missing, unexpected or shape-mismatched key is
listed (`InitReport`), never silently dropped; a learnt ViT position embedding of another grid is resampled as
timm's loader does. `checkpoint_shapes` reads a checkpoint's shapes and metadata without its tensors, so
`dermfast.models.init_checkpoint` can say before a run what a checkpoint is and whether it fills a model.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from dermfast.data.augment import IMAGENET_MEAN, IMAGENET_STD

CLASSIFIER_STAGES = ("finetune", "distill")
CHECKPOINT_NAMES = ("best.safetensors", "checkpoint.safetensors", "model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot serve the request (wrong stage, missing file, class mismatch): one line."""


class ModelSpecJSON:
    """JSON form of a model spec dataclass with `mean` / `std` tuples (the checkpoint metadata of classifiers and
    segmenters): `to_dict` for the metadata, `from_dict` ignoring keys the class does not know."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


@dataclass(frozen=True)
class ClassifierSpec(ModelSpecJSON):
    arch: str                        # "mae_vit" or a timm model name
    num_classes: int
    img_size: int
    mae_preset: dict | None = None   # MAEPreset fields when arch == "mae_vit"
    global_pool: str = "avg"         # mae_vit: avg (mean patch token + fc_norm) | token (class token + norm)
    drop_path: float = 0.0
    drop_rate: float = 0.0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD



def _mae_vit(spec: ClassifierSpec) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    from dermfast.models.mae import MAEPreset, sincos_pos_embed_2d
    if spec.mae_preset is None:
        raise ValueError("arch 'mae_vit' needs mae_preset (the MAE preset's fields)")
    names = {f.name for f in dataclasses.fields(MAEPreset)}
    p = MAEPreset(**{k: v for k, v in spec.mae_preset.items() if k in names})
    if spec.global_pool not in ("avg", "token"):
        raise ValueError(f"global_pool must be avg or token, got {spec.global_pool!r}")
    if spec.img_size % p.patch_size:
        raise ValueError(f"img_size {spec.img_size} is not a multiple of the patch size {p.patch_size}")
    model = VisionTransformer(
        img_size=spec.img_size, patch_size=p.patch_size, in_chans=p.in_chans, num_classes=spec.num_classes,
        embed_dim=p.embed_dim, depth=p.depth, num_heads=p.num_heads, mlp_ratio=p.mlp_ratio, qkv_bias=True,
        global_pool=spec.global_pool, class_token=True, drop_rate=spec.drop_rate, drop_path_rate=spec.drop_path,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    grid = spec.img_size // p.patch_size
    with torch.no_grad():
        pos = torch.cat([torch.zeros(1, p.embed_dim), sincos_pos_embed_2d(p.embed_dim, grid)], 0)
        model.pos_embed.copy_(pos[None])
        nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE fine-tuning: a near-zero head to start
        nn.init.zeros_(model.head.bias)
    return model


def build_classifier(spec: ClassifierSpec) -> nn.Module:
    """A freshly initialised classifier (no weights are downloaded); `load_init` for local weights."""
    if spec.arch == "mae_vit":
        return _mae_vit(spec)
    import timm
    if not timm.is_model(spec.arch):
        raise ValueError(f"unknown model {spec.arch!r}: not 'mae_vit' and not a timm model name "
                         "(e.g. vit_tiny_patch16_224, deit3_small_patch16_224, convnext_atto, efficientnet_b0, "
                         "mobilenetv2_050, edgenext_xx_small, swin_tiny_patch4_window7_224)")
    kw = dict(pretrained=False, num_classes=spec.num_classes, drop_rate=spec.drop_rate,
              drop_path_rate=spec.drop_path)
    try:  # transformers take the input size; CNNs are size-agnostic and refuse the argument
        return timm.create_model(spec.arch, img_size=spec.img_size, **kw)
    except TypeError:
        pass
    try:
        return timm.create_model(spec.arch, **kw)
    except TypeError:  # e.g. a model without stochastic depth
        kw.pop("drop_path_rate")
        return timm.create_model(spec.arch, **kw)


def default_img_size(arch: str) -> int:
    """The timm model's native input size (its pretrained_cfg), for `--model NAME` without `--img-size`."""
    import timm
    cfg = timm.get_pretrained_cfg(arch)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


# -- checkpoints ---------------------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its best.safetensors, else checkpoint.safetensors) or a weights file."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in CHECKPOINT_NAMES:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{str(path)!r} holds no checkpoint (looked for {', '.join(CHECKPOINT_NAMES)})")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    return p


def _decode_meta(raw: dict) -> dict:
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return meta


def _torch_state_dict(p: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a torch / timm file: unwrapped from 'state_dict_ema' / 'model_ema' / 'state_dict' /
    'model', 'module.' prefixes stripped. Loaded with weights_only (argparse.Namespace allowed: the official MAE
    training checkpoints keep their 'args' beside 'model'). `mmap`: tensors are not read until used."""
    import argparse
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several unrelated types for a file that is not a checkpoint
        if mmap:  # a legacy (pre-zip) file cannot be memory-mapped: read it whole
            return _torch_state_dict(p, mmap=False)
        raise CheckpointError(f"{p}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: no state dict of tensors found")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of a safetensors file (metadata values JSON-decoded) or a torch / timm checkpoint
    (state dict unwrapped from 'state_dict' / 'model' / 'state_dict_ema'; 'module.' prefixes stripped)."""
    p = resolve_checkpoint(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(p))
            with safe_open(str(p), framework="pt") as f:
                raw = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
        return tensors, _decode_meta(raw)
    return _torch_state_dict(p), {}


def checkpoint_shapes(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    """({key: shape}, metadata) of a checkpoint, as `read_checkpoint` would give them, without reading the
    tensors (the safetensors header; a torch file memory-mapped). Cached per file (path, size, mtime): the
    finetune stage asks several times before any data is read. Do not mutate the returned dicts."""
    p = resolve_checkpoint(path)
    st = p.stat()
    return _checkpoint_shapes(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _checkpoint_shapes(path: str, size: int, mtime_ns: int) -> tuple[dict[str, tuple[int, ...]], dict]:
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(p), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, _decode_meta(f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    return {k: tuple(v.shape) for k, v in _torch_state_dict(p, mmap=True).items()}, {}


@dataclass
class InitReport:
    """What `load_init` did: keys loaded, model keys left at their initial values, checkpoint keys unused."""
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint [..] vs model [..]"
    resampled: list[str] = field(default_factory=list)   # "pos_embed: checkpoint [..] -> model [..]" (also loaded)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"init from {self.source}: {len(self.loaded)} tensors loaded"]
        for what, keys in (("resampled to the model's grid (loaded)", self.resampled),
                           ("missing (left at initial values)", self.missing),
                           ("unexpected (unused)", self.unexpected), ("shape mismatch (not loaded)", self.mismatched)):
            if keys:
                lines.append(f"  {what}, {len(keys)}: {', '.join(group_keys(keys))}")
        return "\n".join(lines)


def group_keys(keys: list[str]) -> list[str]:
    """'decoder_blocks.0.attn.qkv.weight', ... -> 'decoder_blocks.{0,1}.* (24)' so long lists stay readable;
    keys without a numbered block are kept whole."""
    import re
    groups: dict[str, list] = {}
    out = []
    for k in keys:
        m = re.match(r"^([A-Za-z_.]*?)\.(\d+)\.", k)
        if m:
            groups.setdefault(m.group(1), []).append(int(m.group(2)))
        else:
            out.append(k)
    for prefix, idx in groups.items():
        ids = sorted(set(idx))
        span = f"{ids[0]}..{ids[-1]}" if len(ids) > 2 else ",".join(map(str, ids))
        out.append(f"{prefix}.{{{span}}}.* ({len(idx)})")
    return out


def pos_embed_grid(model: nn.Module, key: str, shape: tuple[int, ...]) -> tuple[tuple[int, int], int] | None:
    """((grid h, w), prefix tokens) when the checkpoint's `key` of `shape` is a learnt ViT position embedding
    [1, prefix + g * g, D] that timm's loader would resample to `model`'s patch grid
    (timm vision_transformer.checkpoint_filter_fn: `resample_abs_pos_embed`); None otherwise."""
    own = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if key != "pos_embed" or not isinstance(own, torch.Tensor) or grid is None or own.dim() != 3:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    if len(shape) != 3 or shape[0] != 1 or shape[2] != own.shape[2] or shape[1] <= prefix:
        return None
    g = int(round((shape[1] - prefix) ** 0.5))
    return (tuple(int(v) for v in grid), prefix) if g * g == shape[1] - prefix else None


def load_init(model: nn.Module, path: str | Path, resample_pos_embed: bool = True) -> InitReport:
    """Load local weights into `model` by name; keys that do not match are listed in the report, and tensors
    whose shape differs are left out (listed as mismatched). An MAE checkpoint's encoder keys match the
    `mae_vit` classifier's names; its decoder, mask token and (with avg pooling) final norm are unexpected.

    `resample_pos_embed`: a learnt ViT position embedding of another grid is resampled to the model's as timm's
    own loader does (listed as resampled); `mae_vit` passes False: its position embedding starts as the exact
    2-D sin-cos of its own grid. `dermfast.models.init_checkpoint` says before loading whether all the weights
    a run needs would load."""
    p = resolve_checkpoint(path)
    tensors, _ = read_checkpoint(p)
    own = model.state_dict()
    report = InitReport(str(p))
    usable = {}
    for k, v in tensors.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(own[k].shape) == tuple(v.shape):
            usable[k] = v
        elif resample_pos_embed and (how := pos_embed_grid(model, k, tuple(v.shape))) is not None:
            from timm.layers import resample_abs_pos_embed
            usable[k] = resample_abs_pos_embed(v.float(), new_size=list(how[0]), num_prefix_tokens=how[1]
                                               ).to(own[k].dtype)
            report.resampled.append(f"{k}: checkpoint {list(v.shape)} -> model {list(own[k].shape)}")
        else:
            report.mismatched.append(f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}")
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = [k for k in own if k not in usable]
    return report


def classifier_metadata(spec: ClassifierSpec, classes: list[str], stage: str = "finetune", **extra) -> dict:
    """The metadata every classifier checkpoint carries (JSON values), so `load_classifier` can rebuild it."""
    if len(classes) != spec.num_classes:
        raise ValueError(f"{len(classes)} class names for a {spec.num_classes}-class model")
    return {"stage": stage, "model": spec.to_dict(), "classes": list(classes), "img_size": spec.img_size,
            "mean": list(spec.mean), "std": list(spec.std), **extra}


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, metadata) from a fine-tune / distill checkpoint (a run directory or a file).

    Refuses with CheckpointError (one line): a checkpoint of another stage (e.g. MAE), one without the model
    description, class names that do not match the head, or weights that do not match the description.
    """
    p = resolve_checkpoint(path)
    tensors, meta = read_checkpoint(p)
    stage = meta.get("stage")
    if stage not in CLASSIFIER_STAGES:
        what = f"a '{stage}' checkpoint" if stage else "a checkpoint without a dermfast stage"
        raise CheckpointError(f"{p} is {what}; this needs a classifier from --stage "
                              f"{' or '.join(CLASSIFIER_STAGES)}")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("classes"), list):
        raise CheckpointError(f"{p}: metadata lacks the model description or class names")
    spec = ClassifierSpec.from_dict(meta["model"])
    classes = meta["classes"]
    if len(classes) != spec.num_classes:
        raise CheckpointError(f"{p}: {len(classes)} class names but the model has {spec.num_classes} outputs")
    try:
        model = build_classifier(spec)
    except ValueError as e:
        raise CheckpointError(f"{p}: {e}") from None
    own = model.state_dict()
    mism = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in tensors.items()
            if k in own and own[k].shape != v.shape]
    missing, unexpected = [k for k in own if k not in tensors], [k for k in tensors if k not in own]
    if not (missing or unexpected or mism):
        model.load_state_dict(tensors)
    else:
        raise CheckpointError(f"{p}: weights do not match {spec.arch} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, shape mismatch: {', '.join(mism[:3]) or 'none'})")
    model.to(device).eval()
    meta["checkpoint_path"] = str(p)
    return model, meta
