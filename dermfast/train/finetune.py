"""Fine-tuning stage: a classifier from an MAE checkpoint (its encoder + a new head) or any timm model by name.

    python -m dermfast.train --stage finetune [--init RUN_OR_FILE] [--model mae_vit|TIMM_NAME] [--select ...]

As MAE fine-tuning does: layer-wise lr decay, drop path, label smoothing, optional mixup / cutmix (timm's
`Mixup`), AdamW with warmup + cosine (the engine's). Class-balanced batches by default (`--balance none` for the
natural mix); negative downsampling and real:synthetic mixing come from the data layer (`--neg-keep`,
`--synthetic --synth-ratio`); `--class-weights` weighs the cross-entropy by inverse class frequency. The
validation split is evaluated at each epoch end (or every `--eval-every` steps); the engine keeps
RUN/best.safetensors by `--select` (balanced accuracy by default; `pauc` = the ISIC 2024 partial AUC above 80%
TPR of the `--positive` class). Both best.safetensors and checkpoint.safetensors carry the classifier
description (`dermfast.models.classifier.classifier_metadata`), so `python -m dermfast.evaluate` and `python -m
dermfast.export` rebuild the model from the file alone.

With no arguments: the `demo` MAE preset's ViT (64 px), from scratch, on the embedded dataset, on the CPU.
Run directory (besides the engine's files): init_report.json (when --init is given), splits.csv,
data_report.csv.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from dermfast.train.config import ConfigError, DataConfig
from dermfast.train.stages import Parts, Stage, register_stage

SELECT_METRICS = ("balanced_accuracy", "pauc", "auroc", "macro_f1", "accuracy")


@dataclass
class FinetuneConfig(DataConfig):
    model: str = "mae_vit"           # mae_vit (an MAE preset's encoder + head) or a timm name (vit_*, deit3_*, convnext_*, ...)
    preset: str = "demo"             # mae_vit: the MAE preset (an MAE --init supplies its own)
    init: str | None = None          # MAE run folder / checkpoint (encoder loads by name), or local weights (safetensors, timm .pth)
    img_size: int | None = None      # image side; None = the MAE preset's / --init's, or the timm model's native size
    global_pool: Literal["avg", "token"] = "avg"  # mae_vit: avg (mean patch token + fc_norm, as MAE) or token (class token)
    layer_decay: float = 0.75        # layer-wise lr decay (lr * decay^(depth - layer)); 1 = off
    drop_path: float = 0.1           # stochastic depth rate
    label_smoothing: float = 0.1     # cross-entropy label smoothing
    mixup: float = 0.0               # mixup alpha (0 = off; MAE fine-tuning uses 0.8)
    cutmix: float = 0.0              # cutmix alpha (0 = off; MAE fine-tuning uses 1.0)
    class_weights: bool = False      # weigh the cross-entropy by inverse class frequency of the training split
    select: Literal["balanced_accuracy", "pauc", "auroc", "macro_f1", "accuracy"] = "balanced_accuracy"  # validation metric that picks best.safetensors
    positive: str | None = None      # the malignant class for pauc (default: melanoma / mel / malignant when present)
    balance: Literal["none", "equal"] = "equal"  # equal: class-balanced batches (rare classes oversampled); none: natural
    epochs: int = 10                 # passes over the training data
    batch_size: int = 64             # images per optimiser micro-step on each rank
    warmup_epochs: float = 1.0       # linear warmup length, in epochs
    out: str = "runs/finetune"       # run directory

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        for name in ("drop_path", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("--mixup and --cutmix are Beta-distribution alphas: >= 0 (0 = off)")
        if self.model == "mae_vit":
            from dermfast.models.mae import presets
            if self.preset not in presets():
                raise ConfigError(f"unknown preset {self.preset!r}; accepted: {', '.join(presets())}")
        else:
            import timm
            if not timm.is_model(self.model):
                raise ConfigError(f"unknown --model {self.model!r}: not mae_vit and not a timm model name "
                                  "(e.g. vit_tiny_patch16_224, deit3_small_patch16_224, convnext_atto)")
        if self.init is not None and not Path(self.init).expanduser().exists():
            raise ConfigError(f"--init {self.init!r} does not exist")


def _init_meta(cfg: FinetuneConfig) -> dict:
    """Metadata of the --init checkpoint (empty for weights without any)."""
    if cfg.init is None:
        return {}
    from dermfast.models.classifier import CheckpointError, resolve_checkpoint
    try:
        path = resolve_checkpoint(cfg.init)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if path.suffix != ".safetensors":
        return {}
    from dermfast.models.classifier import read_checkpoint
    try:
        return read_checkpoint(path)[1]
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def mae_preset_dict(cfg: FinetuneConfig) -> dict | None:
    """The MAE preset the mae_vit classifier is shaped by: --init's (an MAE or mae_vit run), else --preset."""
    if cfg.model != "mae_vit":
        return None
    meta = _init_meta(cfg)
    if meta.get("stage") == "mae" and isinstance(meta.get("preset"), dict):
        return meta["preset"]
    if isinstance(meta.get("model"), dict) and meta["model"].get("mae_preset"):
        return meta["model"]["mae_preset"]
    from dermfast.models.mae import get_preset
    return get_preset(cfg.preset).to_dict()


