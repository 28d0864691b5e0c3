"""Class-conditioned sampling with classifier-free guidance through any diffusers scheduler.

Reproducibility: every image has its own seed. Its initial latent and every noise draw of an ancestral sampler
come from a CPU `torch.Generator` seeded with it (diffusers' `randn_tensor` takes one generator per batch row),
so an image does not depend on which batch it was sampled in: the manifest's seed regenerates it.
Guidance: the conditional and the null-class (unconditional) rows run as one batch of 2B per step.
"""
from __future__ import annotations

import inspect

import torch

SAMPLERS = ("ddim", "euler", "euler_a", "pndm", "dpmpp")


def make_scheduler(name: str, train_config: dict):
    """A fresh scheduler (they keep per-run state) of sampler `name` from the training schedule config."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, PNDMScheduler)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; accepted: {', '.join(SAMPLERS)}")
    cls, extra = {
        "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        "pndm": (PNDMScheduler, {"skip_prk_steps": True}),     # PLMS, as Stable Diffusion uses it
        "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    }[name]
    return cls.from_config({**train_config, **extra})


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_images(unet, vae, scheduler_config: dict, labels: torch.Tensor, seeds: list[int], *, sampler: str = "ddim",
                  steps: int = 25, guidance: float = 2.0, null_class: int, latent_size: int, scale: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """labels [B] int64, seeds: B ints -> images [B, 3, S, S] float32 in [-1, 1] (on the UNet's device).

    guidance: classifier-free guidance weight w (eps = eps_null + w (eps_cond - eps_null)); 1 = conditional only
    (no null-class pass), 0 = unconditional.
    """
    from diffusers.utils.torch_utils import randn_tensor
    dev = next(unet.parameters()).device
    B = labels.shape[0]
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} labels")
    sched = make_scheduler(sampler, scheduler_config)
    sched.set_timesteps(steps, device=dev)
    gens = image_generators(seeds)
    C = unet.config.in_channels
    lat = randn_tensor((B, C, latent_size, latent_size), generator=gens, device=dev, dtype=torch.float32)
    lat = lat * sched.init_noise_sigma
    labels = labels.to(dev)
    null = torch.full_like(labels, null_class)
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    for t in sched.timesteps:
        inp = sched.scale_model_input(lat, t)
        if guidance == 1.0:
            eps = unet(inp.to(dtype), t, class_labels=labels).sample.float()
        elif guidance == 0.0:
            eps = unet(inp.to(dtype), t, class_labels=null).sample.float()
        else:
            both = unet(torch.cat([inp, inp]).to(dtype), t, class_labels=torch.cat([labels, null])).sample.float()
            cond, unc = both.chunk(2)
            eps = unc + guidance * (cond - unc)
        kw = {"generator": gens} if takes_gen else {}
        lat = sched.step(eps, t, lat, **kw).prev_sample
    img = vae.decode((lat / scale).to(dtype)).sample.float()
    return img.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] in [-1, 1] -> [B, S, S, 3] uint8 on the CPU."""
    return ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images_u8, rows: int, path, labels: list[str] | None = None) -> None:
    """images_u8: list / tensor of [S, S, 3] uint8, row-major with `rows` rows -> one PNG (2 px gaps)."""
    import numpy as np
    from PIL import Image, ImageDraw
    ims = [np.asarray(i) for i in images_u8]
    if not ims:
        return
    S = ims[0].shape[0]
    cols = -(-len(ims) // rows)
    left = 0 if not labels else 8 * max(len(s) for s in labels) // 2 + 8
    canvas = np.full((rows * (S + 2), left + cols * (S + 2), 3), 255, np.uint8)
    for k, im in enumerate(ims):
        r, c = divmod(k, cols)
        canvas[r * (S + 2):r * (S + 2) + S, left + c * (S + 2):left + c * (S + 2) + S] = im
    pil = Image.fromarray(canvas)
    if labels:
        d = ImageDraw.Draw(pil)
        for r, s in enumerate(labels[:rows]):
            d.text((2, r * (S + 2) + S // 2 - 5), s[: left // 4], fill=(0, 0, 0))
    pil.save(str(path))
