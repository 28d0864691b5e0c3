"""`python -m dermfast.train --stage synth`: class-conditioned latent diffusion (DerMAE's synthesis recipe).

One run, two phases keyed on the optimiser step (so --resume crosses the boundary exactly):
  1. steps [0, --vae-steps): the AutoencoderKL learns to reconstruct the real training images (L1 + L2 + a small
     KL); the UNet is idle (its grads stay None, so AdamW leaves it alone).
  2. the rest: the VAE is frozen; the UNet learns noise prediction on its latents (scaled to unit variance by
     the first batch, LDM's rule), labels dropped to the null class with --p-uncond (classifier-free guidance),
     plus an optional perceptual term on the decoded x0 estimate. EMA weights (diffusers EMAModel) follow.
Why one run rather than two commands: the default (no arguments) gives a usable model in one CPU process, the
data is prepared once, and one folder holds everything `synthesize` needs. The VAE is trained first and then
frozen (not jointly) because the denoiser needs a fixed latent space. With --vae PATH phase 1 is skipped.
Under torchrun (DDP) give --vae: DDP needs the trainable parameter set fixed for the whole run.

Run folder (besides the engine's files): samples/step_XXXXXXXX.png (a grid per class every --sample-every
denoiser steps, EMA weights), samples.png (final grid), diffusers/ (the bundle `python -m dermfast.synthesize`
reads; layout in dermfast.synth.models).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dermfast.train.config import ConfigError, DataConfig
from dermfast.train.stages import Parts, Stage, register_stage


@dataclass
class SynthConfig(DataConfig):
    size: Literal["tiny", "small"] = "tiny"  # model size: tiny (CPU demo: VAE 32-64 ch, UNet 32-64 ch), small (GPU)
    img_size: int = 32               # image side in pixels the model generates
    vae: str | None = None           # local diffusers AutoencoderKL folder (or a synth run) to use frozen; skips phase 1
    vae_steps: int = 120             # optimiser steps of phase 1 (VAE training) before the denoiser; ignored with --vae
    kl_weight: float = 1e-5          # weight of the VAE's KL term (per latent element)
    perceptual: str = "off"          # perceptual-loss features: off | mae:RUN (dermfast MAE encoder) | PATH (VGG16 state dict)
    perceptual_weight: float = 0.1   # weight of the perceptual term (alpha_bar-weighted feature MSE on decoded x0)
    p_uncond: float = 0.1            # probability a label is replaced by the null class (classifier-free guidance)
    ema_decay: float = 0.999         # EMA decay of the denoiser weights (diffusers EMAModel, with its warmup)
    sample_every: int = 100          # write samples/step_N.png every N denoiser steps (0 = only at the end)
    grid_per_class: int = 4          # images per class in the sample grids
    sample_steps: int = 20           # DDIM steps for the sample grids
    guidance: float = 2.0            # classifier-free guidance weight of the sample grids
    balance: Literal["none", "equal"] = "equal"  # equal: class-balanced batches, so rare classes are learnt too
    epochs: int = 10                 # passes over the training data (both phases)
    batch_size: int = 32             # images per optimiser micro-step on each rank
    weight_decay: float = 0.0        # AdamW weight decay
    out: str = "runs/synth"          # run directory

    def validate(self) -> None:
        super().validate()
        if self.img_size < 8 or self.img_size % 8:
            raise ConfigError(f"--img-size must be a multiple of 8 (>= 8), got {self.img_size}")
        if self.vae_steps < 0 or self.sample_every < 0 or self.grid_per_class < 1 or self.sample_steps < 1:
            raise ConfigError("--vae-steps and --sample-every must be >= 0, --grid-per-class and --sample-steps >= 1")
        if not 0 <= self.p_uncond < 1:
            raise ConfigError(f"--p-uncond must be in [0, 1), got {self.p_uncond}")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        if self.kl_weight < 0 or self.perceptual_weight < 0:
            raise ConfigError("--kl-weight and --perceptual-weight must be >= 0")
        if self.vae is not None:
            from pathlib import Path
            if not Path(self.vae).expanduser().is_dir():
                raise ConfigError(f"--vae {self.vae!r} is not a folder (a diffusers AutoencoderKL)")


def _key(seed: int, micro_step: int, rank: int) -> int:
    return (seed * 1_000_003 + micro_step * 7_919 + rank * 104_729) % (2 ** 63)


@register_stage("synth", help="class-conditioned latent diffusion (AutoencoderKL + UNet2DModel, DerMAE)")
class SynthStage(Stage):
    Config = SynthConfig

    def default_blr(self, cfg) -> float:
        return 8e-3  # lr 1e-3 at batch 32

    def resolve(self, cfg: SynthConfig, world) -> SynthConfig:
        if cfg.vae is not None:
            cfg.vae_steps = 0
        elif world.world_size > 1:
            raise ConfigError("under torchrun give --vae (a trained VAE: first run --stage synth on one process)")
        return super().resolve(cfg, world)

    def build(self, run) -> Parts:
        from dermfast.data.augment import Augment
        from dermfast.synth.features import FeatureError, describe, load_feature_net
        from dermfast.synth.models import CheckpointError, LatentDiffusion, build_vae, latent_size, unet_config

        from diffusers import UNet2DModel
        from diffusers.training_utils import EMAModel

        cfg: SynthConfig = run.cfg
        data = run.prepare_data()
        self.records = data.part("train")
        self.classes = list(self.records.classes)
        counts = np.bincount(self.records.labels[self.records.labels >= 0], minlength=len(self.classes))
        empty = [c for c, n in zip(self.classes, counts) if n == 0]
        if empty:
            raise ConfigError(f"class {empty[0]!r} has no training images to learn from "
                              f"({len(empty)} such class(es)); drop it from the data or add images")
        try:
            vae = build_vae(cfg.size, cfg.img_size, cfg.vae)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        self.latent = latent_size(vae, cfg.img_size)
        unet = UNet2DModel(**unet_config(cfg.size, self.latent, vae.config.latent_channels, len(self.classes)))
        model = LatentDiffusion(vae, unet, len(self.classes), train_vae=cfg.vae is None).to(run.device)
        if cfg.vae is not None:
            model.latent_scale.fill_(float(vae.config.scaling_factor))
        self.ema = EMAModel(model.unet.parameters(), decay=cfg.ema_decay)
        self.ema.to(run.device)
        self.feat = None
        if cfg.perceptual != "off":
            try:
                self.feat = load_feature_net(cfg.perceptual, pooled=False, device=run.device)
            except FeatureError as e:
                raise ConfigError(f"--perceptual: {e}") from None
        self.perceptual_desc = describe(cfg.perceptual)
        self.aug = Augment(size=cfg.img_size, scale=(0.6, 1.0), ratio=(0.9, 1.1), flip=0.5,
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        try:
            sampler = run.sampler(self.records.labels, self.records.source,
                                  class_fractions=None if cfg.balance == "none" else cfg.balance,
                                  neg_keep=cfg.neg_keep, synth_ratio=cfg.synth_ratio)
            loader = run.train_loader(self.records, self.aug, sampler)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        total = cfg.max_steps or cfg.epochs * len(loader) // cfg.accum_steps
        if cfg.vae is None and total <= cfg.vae_steps:
            run.log(f"synth: the run ({total} steps) ends within the VAE phase (--vae-steps {cfg.vae_steps}): "
                    "the denoiser will not be trained (a VAE-only run; use it with --vae)")
        run.log(f"synth: perceptual term: {self.perceptual_desc}; latents {vae.config.latent_channels}x"
                f"{self.latent}x{self.latent}; classes {', '.join(self.classes)}")
        return Parts(model=model, loader=loader, sampler=sampler,
                     summary=f"{cfg.size} latent diffusion, {cfg.img_size}px, {len(self.records)} images, "
                             f"{len(self.classes)} classes, loader {loader.backend}")

    # ------------------------------------------------------------------------------------------------ loop
    def phase(self, run) -> str:
        return "vae" if run.step < run.cfg.vae_steps else "diffusion"

    def step(self, batch, run):
        cfg: SynthConfig = run.cfg
        phase = self.phase(run)
        raw = run.raw_model
        if phase == "diffusion" and any(p.requires_grad for p in raw.vae.parameters()):
            raw.vae.requires_grad_(False)  # phase 2 starts: freeze the VAE (grads None -> AdamW skips it)
        gen = torch.Generator(run.device).manual_seed(_key(cfg.seed, run.micro_step, run.world.rank))
        out = run.model(batch["image"], batch["label"], phase, gen=gen, kl_weight=cfg.kl_weight,
                        p_uncond=cfg.p_uncond, feat_net=self.feat, perceptual_weight=cfg.perceptual_weight)
        zero = torch.zeros((), device=run.device)
        scalars = {k: out.get(k, zero) for k in ("vae_rec", "vae_kl", "mse", "perc")}
        return out["loss"], scalars

    def after_step(self, run) -> None:
        cfg: SynthConfig = run.cfg
        if run.step <= cfg.vae_steps:  # run.step counts the step just applied; phase 1 ends at vae_steps
            return
        self.ema.step(run.raw_model.unet.parameters())
        done = run.step - cfg.vae_steps
        if cfg.sample_every and done % cfg.sample_every == 0 and run.is_main:
            path = run.run_dir / "samples" / f"step_{run.step:08d}.png"
            path.parent.mkdir(exist_ok=True)
            self.grid(run, path)
            run.wrote(path)

    def grid(self, run, path) -> None:
        """A row of --grid-per-class EMA samples per class (DDIM, --sample-steps, --guidance)."""
        from dermfast.synth.sample import sample_images, save_grid, to_uint8
        cfg: SynthConfig = run.cfg
        raw = run.raw_model
        params = list(raw.unet.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            n = cfg.grid_per_class
            labels = torch.arange(len(self.classes)).repeat_interleave(n)
            seeds = [cfg.seed * 100_000 + i for i in range(labels.numel())]
            with run.autocast():
                imgs = sample_images(raw.unet, raw.vae, raw.scheduler.config, labels, seeds, steps=cfg.sample_steps,
                                     guidance=cfg.guidance, null_class=len(self.classes), latent_size=self.latent,
                                     scale=float(raw.latent_scale.clamp_min(1e-6)))
        finally:
            self.ema.restore(params)
        save_grid(to_uint8(imgs), len(self.classes), path, self.classes)

    # ----------------------------------------------------------------------------------------- checkpoints
    def extra_state(self):
        tensors = {f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)}
        return tensors, {"ema_optimization_step": int(self.ema.optimization_step), "ema_decay": self.ema.decay}

    def load_extra_state(self, tensors, meta) -> None:
        for i, p in enumerate(self.ema.shadow_params):
            p.data.copy_(tensors[f"ema.{i}"].to(p.device, p.dtype))
        self.ema.optimization_step = int(meta.get("ema_optimization_step", 0))

    def final_weights(self, run):
        sd = run.model_state_dict()
        names = [n for n, _ in run.raw_model.unet.named_parameters()]
        sd.update({f"ema_unet.{n}": p.detach().cpu() for n, p in zip(names, self.ema.shadow_params)})
        return sd

    def final_meta(self, run) -> dict:
        return {"classes": self.classes, "img_size": run.cfg.img_size, "perceptual": self.perceptual_desc,
                "denoiser_steps": max(0, run.step - run.cfg.vae_steps)}

    def finish(self, run) -> list:
        import copy

        from dermfast.synth.models import save_bundle
        if not run.is_main:
            return []
        cfg: SynthConfig = run.cfg
        raw = run.raw_model
        files = []
        denoiser_steps = max(0, run.step - cfg.vae_steps)
        if denoiser_steps:
            files.append(run.run_dir / "samples.png")
            self.grid(run, files[-1])
        unet = copy.deepcopy(raw.unet).cpu()
        for p, s in zip(unet.parameters(), self.ema.shadow_params):
            p.data.copy_(s.detach().cpu())
        scale = float(raw.latent_scale) if float(raw.latent_scale) > 0 else float(raw.vae.config.scaling_factor)
        vae = copy.deepcopy(raw.vae).cpu()
        bundle = save_bundle(run.run_dir / "diffusers", vae, unet, raw.scheduler, self.classes, cfg.img_size, scale,
                             {"step": run.step, "denoiser_steps": denoiser_steps, "perceptual": self.perceptual_desc,
                              "perceptual_spec": cfg.perceptual, "source": str(run.run_dir)})
        return files + [bundle]
