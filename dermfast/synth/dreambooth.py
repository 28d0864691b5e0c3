"""`python -m dermfast.train --stage dreambooth`: LoRA fine-tuning of a local Stable Diffusion (Derm-T2IM's method).

A local SD folder (diffusers layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/; nothing is downloaded)
is frozen; peft LoRA adapters on the UNet's attention projections (to_q, to_k, to_v, to_out.0) learn
noise prediction on --shots images per class, each captioned with its class prompt (--prompt, e.g. "a
dermoscopic image of a melanoma"). Optional DullRazor hair removal on every batch (dermfast.synth.hair, torch
ops on the batch's device). Prior preservation (DreamBooth's class-prior images) is not implemented.

Run folder: lora/pytorch_lora_weights.safetensors (diffusers LoRA format: `pipe.load_lora_weights(RUN/lora)`),
prompts.json ({class: prompt}). checkpoint.safetensors holds the adapter tensors only (peft names).
The LoRA file carries the adapter config (rank, alpha, target modules) as safetensors metadata, the way diffusers'
own examples/dreambooth/train_dreambooth_lora.py saves it (`unet_lora_adapter_metadata`): without it diffusers'
loader assumes alpha = rank and applies the adapters at scale 1.0 instead of alpha / rank. Folders written before
that (no metadata) are rewritten in place by `add_lora_metadata(RUN)` from the run's config.yaml.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dermfast.train.config import ConfigError, DataConfig
from dermfast.train.stages import Parts, Stage, register_stage

CLASS_NAMES = {"akiec": "actinic keratosis", "bcc": "basal cell carcinoma", "bkl": "benign keratosis",
               "df": "dermatofibroma", "mel": "melanoma", "nv": "melanocytic nevus", "vasc": "vascular lesion",
               "scc": "squamous cell carcinoma", "ak": "actinic keratosis"}


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the UNet attention projections that get adapters
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def lora_config(rank: int, alpha: float):
    """The peft LoraConfig of the UNet adapters (training, and the metadata add_lora_metadata writes)."""
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))


def class_prompt(template: str, cls: str) -> str:
    return template.format(cls=CLASS_NAMES.get(cls.lower(), cls))


@dataclass
class DreamBoothConfig(DataConfig):
    pretrained: str | None = None    # local Stable Diffusion folder (diffusers layout); required
    prompt: str = "a dermoscopic image of a {cls}"  # caption template; {cls} = the class's name (mel -> melanoma)
    shots: int = 8                   # training images per class (few-shot)
    img_size: int = 512              # training resolution (the SD model's native size)
    lora_rank: int = 4               # LoRA rank r of the UNet attention adapters
    lora_alpha: float = 4.0          # LoRA alpha (scale = alpha / r)
    hair_removal: bool = False       # DullRazor hair removal on every training image
    epochs: int = 100                # passes over the few-shot set
    batch_size: int = 4              # images per micro-step on each rank
    weight_decay: float = 0.0        # AdamW weight decay
    out: str = "runs/dreambooth"     # run directory

    def validate(self) -> None:
        super().validate()
        if self.pretrained is None:
            raise ConfigError("--pretrained PATH (a local Stable Diffusion folder) is required")
        p = Path(self.pretrained).expanduser()
        if not (p / "unet" / "config.json").is_file() or not (p / "text_encoder").is_dir():
            raise ConfigError(f"--pretrained {self.pretrained!r} is not a diffusers Stable Diffusion folder "
                              "(unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        if self.shots < 1 or self.lora_rank < 1 or self.img_size < 8 or self.img_size % 8:
            raise ConfigError("--shots and --lora-rank must be >= 1, --img-size a multiple of 8")
        if "{cls}" not in self.prompt:
            raise ConfigError("--prompt must contain {cls} (replaced by the class name)")


class LoRAUNetTrainer(nn.Module):
    """Frozen SD (VAE, text encoder) + UNet with LoRA adapters. forward(images [-1, 1], labels) -> loss.
    prompt_embeds [K, T, D] buffer: the text encoder's output for each class prompt (computed once)."""

    def __init__(self, vae, unet, prompt_embeds, scheduler, hair: bool):
        super().__init__()
        self.vae, self.unet, self.scheduler, self.hair = vae, unet, scheduler, hair
        self.register_buffer("prompt_embeds", prompt_embeds)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float())
        self.scale = float(vae.config.scaling_factor)

    def forward(self, images, labels, gen=None):
        if self.hair:
            from dermfast.synth.hair import remove_hair
            images = remove_hair((images + 1) / 2, backend="torch")[0] * 2 - 1
        with torch.no_grad():
            z = self.vae.encode(images).latent_dist.sample(generator=gen) * self.scale
        B = z.shape[0]
        t = torch.randint(0, self.alphas_cumprod.numel(), (B,), device=z.device, generator=gen)
        noise = torch.randn(z.shape, device=z.device, generator=gen, dtype=z.dtype)
        ab = self.alphas_cumprod[t].view(B, 1, 1, 1)
        zt = ab.sqrt() * z + (1 - ab).sqrt() * noise
        eps = self.unet(zt, t, encoder_hidden_states=self.prompt_embeds[labels]).sample.float()
        return ((eps - noise.float()) ** 2).mean()


