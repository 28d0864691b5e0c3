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

--init and the encoder (`--model mae_vit`): a dermfast MAE or mae_vit run carries its preset; an explicit
`--preset` comes next; otherwise a checkpoint in the MAE / timm ViT layout (the official facebookresearch/mae
`mae_pretrain_vit_*.pth`) shapes the encoder itself: patch size, width, depth, mlp ratio and image size are read
off its tensors, the head count from the registered preset of that shape or a head dim of 64, and one line says
what was inferred. Before any data is read, the run is refused (exit 2, one line: what the checkpoint is, which
flag fits) when --init would leave any of the encoder's learnt weights (patch embedding, class token, every
block; for a timm model everything but the head) missing or of another shape, unless `--init-partial`
(`dermfast.models.init_checkpoint`).

Small data (issue 18): `--min-steps N` raises --epochs until the run has N optimiser steps and `--warmup-steps`
counts the warmup in steps (both said in the run log); `--ema DECAY` averages the weights
(`dermfast.train.ema`; evaluation, best.safetensors and checkpoint.safetensors hold the average, the
checkpoint's extra state keeps it for an exact resume); `--tta none|flips|d4` averages the probabilities over
test-time views (`dermfast.eval.tta`) and is recorded in the checkpoint ("tta") for evaluate / predict;
`--dihedral` adds vertical flips and 90-degree rotations to the training augmentation. For a binary task the
decision threshold is chosen on the validation split at each evaluation (`dermfast.eval.threshold`) and kept
in the checkpoint metadata as "threshold": {"value": t, "source": "val"} when that split holds at least
MIN_PER_CLASS (10) images of each class; below that a chosen threshold is noise, and the arg-max rule stays. `--select last` keeps no
best.safetensors (the final weights are the model). With --data of fewer than 2000 labelled images the
small-data recipe (`dermfast.train.small_data`) fills the options the user did not set, says so in one line
and writes RUN/recipe.json; `--recipe none` turns it off.

With no arguments: the `demo` MAE preset's ViT (64 px), from scratch, on the embedded dataset, on the CPU.
Run directory (besides the engine's files): init_report.json (when --init is given), splits.csv,
data_report.csv, recipe.json.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from dermfast.train.config import ConfigError, DataConfig
from dermfast.train.stages import Parts, Stage, register_stage

SELECT_METRICS = ("balanced_accuracy", "pauc", "auroc", "macro_f1", "accuracy", "last")


@dataclass
class FinetuneConfig(DataConfig):
    model: str = "mae_vit"           # mae_vit (an MAE preset's encoder + head) or a timm name (vit_*, deit3_*, convnext_*, ...)
    preset: str | None = None        # mae_vit: the MAE preset; none = --init's (its metadata, else inferred from its shapes) or demo
    init: str | None = None          # MAE run / checkpoint (dermfast's or the official .pth), or local weights (safetensors, timm .pth)
    init_partial: bool = False       # start even if --init leaves encoder weights unloaded (they keep their initial values)
    img_size: int | None = None      # image side; None = the MAE preset's / --init's, or the timm model's native size
    global_pool: Literal["avg", "token"] = "avg"  # mae_vit: avg (mean patch token + fc_norm, as MAE) or token (class token)
    layer_decay: float = 0.75        # layer-wise lr decay (lr * decay^(depth - layer)); 1 = off
    drop_path: float = 0.1           # stochastic depth rate
    label_smoothing: float = 0.1     # cross-entropy label smoothing
    mixup: float = 0.0               # mixup alpha (0 = off; MAE fine-tuning uses 0.8)
    cutmix: float = 0.0              # cutmix alpha (0 = off; MAE fine-tuning uses 1.0)
    class_weights: bool = False      # weigh the cross-entropy by inverse class frequency of the training split
    select: Literal["balanced_accuracy", "pauc", "auroc", "macro_f1", "accuracy", "last"] = "balanced_accuracy"  # validation metric that picks best.safetensors; last: none (the final weights are the model)
    positive: str | None = None      # the malignant class for pauc (default: melanoma / mel / malignant when present)
    balance: Literal["none", "equal"] = "equal"  # equal: class-balanced batches (rare classes oversampled); none: natural
    epochs: int = 10                 # passes over the training data
    batch_size: int = 64             # images per optimiser micro-step on each rank
    warmup_epochs: float = 1.0       # linear warmup length, in epochs
    min_steps: int = 0               # at least this many optimiser steps: --epochs is raised to reach them (0 = off)
    warmup_steps: int | None = None  # linear warmup length in optimiser steps (overrides --warmup-epochs)
    ema: float = 0.0                 # EMA decay of the weights (e.g. 0.99; 0 = off): evaluation and the saved model use the average
    tta: Literal["none", "flips", "d4"] = "none"  # test-time views averaged at evaluation (d4: the 8 dihedral ones), kept in the checkpoint
    dihedral: bool = False           # training augmentation: random vertical flips and 90-degree rotations too (dermoscopy has no up)
    recipe: Literal["auto", "small-data", "none"] = "auto"  # auto: the small-data recipe for --data with < 2000 labelled images (fills unset options only)
    out: str = "runs/finetune"       # run directory

    def __post_init__(self) -> None:
        if self.preset is None and self.init is None:
            self.preset = DEFAULT_PRESET  # from scratch: the preset is the only source of the shape

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
            if self.preset is not None and self.preset not in presets():
                raise ConfigError(f"unknown preset {self.preset!r}; accepted: {', '.join(presets())}")
        else:
            import timm
            if not timm.is_model(self.model):
                raise ConfigError(f"unknown --model {self.model!r}: not mae_vit and not a timm model name "
                                  "(e.g. vit_tiny_patch16_224, deit3_small_patch16_224, convnext_atto)")
        if self.init is not None and not Path(self.init).expanduser().exists():
            raise ConfigError(f"--init {self.init!r} does not exist")
        if self.min_steps < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ConfigError("--min-steps and --warmup-steps must be >= 0")
        if not (self.ema == 0.0 or 0.0 < self.ema < 1.0):
            raise ConfigError(f"--ema is a decay in (0, 1) (e.g. 0.99), or 0 for off; got {self.ema}")
        if self.ema and self.fsdp:
            raise ConfigError("--ema keeps a full copy of the weights: not with --fsdp (give one)")


DEFAULT_PRESET = "demo"


def _init_shapes(cfg: FinetuneConfig) -> tuple[dict, dict]:
    """({key: shape}, metadata) of the --init checkpoint (both empty without --init; metadata empty for weights
    without any). Reads headers / memory-maps only, cached per file."""
    if cfg.init is None:
        return {}, {}
    from dermfast.models.classifier import CheckpointError, checkpoint_shapes
    try:
        return checkpoint_shapes(cfg.init)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def _init_meta(cfg: FinetuneConfig) -> dict:
    """Metadata of the --init checkpoint (empty for weights without any)."""
    return _init_shapes(cfg)[1]


@dataclass
class EncoderChoice:
    """The MAE preset the mae_vit classifier is shaped by, and where it came from."""
    preset: dict
    source: str                      # for messages: "--preset vit_b16", "the MAE run's preset", ...
    inferred: object = None          # dermfast.models.init_checkpoint.InferredEncoder when read off the shapes


def encoder_choice(cfg: FinetuneConfig) -> EncoderChoice | None:
    """mae_vit's encoder: --init's dermfast metadata (an MAE or mae_vit run) wins; else an explicit --preset;
    else, with an --init in the MAE / timm ViT layout, the encoder its shapes hold; else the demo preset."""
    if cfg.model != "mae_vit":
        return None
    from dermfast.models.mae import get_preset
    shapes, meta = _init_shapes(cfg)
    if meta.get("stage") == "mae" and isinstance(meta.get("preset"), dict):
        return EncoderChoice(meta["preset"], "the MAE run's preset")
    if isinstance(meta.get("model"), dict) and meta["model"].get("mae_preset"):
        return EncoderChoice(meta["model"]["mae_preset"], "the classifier's preset")
    if cfg.preset is not None:
        return EncoderChoice(get_preset(cfg.preset).to_dict(), f"--preset {cfg.preset}")
    from dermfast.models.init_checkpoint import infer_encoder, is_vit_layout
    if is_vit_layout(shapes):
        inferred = infer_encoder(shapes)
        return EncoderChoice(inferred.preset.to_dict(), "the encoder inferred from its shapes", inferred)
    return EncoderChoice(get_preset(DEFAULT_PRESET).to_dict(), f"the default --preset {DEFAULT_PRESET}")


def mae_preset_dict(cfg: FinetuneConfig) -> dict | None:
    """The MAE preset the mae_vit classifier is shaped by (`encoder_choice`); None for a timm model."""
    choice = encoder_choice(cfg)
    return None if choice is None else choice.preset


def classifier_spec(cfg: FinetuneConfig, num_classes: int):
    from dermfast.models.classifier import ClassifierSpec
    return ClassifierSpec(cfg.model, num_classes, int(cfg.img_size), mae_preset=mae_preset_dict(cfg),
                          global_pool=cfg.global_pool, drop_path=cfg.drop_path)


def init_coverage_for(cfg: FinetuneConfig):
    """Which of the weights the run needs from --init would load (`InitCoverage`), from shapes alone: the
    classifier is built on the meta device (a ViT-H costs nothing) and no data is read. Needs a resolved cfg."""
    import torch

    from dermfast.models.classifier import build_classifier
    from dermfast.models.init_checkpoint import init_coverage
    spec = classifier_spec(cfg, 2)  # the head is never required: any class count gives the same answer
    try:
        with torch.device("meta"):
            model = build_classifier(spec)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return init_coverage(model, spec, _init_shapes(cfg)[0])


def init_refusal(cfg: FinetuneConfig, cov) -> str:
    """One line: what --init is, how much of what the run needs it would fill, and which flag fits."""
    from dermfast.models.classifier import group_keys
    from dermfast.models.init_checkpoint import describe_checkpoint, encoder_shape, is_mae_pretraining, is_vit_layout
    shapes, meta = _init_shapes(cfg)
    what = describe_checkpoint(shapes, meta)
    arch = meta.get("model", {}).get("arch") if isinstance(meta.get("model"), dict) else None
    if cfg.model == "mae_vit":
        choice = encoder_choice(cfg)
        target, needs = f"{choice.source} ({encoder_shape(choice.preset)})", "encoder tensors"
        if arch and arch != "mae_vit":
            fix = f"give --model {arch}"
        elif choice.source.startswith("--preset") and is_vit_layout(shapes):
            from dermfast.models.init_checkpoint import infer_encoder
            same = infer_encoder(shapes).same_as
            fix = "leave out --preset to build the encoder it holds" + (f" (= --preset {same[0]})" if same else "")
        elif not is_vit_layout(shapes) and meta.get("stage") != "mae":
            fix = "for a timm model's weights give --model NAME (the model they were trained as)"
        else:
            fix = "give a checkpoint with the whole encoder"
    else:
        target, needs = f"--model {cfg.model}", "tensors besides its head"
        if meta.get("stage") == "mae" or is_mae_pretraining(shapes):
            fix = "it initialises --model mae_vit (the default)"
        elif arch:
            fix = f"give --model {arch}"
        else:
            fix = "give the --model these weights were trained as"
    first = (cov.mismatched + group_keys(cov.missing))[0]
    return (f"--init {cfg.init} is {what}; {target} would take {len(cov.loaded)} of the {len(cov.required)} "
            f"{needs} it needs from it ({first}{', ...' if len(cov.mismatched) + len(cov.missing) > 1 else ''}): "
            f"{fix}, or --init-partial to start anyway with the rest at their initial values")


@register_stage("finetune", help="fine-tune a classifier from an MAE checkpoint or a timm model")
class FinetuneStage(Stage):
    Config = FinetuneConfig

    def resolve(self, cfg: FinetuneConfig, world) -> FinetuneConfig:
        from dermfast.evaluate import require_sklearn
        from dermfast.train.small_data import apply_recipe, choose_recipe
        require_sklearn("finetune")
        self.recipe = choose_recipe(cfg)  # before anything reads the model: it may fill --model / --img-size
        apply_recipe(cfg, self.recipe)
        if world.is_main and cfg.data is not None:
            print(self.recipe.line())
        meta = _init_meta(cfg)
        if meta.get("stage") == "mae" and cfg.model != "mae_vit":
            raise ConfigError(f"--init {cfg.init} is an MAE checkpoint: it initialises --model mae_vit "
                              f"(its encoder), not {cfg.model!r}")
        choice = encoder_choice(cfg)
        if choice is not None and choice.inferred is not None and world.is_main:
            inf = choice.inferred
            print(f"finetune: --init {cfg.init} carries no preset: encoder inferred from its shapes: "
                  f"{inf.describe()} ({'; '.join(inf.notes)}); --preset NAME overrides")
        if cfg.img_size is None:
            if cfg.model == "mae_vit":
                cfg.img_size = int(choice.preset["img_size"])
            else:
                from dermfast.models.classifier import default_img_size
                cfg.img_size = default_img_size(cfg.model)
        if cfg.model == "mae_vit":
            patch = int(choice.preset["patch_size"])
            if cfg.img_size % patch:
                raise ConfigError(f"--img-size {cfg.img_size} is not a multiple of the patch size {patch}")
        if cfg.init is not None:  # before any data is read: a run that would start from half its weights stops here
            cov = init_coverage_for(cfg)
            if not cov.complete and not cfg.init_partial:
                raise ConfigError(init_refusal(cfg, cov))
        return super().resolve(cfg, world)

    def default_blr(self, cfg: FinetuneConfig) -> float:
        return 2e-3  # lr 5e-4 at batch 64: the small CPU models here; MAE's ViT-B recipe is 5e-4 at 1024

    def build(self, run) -> Parts:
        import numpy as np
        import torch

        from dermfast.data.augment import Augment, classify_augment
        from dermfast.eval.metrics import default_positive
        from dermfast.eval.tta import tta_views
        from dermfast.models.classifier import build_classifier, group_keys, load_init

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
            self.init_report = load_init(model, cfg.init, resample_pos_embed=self.spec.arch != "mae_vit")
            run.log(self.init_report.summary())
            from dermfast.models.init_checkpoint import unloaded_required
            short = unloaded_required(model, self.spec, self.init_report)
            if short and not cfg.init_partial:  # resolve checked the shapes; this holds it to the real load
                raise ConfigError(f"--init {cfg.init}: {len(short)} of the weights the run needs did not load "
                                  f"({short[0]}, ...); see the listing above, or give --init-partial")
            if short:
                run.log(f"finetune: --init-partial: {len(short)} weights the run would take from --init keep their "
                        f"initial values ({', '.join(group_keys(short)[:4])})")
            if run.is_main:
                import json
                path = run.run_dir / "init_report.json"
                path.write_text(json.dumps(self.init_report.to_dict(), indent=1))
                run.wrote(path)
        model = model.to(run.device)

        self.aug = replace(classify_augment(self.spec.img_size), mean=self.spec.mean, std=self.spec.std)
        if cfg.dihedral:
            if not {"vflip", "rot90"} <= {f.name for f in fields(Augment)}:
                raise ConfigError("--dihedral needs the vertical-flip / 90-degree-rotation augmentation "
                                  "(Augment.vflip, Augment.rot90), which this dermfast lacks")
            self.aug = replace(self.aug, vflip=0.5, rot90=True)
        self.eval_aug = Augment(size=self.spec.img_size, mean=self.spec.mean, std=self.spec.std)  # = evaluate's
        labels = self.train_rec.labels
        try:
            sampler = run.sampler(labels, self.train_rec.source,
                                  class_fractions=None if cfg.balance == "none" else cfg.balance,
                                  neg_keep=cfg.neg_keep, synth_ratio=cfg.synth_ratio)
            loader = run.train_loader(self.train_rec, self.aug, sampler)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._schedule_in_steps(run, len(loader))
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
        self.ema = None
        if cfg.ema:
            from dermfast.train.ema import ModelEma
            self.ema = ModelEma(model, cfg.ema)
            run.log(f"finetune: EMA of the weights, decay {cfg.ema:g} (warm-up min(decay, (1 + n) / (10 + n))): "
                    "evaluation, best.safetensors and checkpoint.safetensors use the average")
        if cfg.tta != "none":
            run.log(f"finetune: test-time augmentation {cfg.tta} ({len(tta_views(cfg.tta))} views) at evaluation; "
                    "recorded in the checkpoint for evaluate / predict")
        self.threshold = None
        self._write_recipe(run)
        counts = ", ".join(f"{c} {n}" for c, n in self.train_rec.class_counts().items())
        start = f"init {cfg.init}" if cfg.init else "from scratch"
        return Parts(model=model, loader=loader, sampler=sampler,
                     summary=f"{cfg.model} ({start}), {len(self.classes)} classes, {len(self.train_rec)} train "
                             f"({counts}), {len(self.val_rec)} val, loader {loader.backend}")

    def _schedule_in_steps(self, run, batches: int) -> None:
        """--min-steps: raise --epochs until the run has that many optimiser steps; --warmup-steps: the warmup in
        steps (as the engine's --warmup-epochs of this epoch length). Said in the run log; config.yaml keeps both."""
        cfg: FinetuneConfig = run.cfg
        per_epoch = batches // cfg.accum_steps
        if per_epoch < 1:
            return  # the engine refuses it with its own message
        if cfg.min_steps and cfg.epochs * per_epoch < cfg.min_steps:
            old = cfg.epochs
            cfg.epochs = -(-cfg.min_steps // per_epoch)
            run.log(f"finetune: --min-steps {cfg.min_steps}: --epochs raised from {old} to {cfg.epochs} "
                    f"({per_epoch} optimiser steps per epoch, {cfg.epochs * per_epoch} steps)")
        if cfg.warmup_steps is not None:
            cfg.warmup_epochs = (cfg.warmup_steps + 0.5) * cfg.accum_steps / batches  # engine: int(this x steps/epoch)
            run.log(f"finetune: warmup {cfg.warmup_steps} optimiser steps (--warmup-steps)")

    def _write_recipe(self, run) -> None:
        recipe = getattr(self, "recipe", None)
        if recipe is None or not run.is_main:
            return
        import json
        path = run.run_dir / "recipe.json"
        path.write_text(json.dumps(recipe.to_dict(), indent=1))
        run.wrote(path)

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

    def uses_after_step(self, cfg) -> bool:
        return bool(cfg.ema)  # without EMA the hook does nothing: no host sync per step for it

    def after_step(self, run) -> None:
        if self.ema is not None:
            self.ema.update(run.raw_model)

    def extra_state(self):
        return ({}, {}) if self.ema is None else self.ema.state()

    def load_extra_state(self, tensors, meta) -> None:
        if self.ema is None:
            return
        if "updates" not in meta:
            raise ConfigError("the checkpoint holds no EMA state (the run was written without --ema): resume "
                              "it without --ema, or start afresh")
        try:
            self.ema.load_state(tensors, meta)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def evaluate(self, run) -> dict | None:
        """The validation metrics (evaluate's), of the EMA weights when --ema and over the --tta views; for a
        binary task also the threshold chosen on these predictions (`threshold`) and the balanced accuracy there
        (optimistic: chosen on the same images)."""
        if self.val_loader is None:
            return None
        import contextlib

        import numpy as np

        from dermfast.eval import metrics as M
        from dermfast.eval.tta import predict_tta
        with (self.ema.swapped_in(run.raw_model) if self.ema is not None else contextlib.nullcontext()):
            probs, y = predict_tta(run.model, self.val_loader, run.device, run.cfg.tta, run.autocast())
        pred = probs.argmax(1)  # the metrics of evaluate.validation_metrics, on these probabilities
        out = {"balanced_accuracy": M.balanced_accuracy(y, pred), "accuracy": M.accuracy(y, pred),
               "macro_f1": M.macro_f1(y, pred), "auroc": M.auroc(y, probs), "pauc": None}
        if self.positive is not None:
            out["pauc"] = M.pauc_above_tpr(y == self.classes.index(self.positive),
                                           probs[:, self.classes.index(self.positive)])
        self.threshold = None
        if len(self.classes) == 2 and self.positive is not None and len(np.unique(y)) == 2:
            from dermfast.eval.threshold import balanced_accuracy_at, threshold_if_estimable
            k = self.classes.index(self.positive)
            self.threshold = threshold_if_estimable(y == k, probs[:, k])  # None: too few of a class to choose one
            if self.threshold is not None:
                out["threshold"] = self.threshold
                out["balanced_accuracy_at_threshold"] = balanced_accuracy_at(y == k, probs[:, k], self.threshold)
        return out

    def selection(self, cfg: FinetuneConfig):
        return None if cfg.select == "last" else (cfg.select, "max")

    def final_weights(self, run) -> dict:
        return run.model_state_dict() if self.ema is None else self.ema.state_dict_cpu()

    def final_meta(self, run) -> dict:
        from dermfast.models.classifier import classifier_metadata
        cfg: FinetuneConfig = run.cfg
        extra = {"positive": self.positive, "init": cfg.init, "tta": cfg.tta, "ema": cfg.ema or None,
                 "recipe": self.recipe.name if getattr(self, "recipe", None) else None}
        if self.threshold is not None:
            extra["threshold"] = {"value": self.threshold, "source": "val"}
        if self.init_report is not None:
            r = self.init_report
            extra["init_keys"] = {"loaded": len(r.loaded), "missing": r.missing, "unexpected": len(r.unexpected),
                                  "mismatched": r.mismatched}
        return classifier_metadata(self.spec, self.classes, stage="finetune", **extra)

    def finish(self, run) -> list:
        from dermfast.eval.baseline import run_baseline  # RUN/baseline/: the trivial baseline evaluate compares with
        files = run_baseline(run, self.train_rec, self.val_rec, self.classes, self.positive, "finetune")
        run.log(f"finetune: evaluate with `python -m dermfast.evaluate --checkpoint {run.run_dir}`, export with "
                f"`python -m dermfast.export --checkpoint {run.run_dir} --format onnx`")
        return files
