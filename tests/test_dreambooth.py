"""`--stage dreambooth` on a tiny randomly initialised Stable Diffusion built here from configs (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel + a CLIPTokenizer over a hand-written vocabulary): LoRA steps train only the
adapters, the adapters load back into a pipeline that samples, and bad input exits 2."""
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from dermfast.train.cli import main as train_main  # noqa: E402

SMALL = ["--toy-images", "64", "--toy-image-size", "32", "--img-size", "16", "--batch-size", "4", "--shots", "2",
         "--loader", "torch", "--workers", "0", "--no-progress", "--log-every", "1", "--lr", "1e-3",
         "--warmup-epochs", "0"]


def tiny_sd(root):
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for t in letters + [c + "</w>" for c in letters]:
        vocab[t] = len(vocab)
    tok_dir = root / "tok"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=40,
                              pad_token="!")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=40,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=2, projection_dim=32))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    sd = root / "sd"
    pipe.save_pretrained(str(sd))
    return sd


def test_lora_steps_save_load_sample(cache, tmp_path):
    sd = tiny_sd(tmp_path)
    out = tmp_path / "db"
    assert train_main(["--stage", "dreambooth", "--pretrained", str(sd), "--max-steps", "3", "--hair-removal",
                       "--out", str(out), *SMALL]) == 0
    from safetensors.torch import load_file
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all("lora" in k for k in lora)
    ckpt = load_file(str(out / "checkpoint.safetensors"))
    assert ckpt and all("lora" in k for k in ckpt)  # adapters only, not the frozen SD weights
    assert any(not torch.all(v == 0) for k, v in ckpt.items() if "lora_B" in k)  # B starts at 0: trained
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["mel"] == "a dermoscopic image of a melanoma"

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(sd), safety_checker=None, requires_safety_checker=False)
    base = pipe(prompts["mel"], num_inference_steps=2, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(out / "lora"))
    img = pipe(prompts["mel"], num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(img)).all()
    assert abs(img - base).max() > 0  # the adapters change the output


def test_bad_input(cache, tmp_path, capsys):
    assert train_main(["--stage", "dreambooth", "--out", str(tmp_path / "a"), *SMALL]) == 2
    assert "--pretrained PATH" in capsys.readouterr().err
    assert train_main(["--stage", "dreambooth", "--pretrained", str(tmp_path), "--out", str(tmp_path / "b"),
                       *SMALL]) == 2
    assert "not a diffusers Stable Diffusion folder" in capsys.readouterr().err


# ------------------------------------------------------------------ --lora-alpha survives diffusers' loader
RANK, ALPHA = 4, 16.0  # alpha != rank: a loader that drops alpha applies the adapters at 1.0 instead of 4.0


@pytest.fixture(scope="module")
def alpha_run(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("alpha")
    sd = tiny_sd(root)
    out = root / "db"
    assert train_main(["--stage", "dreambooth", "--pretrained", str(sd), "--max-steps", "3", "--lora-rank",
                       str(RANK), "--lora-alpha", str(ALPHA), "--out", str(out), *SMALL]) == 0
    return sd, out


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 7, 32, generator=g))


def eps(unet):
    z, t, ctx = unet_inputs()
    with torch.no_grad():
        return unet(z, t, encoder_hidden_states=ctx).sample


def merged_lora_eps(sd, adapters, rank, alpha):
    """Noise prediction of the plain UNet with each adapted Linear's weight replaced by W + (alpha / r) B A: the LoRA
    formula as written in microsoft/LoRA, loralib/layers.py (Linear: `self.scaling = self.lora_alpha / self.r`,
    merge: `self.weight.data += T(self.lora_B @ self.lora_A) * self.scaling`)."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(str(sd / "unet"))
    mods = dict(unet.named_modules())
    names = {k.rsplit(".lora_", 1)[0] for k in adapters}
    assert names and all(isinstance(mods[n], torch.nn.Linear) for n in names)
    with torch.no_grad():
        for n in names:
            A, B = adapters[f"{n}.lora_A.weight"], adapters[f"{n}.lora_B.weight"]
            assert A.shape[0] == rank and B.shape[1] == rank
            mods[n].weight += (alpha / rank) * (B @ A)
    return eps(unet)


def test_diffusers_loads_lora_at_alpha_over_rank(alpha_run):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    sd, out = alpha_run
    trained = load_file(str(out / "checkpoint.safetensors"))  # the adapters as trained (peft names)
    ref = merged_lora_eps(sd, trained, RANK, ALPHA)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd), safety_checker=None, requires_safety_checker=False)
    base = eps(pipe.unet)
    pipe.load_lora_weights(str(out / "lora"))
    loaded = eps(pipe.unet)
    effect = (ref - base).abs().max().item()
    assert effect > 1e-3, effect  # the adapters matter, so 1e-5 below tells the scales apart
    err = (loaded - ref).abs().max().item()
    assert err < 1e-5, f"diffusers-loaded UNet is {err:.3g} off the trained adapters (LoRA effect {effect:.3g})"


def test_pre_fix_run_folder_repaired(alpha_run, tmp_path):
    """A run folder written before the adapter metadata was saved: diffusers silently applies it at scale 1.0;
    add_lora_metadata rewrites it with the run's rank and alpha (from config.yaml), after which it loads right."""
    import shutil

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dermfast.synth.dreambooth import add_lora_metadata
    from dermfast.train.config import ConfigError
    sd, out = alpha_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    trained = load_file(str(old / "checkpoint.safetensors"))
    StableDiffusionPipeline.save_lora_weights(str(old / "lora"), safe_serialization=True,  # as the old code did
                                              unet_lora_layers=convert_state_dict_to_diffusers(dict(trained)))
    lora_file = old / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora_file), framework="pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})

    def loaded_eps():
        pipe = StableDiffusionPipeline.from_pretrained(str(sd), safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(old / "lora"))
        return eps(pipe.unet)

    ref = merged_lora_eps(sd, trained, RANK, ALPHA)
    at_one = merged_lora_eps(sd, trained, RANK, RANK)  # scale 1.0: what diffusers does without the metadata
    assert (loaded_eps() - at_one).abs().max() < 1e-5 and (at_one - ref).abs().max() > 1e-3

    bad = tmp_path / "bad"  # a config.yaml that disagrees with the tensors is refused, not written into the file
    shutil.copytree(old, bad)
    (bad / "config.yaml").write_text((bad / "config.yaml").read_text().replace(f"lora_rank: {RANK}", "lora_rank: 8"))
    with pytest.raises(ConfigError, match=r"adapter rank\(s\) \[4\] but config.yaml says lora_rank 8"):
        add_lora_metadata(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        add_lora_metadata(tmp_path / "nowhere")

    assert add_lora_metadata(old) == lora_file
    assert (loaded_eps() - ref).abs().max() < 1e-5
    new_file = out / "lora" / "pytorch_lora_weights.safetensors"  # what a run writes today
    repaired, fresh = load_file(str(lora_file)), load_file(str(new_file))
    assert repaired.keys() == fresh.keys() and all(torch.equal(repaired[k], fresh[k]) for k in fresh)

    def adapter_meta(p):
        with safe_open(str(p), framework="pt") as f:
            return json.loads(f.metadata()["lora_adapter_metadata"])
    meta = adapter_meta(lora_file)
    assert meta == adapter_meta(new_file) and meta["unet.r"] == RANK and meta["unet.lora_alpha"] == ALPHA
    stamp = lora_file.stat().st_mtime_ns
    assert add_lora_metadata(old) == lora_file and lora_file.stat().st_mtime_ns == stamp  # has it: left alone
