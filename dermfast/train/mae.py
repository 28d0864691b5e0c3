"""MAE pretraining stage: data -> MaskedAutoencoderViT -> run directory.

Run directory: config.yaml (resolved), log.csv, checkpoint.safetensors (weights + metadata), reconstruction.png.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dermfast.data.pipeline import prepare_data
from dermfast.data.augment import mae_augment
from dermfast.data.loader import build_loader
from dermfast.data.sampler import BalancedSampler
from dermfast.eval.mae_vis import save_reconstruction_png
from dermfast.models.mae import MAEPreset, MaskedAutoencoderViT, get_preset
from dermfast.train.config import ConfigError, MAEConfig, save_config
from dermfast.train.engine import (CSVLog, autocast, build_optimizer, resolve_device, save_checkpoint,
                                   seed_everything, warmup_cosine)


def resolve_preset(cfg: MAEConfig) -> MAEPreset:
    try:
        preset = get_preset(cfg.preset)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    overrides = {k: v for k, v in (("img_size", cfg.img_size), ("mask_ratio", cfg.mask_ratio)) if v is not None}
    return MAEPreset(**{**preset.to_dict(), **overrides}) if overrides else preset


def make_sampler(cfg: MAEConfig, records) -> BalancedSampler:
    """Natural order by default; --balance equal / --neg-keep / --synth-ratio need labels."""
    labels = records.labels
    if (cfg.balance != "none" or cfg.neg_keep is not None) and labels.min() < 0:
        raise ConfigError("--balance and --neg-keep need labelled data")
    fractions = None if cfg.balance == "none" else cfg.balance
    try:
        return BalancedSampler(labels.clip(min=0), records.source, class_fractions=fractions,
                               neg_keep=cfg.neg_keep, synth_ratio=cfg.synth_ratio, seed=cfg.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run_mae(cfg: MAEConfig, progress: bool = True) -> Path:
    """Pretrain an MAE as configured; returns the run directory."""
    preset = resolve_preset(cfg)
    try:
        device = resolve_device(cfg.device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"bad --device {cfg.device!r}: {e}") from None
    run_dir = Path(cfg.out)
    data = prepare_data(cfg.data, run_dir, synthetic=cfg.synthetic, seed=cfg.seed, require_labels=False,
                        toy_images=cfg.toy_images, toy_image_size=cfg.toy_image_size, progress=progress)
    records = data.part("train")  # pretraining sees the training split only; val / test stay unseen
    seed_everything(cfg.seed)
    model = MaskedAutoencoderViT(preset).to(device)
    aug = mae_augment(preset.img_size)
    sampler = make_sampler(cfg, records)
    try:
        loader = build_loader(records, aug, cfg.batch_size, train=True, sampler=sampler, loader=cfg.loader,
                              device=device, seed=cfg.seed, workers=cfg.workers)
        batches_per_epoch = len(loader)
    except ValueError as e:  # e.g. a sampler configuration that leaves an epoch empty
        raise ConfigError(str(e)) from None
    steps_per_epoch = batches_per_epoch / cfg.accum_steps
    total_steps = max(1, cfg.epochs * batches_per_epoch // cfg.accum_steps)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    eff_batch = cfg.batch_size * cfg.accum_steps
    lr = cfg.lr if cfg.lr is not None else (cfg.blr if cfg.blr is not None else preset.blr) * eff_batch / 256
    optimizer, opt_name = build_optimizer(model, lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, min(total_steps, int(cfg.warmup_epochs * steps_per_epoch)), lr, cfg.min_lr))

    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "log.csv").unlink(missing_ok=True)
    log = CSVLog(run_dir / "log.csv")
    print(f"mae: preset {cfg.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params), "
          f"{len(records)} images, loader {loader.backend}, device {device}, {opt_name}, lr {lr:.2e}, {total_steps} steps -> {run_dir}")

    step, micro, t0 = 0, 0, time.perf_counter()
    running = torch.zeros((), device=device)
    n_running = 0
    bar = tqdm(total=total_steps, desc="mae", unit="step", disable=not progress, dynamic_ncols=True)
    model.train()
    done = False
    for epoch in range(cfg.epochs):
        loader.set_epoch(epoch)
        seen_in_epoch = 0
        for batch in loader:
            imgs = batch["image"]
            seen_in_epoch += imgs.shape[0]
            with autocast(device):
                loss, _, _ = model(imgs, seed=cfg.seed, step=micro)
            (loss / cfg.accum_steps).backward()
            running += loss.detach().float()
            n_running += 1
            micro += 1
            if micro % cfg.accum_steps:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                mean_loss = (running / n_running).item()  # the one host sync per log interval
                if not torch.isfinite(torch.tensor(mean_loss)):
                    raise FloatingPointError(f"mae: loss became {mean_loss} at step {step}; lower --lr")
                elapsed = time.perf_counter() - t0
                log.write({"epoch": epoch, "step": step, "lr": f"{optimizer.param_groups[0]['lr']:.3e}",
                           "loss": f"{mean_loss:.5f}", "images_per_s": f"{micro * cfg.batch_size / elapsed:.1f}",
                           "elapsed_s": f"{elapsed:.1f}"})
                bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=epoch)
                running.zero_()
                n_running = 0
            if step >= total_steps:
                done = True
                break
        if done:
            break
    bar.close()

    meta = {"stage": "mae", "preset": preset.to_dict(), "step": step, "epoch": epoch, "seed": cfg.seed,
            "sampler": sampler.state_dict(consumed=seen_in_epoch), "loader": loader.backend,
            "data": data.report.counts()}
    save_checkpoint(run_dir / "checkpoint.safetensors", model, meta)
    vis = next(iter(build_loader(records.subset(range(min(8, len(records)))), aug, 8, train=False,
                                 loader=cfg.loader, device=device, workers=0)))["image"]
    save_reconstruction_png(model, vis, run_dir / "reconstruction.png", seed=cfg.seed)
    print(f"mae: done in {time.perf_counter() - t0:.0f} s; wrote {run_dir}/"
          "{config.yaml, log.csv, checkpoint.safetensors, reconstruction.png}")
    return run_dir
