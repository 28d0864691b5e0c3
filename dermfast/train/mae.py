"""MAE pretraining stage: data -> MaskedAutoencoderViT; the engine runs the loop.

`--mask-ratio-range LO HI` trains on ragged batches (one mask ratio per sample, packed encoder tokens).

Run directory (besides the engine's files): reconstruction.png, data_report.csv, splits.csv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dermfast.train.config import ConfigError, DataConfig
from dermfast.train.stages import Parts, Stage, register_stage


@dataclass
class MAEConfig(DataConfig):
    preset: str = "demo"             # model preset: demo (CPU), vit_b16, vit_l16, vit_h14 (the paper's)
    mask_ratio: float | None = None  # fraction of patches removed; None = the preset's (0.75)
    mask_ratio_range: tuple[float, float] | None = None  # ragged batches: per-sample ratio in [lo, hi] (e.g. 0.6 0.9)
    img_size: int | None = None      # image side in pixels; None = the preset's (demo 64, others 224)
    augment: Literal["mae", "none"] = "mae"  # mae: random resized crop (0.2-1) + flip; none: the full image, no flip
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (the MAE paper's)
    out: str = "runs/mae"            # run directory

    def validate(self) -> None:
        super().validate()
        from dermfast.models.mae import presets
        if self.preset not in presets():
            raise ConfigError(f"unknown preset {self.preset!r}; accepted: {', '.join(presets())}")
        if self.mask_ratio is not None and not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_ratio_range is not None:
            lo, hi = self.mask_ratio_range
            if not 0.0 <= lo <= hi < 1.0:
                raise ConfigError(f"--mask-ratio-range needs 0 <= lo <= hi < 1, got {lo} {hi}")
            if self.compile:  # host-side ragged layout + per-step token counts: not a compiled graph (yet)
                raise ConfigError("--compile does not support --mask-ratio-range yet (the packed token count "
                                  "changes every step); drop one of them")
        preset = self.preset_obj()
        if preset.img_size % preset.patch_size:
            sizes = ", ".join(str(preset.patch_size * k) for k in range(4, 9))
            raise ConfigError(f"--img-size {preset.img_size} is not a multiple of preset {self.preset}'s patch "
                              f"size {preset.patch_size}; try one of {sizes}")
        if preset.img_size < 2 * preset.patch_size:
            raise ConfigError(f"--img-size {preset.img_size} is too small for patch size {preset.patch_size}")

    def preset_obj(self):
        """The model preset with --img-size / --mask-ratio applied."""
        from dermfast.models.mae import MAEPreset, get_preset
        preset = get_preset(self.preset)
        over = {k: v for k, v in (("img_size", self.img_size), ("mask_ratio", self.mask_ratio)) if v is not None}
        return MAEPreset(**{**preset.to_dict(), **over}) if over else preset


@register_stage("mae", help="masked-autoencoder pretraining of a ViT (He et al. 2021)")
class MAEStage(Stage):
    Config = MAEConfig

    def resolve(self, cfg: MAEConfig, world) -> MAEConfig:
        preset = cfg.preset_obj()
        cfg.img_size, cfg.mask_ratio = preset.img_size, preset.mask_ratio  # recorded in config.yaml
        return super().resolve(cfg, world)

    def default_blr(self, cfg: MAEConfig) -> float:
        return cfg.preset_obj().blr

    def build(self, run) -> Parts:
        from dermfast.data.augment import Augment, mae_augment
        from dermfast.models.mae import MaskedAutoencoderViT

        cfg: MAEConfig = run.cfg
        data = run.prepare_data(require_labels=False)
        self.records = data.part("train")  # pretraining sees the training split only; val / test stay unseen
        self.preset = cfg.preset_obj()
        # ragged: packed encoder tokens through MaskedAttention blocks (same weights and state_dict keys)
        model = MaskedAutoencoderViT(self.preset, ragged=cfg.mask_ratio_range is not None).to(run.device)
        self.aug = mae_augment(cfg.img_size) if cfg.augment == "mae" else \
            Augment(size=cfg.img_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0)
        labels = self.records.labels
        if (cfg.balance != "none" or cfg.neg_keep is not None) and labels.min() < 0:
            raise ConfigError("--balance and --neg-keep need labelled data")
        try:
            sampler = run.sampler(labels.clip(min=0), self.records.source,
                                  class_fractions=None if cfg.balance == "none" else cfg.balance,
                                  neg_keep=cfg.neg_keep, synth_ratio=cfg.synth_ratio)
            loader = run.train_loader(self.records, self.aug, sampler)
        except ValueError as e:  # e.g. a sampler configuration that leaves an epoch empty
            raise ConfigError(str(e)) from None
        return Parts(model=model, loader=loader, sampler=sampler,
                     summary=f"preset {cfg.preset}, {len(self.records)} images, loader {loader.backend}")

    def step(self, batch, run):
        rng = run.cfg.mask_ratio_range
        # ragged: each rank's loss weighted by its share of the removed patches, so N ranks of batch b train as
        # one process of batch N x b (the keep counts are host values of the global sample index)
        extra = {} if rng is None else {"mask_ratio_range": tuple(rng)}
        if rng is not None and run.world.world_size > 1:
            extra["dp_batch"] = batch["image"].shape[0] * run.world.world_size
        loss, _, _ = run.model(batch["image"], seed=run.cfg.seed, step=run.micro_step,
                               sample_offset=run.sample_offset, **extra)
        return loss, {}

    def final_meta(self, run) -> dict:
        return {"preset": self.preset.to_dict()}

    def finish(self, run) -> list:
        """reconstruction.png: 8 training images, one row each of original / masked / reconstruction /
        reconstruction with the visible patches pasted back, labelled."""
        from dermfast.eval.mae_vis import reconstruction_grid
        from dermfast.eval.plots import save_labelled_grid
        vis_records = self.records.subset(range(min(8, len(self.records))))
        vis = next(iter(run.eval_loader(vis_records, self.aug, batch_size=8, workers=0)))["image"]
        if not run.is_main and not run.cfg.fsdp:  # FSDP: every rank takes part in the forward pass
            return []
        grid = reconstruction_grid(run.raw_model, vis, seed=run.cfg.seed)
        if not run.is_main:
            return []
        p = self.preset
        labels = ["original", f"masked ({p.mask_ratio:.0%})", "reconstruction", "recon. + visible"]
        note = ("norm-pix loss: each reconstructed patch is shown with the true patch's mean and variance "
                "restored (as in the MAE paper's figures)") if p.norm_pix_loss else None
        return [save_labelled_grid(grid, run.run_dir / "reconstruction.png", labels, note,
                                   scale=max(1, 256 // vis.shape[-1]))]
