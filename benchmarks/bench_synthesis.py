"""Synthesis throughput: images/s sampling the same class-conditioned latent diffusion model for the same steps.

Workload: dermfast.synth's "small" preset (AutoencoderKL 64-128-256, UNet2DModel 128-256-256 with class
embeddings) at 64 px, batch 64, DDIM 25 steps, classifier-free guidance 2 (one 2B-row UNet call per step), VAE
decode included. Weights are random (timing does not depend on them).

Implementations:
  diffusers-default  the loop every diffusers pipeline runs (scheduler.step + UNet + VAE decode), fp32, eager,
                     diffusers' default attention processor: the baseline. (diffusers has no pipeline for a
                     class-conditioned UNet2DModel with guidance; dermfast.synth.sample.sample_images is that loop.)
  dermfast           the same loop with the UNet and VAE in bf16, channels-last, SDPA attention (AttnProcessor2_0),
                     and the UNet under torch.compile (mode max-autotune-no-cudagraphs) on CUDA
On a CPU (no GPU, or --quick): the tiny preset at 16 px, batch 4, 2 steps, fp32 for both and no compile: proves
the harness only, not performance. Needs diffusers (`pip install -e .[synth]`); reported absent otherwise.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import absent, error_row, main, on_gpu, peak_mib, row, time_fn  # noqa: E402

BENCH = "synthesis"
K = 7  # classes (HAM10000)


def build(size: str, img: int, device):
    from diffusers import AutoencoderKL, UNet2DModel

    from dermfast.synth.models import latent_size, scheduler_config, unet_config, vae_config
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config(size, img))
    lat = latent_size(vae, img)
    unet = UNet2DModel(**unet_config(size, lat, 4, K))
    return vae.to(device).eval(), unet.to(device).eval(), lat, scheduler_config()


def set_processor(model, proc) -> None:
    from diffusers.models.attention_processor import Attention
    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(proc)


def run(quick: bool = False) -> list[dict]:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return [absent(BENCH, "ddim", "", "", impl, "fwd", "diffusers not installed (pip install -e .[synth])")
                for impl in ("diffusers-default", "dermfast")]
    from dermfast.synth.sample import sample_images
    gpu = on_gpu() and not quick
    dev = torch.device("cuda" if gpu else "cpu")
    size, img, batch, steps = ("small", 64, 64, 25) if gpu else ("tiny", 16, 4, 2)
    shape = f"B{batch} {img}px {steps} steps"
    rows = []
    labels = torch.arange(batch) % K
    seeds = list(range(batch))
    for impl in ("diffusers-default", "dermfast"):
        try:
            vae, unet, lat, sched = build(size, img, dev)
            dtype = torch.float32
            if impl == "dermfast" and gpu:
                from diffusers.models.attention_processor import AttnProcessor2_0
                dtype = torch.bfloat16
                set_processor(unet, AttnProcessor2_0())
                set_processor(vae, AttnProcessor2_0())
                unet.to(dtype=dtype, memory_format=torch.channels_last)
                vae.to(dtype=dtype, memory_format=torch.channels_last)
                unet = torch.compile(unet, mode="max-autotune-no-cudagraphs")
            elif impl == "diffusers-default":
                from diffusers.models.attention_processor import AttnProcessor
                set_processor(unet, AttnProcessor())

            def fn():
                return sample_images(unet, vae, sched, labels, seeds, sampler="ddim", steps=steps, guidance=2.0,
                                     null_class=K, latent_size=lat, scale=1.0, dtype=dtype)

            t = time_fn(fn, warmup=2 if gpu else 1, rep=10 if gpu else 3)
            rows.append(row(BENCH, "ddim cfg", shape, dtype, impl, "fwd", t, peak=peak_mib(fn) if gpu else None,
                            extra={"images_per_s": batch / (t["median_ms"] / 1e3)},
                            note="" if gpu else "CPU: tiny preset, fp32, no compile (harness check only)"))
        except Exception as e:  # one failing implementation must not hide the other's row
            rows.append(error_row(BENCH, f"{impl}: {type(e).__name__}: {e}", workload="ddim cfg", shape=shape,
                                  impl=impl, pass_="fwd"))
    return rows


def summary(rows: list[dict]) -> str:
    ips = {r["impl"]: float(r["images_per_s"]) for r in rows if r.get("images_per_s")}
    if "diffusers-default" in ips and "dermfast" in ips:
        if any("CPU" in r.get("note", "") for r in rows):
            return "### synthesis\n\nCPU harness check only (tiny preset, fp32 both): no speed result\n"
        return (f"### synthesis\n\ndermfast {ips['dermfast']:.1f} images/s vs diffusers default "
                f"{ips['diffusers-default']:.1f} ({ips['dermfast'] / ips['diffusers-default']:.2f}x; target >= 2x "
                "on an H100)\n")
    return "### synthesis\n\nnot measured (diffusers missing or a row failed)\n"


if __name__ == "__main__":
    sys.exit(main(run))
