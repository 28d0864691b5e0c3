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


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("DERMFAST_CACHE", str(path))
        yield path


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
