"""Classifier builder: MAE encoder weights load by name (and compute the same function), timm models by name,
local --init weights with every missing / unexpected key listed, classifier checkpoints round-trip."""
import pytest
import torch

from dermfast.models.classifier import (CheckpointError, ClassifierSpec, build_classifier, classifier_metadata,
                                        load_classifier, load_init)
from dermfast.models.mae import MAEPreset, MaskedAutoencoderViT

def save_checkpoint(path, model, metadata):
    """The checkpoint format both the old and the new engine write: safetensors, JSON-encoded metadata values."""
    import json
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={k: json.dumps(v) for k, v in metadata.items()})


TINY = MAEPreset(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                 decoder_depth=1, decoder_num_heads=2)


def mae_checkpoint(tmp_path):
    mae = MaskedAutoencoderViT(TINY)
    with torch.no_grad():  # non-trivial values everywhere, so a wrong mapping cannot pass by accident
        for p in mae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, mae, {"stage": "mae", "preset": TINY.to_dict()})
    return mae, path


def spec(pool="avg", num_classes=3):
    return ClassifierSpec("mae_vit", num_classes, TINY.img_size, mae_preset=TINY.to_dict(), global_pool=pool)


def test_mae_encoder_loads_by_name_and_lists_every_other_key(tmp_path):
    mae, path = mae_checkpoint(tmp_path)
    model = build_classifier(spec("avg"))
    rep = load_init(model, tmp_path)  # a run directory works as well as a file
    assert rep.source == str(path)
    assert set(rep.missing) == {"pos_embed", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(rep.unexpected) == {k for k in mae.state_dict() if k.startswith(("decoder", "mask_token", "norm."))}
    assert not rep.mismatched
    assert "blocks.1.attn.qkv.weight" in rep.loaded and "patch_embed.proj.weight" in rep.loaded
    for k in rep.loaded:
        assert torch.equal(model.state_dict()[k], mae.state_dict()[k]), k
    text = rep.summary()
    assert "missing" in text and "fc_norm.weight" in text and "decoder_blocks.{0}.*" in text


def test_loaded_encoder_computes_what_the_mae_encoder_computes(tmp_path):
    """With nothing masked, the MAE encoder (patch embedding + its fixed sin-cos position embedding, class token,
    blocks, norm: written out here from the MAE's own modules) and the classifier compute the same tokens."""
    mae, _ = mae_checkpoint(tmp_path)
    model = build_classifier(spec("token")).eval()
    rep = load_init(model, tmp_path)
    assert "norm.weight" in rep.loaded and "fc_norm.weight" not in rep.missing
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = mae.patch_embed(x) + mae.pos_embed
        t = torch.cat([mae.cls_token.expand(2, -1, -1), t], 1)
        for blk in mae.eval().blocks:
            t = blk(t)
        want = mae.norm(t)
        feats = model.forward_features(x)
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)


def test_shape_mismatch_is_listed_not_loaded(tmp_path):
    _, _ = mae_checkpoint(tmp_path)
    wider = MAEPreset(**{**TINY.to_dict(), "embed_dim": 96, "num_heads": 3})
    model = build_classifier(ClassifierSpec("mae_vit", 2, 32, mae_preset=wider.to_dict()))
    rep = load_init(model, tmp_path)
    assert any(m.startswith("patch_embed.proj.weight: checkpoint [64, 3, 8, 8] vs model [96, 3, 8, 8]")
               for m in rep.mismatched)
    assert "patch_embed.proj.weight" in rep.missing and "patch_embed.proj.weight" not in rep.loaded


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "convnext_atto", "mobilenetv2_050"])
def test_timm_models_by_name(arch):
    model = build_classifier(ClassifierSpec(arch, 4, 64, drop_path=0.1)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet_9000'"):
        build_classifier(ClassifierSpec("resnet_9000", 2, 64))


def test_timm_style_checkpoint_with_other_head(tmp_path):
    src = build_classifier(ClassifierSpec("convnext_atto", 1000, 64))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    dst = build_classifier(ClassifierSpec("convnext_atto", 2, 64))
    rep = load_init(dst, tmp_path / "w.pth")
    assert {m.split(":")[0] for m in rep.mismatched} == {"head.fc.weight", "head.fc.bias"}
    assert set(rep.missing) == {"head.fc.weight", "head.fc.bias"} and not rep.unexpected
    assert torch.equal(dst.state_dict()["stem.0.weight"], src.state_dict()["stem.0.weight"])


def test_classifier_checkpoint_round_trip_and_refusals(tmp_path):
    s = spec("avg", 2)
    model = build_classifier(s).eval()
    save_checkpoint(tmp_path / "best.safetensors", model, classifier_metadata(s, ["nevus", "melanoma"]))
    back, meta = load_classifier(tmp_path)
    assert meta["classes"] == ["nevus", "melanoma"] and meta["stage"] == "finetune"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))

    (tmp_path / "mae").mkdir()
    mae_checkpoint(tmp_path / "mae")
    with pytest.raises(CheckpointError, match="is a 'mae' checkpoint; this needs a classifier from --stage finetune"):
        load_classifier(tmp_path / "mae")
    bad = {**classifier_metadata(s, ["nevus", "melanoma"]), "classes": ["a", "b", "c"]}
    save_checkpoint(tmp_path / "bad.safetensors", model, bad)
    with pytest.raises(CheckpointError, match="3 class names but the model has 2 outputs"):
        load_classifier(tmp_path / "bad.safetensors")
    three = classifier_metadata(spec("avg", 3), ["a", "b", "c"])
    save_checkpoint(tmp_path / "head.safetensors", model, three)
    with pytest.raises(CheckpointError, match="head.weight"):
        load_classifier(tmp_path / "head.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "nope")


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_dermfast_mae_checkpoint_covers_everything_the_classifier_needs(tmp_path, pool):
    """What finetune checks before a run (shapes only, model on the meta device) agrees with what load_init then
    does: dermfast's own MAE -> finetune needs the patch embedding, class token and every block (and the final
    norm under token pooling), never the sin-cos position embedding or, with average pooling, the final norm."""
    from dermfast.models.classifier import checkpoint_shapes, read_checkpoint
    from dermfast.models.init_checkpoint import init_coverage, required_keys, unloaded_required
    mae, path = mae_checkpoint(tmp_path)
    shapes, meta = checkpoint_shapes(path)
    tensors, meta2 = read_checkpoint(path)
    assert shapes == {k: tuple(v.shape) for k, v in tensors.items()} and meta == meta2
    with torch.device("meta"):
        ghost = build_classifier(spec(pool))
    cov = init_coverage(ghost, spec(pool), shapes)
    assert cov.complete and "pos_embed" not in cov.required and ("norm.weight" in cov.required) == (pool == "token")
    assert {k.split(".")[0] for k in cov.required} == {"cls_token", "patch_embed", "blocks"} | (
        {"norm"} if pool == "token" else set())
    model = build_classifier(spec(pool))
    rep = load_init(model, path)
    assert sorted(required_keys(model, spec(pool))) == sorted(cov.loaded)
    assert not unloaded_required(model, spec(pool), rep)
    wider = ClassifierSpec("mae_vit", 3, 32, mae_preset={**TINY.to_dict(), "embed_dim": 96, "num_heads": 3})
    with torch.device("meta"):
        cov = init_coverage(build_classifier(wider), wider, shapes)
    assert not cov.complete and not cov.loaded
    assert cov.mismatched[0] == "cls_token: checkpoint [1, 1, 64] vs model [1, 1, 96]"
