"""Distillation stage: a fine-tuned teacher -> a small (on-device) student, by soft-target KD or SSD-KD.

    python -m dermfast.train --stage distill [--teacher RUN | --teacher TIMM_NAME --teacher-init FILE]
                                             [--student TIMM_NAME] [--kd soft|ssd] [--cache-teacher]

Teacher: a `--stage finetune` (or distill) run or checkpoint file (`--teacher RUN`: the classifier is rebuilt from
the file's metadata, its classes must be the data's), or a timm model name with local weights (`--teacher-init`,
nothing is downloaded; the weights must hold the data's K-class head). Without `--teacher`, a small teacher is
fine-tuned first by the finetune stage into RUN/teacher (same data, seed and splits, `--teacher-epochs` epochs),
and the output says so; a resumed run reuses it.

Student: any timm model (`--student`, default vit_tiny_patch16_224 at the teacher's input size), trained from
scratch or from `--init` (local weights by name, as finetune's; refused, exit 2, when any of the student's weights
but its head would stay unloaded, unless `--init-partial`; the same holds for `--teacher-init`). The student's
input normalisation is the teacher's, so one batch feeds both; a teacher of another input size sees the batch
resized.

Objectives (`--kd`):
- soft: the fused `dermfast.ops.kd_loss` = alpha T^2 KL(teacher || student) + (1 - alpha) CE (DerMAE's KD).
- ssd: `dermfast.distill.SSDKDLoss` with the paper's weights (preset `ssd_kd`: CE, KD, rotated-view KD, sample
  similarity with the teacher's rank filter at `--ss-ratio`, RKD distance / angle, channel Gram through the
  official adapter, 1x1 conv + BatchNorm + ReLU) plus a 4-way `RotationHead` on the student's embeddings at
  `--rotation-weight` (0 = exactly the paper's objective, no head). Each batch also runs as its 90 / 180 / 270
  degree views. Embeddings are the models' pre-logits features; the Gram feature map is the last feature map (a
  ViT's patch tokens as a [D, g, g] map). The adapter's ReLU is kept when the teacher's feature map is
  non-negative (a post-ReLU CNN map, as the paper's ResNet-50) and left out when it is signed (a ViT's tokens),
  where a ReLU could never reach the teacher's negative Gram entries; the run says which. log.csv holds every
  term unweighted (`ce`, `kd`, ..., `gram`) and weighted (`weighted_ce`, ..., `weighted_gram`: the weighted ones
  sum to `loss`). The rotation head and the Gram adapter live in the
  trained module beside the student, so they are optimised (`param_groups`) and checkpointed; the final weights
  (checkpoint.safetensors, best.safetensors) hold the student alone, in the classifier format, so
  `python -m dermfast.evaluate --checkpoint RUN` and `python -m dermfast.export --checkpoint RUN` take them.

Teacher outputs are computed on the fly under no_grad (bf16 autocast on CUDA), or with `--cache-teacher` once per
epoch before the student's pass: a second loader with the same sampler, seed and augmentation replays the
epoch's batches (the loader contract: augmentation is a pure function of seed, rank, epoch and position), the
teacher's outputs are kept per batch on the device, and the student's pass reads batch k's. The student thus
trains on the full augmentation with exactly the views the teacher saw; the cache holds one epoch of teacher
outputs (logits; for ssd also embeddings and feature maps of all four views). Labels are checked against the
cache on the device (no host sync).

Evaluation is finetune's (balanced accuracy, accuracy, macro F1, AUROC, pAUC; best.safetensors by --select).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from dermfast.train.config import ConfigError, DataConfig
from dermfast.train.stages import Parts, Stage, register_stage


@dataclass
class DistillConfig(DataConfig):
    teacher: str | None = None       # a --stage finetune run / checkpoint, or a timm name (with --teacher-init); None = fine-tune a small one first
    teacher_init: str | None = None  # local weights of a timm --teacher (safetensors / timm .pth; never downloaded)
    teacher_img_size: int | None = None  # input size of a timm --teacher; None = --img-size
    teacher_epochs: int = 6          # no --teacher: epochs of the small teacher fine-tuned into RUN/teacher first
    student: str = "vit_tiny_patch16_224"  # timm model name (vit_tiny_patch16_224, mobilenetv2_100, efficientnet_b0, edgenext_small, ...)
    init: str | None = None          # local weights to start the student from (loaded by name, as finetune's --init)
    init_partial: bool = False       # start even if --init (or --teacher-init) leaves weights other than the head unloaded
    img_size: int | None = None      # student input size; None = the teacher's (64 for the teacher trained here)
    kd: Literal["soft", "ssd"] = "soft"  # soft: fused kd_loss (alpha T^2 KL + (1-alpha) CE); ssd: the SSD-KD terms (paper weights)
    temperature: float = 4.0         # T of the logit KL terms
    alpha: float = 0.9               # soft: weight of the KD term (1 - alpha on the CE)
    rotation_weight: float = 1.0     # ssd: weight of the student's 4-way rotation CE (RotationHead); 0 = the paper's objective, no head
    ss_ratio: float = 0.75           # ssd: share of the rotated views the teacher matches wrongly kept in the similarity term (the paper's ratio_ss; 1 = no filter)
    class_weights: bool | None = None  # weigh the CE by inverse class frequency; None = on for ssd (the paper's), off for soft
    cache_teacher: bool = False      # teacher outputs computed once per epoch before the student's pass: a second loader replays the epoch's exact (augmented) batches
    drop_path: float = 0.0           # student stochastic depth rate
    select: Literal["balanced_accuracy", "pauc", "auroc", "macro_f1", "accuracy"] = "balanced_accuracy"  # validation metric that picks best.safetensors
    positive: str | None = None      # the malignant class for pauc (default: melanoma / mel / malignant when present)
    epochs: int = 5                  # passes over the training data
    batch_size: int = 64             # images per optimiser micro-step on each rank
    warmup_epochs: float = 1.0       # linear warmup length, in epochs
    out: str = "runs/distill"        # run directory

    def validate(self) -> None:
        super().validate()
        import timm
        if not timm.is_model(self.student):
            raise ConfigError(f"unknown --student {self.student!r}: not a timm model name (e.g. vit_tiny_patch16_224, "
                              "mobilenetv2_100, efficientnet_b0, edgenext_small)")
        if self.kd not in ("soft", "ssd"):
            raise ConfigError(f"unknown --kd {self.kd!r}; accepted: soft, ssd")
        if not (self.temperature > 0 and 0.0 <= self.alpha <= 1.0 and self.rotation_weight >= 0
                and 0.0 <= self.ss_ratio <= 1.0):
            raise ConfigError("--temperature must be > 0, --alpha in [0, 1], --rotation-weight >= 0, "
                              "--ss-ratio in [0, 1]")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if self.teacher_epochs < 1:
            raise ConfigError(f"--teacher-epochs must be >= 1, got {self.teacher_epochs}")
        for name in ("img_size", "teacher_img_size"):
            v = getattr(self, name)
            if v is not None and v < 8:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 8, got {v}")
        for name in ("init", "teacher_init"):
            v = getattr(self, name)
            if v is not None and not Path(v).expanduser().exists():
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} does not exist")
        if self.teacher_init is not None and (self.teacher is None or Path(self.teacher).expanduser().exists()):
            raise ConfigError("--teacher-init goes with --teacher TIMM_NAME (a run or checkpoint carries its weights)")


# ---------------------------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------------------------

def teacher_kind(cfg: DistillConfig) -> str:
    """'trained_here' (no --teacher), 'checkpoint' (a run / file) or 'timm' (a name + --teacher-init).
    Raises ConfigError (one line) for a teacher that cannot be used; reads metadata only, no data."""
    if cfg.teacher is None:
        return "trained_here"
    if Path(cfg.teacher).expanduser().exists():
        from dermfast.models.classifier import CLASSIFIER_STAGES, CheckpointError, read_checkpoint
        try:
            _, meta = read_checkpoint(cfg.teacher)
        except CheckpointError as e:
            raise ConfigError(f"--teacher: {e}") from None
        if meta.get("stage") not in CLASSIFIER_STAGES or not isinstance(meta.get("model"), dict):
            what = f"a '{meta['stage']}' checkpoint" if meta.get("stage") else "not a dermfast classifier checkpoint"
            raise ConfigError(f"--teacher {cfg.teacher} is {what}: it needs a classifier from --stage finetune "
                              "(or a timm name with --teacher-init)")
        return "checkpoint"
    import timm
    if not timm.is_model(cfg.teacher):
        raise ConfigError(f"--teacher {cfg.teacher!r} is neither an existing run / checkpoint nor a timm model name")
    if cfg.teacher_init is None:
        raise ConfigError(f"--teacher {cfg.teacher} (a timm name) needs --teacher-init FILE: local weights with the "
                          "data's classifier head (nothing is downloaded; a random teacher teaches nothing)")
    return "timm"


def train_teacher(cfg: DistillConfig, run_dir: Path, log) -> Path:
    """Fine-tune the small default teacher (finetune's mae_vit demo model, class-weighted CE) into
    run_dir/teacher with the same data, seed and so the same splits; reused when already there (a resumed or
    repeated run)."""
    from dermfast.train.engine import train
    from dermfast.train.finetune import FinetuneConfig, FinetuneStage
    out = run_dir / "teacher"
    if (out / "checkpoint.safetensors").is_file():
        log(f"distill: reusing the teacher fine-tuned earlier in {out}")
        return out
    shared = {f.name for f in fields(DataConfig)} - {"out", "epochs", "resume", "overwrite", "max_steps",
                                                      "warmup_epochs", "lr", "blr", "checkpoint_every",
                                                      "eval_every", "log_every"}
    tcfg = FinetuneConfig(**{k: getattr(cfg, k) for k in shared}, epochs=cfg.teacher_epochs, out=str(out),
                          img_size=cfg.img_size, overwrite=True, warmup_epochs=min(1.0, cfg.warmup_epochs),
                          class_weights=True)  # a teacher that knows the rare classes is worth distilling
    from dermfast.train.context import fold_of, set_fold
    if fold_of(cfg) is not None:  # --folds: the teacher trains on this fold's training images only
        set_fold(tcfg, fold_of(cfg))
    log(f"distill: no --teacher given: fine-tuning a small teacher first ({tcfg.model}, preset {tcfg.preset}, "
        f"{tcfg.img_size} px, {tcfg.epochs} epochs) into {out}; pass --teacher RUN to use your own")
    train(FinetuneStage, tcfg)
    log(f"distill: teacher ready in {out}; distilling into {cfg.student}")
    return out


def load_teacher(cfg: DistillConfig, kind: str, num_classes: int, device):
    """(teacher in eval mode with frozen parameters, its ClassifierSpec, its class names or None)."""
    import torch

    from dermfast.models.classifier import (CheckpointError, ClassifierSpec, build_classifier, load_classifier,
                                            load_init)
    if kind == "timm":
        spec = ClassifierSpec(cfg.teacher, num_classes, int(cfg.teacher_img_size or cfg.img_size))
        model = build_classifier(spec)
        report = load_init(model, cfg.teacher_init)
        head = {k for k, _ in model.named_parameters() if k.startswith(_classifier_prefix(model))}
        bad = [k for k in head if k not in report.loaded]
        if bad or not report.loaded:
            raise ConfigError(f"--teacher-init {cfg.teacher_init}: no {num_classes}-class head for {cfg.teacher} in "
                              f"it ({', '.join(sorted(bad)[:2]) or 'nothing loaded'}): give a fine-tuned teacher")
        from dermfast.models.init_checkpoint import unloaded_required
        short = unloaded_required(model, spec, report)  # a teacher half random teaches noise
        if short and not cfg.init_partial:
            raise ConfigError(f"--teacher-init {cfg.teacher_init}: {len(short)} of the weights {cfg.teacher} needs did "
                              f"not load ({short[0]}, ...): give the weights it was trained with, or --init-partial")
        model.to(device)
        classes = None
    else:
        try:
            model, meta = load_classifier(cfg.teacher, device)
        except CheckpointError as e:
            raise ConfigError(f"--teacher: {e}") from None
        spec, classes = ClassifierSpec.from_dict(meta["model"]), list(meta["classes"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec, classes


def _classifier_prefix(model) -> str:
    head = model.get_classifier()
    for name, mod in model.named_modules():
        if mod is head:
            return name + "."
    raise ConfigError(f"{type(model).__name__}: cannot find its classifier head")


# ---------------------------------------------------------------------------------------------------------------
# What a network gives the losses
# ---------------------------------------------------------------------------------------------------------------

def feature_map(model, f):
    """forward_features output -> [N, C, H, W]: a CNN's map as is (NHWC models permuted), a ViT's patch tokens
    (prefix tokens dropped) as a [D, g, g] map."""
    if f.dim() == 4:
        return f.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else f
    if f.dim() == 3:
        tokens = f[:, getattr(model, "num_prefix_tokens", 0):]
        g = int(round(tokens.shape[1] ** 0.5))
        if g * g != tokens.shape[1]:
            raise ValueError(f"{type(model).__name__}: {tokens.shape[1]} patch tokens are not a square grid")
        return tokens.transpose(1, 2).reshape(f.shape[0], f.shape[2], g, g)
    raise ValueError(f"{type(model).__name__}: forward_features gave a {f.dim()}-d tensor; expected tokens or a map")


def network_outputs(model, x, feat: bool):
    """(logits, pre-logits embedding, feature map or None) from one forward_features pass of a timm model."""
    f = model.forward_features(x)
    return model.forward_head(f), model.forward_head(f, pre_logits=True), (feature_map(model, f) if feat else None)


def split_views(x, n: int):
    return (None, None) if x is None else (x[:n], x[n:])


def make_distill_module(student, rot_head, kd):
    """The module the engine trains: the student plus the heads the objective trains with it (RotationHead,
    SSDKDLoss with its Gram adapter). forward(x) gives the student's logits (evaluation, export);
    forward(x, ssd=True) gives the student's DistillOutputs over x and its three rotated views."""
    from torch import nn

    from dermfast.distill import DistillOutputs, rotate_views

    class _Distill(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student
            self.heads = nn.ModuleDict({k: v for k, v in (("rotation", rot_head), ("kd", kd)) if v is not None})

        def forward(self, x, ssd: bool = False):
            if not ssd:
                return self.student(x)
            import torch
            n = x.shape[0]
            views, _ = rotate_views(x)
            logits, embed, fmap = network_outputs(self.student, torch.cat([x, views]), feat=True)
            out = DistillOutputs(logits=logits[:n], rot_logits=logits[n:], embed=embed[:n], rot_embed=embed[n:],
                                 feat=fmap[:n])
            if "rotation" in self.heads:
                out.rot_head = self.heads["rotation"](embed)  # all four views: labels 0 (identity) .. 3
            return out

    return _Distill()


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------

@register_stage("distill", help="distil a fine-tuned teacher into a small student (soft KD or SSD-KD)")
class DistillStage(Stage):
    Config = DistillConfig

    def resolve(self, cfg: DistillConfig, world) -> DistillConfig:
        from dermfast.evaluate import require_sklearn
        require_sklearn("distill")
        self.kind = teacher_kind(cfg)
        if self.kind == "trained_here" and world.world_size > 1:
            raise ConfigError("under torchrun, give --teacher RUN (fine-tune one with --stage finetune first)")
        if cfg.img_size is None:
            if self.kind == "checkpoint":
                from dermfast.models.classifier import read_checkpoint
                cfg.img_size = int(read_checkpoint(cfg.teacher)[1]["img_size"])
            else:
                cfg.img_size = int(cfg.teacher_img_size or 64)
        if cfg.class_weights is None:
            cfg.class_weights = cfg.kd == "ssd"
        return super().resolve(cfg, world)

    def default_blr(self, cfg: DistillConfig) -> float:
        return 2e-3  # finetune's: lr 5e-4 at batch 64 for the small models here

    def build(self, run) -> Parts:
        import numpy as np
        import torch

        from dermfast.data.augment import Augment, classify_augment
        from dermfast.eval.metrics import default_positive
        from dermfast.models.classifier import ClassifierSpec, build_classifier, load_init
        from dermfast.train.engine import seed_everything

        cfg: DistillConfig = run.cfg
        if self.kind == "trained_here":
            cfg.teacher = str(run.wrote(train_teacher(cfg, run.run_dir, run.log)))
            self.kind = "checkpoint"
            seed_everything(cfg.seed)  # the student starts as it would with a teacher given
        data = self._teacher_splits(run, run.prepare_data())
        self.train_rec, self.val_rec = data.part("train"), data.part("val")
        self.classes = list(data.records.classes)
        k = len(self.classes)
        self.teacher, self.tspec, tclasses = load_teacher(cfg, self.kind, k, run.device)
        if tclasses is not None and tclasses != self.classes:
            raise ConfigError(f"teacher classes {tclasses} do not match the data's {self.classes}")
        if self.tspec.num_classes != k:
            raise ConfigError(f"the teacher has {self.tspec.num_classes} outputs, the data {k} classes")
        self.positive = cfg.positive or default_positive(self.classes)
        if cfg.positive is not None and cfg.positive not in self.classes:
            raise ConfigError(f"--positive {cfg.positive!r} is not a class of the data; accepted: "
                              f"{', '.join(self.classes)}")
        if cfg.select == "pauc" and self.positive is None:
            raise ConfigError(f"--select pauc needs a malignant class: name it with --positive (classes: "
                              f"{', '.join(self.classes)})")

        self.spec = ClassifierSpec(cfg.student, k, int(cfg.img_size), drop_path=cfg.drop_path,
                                   mean=self.tspec.mean, std=self.tspec.std)
        try:
            student = build_classifier(self.spec)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--student {cfg.student}: {e}") from None
        if cfg.init is not None:
            report = load_init(student, cfg.init)
            run.log(report.summary())
            from dermfast.models.classifier import group_keys
            from dermfast.models.init_checkpoint import unloaded_required
            short = unloaded_required(student, self.spec, report)  # as finetune: no silent partial start
            if short and not cfg.init_partial:
                raise ConfigError(f"--init {cfg.init}: {len(short)} of the weights --student {cfg.student} needs did "
                                  f"not load ({short[0]}, ...); see the listing above, or give --init-partial")
            if short:
                run.log(f"distill: --init-partial: {len(short)} student weights keep their initial values "
                        f"({', '.join(group_keys(short)[:4])})")
        student = student.to(run.device)

        counts = np.bincount(self.train_rec.labels, minlength=k)
        weight = None
        if cfg.class_weights:
            from dermfast.distill import inverse_frequency_weights
            weight = inverse_frequency_weights(torch.as_tensor(counts)).to(run.device)
        self.weight = weight
        rot_head = kd = None
        if cfg.kd == "ssd":
            from dermfast.distill import RotationHead, SSDKDLoss, preset
            s_ch, t_ch, s_dim, t_signed = self._probe(student, run.device)
            if cfg.rotation_weight > 0:
                rot_head = RotationHead(s_dim)
            run.log(f"distill: Gram adapter {s_ch} -> {t_ch} channels, 1x1 conv + BatchNorm" +
                    (" (no ReLU: the teacher's feature map is signed, a ReLU could not reach its negative Gram "
                     "entries)" if t_signed else " + ReLU (the teacher's feature map is non-negative)"))
            kd = SSDKDLoss(preset("ssd_kd", temperature=cfg.temperature, rotation=cfg.rotation_weight,
                                  ss_ratio=cfg.ss_ratio),
                           student_channels=s_ch, teacher_channels=t_ch, class_weight=weight,
                           adapter_relu=not t_signed)
        model = make_distill_module(student, rot_head, kd).to(run.device)

        self.aug = replace(classify_augment(self.spec.img_size), mean=self.spec.mean, std=self.spec.std)
        self.eval_aug = Augment(size=self.spec.img_size, mean=self.spec.mean, std=self.spec.std)  # = evaluate's
        skw = dict(class_fractions=None if cfg.balance == "none" else cfg.balance, neg_keep=cfg.neg_keep,
                   synth_ratio=cfg.synth_ratio)
        try:
            sampler = run.sampler(self.train_rec.labels, self.train_rec.source, **skw)
            loader = run.train_loader(self.train_rec, self.aug, sampler)
            self.cache_loader = None
            if cfg.cache_teacher:  # the same sampler, seed and augmentation: it replays the epoch's batches
                self.cache_loader = run.train_loader(
                    self.train_rec, self.aug, run.sampler(self.train_rec.labels, self.train_rec.source, **skw))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.val_loader = run.eval_loader(self.val_rec, self.eval_aug) if len(self.val_rec) else None
        if self.val_loader is None:
            run.log("distill: the validation split is empty: no evaluation, best.safetensors is not kept")
        self.cache, self.cache_epoch, self.cache_pos, self.resume_point = None, None, 0, None
        tsize = f", teacher input {self.tspec.img_size} px" if self.tspec.img_size != self.spec.img_size else ""
        return Parts(model=model, loader=loader, sampler=sampler,
                     summary=f"student {cfg.student} <- teacher {self.tspec.arch} ({cfg.teacher}{tsize}), "
                             f"--kd {cfg.kd}{' (cached per epoch)' if cfg.cache_teacher else ''}, {k} classes, "
                             f"{len(self.train_rec)} train, {len(self.val_rec)} val, loader {loader.backend}")

    def _teacher_splits(self, run, data):
        """Train and evaluate on the teacher run's splits when its splits.csv covers this dataset's real images
        (whatever --seed says), so the student's val / test images are ones the teacher never trained on; a
        teacher without such a file gets this run's own split, with a warning when the two overlap."""
        import numpy as np

        from dermfast.data.pipeline import PreparedData
        from dermfast.data.records import DatasetError
        from dermfast.data.splits import load_splits, save_splits
        p = Path(run.cfg.teacher).expanduser()
        tdir = p if p.is_dir() else p.parent
        if not (tdir / "splits.csv").is_file():
            run.log(f"distill: the teacher {p} comes without a splits.csv: make sure it never trained on this "
                    "run's val / test images")
            return data
        try:
            ts = load_splits(tdir / "splits.csv", data.records, strict=False)
        except DatasetError as e:
            raise ConfigError(f"--teacher: {e}") from None
        real = np.flatnonzero(data.records.source == 0)
        covered = np.concatenate([ts[k] for k in ("train", "val", "test")])
        if len(np.intersect1d(covered, real)) != len(real):
            leak = np.intersect1d(ts["train"], np.concatenate([data.splits["val"], data.splits["test"]]))
            if len(leak):
                run.log(f"distill: warning: the teacher trained on {len(leak)} of this run's val / test images "
                        f"(its splits.csv covers another dataset): validation scores are optimistic")
            return data
        splits = {"train": np.concatenate([np.setdiff1d(ts["train"], np.flatnonzero(data.records.source != 0)),
                                           np.flatnonzero(data.records.source != 0)]),
                  "val": ts["val"], "test": ts["test"]}
        if any(not np.array_equal(np.sort(splits[k]), np.sort(data.splits[k])) for k in splits):
            run.log(f"distill: using the teacher's splits ({tdir / 'splits.csv'}): the student's val / test images "
                    "are ones the teacher never trained on")
            if run.is_main:
                save_splits(splits, data.records, run.run_dir / "splits.csv")
        return PreparedData(data.records, splits, data.report)

    def _probe(self, student, device):
        """(student feature channels, teacher feature channels, student embedding width, whether the teacher's
        feature map takes negative values) from a 2-image pass (seeded noise, the global RNG untouched)."""
        import torch
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, self.spec.img_size, self.spec.img_size, generator=g).to(device)
        was = student.training
        student.eval()
        with torch.no_grad():
            try:
                _, s_emb, s_map = network_outputs(student, x, feat=True)
                _, _, t_map = network_outputs(self.teacher, self._teacher_input(x), feat=True)
            except ValueError as e:
                raise ConfigError(f"--kd ssd: {e}") from None
        student.train(was)
        return s_map.shape[1], t_map.shape[1], s_emb.shape[1], bool((t_map < 0).any())

    def _teacher_input(self, x):
        """The student's batch as the teacher takes it (same normalisation; resized when its size differs)."""
        if self.tspec.img_size != x.shape[-1]:
            import torch.nn.functional as F
            x = F.interpolate(x, size=(self.tspec.img_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=True)
        return x

    def _teacher_outputs(self, x, ssd: bool):
        """The teacher's view of a batch, under no_grad: logits [N, K] (soft) or a DistillOutputs over x and its
        rotated views (ssd); float32."""
        import torch

        from dermfast.distill import DistillOutputs, rotate_views
        with torch.no_grad():
            if not ssd:
                return self.teacher(self._teacher_input(x)).float()
            n = x.shape[0]
            views, _ = rotate_views(x)
            logits, embed, fmap = network_outputs(self.teacher, self._teacher_input(torch.cat([x, views])), True)
            logits, embed = logits.float(), embed.float()
            return DistillOutputs(logits=logits[:n], rot_logits=logits[n:], embed=embed[:n], rot_embed=embed[n:],
                                  feat=fmap[:n].float())

    def _fill_cache(self, run) -> None:
        """One pass of the replaying loader over this epoch: the teacher's outputs and labels per batch."""
        loader = self.cache_loader
        loader.set_epoch(run.epoch)
        self.cache = []
        with run.autocast():
            for batch in loader:
                self.cache.append((self._teacher_outputs(batch["image"], run.cfg.kd == "ssd"), batch["label"]))
        self.cache_epoch = run.epoch
        e, pos = self.resume_point or (None, 0)
        self.cache_pos = pos if e == run.epoch else 0
        self.resume_point = None
        run.log(f"distill: teacher outputs cached for epoch {run.epoch} ({len(self.cache)} batches)")

    def param_groups(self, model, cfg: DistillConfig):
        """The student's parameters (no decay on 1-D ones) and the objective's heads (RotationHead, the Gram
        adapter) in their own groups: everything trainable of the distill module, nothing of the teacher."""
        from dermfast.train.optim import param_groups
        groups = param_groups(model.student, cfg.weight_decay)
        if len(model.heads):
            groups += [{**g, "name": "heads"} for g in param_groups(model.heads, cfg.weight_decay)]
        return groups

    def step(self, batch, run):
        import torch

        from dermfast.ops import kd_loss
        cfg: DistillConfig = run.cfg
        x, y = batch["image"], batch["label"]
        ssd = cfg.kd == "ssd"
        if self.cache_loader is not None:
            if self.cache_epoch != run.epoch:
                self._fill_cache(run)
            if self.cache_pos >= len(self.cache):
                from dermfast.train.engine import TrainingError
                raise TrainingError(f"--cache-teacher: epoch {run.epoch} has more batches than the cached "
                                    f"{len(self.cache)}: the replaying loader and the training loader disagree")
            teacher, cached_y = self.cache[self.cache_pos]
            self.cache_pos += 1
            torch._assert_async((cached_y == y).all(), "--cache-teacher: cached batch labels differ from the batch")
        else:
            teacher = self._teacher_outputs(x, ssd)
        dev = x.device.type
        if not ssd:
            logits = run.model(x)
            with torch.autocast(dev, enabled=False):
                # labels come from the validated data layer (in range by construction): no per-step host check;
                # an out-of-range one would give a NaN loss, which the engine skips and counts
                loss = kd_loss(logits.float(), teacher, y, cfg.temperature, cfg.alpha, self.weight,
                               validate_target=False)
            return loss, {"acc": (logits.argmax(1) == y).float().mean()}
        student = run.model(x, ssd=True)
        rot_labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
        with torch.autocast(dev, enabled=False):
            for f in ("logits", "rot_logits", "embed", "rot_embed", "feat", "rot_head"):
                v = getattr(student, f)
                if v is not None:
                    setattr(student, f, v.float())
            crit = run.raw_model.heads["kd"]
            loss, terms = crit(student, teacher, y, rot_labels)
        # each term unweighted (its own scale) and weighted (its share of the loss: these sum to it)
        return loss, {**terms, **crit.weighted(terms), "acc": (student.logits.argmax(1) == y).float().mean()}

    def evaluate(self, run) -> dict | None:
        if self.val_loader is None:
            return None
        from dermfast.evaluate import validation_metrics
        return validation_metrics(run.model, self.val_loader, run.device, self.classes, self.positive,
                                  autocast=run.autocast())

    def selection(self, cfg: DistillConfig):
        return (cfg.select, "max")

    def extra_state(self):
        if self.cache_loader is None:
            return {}, {}
        return {}, {"cache_epoch": self.cache_epoch, "cache_pos": self.cache_pos}

    def load_extra_state(self, tensors, meta) -> None:
        if meta.get("cache_epoch") is not None:
            self.resume_point = (int(meta["cache_epoch"]), int(meta["cache_pos"]))

    def final_weights(self, run):
        """The student alone, under its own names (the classifier format evaluate / export rebuild)."""
        state = run.model_state_dict()
        return {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}

    def final_meta(self, run) -> dict:
        from dermfast.models.classifier import classifier_metadata
        cfg: DistillConfig = run.cfg
        return classifier_metadata(self.spec, self.classes, stage="distill", positive=self.positive,
                                   init=cfg.init, teacher=cfg.teacher, teacher_model=self.tspec.to_dict(),
                                   kd=cfg.kd, temperature=cfg.temperature)

    def finish(self, run) -> list:
        from dermfast.eval.baseline import run_baseline  # RUN/baseline/: the trivial baseline evaluate compares with
        files = run_baseline(run, self.train_rec, self.val_rec, self.classes, self.positive, "distill")
        run.log(f"distill: evaluate with `python -m dermfast.evaluate --checkpoint {run.run_dir}`, export with "
                f"`python -m dermfast.export --checkpoint {run.run_dir} --format onnx`")
        return files
