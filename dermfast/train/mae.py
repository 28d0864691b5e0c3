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
    # --method tedmae (dermfast/models/tedmae.py): + EMA teacher on the whole image, feature distillation, EC, DF
    method: Literal["mae", "tedmae"] = "mae"
    ema_start: float = 0.996         # teacher EMA momentum at the first step; cosine schedule (BYOL / DINO) ...
    ema_end: float = 1.0             # ... to this at the last step
    distill_weight: float = 1.0      # loss = mae_loss + distill_weight * smooth-L1(head(student), teacher target)
    df: bool = True                  # Dynamic Feature fusion of the teacher's top --df-layers blocks (off: last block)
    df_layers: int = 3               # teacher blocks DF fuses (the last n)
    df_temperature: float = 0.1      # DF's softmax temperature over layers (large: their uniform mean, data2vec's)
    ec: Literal["none", "student", "teacher", "both"] = "student"  # Exterior Conversion on whose input
    ec_kernel_sizes: tuple[int, ...] = (1, 3, 5, 7)  # EC random-convolution kernel sizes (odd), one drawn per image
    ec_alpha: tuple[float, float] = (0.0, 1.0)  # EC mix weight range: (1 - a) image + a conv(image), a ~ U(lo, hi)

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
        if self.method == "tedmae":
            self._validate_tedmae(preset)
        if preset.img_size % preset.patch_size:
            sizes = ", ".join(str(preset.patch_size * k) for k in range(4, 9))
            raise ConfigError(f"--img-size {preset.img_size} is not a multiple of preset {self.preset}'s patch "
                              f"size {preset.patch_size}; try one of {sizes}")
        if preset.img_size < 2 * preset.patch_size:
            raise ConfigError(f"--img-size {preset.img_size} is too small for patch size {preset.patch_size}")

    def _validate_tedmae(self, preset) -> None:
        from dermfast.models.exterior_conversion import check_kernel_sizes
        if self.mask_ratio_range is not None:
            raise ConfigError("--method tedmae does not support --mask-ratio-range yet (the distillation gathers "
                              "the teacher's features at a fixed count of visible positions); drop one of them")
        if self.fsdp:
            raise ConfigError("--method tedmae does not support --fsdp yet (the EMA teacher is a full copy "
                              "updated from unsharded student weights); use DDP (torchrun without --fsdp)")
        if not 0.0 <= self.ema_start <= self.ema_end <= 1.0:
            raise ConfigError(f"--ema-start / --ema-end need 0 <= start <= end <= 1, got {self.ema_start} "
                              f"{self.ema_end}")
        if self.distill_weight < 0:
            raise ConfigError(f"--distill-weight must be >= 0, got {self.distill_weight}")
        if self.df and not 1 <= self.df_layers <= preset.depth:
            raise ConfigError(f"--df-layers must be in 1..{preset.depth} (preset {self.preset}'s depth), got "
                              f"{self.df_layers}")
        if self.df_temperature <= 0:
            raise ConfigError(f"--df-temperature must be > 0, got {self.df_temperature}")
        try:
            sizes = check_kernel_sizes(self.ec_kernel_sizes)
        except ValueError as e:
            raise ConfigError(f"--ec-kernel-sizes: {e}") from None
        if self.ec != "none" and max(sizes) // 2 >= preset.img_size:
            raise ConfigError(f"--ec-kernel-sizes {max(sizes)} is too large for {preset.img_size} px images")
        lo, hi = self.ec_alpha
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"--ec-alpha needs 0 <= lo <= hi <= 1, got {lo} {hi}")

    def tedmae_options(self):
        from dermfast.models.tedmae import TEDMAEOptions
        return TEDMAEOptions(distill_weight=self.distill_weight, df=self.df, df_layers=self.df_layers,
                             df_temperature=self.df_temperature)

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
        if cfg.method == "tedmae" and type(self) is MAEStage:
            # One stage name, two behaviours: TEDMAE's hooks (EMA after_step, teacher in extra_state) live on a
            # subclass this instance becomes, so plain MAE keeps no after_step (it would cost a host sync per step).
            self.__class__ = TEDMAEStage
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
        if cfg.method == "tedmae":
            from dermfast.models.tedmae import TEDMAE
            model = TEDMAE(self.preset, cfg.tedmae_options()).to(run.device)
        else:
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