def few_shot(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` images per class (all of a class with fewer), chosen with `seed`."""
    rng = np.random.default_rng(seed)
    idx = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        idx.extend(rng.choice(members, size=min(shots, len(members)), replace=False).tolist())
    return np.sort(np.array(idx, dtype=np.int64))


def load_sd(path: str):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    p = Path(path).expanduser()
    try:
        return dict(unet=UNet2DConditionModel.from_pretrained(str(p / "unet")),
                    vae=AutoencoderKL.from_pretrained(str(p / "vae")),
                    text_encoder=CLIPTextModel.from_pretrained(str(p / "text_encoder")),
                    tokenizer=CLIPTokenizer.from_pretrained(str(p / "tokenizer")),
                    scheduler=DDPMScheduler.from_pretrained(str(p / "scheduler")))
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(f"--pretrained {path!r}: unreadable Stable Diffusion folder "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


@register_stage("dreambooth", help="LoRA fine-tuning of a local Stable Diffusion on few-shot class prompts (Derm-T2IM)")
class DreamBoothStage(Stage):
    Config = DreamBoothConfig

    def default_blr(self, cfg) -> float:
        return 6.4e-3  # lr 1e-4 at batch 4 (LoRA's usual)

    def build(self, run) -> Parts:
        from dermfast.data.augment import Augment
        cfg: DreamBoothConfig = run.cfg
        data = run.prepare_data()
        train = data.part("train")
        self.records = train.subset(few_shot(train.labels, cfg.shots, cfg.seed))
        self.classes = list(self.records.classes)
        sd = load_sd(cfg.pretrained)
        vae, unet, te, tok = sd["vae"], sd["unet"], sd["text_encoder"], sd["tokenizer"]
        for m in (vae, unet, te):
            m.requires_grad_(False)
        unet.add_adapter(lora_config(cfg.lora_rank, cfg.lora_alpha))
        self.prompts = {c: class_prompt(cfg.prompt, c) for c in self.classes}
        ids = tok([self.prompts[c] for c in self.classes], padding="max_length", truncation=True,
                  max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            embeds = te(ids)[0]
        model = LoRAUNetTrainer(vae, unet, embeds, sd["scheduler"], cfg.hair_removal).to(run.device)
        aug = Augment(size=cfg.img_size, scale=(0.7, 1.0), ratio=(0.9, 1.1), flip=0.5,
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        try:
            sampler = run.sampler(self.records.labels, self.records.source)
            loader = run.train_loader(self.records, aug, sampler)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        n_lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        return Parts(model=model, loader=loader, sampler=sampler,
                     summary=f"SD LoRA r={cfg.lora_rank} ({n_lora:,} trainable), {len(self.records)} few-shot "
                             f"images, {len(self.classes)} prompts, hair removal {'on' if cfg.hair_removal else 'off'}")

    def step(self, batch, run):
        gen = torch.Generator(run.device).manual_seed(run.cfg.seed * 1_000_003 + run.micro_step * 7_919
                                                      + run.world.rank)
        return run.model(batch["image"], batch["label"], gen=gen), {}

    def param_groups(self, model, cfg):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]

    def lora_state(self, run) -> dict:
        from peft.utils import get_peft_model_state_dict
        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(run.raw_model.unet).items()}

    def final_weights(self, run):
        return self.lora_state(run)

    def final_meta(self, run) -> dict:
        return {"classes": self.classes, "prompts": self.prompts, "pretrained": str(run.cfg.pretrained)}

    def finish(self, run) -> list:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        if not run.is_main:
            return []
        out = run.run_dir / "lora"
        # the adapter config as metadata (diffusers.training_utils._collate_lora_metadata): carries alpha / rank
        StableDiffusionPipeline.save_lora_weights(
            str(out), unet_lora_layers=convert_state_dict_to_diffusers(self.lora_state(run)), safe_serialization=True,
            unet_lora_adapter_metadata=run.raw_model.unet.peft_config["default"].to_dict())
        (run.run_dir / "prompts.json").write_text(json.dumps(self.prompts, indent=1))
        return [out / LORA_FILE, run.run_dir / "prompts.json"]


def add_lora_metadata(run_dir: str | Path) -> Path:
    """Give RUN/lora/pytorch_lora_weights.safetensors written before the adapter metadata was saved (diffusers
    would load it at scale 1.0, not alpha / rank) the adapter config of its run (lora_rank, lora_alpha from
    RUN/config.yaml), rewriting the file atomically; tensors unchanged. A file with metadata is left as it is.
    Returns the file's path; ConfigError when the folder lacks the file or config, or they disagree on the rank."""
    import os
    import shutil
    import tempfile

    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dermfast.train.config import load_yaml
    run_dir = Path(run_dir).expanduser()
    path = run_dir / "lora" / LORA_FILE
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist (not a --stage dreambooth run folder?)")
    with safe_open(str(path), framework="pt") as f:
        if LORA_METADATA_KEY in (f.metadata() or {}):
            return path
    cfg = load_yaml(run_dir / "config.yaml")
    if "lora_rank" not in cfg or "lora_alpha" not in cfg:
        raise ConfigError(f"{str(run_dir / 'config.yaml')!r} has no lora_rank / lora_alpha: not a dreambooth run")
    rank, alpha = int(cfg["lora_rank"]), float(cfg["lora_alpha"])
    tensors = load_file(str(path))
    prefix = StableDiffusionPipeline.unet_name + "."
    if not tensors or not all(k.startswith(prefix) for k in tensors):
        raise ConfigError(f"{str(path)!r}: expected UNet LoRA tensors only ({prefix}*)")
    ranks = {v.shape[0] for k, v in tensors.items() if ".lora_A." in k or ".lora.down." in k}
    if ranks != {rank}:
        raise ConfigError(f"{str(path)!r}: adapter rank(s) {sorted(ranks)} but config.yaml says lora_rank {rank}")
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=path.parent))
    try:
        StableDiffusionPipeline.save_lora_weights(
            str(tmp), unet_lora_layers={k[len(prefix):]: v for k, v in tensors.items()}, safe_serialization=True,
            unet_lora_adapter_metadata=lora_config(rank, alpha).to_dict())
        os.replace(tmp / LORA_FILE, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
