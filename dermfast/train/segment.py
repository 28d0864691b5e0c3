"""Segmentation stage: a binary lesion mask per image.

    python -m dermfast.train --stage segment [--model unet|vit|otsu] [--encoder NAME] [--init RUN_OR_FILE] [--data D]

Models (`dermfast.models.segmenter`):
- `unet` (default): a U-Net decoder on a timm CNN (`--encoder`, default resnet10t), from scratch: the small-data
  choice (on the embedded dataset it beats the Otsu baseline within a few CPU minutes; README, segmentation).
- `vit`: a UNETR-style progressive-upsampling head on a ViT encoder: `--encoder mae_vit` (default) shaped by
  `--preset` or by an MAE / TEDMAE `--init` run (its encoder weights are loaded), or a timm ViT name.
- `otsu`: no training: Otsu's threshold on the smoothed blue channel, largest component, holes filled
  (`dermfast.eval.otsu`); writes the run folder (splits.csv, config.yaml, checkpoint.safetensors describing
  the model, metrics.json on the validation split) so `python -m dermfast.evaluate --checkpoint RUN` works alike.
Loss: BCE + soft Dice (per image, then the mean) on the logits; images without a mask file are left out of
training. Validation: Dice / Jaccard / HD95 per image at the original resolution (`dermfast.eval.segment_eval`)
at each epoch end; best.safetensors is kept by validation Dice. At the end the Otsu baseline is scored on the
same validation images and both are printed and written to RUN/val_metrics.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from dermfast.train.config import ConfigError, DataConfig
from dermfast.train.stages import Parts, Stage, register_stage


@dataclass
class SegmentConfig(DataConfig):
    model: Literal["unet", "vit", "otsu"] = "unet"  # unet: CNN + U-Net decoder; vit: ViT + UNETR head; otsu: no training
    encoder: str | None = None       # unet: a timm CNN (default resnet10t); vit: mae_vit (default) or a timm ViT name
    preset: str | None = None        # vit + mae_vit: the MAE preset; none = --init's, else demo
    init: str | None = None          # vit: the encoder's weights: an MAE / TEDMAE run or checkpoint, or a timm ViT's
    img_size: int | None = None      # side the model sees; None = 128 (unet) or the encoder's preset size (vit)
    decoder_width: int = 32          # channels of the full-resolution decoder stage (doubled per scale, at most x8)
    dice_weight: float = 1.0         # loss = BCE + dice_weight * soft Dice loss
    epochs: int = 10                 # passes over the training data (250 embedded images: about 9 CPU minutes, README)
    batch_size: int = 16             # images per optimiser micro-step on each rank
    warmup_epochs: float = 1.0       # linear warmup length, in epochs
    out: str = "runs/segment"        # run directory

    def validate(self) -> None:
        super().validate()
        if self.dice_weight < 0:
            raise ConfigError(f"--dice-weight must be >= 0, got {self.dice_weight}")
        if self.decoder_width < 4:
            raise ConfigError(f"--decoder-width must be >= 4, got {self.decoder_width}")
        if self.init is not None and not Path(self.init).expanduser().exists():
            raise ConfigError(f"--init {self.init!r} does not exist")
        if self.init is not None and self.model != "vit":
            raise ConfigError(f"--init initialises the ViT encoder of --model vit, not --model {self.model}")
        if self.img_size is not None and self.img_size < 16:
            raise ConfigError(f"--img-size must be >= 16, got {self.img_size}")


def _finetune_view(cfg: SegmentConfig):
    """The fields `dermfast.train.finetune.encoder_choice` reads, for the mae_vit encoder of --model vit."""
    return SimpleNamespace(model="mae_vit", preset=cfg.preset, init=cfg.init)


def segmenter_spec(cfg: SegmentConfig):
    from dermfast.models.segmenter import DEFAULT_ENCODER, SegmenterSpec
    encoder = None if cfg.model == "otsu" else (cfg.encoder or DEFAULT_ENCODER[cfg.model])
    preset = None
    if cfg.model == "vit" and encoder == "mae_vit":
        from dermfast.train.finetune import encoder_choice
        preset = encoder_choice(_finetune_view(cfg)).preset
    return SegmenterSpec(cfg.model, encoder, int(cfg.img_size), mae_preset=preset, decoder_width=cfg.decoder_width)


def seg_augment(size: int):
    """Training augmentation: a crop of 35-100% of the image, flips both ways, quarter turns (a lesion has no
    up), mild colour jitter; the data layer moves the mask with the geometry."""
    from dermfast.data.augment import Augment
    return Augment(size=size, scale=(0.35, 1.0), flip=0.5, vflip=0.5, rot90=True, brightness=0.1, contrast=0.1,
                   saturation=0.1, hue=0.01)


def seg_loss(logits, target):
    """BCE + soft Dice loss (per image: 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), then the mean).
    logits, target: [B, 1, S, S]; target in {0, 1}. Returns (bce, dice loss)."""
    import torch.nn.functional as F
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce, dice.mean()


def _masked_part(records, data_desc: str):
    from dermfast.eval.segment_eval import with_masks
    if not records.has_masks:
        raise ConfigError(f"--stage segment needs lesion masks and {data_desc} has none: give PH2, ISIC 2017 / "
                          "2018 task 1 (*_segmentation.png), a folder of image + mask pairs, or no --data "
                          "(the embedded dataset draws its masks)")
    return with_masks(records)[1]


@register_stage("segment", help="lesion segmentation (U-Net on a timm CNN, ViT + UNETR-style head, or Otsu)")
class SegmentStage(Stage):
    Config = SegmentConfig

    def resolve(self, cfg: SegmentConfig, world) -> SegmentConfig:
        if cfg.img_size is None:
            if cfg.model == "vit":
                if (cfg.encoder or "mae_vit") == "mae_vit":
                    from dermfast.train.finetune import encoder_choice
                    cfg.img_size = int(encoder_choice(_finetune_view(cfg)).preset["img_size"])
                else:
                    from dermfast.models.classifier import default_img_size
                    cfg.img_size = default_img_size(cfg.encoder)
            else:
                cfg.img_size = 128
        if cfg.model == "vit":
            try:
                spec = segmenter_spec(cfg)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            patch = int(spec.mae_preset["patch_size"]) if spec.mae_preset else None
            if patch and cfg.img_size % patch:
                raise ConfigError(f"--img-size {cfg.img_size} is not a multiple of the patch size {patch}")
        elif cfg.encoder is not None and cfg.model == "unet":
            import timm
            if not timm.is_model(cfg.encoder):
                raise ConfigError(f"unknown --encoder {cfg.encoder!r}: not a timm model (e.g. resnet10t, regnetx_002)")
        if cfg.model == "otsu":
            if world.world_size > 1:
                raise ConfigError("--model otsu trains nothing: run it as one process, not under torchrun")
        return super().resolve(cfg, world)

    def trains(self, cfg: SegmentConfig) -> bool:
        return cfg.model != "otsu"

    def run_without_training(self, cfg: SegmentConfig, run_dir: Path) -> str:
        return run_otsu(cfg, run_dir)

    def default_blr(self, cfg: SegmentConfig) -> float:
        return 1.6e-2  # lr 1e-3 at batch 16: Adam's usual rate for a U-Net from scratch

    def build(self, run) -> Parts:
        from dermfast.models.classifier import load_init
        from dermfast.models.segmenter import build_segmenter

        cfg: SegmentConfig = run.cfg
        data = run.prepare_data(require_labels=False)
        desc = cfg.data or "the embedded dataset"
        self.train_rec = _masked_part(data.part("train"), desc)
        self.val_rec = _masked_part(data.part("val"), desc)
        if len(self.train_rec) == 0:
            raise ConfigError(f"no training image of {desc} has a mask file")
        self.spec = segmenter_spec(cfg)
        try:
            model = build_segmenter(self.spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.init_report = None
        if cfg.init is not None:
            self.init_report = load_init(model.encoder, cfg.init, resample_pos_embed=self.spec.encoder != "mae_vit")
            run.log(self.init_report.summary())
            if not self.init_report.loaded:
                raise ConfigError(f"--init {cfg.init}: none of its tensors fits the {self.spec.encoder} encoder")
        model = model.to(run.device)
        self.meta = {"img_size": self.spec.img_size, "mean": list(self.spec.mean), "std": list(self.spec.std)}
        aug = seg_augment(self.spec.img_size)
        labels = self.train_rec.labels.clip(min=0)
        try:
            sampler = run.sampler(labels, self.train_rec.source)
            loader = run.train_loader(self.train_rec, aug, sampler)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if len(self.val_rec) == 0:
            run.log("segment: the validation split has no masked image: no evaluation, best.safetensors is not kept")
        start = f"init {cfg.init}" if cfg.init else "from scratch"
        return Parts(model=model, loader=loader, sampler=sampler,
                     summary=f"{cfg.model} ({self.spec.encoder}, {start}), {self.spec.img_size} px, "
                             f"{len(self.train_rec)} train / {len(self.val_rec)} val images with masks, "
                             f"loader {loader.backend}")

    def step(self, batch, run):
        cfg: SegmentConfig = run.cfg
        logits = run.model(batch["image"])
        bce, dice_loss = seg_loss(logits, batch["mask"].float())
        return bce + cfg.dice_weight * dice_loss, {"bce": bce, "dice_loss": dice_loss}

    def evaluate(self, run) -> dict | None:
        if len(self.val_rec) == 0:
            return None
        from dermfast.eval.segment_eval import score
        s = score(run.model, self.meta, self.val_rec, run.device, batch_size=run.batch_size,
                  autocast=run.autocast(), baseline=False)["model"].summary()
        return {"dice": s["dice"], "jaccard": s["jaccard"], "hd95": s["hd95"]}

    def selection(self, cfg):
        return ("dice", "max")

    def final_meta(self, run) -> dict:
        from dermfast.models.segmenter import segmenter_metadata
        return segmenter_metadata(self.spec, init=run.cfg.init)

    def finish(self, run) -> list:
        if len(self.val_rec) == 0:
            return []
        from dermfast.eval.segment_eval import score
        run.model.eval()  # every rank takes part in the forward passes (FSDP); rank 0 writes
        res = score(run.model, self.meta, self.val_rec, run.device, batch_size=run.batch_size,
                    autocast=run.autocast())
        if not run.is_main:
            return []
        out = {"split": "val", "model": res["model"].summary(), "baseline_otsu": res["otsu"].summary()}
        path = run.run_dir / "val_metrics.json"
        path.write_text(json.dumps(out, indent=2))
        m, o = out["model"], out["baseline_otsu"]
        run.log(f"segment: validation (last weights) Dice {m['dice']:.4f} / Jaccard {m['jaccard']:.4f} / HD95 "
                f"{m['hd95']:.2f} px; Otsu baseline Dice {o['dice']:.4f} / Jaccard {o['jaccard']:.4f} / HD95 "
                f"{o['hd95']:.2f} px; evaluate with `python -m dermfast.evaluate --checkpoint {run.run_dir}`")
        return [path]


def run_otsu(cfg: SegmentConfig, run_dir: Path) -> str:
    """--model otsu: prepare the data (splits.csv, data_report.csv), write config.yaml, a weightless
    checkpoint.safetensors whose metadata says `otsu` (what evaluate reads), run.json (finished) and
    val_metrics.json. Returns the line the CLI prints. The engine has taken the folder's lock and made its checks
    (another run there, --overwrite) as for any run."""
    from datetime import datetime, timezone

    from dermfast.data.pipeline import prepare_data
    from dermfast.eval.segment_eval import score
    from dermfast.models.segmenter import segmenter_metadata
    from dermfast.train import checkpoint as ckpt
    from dermfast.train.config import config_dict, save_config
    data = prepare_data(cfg.data, run_dir, synthetic=None, seed=cfg.seed, require_labels=False,
                        toy_images=cfg.toy_images, toy_image_size=cfg.toy_image_size, progress=cfg.progress)
    desc = cfg.data or "the embedded dataset"
    val = _masked_part(data.part("val"), desc)
    save_config(cfg, run_dir / "config.yaml")
    spec = segmenter_spec(cfg)
    meta = segmenter_metadata(spec, init=None)
    ckpt.save_safetensors(run_dir / "checkpoint.safetensors", {},
                          {"stage": "segment", "step": 0, "epoch": 0, "config": config_dict(cfg), **meta})
    s = score(None, meta, val, "cpu", baseline=False)["model"].summary()
    (run_dir / "val_metrics.json").write_text(json.dumps({"split": "val", "model": s, "baseline_otsu": s}, indent=2))
    ckpt.write_json(run_dir / "run.json", {"stage": "segment", "status": "finished", "step": 0, "world_size": 1,
                                           "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    fmt = (lambda v: "undefined" if v is None else f"{v:.4f}")
    return (f"segment: otsu (no training), validation n {s['n']}: Dice {fmt(s['dice'])}, Jaccard {fmt(s['jaccard'])}, "
            f"HD95 {fmt(s['hd95'])} px; wrote {run_dir}/{{config.yaml, splits.csv, data_report.csv, "
            f"checkpoint.safetensors, val_metrics.json, run.json}}; evaluate with "
            f"`python -m dermfast.evaluate --checkpoint {run_dir}`")