def classifier_spec(cfg: FinetuneConfig, num_classes: int):
    from dermfast.models.classifier import ClassifierSpec
    return ClassifierSpec(cfg.model, num_classes, int(cfg.img_size), mae_preset=mae_preset_dict(cfg),
                          global_pool=cfg.global_pool, drop_path=cfg.drop_path)


@register_stage("finetune", help="fine-tune a classifier from an MAE checkpoint or a timm model")
class FinetuneStage(Stage):
    Config = FinetuneConfig

    def resolve(self, cfg: FinetuneConfig, world) -> FinetuneConfig:
        from dermfast.evaluate import require_sklearn
        require_sklearn("finetune")
        meta = _init_meta(cfg)
        if meta.get("stage") == "mae" and cfg.model != "mae_vit":
            raise ConfigError(f"--init {cfg.init} is an MAE checkpoint: it initialises --model mae_vit "
                              f"(its encoder), not {cfg.model!r}")
        if cfg.img_size is None:
            if cfg.model == "mae_vit":
                cfg.img_size = int(mae_preset_dict(cfg)["img_size"])
            else:
                from dermfast.models.classifier import default_img_size
                cfg.img_size = default_img_size(cfg.model)
        if cfg.model == "mae_vit":
            patch = int(mae_preset_dict(cfg)["patch_size"])
            if cfg.img_size % patch:
                raise ConfigError(f"--img-size {cfg.img_size} is not a multiple of the patch size {patch}")
        return super().resolve(cfg, world)

    def default_blr(self, cfg: FinetuneConfig) -> float:
        return 2e-3  # lr 5e-4 at batch 64: the small CPU models here; MAE's ViT-B recipe is 5e-4 at 1024

    def build(self, run) -> Parts:
        import numpy as np
        import torch

        from dermfast.data.augment import Augment, classify_augment
        from dermfast.eval.metrics import default_positive
        from dermfast.models.classifier import build_classifier, load_init

        cfg: FinetuneConfig = run.cfg
        data = run.prepare_data()
        self.train_rec, self.val_rec = data.part("train"), data.part("val")
        self.classes = list(data.records.classes)
        self.positive = cfg.positive or default_positive(self.classes)
        if cfg.positive is not None and cfg.positive not in self.classes:
            raise ConfigError(f"--positive {cfg.positive!r} is not a class of the data; accepted: "
                              f"{', '.join(self.classes)}")
        if cfg.select == "pauc" and self.positive is None:
            raise ConfigError(f"--select pauc needs a malignant class: name it with --positive (classes: "
                              f"{', '.join(self.classes)})")
        self.spec = classifier_spec(cfg, len(self.classes))
        try:
            model = build_classifier(self.spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.init_report = None
        if cfg.init is not None:
            self.init_report = load_init(model, cfg.init)
            run.log(self.init_report.summary())
            if run.is_main:
                import json
                path = run.run_dir / "init_report.json"
                path.write_text(json.dumps(self.init_report.to_dict(), indent=1))
                run.wrote(path)
        model = model.to(run.device)

        self.aug = replace(classify_augment(self.spec.img_size), mean=self.spec.mean, std=self.spec.std)
        self.eval_aug = Augment(size=self.spec.img_size, mean=self.spec.mean, std=self.spec.std)  # = evaluate's
        labels = self.train_rec.labels
        try:
            sampler = run.sampler(labels, self.train_rec.source,
                                  class_fractions=None if cfg.balance == "none" else cfg.balance,
                                  neg_keep=cfg.neg_keep, synth_ratio=cfg.synth_ratio)
            loader = run.train_loader(self.train_rec, self.aug, sampler)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.val_loader = run.eval_loader(self.val_rec, self.eval_aug) if len(self.val_rec) else None
        if self.val_loader is None:
            run.log("finetune: the validation split is empty: no evaluation, best.safetensors is not kept")

        weight = None
        if cfg.class_weights:
            counts = np.bincount(labels, minlength=len(self.classes)).astype(np.float64)
            w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(self.classes), 0.0)
            weight = torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32, device=run.device)
        self.weight = weight
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=len(self.classes))
        counts = ", ".join(f"{c} {n}" for c, n in self.train_rec.class_counts().items())
        start = f"init {cfg.init}" if cfg.init else "from scratch"
        return Parts(model=model, loader=loader, sampler=sampler,
                     summary=f"{cfg.model} ({start}), {len(self.classes)} classes, {len(self.train_rec)} train "
                             f"({counts}), {len(self.val_rec)} val, loader {loader.backend}")

    def param_groups(self, model, cfg: FinetuneConfig):
        if cfg.layer_decay >= 1.0:
            return None
        from timm.optim import param_groups_layer_decay
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        return param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=skip,
                                        layer_decay=cfg.layer_decay)

    def step(self, batch, run):
        import torch.nn.functional as F
        x, y = batch["image"], batch["label"]
        cfg: FinetuneConfig = run.cfg
        if self.mixup is not None and x.shape[0] % 2 == 0:  # timm's Mixup pairs samples: needs an even batch
            x, target = self.mixup(x, y)
            logits = run.model(x)
            logp = logits.float().log_softmax(-1)
            w = 1.0 if self.weight is None else self.weight
            loss = -(target * w * logp).sum(-1).mean()
            return loss, {}
        logits = run.model(x)
        loss = F.cross_entropy(logits.float(), y, weight=self.weight, label_smoothing=cfg.label_smoothing)
        return loss, {"acc": (logits.argmax(1) == y).float().mean()}

    def evaluate(self, run) -> dict | None:
        if self.val_loader is None:
            return None
        from dermfast.evaluate import validation_metrics
        return validation_metrics(run.model, self.val_loader, run.device, self.classes, self.positive,
                                  autocast=run.autocast())

    def selection(self, cfg: FinetuneConfig):
        return (cfg.select, "max")

    def final_meta(self, run) -> dict:
        from dermfast.models.classifier import classifier_metadata
        extra = {"positive": self.positive, "init": run.cfg.init}
        if self.init_report is not None:
            r = self.init_report
            extra["init_keys"] = {"loaded": len(r.loaded), "missing": r.missing, "unexpected": len(r.unexpected),
                                  "mismatched": r.mismatched}
        return classifier_metadata(self.spec, self.classes, stage="finetune", **extra)

    def finish(self, run) -> list:
        run.log(f"finetune: evaluate with `python -m dermfast.evaluate --checkpoint {run.run_dir}`, export with "
                f"`python -m dermfast.export --checkpoint {run.run_dir} --format onnx`")
        return []
