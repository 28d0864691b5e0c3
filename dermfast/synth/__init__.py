"""Diffusion synthesis: `--stage synth` (stage.py: latent diffusion, DerMAE), `--stage dreambooth` (dreambooth.py:
SD LoRA, Derm-T2IM), sampling (sample.py; CLI `python -m dermfast.synthesize`), FID (fid.py), feature nets
(features.py), DullRazor (hair.py). Nothing here imports diffusers at import time: stage discovery imports
every module of this package."""
