"""Latent-diffusion parts (diffusers AutoencoderKL + class-conditioned UNet2DModel) and the on-disk bundle.

Why this shape: diffusers already has the VAE, the UNet with class embeddings (`num_class_embeds`), the noise
schedulers and EMA, so dermfast only adds the training step (`LatentDiffusion.forward`), the size presets and the
bundle format `synthesize` reads. A finished `--stage synth` run writes RUN/diffusers/ :

    vae/        AutoencoderKL.save_pretrained (config scaling_factor = the latent scale learnt by the run)
    unet/       UNet2DModel.save_pretrained with the EMA weights; num_class_embeds = classes + 1 (the last index
                is the null class used for classifier-free guidance)
    scheduler/  the DDPMScheduler training config (every sampler is built from it)
    dermfast_synth.json  {"classes": [...], "img_size": S, "null_class": K, "step": n, "source": RUN}

Heavy imports (diffusers) stay inside functions: `dermfast.train.stages.discover()` imports this package.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BUNDLE_META = "dermfast_synth.json"


class CheckpointError(ValueError):
    """A path that is not a dermfast synth run or diffusers bundle (reported as one line, exit 2)."""


def vae_config(size: str, img_size: int) -> dict[str, Any]:
    """AutoencoderKL kwargs. tiny: 2 levels (latent = img / 2), 4 latent channels; small: 3 levels (img / 4)."""
    if size == "tiny":
        ch, groups = (32, 64), 8
    elif size == "small":
        ch, groups = (64, 128, 256), 32
    else:
        raise ValueError(f"unknown model size {size!r}")
    return dict(in_channels=3, out_channels=3, block_out_channels=ch, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * len(ch), up_block_types=("UpDecoderBlock2D",) * len(ch),
                latent_channels=4, norm_num_groups=groups, sample_size=img_size)


def unet_config(size: str, latent_size: int, latent_channels: int, num_classes: int) -> dict[str, Any]:
    """UNet2DModel kwargs: class embedding table of num_classes + 1 rows (row num_classes = null class)."""
    if size == "tiny":
        ch, groups, layers = (32, 64), 8, 1
    elif size == "small":
        ch, groups, layers = (128, 256, 256), 32, 2
    else:
        raise ValueError(f"unknown model size {size!r}")
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (len(ch) - 1)
    up = ("AttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",)
    return dict(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                block_out_channels=ch, layers_per_block=layers, down_block_types=down, up_block_types=up,
                norm_num_groups=groups, attention_head_dim=32, num_class_embeds=num_classes + 1)


def scheduler_config() -> dict[str, Any]:
    """The training noise schedule (LDM's scaled-linear betas, 1000 steps, epsilon prediction)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False)


class LatentDiffusion(nn.Module):
    """VAE + class-conditioned denoiser. `forward(images, labels, phase, ...)` returns the loss terms of one
    micro-batch so the engine's DDP wrapper sees a single forward. images [B, 3, S, S] in [-1, 1]; labels [B]
    int64 in [0, K) (K = null class after label dropout).

    latent_scale: 0-d buffer; 0 until the first denoiser step sets it to 1 / std(latents of that batch) (LDM's
    rule), then fixed; saved with the weights and written to the VAE config as scaling_factor.
    """

    def __init__(self, vae: nn.Module, unet: nn.Module, num_classes: int, train_vae: bool = True):
        super().__init__()
        from diffusers import DDPMScheduler
        self.vae, self.unet, self.num_classes = vae, unet, num_classes
        self.vae.requires_grad_(train_vae)
        self.scheduler = DDPMScheduler(**scheduler_config())
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float())
        self.register_buffer("latent_scale", torch.zeros(()))

    def vae_loss(self, x: torch.Tensor, kl_weight: float, gen: torch.Generator | None) -> dict[str, torch.Tensor]:
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample(generator=gen)).sample.float()
        l_rec = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        l_kl = post.kl().mean() / x[0].numel()
        return {"loss": l_rec + kl_weight * l_kl, "vae_rec": l_rec.detach(), "vae_kl": l_kl.detach()}

    def diffusion_loss(self, x: torch.Tensor, labels: torch.Tensor, p_uncond: float, gen: torch.Generator,
                       feat_net=None, perceptual_weight: float = 0.0) -> dict[str, torch.Tensor]:
        B, dev = x.shape[0], x.device
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.sample(generator=gen).float()
            scale = torch.where(self.latent_scale > 0, self.latent_scale, 1.0 / z.std().clamp_min(1e-6))
            self.latent_scale.copy_(scale)
            z = z * scale
        t = torch.randint(0, self.alphas_cumprod.numel(), (B,), device=dev, generator=gen)
        noise = torch.randn(z.shape, device=dev, generator=gen)
        drop = torch.rand(B, device=dev, generator=gen) < p_uncond
        y = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        ab = self.alphas_cumprod[t].view(B, 1, 1, 1)
        zt = ab.sqrt() * z + (1 - ab).sqrt() * noise
        eps = self.unet(zt, t, class_labels=y).sample.float()
        mse = ((eps - noise) ** 2).mean()
        perc = torch.zeros((), device=dev)
        if feat_net is not None and perceptual_weight > 0:
            # x0 from the predicted noise, decoded through the (frozen) VAE; weighted by alpha_bar so the
            # nearly pure-noise timesteps (where x0 is undefined) contribute little
            z0 = (zt - (1 - ab).sqrt() * eps) / ab.sqrt().clamp_min(1e-3)
            dec = self.vae.decode(z0 / self.latent_scale).sample.float().clamp(-1, 1)
            with torch.no_grad():
                f_real = feat_net(x)
            f_fake = feat_net(dec)
            perc = (ab.view(B) * ((f_fake - f_real) ** 2).flatten(1).mean(1)).mean()
        return {"loss": mse + perceptual_weight * perc, "mse": mse.detach(), "perc": perc.detach()}

    def forward(self, images, labels, phase: str, gen=None, kl_weight: float = 1e-5, p_uncond: float = 0.1,
                feat_net=None, perceptual_weight: float = 0.0):
        if phase == "vae":
            return self.vae_loss(images, kl_weight, gen)
        return self.diffusion_loss(images, labels, p_uncond, gen, feat_net, perceptual_weight)