class TEDMAEStage(MAEStage):
    """`--stage mae --method tedmae` (not registered: MAEStage.resolve turns a tedmae run's stage into this).
    Per step: EC draws on the host (`ec_params`, keyed by (seed, micro_step, sample)), the student + teacher
    forward in one model call (compiled with it under --compile), and after each applied optimiser step the EMA
    update (outside autograd and the compiled graph). Checkpoints keep the teacher and the EMA update count in
    `extra_state`; RUN/checkpoint.safetensors holds exactly an MAE checkpoint's tensors (the student), and
    RUN/teacher.safetensors the teacher encoder under the same encoder keys (either loads as an --init)."""

    def build(self, run) -> Parts:
        parts = super().build(run)
        cfg = run.cfg
        self.ema_updates = 0
        self._raw = parts.model  # unwrapped: the teacher and the EMA pairs live on it
        o = cfg.tedmae_options()
        parts.summary += (f", TEDMAE (EMA {cfg.ema_start:g} -> {cfg.ema_end:g}, distill weight {o.distill_weight:g}, "
                          f"DF {'top ' + str(o.df_layers) + ' layers' if o.df else 'off'}, EC {cfg.ec})")
        return parts

    def step(self, batch, run):
        from dermfast.models.exterior_conversion import ec_params
        cfg = run.cfg
        imgs = batch["image"]
        ec = {}
        for branch, (name, on) in enumerate((("student_ec", cfg.ec in ("student", "both")),
                                             ("teacher_ec", cfg.ec in ("teacher", "both")))):
            if on:
                p = ec_params(imgs.shape[0], imgs.shape[1], cfg.ec_kernel_sizes, cfg.seed, run.micro_step,
                              run.sample_offset, tuple(cfg.ec_alpha), branch=branch).to(imgs.device)
                ec[name] = (p.weight, p.alpha)
        loss, _, _, parts = run.model(imgs, seed=cfg.seed, step=run.micro_step, sample_offset=run.sample_offset,
                                      return_parts=True, **ec)
        return loss, parts

    def after_step(self, run) -> None:
        from dermfast.models.tedmae import ema_momentum
        cfg = run.cfg
        m = ema_momentum(run.step - 1, run.total_steps, cfg.ema_start, cfg.ema_end)  # spans the engine's schedule
        self._raw.ema_update_(m)
        self.ema_updates += 1

    def extra_state(self):
        tensors = {f"teacher/{k}": v.detach().cpu().clone() for k, v in self._raw.teacher_state_dict().items()}
        return tensors, {"ema_updates": self.ema_updates}

    def load_extra_state(self, tensors, meta) -> None:
        from dermfast.train.config import ConfigError
        teacher = {k[len("teacher/"):]: v for k, v in tensors.items() if k.startswith("teacher/")}
        if not teacher:
            raise ConfigError("this checkpoint has no TEDMAE teacher (written by --method mae?): resume it with "
                              "the method it was written with")
        self._raw.load_teacher_state_dict(teacher)
        self.ema_updates = int(meta.get("ema_updates", 0))

    def final_meta(self, run) -> dict:
        return {**super().final_meta(run), "method": "tedmae", "tedmae": run.cfg.tedmae_options().to_dict(),
                "ema_updates": self.ema_updates}

    def final_weights(self, run):
        return {k: v for k, v in run.model_state_dict().items() if not k.startswith("distill_head.")}

    def finish(self, run) -> list:
        files = super().finish(run)
        if not run.is_main:
            return files
        from dermfast.train import checkpoint as ckpt
        from dermfast.train.config import config_dict
        path = run.run_dir / "teacher.safetensors"
        teacher = {k: v.detach().cpu().contiguous() for k, v in run.raw_model.teacher_state_dict().items()}
        ckpt.save_safetensors(path, teacher, {"stage": "mae", "step": run.step, "epoch": run.epoch,
                                              "config": config_dict(run.cfg), **self.final_meta(run),
                                              "role": "teacher"})
        return [*files, path]
