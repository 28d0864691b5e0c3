"""The small-data recipe of the finetune stage: what `--stage finetune --data DIR` uses when DIR holds few real
labelled images (issue 18), filling ONLY the options the user did not set.

Where "small" starts: fewer than SMALL_DATA_IMAGES (2000) real labelled images in --data. Two reasons, both
about the data, not one data set: (1) the default schedule, 10 epochs at batch 64, is under ~250 optimiser
steps for a training split (80%) of under 1600 images, too few for any model to converge (111 images gave 20
steps); (2) a ViT trained from scratch needs far more images than that (ViT / DeiT: ImageNet-scale, or heavy
pretraining), while a small CNN's locality and translation equivariance are a prior that holds for lesions.
The embedded procedural dataset (no --data) is a smoke-test preset and keeps the plain defaults.

The recipe (measured with 5-fold cross-validation on ../shared/data/isic-cc0-mini, README "Small data": fold
means AUROC 0.707 vs the trivial baseline's 0.580, paired difference +0.126 +- 0.037 SE; balanced accuracy at the
validation threshold 0.637 vs 0.621, +0.016 +- 0.052 SE):
- model: timm resnet18 from scratch (no weights are downloaded), layer decay off (it is for pretrained models)
- image size 64: the lesion-level colour / shape cues survive and a 5-fold run fits 2 CPU cores
- batch 16 and at least 300 optimiser steps (`--min-steps`, epochs raised to reach them), warmup 30 steps
- all 8 dihedral views as training augmentation (`--dihedral`: dermoscopy has no up or down); NOT at test time:
  averaging the 8 views (`--tta d4`) lowered the fold-mean AUROC by 0.027 (lower on 4 of 5 folds, equal on
  one), so the recipe leaves --tta at none
- no EMA of the weights: `--ema 0.99` changed the fold-mean AUROC by +0.006 and balanced accuracy by 0.000
  (the cosine schedule's last steps barely move the weights, so their average is the final weights)
- class-balanced batches (the stage's default) and the decision threshold chosen on the validation split
- the final (EMA) weights are the model (`--select last`: picking a checkpoint by a validation split of ~10
  images picks noise), evaluated every 50 steps (not every 5-step epoch) and at the end; resume checkpoints
  every 50 steps too, not at every epoch end (`--no-epoch-checkpoints --checkpoint-every 50`)

Explicit choices win: an explicit --model, --preset or --init keeps its model (and its image size, preset and layer
decay: MAE -> finetune stays MAE -> finetune); explicit --epochs / --max-steps keep their schedule length.
"""
from __future__ import annotations

from dataclasses import dataclass

SMALL_DATA_IMAGES = 2000   # fewer real labelled images than this in --data: the small-data recipe applies

# option -> value; groups: the model's, the schedule's, the rest. Each filled only when the user did not set it.
MODEL_VALUES = {"model": "resnet18", "img_size": 64, "layer_decay": 1.0}
SCHEDULE_VALUES = {"min_steps": 300, "warmup_steps": 30}
# checkpoints every 50 steps instead of at every epoch end: an epoch of a small split is a few steps, and each
# checkpoint of resnet18 + AdamW state is ~135 MB written
OTHER_VALUES = {"batch_size": 16, "dihedral": True, "select": "last", "eval_every": 50,
                "checkpoint_every": 50, "epoch_checkpoints": False}


@dataclass
class RecipeChoice:
    name: str                  # "small-data" or "none"
    reason: str                # why (one clause)
    filled: dict               # option -> the value the recipe set

    def line(self) -> str:
        if not self.filled:
            return f"finetune: recipe {self.name} ({self.reason})"
        vals = ", ".join(f"--{k.replace('_', '-')} {_fmt(v)}" for k, v in self.filled.items())
        return f"finetune: recipe {self.name} ({self.reason}); filled: {vals}"

    def to_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason, "filled": dict(self.filled),
                "small_data_images": SMALL_DATA_IMAGES}


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def count_real_images(data: str) -> int:
    """Real labelled images listed by the dataset at `data` (its index: no image is decoded)."""
    import numpy as np

    from dermfast.data.pipeline import open_records
    rec = open_records(data, progress=False)
    return int(np.sum(np.asarray(rec.labels) >= 0))


def recipe_values(explicit: frozenset, has_init: bool) -> dict:
    """The options the small-data recipe fills, given which options the user set (`explicit`)."""
    out = {}
    if not explicit & {"model", "preset"} and not has_init:
        out.update({k: v for k, v in MODEL_VALUES.items() if k not in explicit})
    if not explicit & {"epochs", "max_steps", "min_steps"}:
        out.update({k: v for k, v in SCHEDULE_VALUES.items() if k not in explicit})
    elif "warmup_steps" not in explicit and "warmup_epochs" not in explicit and "min_steps" in explicit:
        out["warmup_steps"] = SCHEDULE_VALUES["warmup_steps"]
    out.update({k: v for k, v in OTHER_VALUES.items() if k not in explicit})
    return out


def choose_recipe(cfg, n_images: int | None = None) -> RecipeChoice:
    """Decide (not apply) the recipe for a FinetuneConfig: `cfg.recipe` auto | small-data | none. Counts the
    images of --data when `n_images` is not given (auto only)."""
    from dermfast.train.config import explicit_fields
    if cfg.recipe == "none":
        return RecipeChoice("none", "--recipe none", {})
    explicit = explicit_fields(cfg)
    if cfg.recipe == "auto":
        if cfg.data is None:
            return RecipeChoice("none", "the embedded dataset keeps the plain defaults", {})
        n = count_real_images(cfg.data) if n_images is None else n_images
        if n >= SMALL_DATA_IMAGES:
            return RecipeChoice("none", f"{n} labelled images: not small (< {SMALL_DATA_IMAGES})", {})
        reason = f"{n} labelled images < {SMALL_DATA_IMAGES}"
    else:
        reason = "--recipe small-data"
    return RecipeChoice("small-data", reason, recipe_values(explicit, cfg.init is not None))


def apply_recipe(cfg, choice: RecipeChoice):
    """Set the chosen values on `cfg` (in place; returns it). The preset goes with a timm model: none."""
    for k, v in choice.filled.items():
        setattr(cfg, k, v)
    if choice.filled.get("model") is not None and choice.filled["model"] != "mae_vit":
        cfg.preset = None
    return cfg


__all__ = ["SMALL_DATA_IMAGES", "RecipeChoice", "choose_recipe", "apply_recipe", "recipe_values",
           "count_real_images"]
