"""What an --init checkpoint holds, and whether it initialises the classifier it is given to: decided from shapes
alone, before any data is read, so a run that would start from half its weights is refused before it has spent
its GPU hours (`load_init` then loads and lists every key).

Checkpoints without dermfast metadata are read by their layout. The facebookresearch/mae one (models_mae.py
`MaskedAutoencoderViT`, saved as {"model": state_dict}), whose encoder keys timm's VisionTransformer shares:

    patch_embed.proj.weight [D, C, p, p]   patch size p, width D, input channels C
    cls_token [1, 1, D]; pos_embed [1, 1 + (S / p)^2, D] (fixed 2-D sin-cos; gives the image side S)
    blocks.{i}.norm1 / attn.qkv [3D, D] / attn.proj / norm2 / mlp.fc1 [r D, D] / mlp.fc2   depth, mlp ratio r
    norm.*; and for a pretraining checkpoint decoder_embed [Dd, D], mask_token, decoder_blocks.{i}.*, decoder_*

The head count is not in the layout (qkv is [3D, D] for any count): a registered preset of the same patch,
width, depth and mlp ratio gives it (ViT-H/14: 16 heads of 80), else a head dim of 64 is assumed, and
`InferredEncoder.notes` says which.

What a classifier needs from an --init (`required_keys`): for `mae_vit`, the encoder's learnt weights: the patch
embedding, the class token and every block, and the final norm only under token pooling (average pooling uses
fc_norm, which MAE fine-tuning starts fresh); not the position embedding (fixed 2-D sin-cos, built for the
target grid). That is exactly what dermfast's own MAE -> finetune loads. For a timm model: every tensor but the
classifier head (a learnt position embedding of another grid counts: `load_init` resamples it as timm does).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from torch import nn

from dermfast.models.classifier import CLASSIFIER_STAGES, ClassifierSpec, pos_embed_grid
from dermfast.models.mae import MAEPreset, presets

OFFICIAL_MAE = "facebookresearch/mae layout"
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_DECODER_BLOCK = re.compile(r"^decoder_blocks\.(\d+)\.")
DEFAULT_HEAD_DIM = 64  # ViT-S/B/L's; the layout does not record the head count


def is_vit_layout(shapes: dict[str, tuple]) -> bool:
    """A square-kernel patch embedding and numbered blocks: the MAE / timm ViT encoder layout."""
    w = shapes.get("patch_embed.proj.weight")
    return (w is not None and len(w) == 4 and w[2] == w[3] and "blocks.0.attn.qkv.weight" in shapes)


def is_mae_pretraining(shapes: dict[str, tuple]) -> bool:
    return "mask_token" in shapes or any(k.startswith(("decoder_embed.", "decoder_blocks.")) for k in shapes)


@dataclass
class InferredEncoder:
    preset: MAEPreset
    notes: list[str] = field(default_factory=list)  # what the layout did not say and was assumed
    same_as: list[str] = field(default_factory=list)  # registered presets of this encoder shape

    def describe(self) -> str:
        p = self.preset
        return (f"patch {p.patch_size}, width {p.embed_dim}, depth {p.depth}, {p.img_size} px, {p.num_heads} heads, "
                f"mlp ratio {p.mlp_ratio:g}" + (f", {p.in_chans} channels" if p.in_chans != 3 else ""))


def encoder_shape(p: MAEPreset | dict) -> str:
    p = p if isinstance(p, dict) else p.to_dict()
    return f"patch {p['patch_size']}, width {p['embed_dim']}, depth {p['depth']}"


def same_encoder_presets(p: MAEPreset) -> list[str]:
    """Registered presets whose encoder has these learnt shapes (patch, channels, width, depth, mlp ratio)."""
    key = (p.patch_size, p.in_chans, p.embed_dim, p.depth, float(p.mlp_ratio))
    return [name for name, q in presets().items()
            if (q.patch_size, q.in_chans, q.embed_dim, q.depth, float(q.mlp_ratio)) == key]


def infer_encoder(shapes: dict[str, tuple]) -> InferredEncoder:
    """The ViT encoder a checkpoint in the MAE / timm layout holds, from its shapes. Raises ValueError when the
    layout is not that (`is_vit_layout`)."""
    if not is_vit_layout(shapes):
        raise ValueError("no ViT encoder (patch_embed.proj.weight [D, C, p, p] and blocks.{i}.attn.qkv.weight)")
    D, C, p, _ = shapes["patch_embed.proj.weight"]
    depth = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK.match(k)))
    fc1 = shapes.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1[0] / D if fc1 is not None and len(fc1) == 2 else 4.0
    notes = []
    img = None
    pos = shapes.get("pos_embed")
    if pos is not None and len(pos) == 3:
        for prefix in (1, 0):  # with the class token's position (MAE, timm), or without
            g = math.isqrt(max(pos[1] - prefix, 0))
            if g > 0 and g * g == pos[1] - prefix:
                img = g * p
                break
    if img is None:
        img = 224
        notes.append("224 px assumed (no square position embedding in the file; --img-size sets it)")
    fields = dict(img_size=img, patch_size=p, in_chans=C, embed_dim=D, depth=depth, mlp_ratio=float(mlp_ratio))
    dec = shapes.get("decoder_embed.weight")
    if dec is not None and len(dec) == 2:  # recorded for completeness; fine-tuning does not build the decoder
        fields["decoder_embed_dim"] = dec[0]
        fields["decoder_depth"] = 1 + max((int(m.group(1)) for k in shapes if (m := _DECODER_BLOCK.match(k))),
                                          default=-1)
        fields["decoder_num_heads"] = max(1, dec[0] // 32) if dec[0] % 32 == 0 else 1  # MAE's decoders: head dim 32
    probe = MAEPreset(**fields)
    same = same_encoder_presets(probe)
    if same:
        heads = presets()[same[0]].num_heads
        notes.append(f"heads as preset {same[0]}: the layout does not record them")
    else:
        heads = _heads_for(D)
        notes.append(f"heads assumed from head dim {D // heads}: the layout does not record them"
                     + ("" if D // heads == DEFAULT_HEAD_DIM else f" (width {D} is not a multiple of "
                                                                  f"{DEFAULT_HEAD_DIM})"))
    return InferredEncoder(MAEPreset(**fields, num_heads=heads), notes, same)


def _heads_for(width: int) -> int:
    """Head count for a width: head dim 64 when it divides, else the divisor whose head dim is nearest 64."""
    if width % DEFAULT_HEAD_DIM == 0:
        return width // DEFAULT_HEAD_DIM
    divisors = [h for h in range(1, width + 1) if width % h == 0]
    return min(divisors, key=lambda h: (abs(width // h - DEFAULT_HEAD_DIM), h))


def describe_checkpoint(shapes: dict[str, tuple], meta: dict) -> str:
    """One phrase naming what a checkpoint is, e.g. 'an MAE pretraining checkpoint in the facebookresearch/mae
    layout (ViT patch 16, width 768, depth 12, 224 px)'."""
    stage = meta.get("stage")
    if stage == "mae" and isinstance(meta.get("preset"), dict):
        return f"a dermfast MAE checkpoint ({encoder_shape(meta['preset'])})"
    if stage in CLASSIFIER_STAGES and isinstance(meta.get("model"), dict):
        arch = meta["model"].get("arch", "?")
        return f"a dermfast {stage} classifier ({arch})"
    if is_vit_layout(shapes):
        enc = infer_encoder(shapes).preset
        shape = f"ViT {encoder_shape(enc)}, {enc.img_size} px"
        if is_mae_pretraining(shapes):
            return f"an MAE pretraining checkpoint in the {OFFICIAL_MAE} ({shape})"
        return f"a ViT encoder state dict in the MAE / timm layout ({shape})"
    first = ", ".join(list(shapes)[:2])
    return f"a state dict of {len(shapes)} tensors with no ViT encoder ({first}, ...)"


