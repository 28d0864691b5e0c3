"""`python -m dermfast.synthesize --checkpoint RUN --per-class N --out DIR`: class-balanced synthetic sets on disk.

Output (DIR): images/<class>_<index>.png, manifest.csv and grid.png. manifest.csv has the columns the data
layer reads (`image` = file name under images/, `label` = class name; `--synthetic DIR` of every training
stage takes the folder as it is) plus sampler, steps, guidance, seed, precision, checkpoint: an image's seed and
settings regenerate it exactly (see dermfast.synth.sample). DIR/settings.json records the settings that determine
every image (dermfast.synth.manifest.IMAGE_SETTINGS). Resumable: rerun with the same settings, an image already on
disk AND in the manifest is skipped, so rerunning an interrupted command finishes the set (or extends it with a
larger --per-class). Rerun with other settings (say --steps 25 after --steps 10) into a folder that holds images,
it is refused (exit 2, naming the settings that differ) unless `--overwrite` replaces the folder's images.
`--balance-to DATA`: per-class quotas that bring
every class of DATA up to its largest class. `--fid-against DATA`: FID (overall and per class) of the set
against DATA's images (dermfast.synth.fid). Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from dermfast.cliparse import OneLineParser
from dermfast.synth.manifest import (SEED_STRIDE, bundle_digest, read_manifest, read_settings, settings_diff,
                                     settings_from_rows, write_manifest, write_settings)


class UsageError(ValueError):
    """Bad input: printed as one line, exit code 2."""


def _parser() -> OneLineParser:
    p = OneLineParser(prog="python -m dermfast.synthesize", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a finished --stage synth run (or its diffusers/ bundle)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--per-class", type=int, help="images per class")
    g.add_argument("--balance-to", metavar="DATA", help="quotas that balance DATA's classes (up to the largest)")
    p.add_argument("--out", required=True, help="output folder (images/, manifest.csv, grid.png)")
    p.add_argument("--sampler", default="ddim", help="ddim | euler | euler_a | pndm | dpmpp (DPM-Solver++)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance weight (1 = none)")
    p.add_argument("--batch-size", type=int, default=64, help="images per denoiser batch")
    p.add_argument("--seed", type=int, default=0, help="base seed (each image's own seed is in the manifest)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA) | bf16 | fp32")
    p.add_argument("--fid-against", metavar="DATA", help="also report FID against DATA's real images")
    p.add_argument("--fid-features", metavar="SPEC",
                   help="FID features: mae:RUN (dermfast MAE encoder) or inception:PATH; default: the run's "
                        "perceptual MAE encoder when it had one")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the images --out holds (needed when they were made with other settings)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv):
    return _parser().parse_args(argv)


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "class"


def image_seed(base: int, class_index: int, j: int) -> int:
    """The seed of image j of class class_index (unique per image for j < 10^7, classes < 100)."""
    return base * SEED_STRIDE + class_index * 10_000_000 + j


def quotas(args, classes: list[str]) -> list[int]:
    if args.per_class is not None:
        if args.per_class < 1:
            raise UsageError(f"--per-class must be >= 1, got {args.per_class}")
        return [args.per_class] * len(classes)
    if args.balance_to is None:
        raise UsageError("give --per-class N or --balance-to DATA")
    from dermfast.data.adapters import open_any
    from dermfast.data.records import DatasetError
    try:
        rec = open_any(args.balance_to)
    except DatasetError as e:
        raise UsageError(f"--balance-to: {e}") from None
    counts = rec.class_counts()
    if not any(counts.values()):
        raise UsageError(f"--balance-to {args.balance_to!r} has no labelled images")
    unknown = [c for c, n in counts.items() if n and c not in classes]
    if unknown:
        raise UsageError(f"--balance-to: class {unknown[0]!r} of the data is not one the checkpoint generates "
                         f"({', '.join(classes)})")
    top = max(counts.values())
    return [top - counts.get(c, 0) for c in classes]


def prepare_out(out: Path, settings: dict, overwrite: bool) -> dict[str, dict]:
    """The manifest rows of `out` to keep (their images are on disk), after checking they were made with
    `settings`; writes settings.json. Images made with other settings: UsageError naming the differing settings,
    or, with `overwrite`, deleted (with the manifest, grid and FID report) so the set starts afresh."""
    manifest = out / "manifest.csv"
    listed = read_manifest(manifest)
    rows = {k: r for k, r in listed.items() if (out / "images" / k).is_file()}
    if overwrite:
        for k in listed:
            (out / "images" / k).unlink(missing_ok=True)
        for f in (manifest, out / "grid.png", out / "fid.json"):
            f.unlink(missing_ok=True)
        rows = {}
    elif rows:
        old = read_settings(out) or settings_from_rows(rows)
        diff = settings_diff(old, settings)
        if diff:
            raise UsageError(f"{out} holds {len(rows)} image(s) made with other settings ({'; '.join(diff)}): "
                             "pass --overwrite to replace them, or give another --out")
    (out / "images").mkdir(parents=True, exist_ok=True)
    write_settings(out, settings)  # before any image: every image in the folder was made with these
    return rows


def synthesize(args) -> dict:
    import contextlib

    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from dermfast.device import resolve_device
    from dermfast.synth.models import load_bundle, latent_size
    from dermfast.synth.sample import SAMPLERS, sample_images, save_grid, to_uint8

    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; accepted: {', '.join(SAMPLERS)}")
    if args.steps < 1 or args.batch_size < 1:
        raise UsageError("--steps and --batch-size must be >= 1")
    if args.guidance < 0:
        raise UsageError(f"--guidance must be >= 0, got {args.guidance}")
    if args.precision not in ("auto", "bf16", "fp32"):
        raise UsageError(f"--precision must be auto, bf16 or fp32, got {args.precision!r}")
    bundle = load_bundle(args.checkpoint)
    if bundle.meta.get("denoiser_steps", 1) == 0:
        raise UsageError(f"checkpoint {args.checkpoint!r} holds a VAE only (its run never trained the denoiser)")
    classes = bundle.classes
    want = quotas(args, classes)
    try:
        dev = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"bad --device {args.device!r}: {e}") from None
    bf16 = dev.type == "cuda" and args.precision != "fp32"
    out = Path(args.out).expanduser()
    manifest = out / "manifest.csv"
    ckpt = str(bundle.path)
    settings = {"sampler": args.sampler, "steps": args.steps, "guidance": float(args.guidance), "seed": args.seed,
                "precision": "bf16" if bf16 else "fp32", "checkpoint": ckpt,
                "checkpoint_sha256": bundle_digest(bundle.path)}
    rows = prepare_out(out, settings, args.overwrite)
    plan = []
    for c, (cls, n) in enumerate(zip(classes, want)):
        for j in range(n):
            name = f"{safe_name(cls)}_{j:06d}.png"
            if name not in rows:
                plan.append((c, name, image_seed(args.seed, c, j)))
    kept = sum(want) - len(plan)
    bundle.to(dev)
    lat = latent_size(bundle.vae, bundle.img_size)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    bar = tqdm(total=len(plan), unit="img", desc=f"sampling ({args.sampler}, {args.steps} steps)",
               disable=args.no_progress, dynamic_ncols=True)
    for i in range(0, len(plan), args.batch_size):
        chunk = plan[i:i + args.batch_size]
        labels = torch.tensor([c for c, _, _ in chunk], dtype=torch.long)
        with amp:
            imgs = sample_images(bundle.unet, bundle.vae, bundle.scheduler_config, labels, [s for _, _, s in chunk],
                                 sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                 null_class=bundle.null_class, latent_size=lat, scale=bundle.scale)
        for (c, name, seed), im in zip(chunk, to_uint8(imgs)):
            tmp = out / "images" / f".{name}.tmp.png"
            Image.fromarray(im.numpy()).save(str(tmp))
            os.replace(tmp, out / "images" / name)
            rows[name] = dict(image=name, label=classes[c], sampler=args.sampler, steps=args.steps,
                              guidance=args.guidance, seed=seed, precision=settings["precision"], checkpoint=ckpt)
        write_manifest(manifest, rows)  # after the images: a row always names a complete file
        bar.update(len(chunk))
    bar.close()
    write_manifest(manifest, rows)
    secs = time.perf_counter() - t0
    grid_rows = []
    for cls in classes:
        names = sorted(k for k, r in rows.items() if r["label"] == cls)[:8]
        grid_rows.append([Image.open(out / "images" / k).convert("RGB") for k in names])
    width = max((len(r) for r in grid_rows), default=0)
    if width:
        import numpy as np
        blank = np.full((bundle.img_size, bundle.img_size, 3), 255, np.uint8)
        cells = [np.asarray(r[k]) if k < len(r) else blank for r in grid_rows for k in range(width)]
        save_grid(cells, len(classes), out / "grid.png", classes)
    result = {"written": len(plan), "kept": kept, "seconds": secs,
              "images_per_s": len(plan) / secs if secs > 0 and plan else None, "out": str(out)}
    print(f"synthesize: {len(plan)} image(s) written, {kept} already there, "
          f"{result['images_per_s'] or 0:.2f} images/s ({'bf16' if bf16 else 'fp32'}, {dev}); "
          f"{out / 'manifest.csv'}, {out / 'grid.png'}")
    if args.fid_against:
        from dermfast.data.adapters import open_any
        from dermfast.synth.fid import fid_report
        spec = args.fid_features or bundle.meta.get("perceptual_spec")
        if not spec or not spec.startswith(("mae:", "inception:")):
            raise UsageError("--fid-against needs --fid-features mae:RUN or inception:PATH (no feature net is "
                             "downloaded, and the run had no MAE perceptual encoder to reuse)")
        try:
            real = open_any(args.fid_against)
        except ValueError as e:
            raise UsageError(f"--fid-against: {e}") from None
        result["fid"] = fid_report(out, real, spec, dev, bundle.img_size, classes)
    return result


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from dermfast.synth.features import FeatureError
    from dermfast.synth.models import CheckpointError
    try:
        synthesize(args)
    except (UsageError, CheckpointError, FeatureError) as e:
        print(f"synthesize: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synthesize: interrupted; rerun the same command to finish (written images are kept)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