def build_vae(size: str, img_size: int, path: str | None = None):
    from diffusers import AutoencoderKL
    if path is not None:
        return load_vae(path)
    return AutoencoderKL(**vae_config(size, img_size))


def load_vae(path: str):
    """A local diffusers AutoencoderKL folder (config.json + weights), or a bundle / SD folder with vae/."""
    from diffusers import AutoencoderKL
    p = Path(path).expanduser()
    for cand in (p, p / "vae", p / "diffusers" / "vae"):
        if (cand / "config.json").is_file():
            try:
                return AutoencoderKL.from_pretrained(str(cand))
            except (OSError, ValueError, EnvironmentError) as e:
                raise CheckpointError(f"--vae {path!r}: not a loadable diffusers AutoencoderKL ({e})") from None
    raise CheckpointError(f"--vae {path!r} is not a diffusers AutoencoderKL folder (no config.json)")


def latent_size(vae, img_size: int) -> int:
    return img_size // (2 ** (len(vae.config.block_out_channels) - 1))


@dataclass
class Bundle:
    """A trained class-conditioned latent diffusion model, ready to sample."""
    vae: nn.Module
    unet: nn.Module
    scheduler_config: dict
    classes: list[str]
    img_size: int
    path: Path
    meta: dict

    @property
    def null_class(self) -> int:
        return len(self.classes)

    @property
    def scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def to(self, device) -> "Bundle":
        self.vae.to(device).eval()
        self.unet.to(device).eval()
        return self


def save_bundle(out: Path, vae, unet, scheduler, classes: list[str], img_size: int, scale: float,
                extra: dict) -> Path:
    """Write the diffusers bundle described in the module docstring; returns its folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae.register_to_config(scaling_factor=float(scale))
    vae.save_pretrained(str(out / "vae"))
    unet.save_pretrained(str(out / "unet"))
    scheduler.save_pretrained(str(out / "scheduler"))
    meta = {"classes": list(classes), "img_size": int(img_size), "null_class": len(classes), **extra}
    (out / BUNDLE_META).write_text(json.dumps(meta, indent=1))
    return out


def find_bundle(path: str | Path) -> Path:
    """RUN (a synth run folder) or the bundle folder itself -> the bundle folder; CheckpointError otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    for cand in (p, p / "diffusers"):
        if (cand / BUNDLE_META).is_file() and (cand / "unet" / "config.json").is_file():
            return cand
    if (p / "checkpoint.safetensors").is_file() or (p / "state.json").is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is a dermfast run without a synth bundle (diffusers/); "
                              "give a finished `--stage synth` run")
    raise CheckpointError(f"checkpoint {str(path)!r} is not a dermfast synth run or diffusers bundle "
                          f"(no {BUNDLE_META} + unet/config.json)")


def load_bundle(path: str | Path) -> Bundle:
    from diffusers import AutoencoderKL, UNet2DModel
    root = find_bundle(path)
    try:
        meta = json.loads((root / BUNDLE_META).read_text())
        classes, img_size = list(meta["classes"]), int(meta["img_size"])
        vae = AutoencoderKL.from_pretrained(str(root / "vae"))
        unet = UNet2DModel.from_pretrained(str(root / "unet"))
        sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, KeyError, EnvironmentError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: unreadable synth bundle ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if unet.config.num_class_embeds != len(classes) + 1:
        raise CheckpointError(f"checkpoint {str(path)!r}: the UNet has {unet.config.num_class_embeds} class rows, "
                              f"expected {len(classes)} classes + 1 null")
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    return Bundle(vae, unet, sched, classes, img_size, root, meta)