def classifier_head_prefix(model: nn.Module) -> str | None:
    """The module name of a timm model's classifier head ('head', 'head.fc', 'classifier', ...)."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    head = get()
    for name, mod in model.named_modules():
        if mod is head and name:
            return name
    return None


def required_keys(model: nn.Module, spec: ClassifierSpec) -> list[str]:
    """The state-dict keys of `model` an --init must fill for the run to start from the checkpoint (see the
    module's docstring)."""
    keys = list(model.state_dict())
    if spec.arch == "mae_vit":
        norm = ("norm.",) if spec.global_pool == "token" else ()
        return [k for k in keys if k == "cls_token" or k.startswith(("patch_embed.", "blocks.", *norm))]
    head = classifier_head_prefix(model)
    return [k for k in keys if not (head and (k == head or k.startswith(head + ".")))]


def unloaded_required(model: nn.Module, spec: ClassifierSpec, report) -> list[str]:
    """The required keys (`required_keys`) a `load_init` report did not load: empty when the run starts from
    everything it needs. For stages that load first and check after (distill's --init)."""
    loaded = set(report.loaded)
    return [k for k in required_keys(model, spec) if k not in loaded]


@dataclass
class InitCoverage:
    """Which of the required keys an --init would fill (`loaded`), lacks (`missing`) or holds in another shape
    (`mismatched`: 'key: checkpoint [..] vs model [..]')."""
    required: list[str]
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.mismatched)


def init_coverage(model: nn.Module, spec: ClassifierSpec, shapes: dict[str, tuple]) -> InitCoverage:
    """What `load_init(model, ...)` would do with a checkpoint of these shapes, for the required keys. `model`
    may live on the meta device (shapes are all that is read)."""
    own = model.state_dict()
    cov = InitCoverage(required_keys(model, spec))
    resample = spec.arch != "mae_vit"
    for k in cov.required:
        if k not in shapes:
            cov.missing.append(k)
        elif tuple(shapes[k]) == tuple(own[k].shape) or (resample and pos_embed_grid(model, k, tuple(shapes[k]))):
            cov.loaded.append(k)
        else:
            cov.mismatched.append(f"{k}: checkpoint {list(shapes[k])} vs model {list(own[k].shape)}")
    return cov
