"""--stage finetune --init with checkpoints dermfast did not write: the official MAE layout (a ViT-B/16-shaped one
and a small one of a shape no preset has), timm weights for --model NAME; the encoder is inferred from the
checkpoint's shapes when no --preset is given, and an --init that would leave encoder weights unloaded is refused
(exit 2, one line) unless --init-partial.

The official layout is written out here from its source, not from dermfast:
facebookresearch/mae, models_mae.py, class MaskedAutoencoderViT (__init__):
    patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)  -> patch_embed.proj.{weight [D, C, p, p], bias}
    cls_token   = Parameter(zeros(1, 1, embed_dim))
    pos_embed   = Parameter(zeros(1, num_patches + 1, embed_dim), requires_grad=False)   # fixed sin-cos
    blocks      = [timm Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for depth]
                  -> norm1, attn.qkv [3D, D], attn.proj [D, D], norm2, mlp.fc1 [rD, D], mlp.fc2 [D, rD] (all with bias)
    norm        = LayerNorm(embed_dim)
    decoder_embed = Linear(embed_dim, decoder_embed_dim); mask_token [1, 1, Dd]; decoder_pos_embed [1, L + 1, Dd];
    decoder_blocks (as blocks, width Dd); decoder_norm; decoder_pred = Linear(Dd, p * p * in_chans)
and saved as {"model": state_dict} (main_pretrain.py / util/misc.py save_model; the released
mae_pretrain_vit_*.pth hold the "model" entry), with no other metadata. The encoder's forward
(`forward_encoder` without masking) is written out in `official_encoder` below for the same reason.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from dermfast.train.cli import main as train_main  # noqa: E402

SMALL = ["--toy-images", "96", "--toy-image-size", "32", "--batch-size", "16", "--loader", "torch",
         "--workers", "0", "--no-progress", "--log-every", "1", "--max-steps", "1"]


def official_mae_state_dict(patch, width, depth, img, mlp_ratio=4, in_chans=3, decoder=(512, 8), make=None):
    """The facebookresearch/mae MaskedAutoencoderViT state dict (keys and shapes above); `make(shape)` makes each
    tensor (default: small random values, so a wrong mapping cannot pass by accident)."""
    make = make or (lambda s: torch.randn(s) * 0.1)
    L, hidden = (img // patch) ** 2, int(width * mlp_ratio)

    def block(prefix, d):
        h = int(d * mlp_ratio)
        shapes = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                  "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                  "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,)}
        return {f"{prefix}.{k}": make(s) for k, s in shapes.items()}

    sd = {"cls_token": make((1, 1, width)), "pos_embed": make((1, L + 1, width)),
          "patch_embed.proj.weight": make((width, in_chans, patch, patch)), "patch_embed.proj.bias": make((width,))}
    for i in range(depth):
        sd.update(block(f"blocks.{i}", width))
    sd.update({"norm.weight": make((width,)), "norm.bias": make((width,))})
    assert hidden == sd["blocks.0.mlp.fc1.weight"].shape[0]
    if decoder is not None:
        dd, ddepth = decoder
        sd.update({"decoder_embed.weight": make((dd, width)), "decoder_embed.bias": make((dd,)),
                   "mask_token": make((1, 1, dd)), "decoder_pos_embed": make((1, L + 1, dd))})
        for i in range(ddepth):
            sd.update(block(f"decoder_blocks.{i}", dd))
        sd.update({"decoder_norm.weight": make((dd,)), "decoder_norm.bias": make((dd,)),
                   "decoder_pred.weight": make((patch * patch * in_chans, dd)),
                   "decoder_pred.bias": make((patch * patch * in_chans,))})
    return sd


def shapes_only(shape):
    """A tensor of the right shape on a one-element storage (stride 0): a ViT-B/16 state dict in 45 kB, so the
    shape inference and the refusals are tested at full size without 350 MB of random numbers."""
    return torch.full((), 0.01).expand(shape)


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "mae_pretrain_vit_base.pth"
    torch.save({"model": official_mae_state_dict(16, 768, 12, 224, make=shapes_only)}, path)
    return path


# A shape no preset has: patch 4, width 128, depth 3, 32 px (8 x 8 patches), mlp ratio 2.
ODD = dict(patch=4, width=128, depth=3, img=32, mlp_ratio=2, decoder=(64, 1))


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "mae_odd.pth"
    sd = official_mae_state_dict(**ODD)
    torch.save({"model": sd}, path)
    return path, sd


def finetune_cfg(**kw):
    from dermfast.train.finetune import FinetuneConfig
    return FinetuneConfig(**kw)


def resolve(cfg):
    from dermfast.train.distributed import world_from_env
    from dermfast.train.finetune import FinetuneStage
    return FinetuneStage().resolve(cfg, world_from_env())


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- ViT-B/16, official layout ------------------------------------------------------------------------------------

def test_vit_b16_official_layout_infers_the_encoder_when_no_preset_is_given(vit_b16, capsys):
    from dermfast.train.finetune import mae_preset_dict
    cfg = resolve(finetune_cfg(init=str(vit_b16)))
    p = mae_preset_dict(cfg)
    assert (p["patch_size"], p["embed_dim"], p["depth"], p["img_size"], p["in_chans"]) == (16, 768, 12, 224, 3)
    assert p["num_heads"] == 12 and p["mlp_ratio"] == 4.0  # as mae_vit_base_patch16 (models_mae.py)
    assert (p["decoder_embed_dim"], p["decoder_depth"]) == (512, 8)
    assert cfg.img_size == 224
    out = [line for line in capsys.readouterr().out.splitlines() if "inferred" in line]
    assert len(out) == 1 and "patch 16" in out[0] and "width 768" in out[0] and "depth 12" in out[0], out
    assert "224 px" in out[0] and "12 heads" in out[0] and "vit_b16" in out[0]


def test_vit_b16_official_layout_under_an_explicit_other_preset_is_refused(vit_b16, tmp_path, capsys):
    out = tmp_path / "ft"
    assert train_main(["--stage", "finetune", "--init", str(vit_b16), "--preset", "demo", "--out", str(out),
                       *SMALL]) == 2
    err = one_line_error(capsys)
    assert "facebookresearch/mae" in err and "patch 16, width 768, depth 12" in err, err
    assert "--preset vit_b16" in err and "--init-partial" in err and "0 of" in err, err
    assert not out.exists()  # refused before anything was written


def test_vit_b16_official_layout_with_its_own_preset_loads_every_encoder_tensor(vit_b16):
    """Shapes only (a ViT-B model takes 20 s to build on 2 cores): the check the CLI runs before any data."""
    from dermfast.train.finetune import init_coverage_for
    cfg = resolve(finetune_cfg(init=str(vit_b16), preset="vit_b16"))
    cov = init_coverage_for(cfg)
    assert not cov.missing and not cov.mismatched
    assert "patch_embed.proj.weight" in cov.loaded and "cls_token" in cov.loaded
    assert sum(k.startswith("blocks.") for k in cov.loaded) == 12 * 12


# models_mae.py's three architectures (mae_vit_base_patch16_dec512d8b, _large_patch16_, _huge_patch14_):
# (patch, width, depth, num_heads). The head count is not in the state dict; ViT-H's is 16 (head dim 80), not the
# 20 a head dim of 64 would give.
OFFICIAL_ARCHS = {"base": (16, 768, 12, 12), "large": (16, 1024, 24, 16), "huge": (14, 1280, 32, 16)}


@pytest.mark.parametrize("arch", sorted(OFFICIAL_ARCHS))
def test_official_architectures_are_inferred_with_their_head_counts(arch, tmp_path):
    """Also saved as main_pretrain.py saves (util/misc.py save_model: model, optimizer, epoch, scaler, args as an
    argparse.Namespace), which torch.load(weights_only=True) refuses unless Namespace is allowed."""
    import argparse

    from dermfast.models.classifier import checkpoint_shapes
    from dermfast.models.init_checkpoint import infer_encoder
    patch, width, depth, heads = OFFICIAL_ARCHS[arch]
    sd = official_mae_state_dict(patch, width, depth, 224, make=shapes_only)
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "epoch": 399, "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model=f"mae_vit_{arch}_patch{patch}", mask_ratio=0.75)},
               tmp_path / "checkpoint-399.pth")
    shapes, meta = checkpoint_shapes(tmp_path / "checkpoint-399.pth")
    assert shapes == {k: tuple(v.shape) for k, v in sd.items()} and meta == {}
    p = infer_encoder(shapes).preset
    assert (p.patch_size, p.embed_dim, p.depth, p.num_heads, p.img_size) == (patch, width, depth, heads, 224)


# -- a small official-layout checkpoint of a shape no preset has -------------------------------------------------

def official_encoder(sd, x, heads):
    """facebookresearch/mae models_mae.py `forward_encoder` with nothing masked, written out from the state dict:
    patch conv + pos_embed[:, 1:]; cls_token + pos_embed[:, :1] prepended; timm Block = x + attn(norm1(x)),
    x + mlp(norm2(x)) (LayerNorm eps 1e-6 as mae_vit_*: partial(nn.LayerNorm, eps=1e-6); attention softmax(q k^T /
    sqrt(head dim)) v over `heads` heads; mlp fc1 -> exact GELU -> fc2); final norm."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    t = t + sd["pos_embed"][:, 1:]
    t = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(x.shape[0], -1, -1), t], 1)
    B, N, D = t.shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(t, (D,), w["norm1.weight"], w["norm1.bias"], 1e-6)
        q, k, v = F.linear(h, w["attn.qkv.weight"], w["attn.qkv.bias"]).reshape(B, N, 3, heads, D // heads
                                                                                ).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) / math.sqrt(D // heads)).softmax(-1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(B, N, D), w["attn.proj.weight"], w["attn.proj.bias"])
        h = F.layer_norm(t, (D,), w["norm2.weight"], w["norm2.bias"], 1e-6)
        t = t + F.linear(F.gelu(F.linear(h, w["mlp.fc1.weight"], w["mlp.fc1.bias"])), w["mlp.fc2.weight"],
                         w["mlp.fc2.bias"])
    return F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], 1e-6)


def test_odd_shape_inferred_and_loaded_computes_the_official_encoder(odd):
    from dermfast.models.classifier import build_classifier, load_init
    from dermfast.train.finetune import classifier_spec, mae_preset_dict
    path, sd = odd
    cfg = resolve(finetune_cfg(init=str(path), global_pool="token"))
    p = mae_preset_dict(cfg)
    assert (p["patch_size"], p["embed_dim"], p["depth"], p["img_size"], p["mlp_ratio"]) == (4, 128, 3, 32, 2.0)
    assert p["num_heads"] == 2  # not in the layout: head dim 64 assumed (and said)
    model = build_classifier(classifier_spec(cfg, 5)).eval()
    rep = load_init(model, path)
    assert not rep.mismatched and set(rep.missing) == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), official_encoder(sd, x, heads=2), atol=1e-5, rtol=1e-5)


def test_odd_shape_through_the_cli_trains_from_it(odd, cache, tmp_path, capsys):
    path, sd = odd
    out = tmp_path / "ft"
    assert train_main(["--stage", "finetune", "--init", str(path), "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    line = [s for s in printed.splitlines() if "inferred" in s]
    assert len(line) == 1 and "patch 4, width 128, depth 3" in line[0] and "32 px" in line[0], line
    assert "head dim 64" in line[0], line
    rep = json.loads((out / "init_report.json").read_text())
    assert sum(k.startswith("blocks.") for k in rep["loaded"]) == 3 * 12 and "patch_embed.proj.weight" in rep["loaded"]
    assert not rep["mismatched"]
    from safetensors import safe_open
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        w = f.get_tensor("blocks.2.mlp.fc1.weight")
    assert meta["model"]["mae_preset"]["patch_size"] == 4 and meta["model"]["mae_preset"]["embed_dim"] == 128
    assert (w - sd["blocks.2.mlp.fc1.weight"]).abs().max() < 0.05  # started from the checkpoint


def test_width_matches_but_patch_does_not_is_refused_then_allowed_with_init_partial(cache, tmp_path, capsys):
    """The demo preset's width (192) and depth (4), patch 16 instead of 8: by name 26 tensors fit, the patch
    embedding does not. Under --preset demo: refused; with --init-partial: runs, the patch embedding listed."""
    path = tmp_path / "p16.pth"
    torch.save({"model": official_mae_state_dict(16, 192, 4, 64, decoder=(64, 1))}, path)
    flags = ["--stage", "finetune", "--init", str(path), "--preset", "demo", *SMALL]
    assert train_main([*flags, "--out", str(tmp_path / "a")]) == 2
    err = one_line_error(capsys)
    assert "patch_embed.proj.weight: checkpoint [192, 3, 16, 16] vs model [192, 3, 8, 8]" in err, err
    assert "leave out --preset" in err and "--init-partial" in err, err
    assert train_main([*flags, "--out", str(tmp_path / "b"), "--init-partial"]) == 0
    rep = json.loads((tmp_path / "b" / "init_report.json").read_text())
    assert any(m.startswith("patch_embed.proj.weight") for m in rep["mismatched"])
    capsys.readouterr()
    assert train_main(["--stage", "finetune", "--init", str(path), *SMALL, "--out", str(tmp_path / "c")]) == 0
    assert "patch 16, width 192, depth 4" in capsys.readouterr().out  # no --preset: inferred


def test_not_a_vit_checkpoint_for_mae_vit_is_refused(cache, tmp_path, capsys):
    from dermfast.models.classifier import ClassifierSpec, build_classifier
    torch.save(build_classifier(ClassifierSpec("convnext_atto", 10, 32)).state_dict(), tmp_path / "cnn.pth")
    assert train_main(["--stage", "finetune", "--init", str(tmp_path / "cnn.pth"), *SMALL,
                       "--out", str(tmp_path / "x")]) == 2
    err = one_line_error(capsys)
    assert "no ViT encoder" in err and "--model" in err, err


# -- timm checkpoints for --model NAME ---------------------------------------------------------------------------

def test_timm_checkpoint_for_its_model_loads_and_for_another_is_refused(cache, tmp_path, capsys):
    from dermfast.models.classifier import ClassifierSpec, build_classifier
    src = build_classifier(ClassifierSpec("convnext_atto", 1000, 32))  # an ImageNet head: not the data's
    torch.save({"state_dict": src.state_dict()}, tmp_path / "convnext_atto.pth")
    init = ["--init", str(tmp_path / "convnext_atto.pth"), "--img-size", "32", *SMALL]
    assert train_main(["--stage", "finetune", "--model", "convnext_atto", *init, "--out", str(tmp_path / "a")]) == 0
    rep = json.loads((tmp_path / "a" / "init_report.json").read_text())
    assert set(rep["missing"]) == {"head.fc.weight", "head.fc.bias"}
    assert train_main(["--stage", "finetune", "--model", "mobilenetv2_050", *init, "--out", str(tmp_path / "b")]) == 2
    err = one_line_error(capsys)
    assert "--model mobilenetv2_050" in err and "--init-partial" in err, err


def test_timm_vit_at_another_size_gets_the_position_embedding_resampled_as_timm_does(tmp_path):
    """timm's own loader (vision_transformer.checkpoint_filter_fn) resamples a learnt position embedding to the
    model's grid; load_init must give the same tensor instead of leaving it at its random start."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from dermfast.models.classifier import ClassifierSpec, build_classifier, load_init
    src = build_classifier(ClassifierSpec("vit_tiny_patch16_224", 1000, 64))
    with torch.no_grad():
        src.pos_embed.normal_()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "vit.pth")
    dst = build_classifier(ClassifierSpec("vit_tiny_patch16_224", 3, 32))
    rep = load_init(dst, tmp_path / "vit.pth")
    assert "pos_embed" in rep.loaded and not any(m.startswith("pos_embed") for m in rep.mismatched)
    want = checkpoint_filter_fn(sd, dst)["pos_embed"]
    torch.testing.assert_close(dst.pos_embed.detach(), want)
