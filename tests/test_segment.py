"""--stage segment: loss, models, a tiny end-to-end run + evaluation, and --model otsu.

The data come from records built by hand (images + masks as PNG files, non-square so that "original
resolution" means something), handed to the pipeline in place of the dataset reader."""
import argparse
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dermfast.data.records import ImageRecords
from dermfast.eval.segment_eval import evaluate_segmentation
from dermfast.models.segmenter import SegmenterSpec, build_segmenter, is_segmentation_checkpoint, load_segmenter
from dermfast.train.segment import seg_loss


def make_records(root, n=32, h=40, w=52, seed=0):
    """n dermoscopy-like images (a dark ellipse on skin, random place and size) with their masks."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    paths, masks, labels = [], [], []
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img = np.empty((h, w, 3), np.float32)
        img[:] = rng.uniform(190, 235, 3)
        img[m] = rng.uniform(40, 130, 3)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        p, q = root / "img" / f"case{i:03d}.png", root / "mask" / f"case{i:03d}_mask.png"
        Image.fromarray(img).save(p)
        Image.fromarray((m * 255).astype(np.uint8)).save(q)
        paths.append(str(p))
        masks.append(str(q))
        labels.append(i % 2)
    return ImageRecords(paths, np.array(labels), ["nv", "mel"], root=str(root), masks=np.array(masks, dtype=object),
                        origins=[f"user/{i:03d}.bmp" for i in range(n)])


@pytest.fixture
def masked_data(tmp_path, monkeypatch, cache):
    recs = make_records(tmp_path / "data")
    import dermfast.data.pipeline as pipeline
    monkeypatch.setattr(pipeline, "open_records", lambda data, **kw: recs)
    return recs


def eval_args(run, **kw):
    d = dict(checkpoint=[str(run)], data=None, split="test", out=None, device="cpu", batch_size=8, no_report=False)
    d.update(kw)
    return argparse.Namespace(**d)


# --- loss and models ---------------------------------------------------------------------------------------------
def test_seg_loss_is_bce_plus_soft_dice():
    logits = torch.randn(3, 1, 8, 8)
    target = (torch.rand(3, 1, 8, 8) > 0.5).float()
    bce, dl = seg_loss(logits, target)
    p = logits.sigmoid()
    ref_bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    inter = (p * target).flatten(1).sum(1)
    ref_dice = (1 - (2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)).mean()
    torch.testing.assert_close(bce, ref_bce, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dl, ref_dice, atol=1e-6, rtol=1e-5)
    good = (target * 40 - 20)  # confident and right
    assert seg_loss(good, target)[1] < 0.02 and seg_loss(good, target)[0] < 1e-6


@pytest.mark.parametrize("spec", [SegmenterSpec("unet", "resnet10t", 40, decoder_width=8),
                                  SegmenterSpec("vit", "vit_tiny_patch16_224", 32, decoder_width=8)])
def test_segmenters_map_images_to_one_logit_per_pixel(spec):
    model = build_segmenter(spec)
    y = model(torch.randn(2, 3, spec.img_size, spec.img_size))
    assert y.shape == (2, 1, spec.img_size, spec.img_size) and torch.isfinite(y).all()
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_mae_checkpoint_loads_into_the_vit_encoder(tmp_path):
    from dermfast.models.classifier import load_init
    from dermfast.models.mae import MaskedAutoencoderViT, get_preset
    from dermfast.train.checkpoint import save_safetensors
    preset = get_preset("demo")
    mae = MaskedAutoencoderViT(preset)
    save_safetensors(tmp_path / "mae.safetensors", mae.state_dict(), {"stage": "mae", "preset": preset.to_dict()})
    seg = build_segmenter(SegmenterSpec("vit", "mae_vit", preset.img_size, mae_preset=preset.to_dict()))
    rep = load_init(seg.encoder, tmp_path / "mae.safetensors", resample_pos_embed=False)
    assert not rep.mismatched and not [k for k in rep.missing if k.startswith(("blocks", "patch_embed"))]
    torch.testing.assert_close(seg.encoder.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)


# --- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # about 50 s on a loaded 2-core machine (timm import, 6 CPU steps, evaluation)
def test_segment_run_then_evaluate(masked_data, tmp_path, capsys):
    from dermfast.train.cli import main
    run = tmp_path / "seg"
    rc = main(["--stage", "segment", "--out", str(run), "--epochs", "2", "--batch-size", "8", "--img-size", "32",
               "--decoder-width", "8", "--device", "cpu", "--loader", "torch", "--no-progress", "--workers", "0"])
    assert rc == 0, capsys.readouterr().err
    meta = load_segmenter(run, "cpu")[1]
    assert meta["stage"] == "segment" and meta["model"]["arch"] == "unet"
    rows = list(csv.DictReader(open(run / "eval.csv")))
    assert rows and all(0 <= float(r["dice"]) <= 1 for r in rows)
    assert (run / "best.safetensors").is_file()
    val = json.loads((run / "val_metrics.json").read_text())
    assert val["baseline_otsu"]["n"] == val["model"]["n"] > 0

    m = evaluate_segmentation(eval_args(run))
    out = run / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    for k in ("dice", "jaccard", "hd95", "n", "baseline"):
        assert k in saved
    assert saved["n"] == m["n"] > 0 and 0 <= saved["dice"] <= 1 and saved["hd95"] >= 0
    assert saved["baseline"]["dice"] > 0.8  # Otsu on dark ellipses on skin
    per = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(per) == saved["n"] and all(r["image"].startswith("user/") for r in per)  # the user's paths
    assert np.mean([float(r["dice"]) for r in per]) == pytest.approx(saved["dice"], abs=1e-5)
    html = (out / "report.html").read_text()
    assert "worst" in html and "best" in html and "data:image/png;base64" in html


def test_otsu_stage_trains_nothing_and_evaluates(masked_data, tmp_path, capsys):
    from dermfast.train.cli import main
    run = tmp_path / "otsu"
    rc = main(["--stage", "segment", "--model", "otsu", "--out", str(run), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "otsu (no training)" in capsys.readouterr().out
    model, meta = load_segmenter(run)
    assert is_segmentation_checkpoint(run) and not is_segmentation_checkpoint(tmp_path / "nothing")
    assert model is None and meta["model"]["arch"] == "otsu"
    m = evaluate_segmentation(eval_args(run, no_report=True))
    assert m["dice"] == m["baseline"]["dice"] > 0.8
    assert m["hd95"] == m["baseline"]["hd95"]
    # a second run into the same folder is refused like any other run
    assert main(["--stage", "segment", "--model", "otsu", "--out", str(run), "--no-progress"]) == 2


def test_data_without_masks_is_refused(tmp_path, monkeypatch, cache, capsys):
    recs = make_records(tmp_path / "data", n=16)
    recs.masks = None
    import dermfast.data.pipeline as pipeline
    monkeypatch.setattr(pipeline, "open_records", lambda data, **kw: recs)
    from dermfast.train.cli import main
    rc = main(["--stage", "segment", "--out", str(tmp_path / "r"), "--epochs", "1", "--no-progress"])
    assert rc == 2 and "needs lesion masks" in capsys.readouterr().err


def test_evaluate_refuses_a_classifier_checkpoint(tmp_path):
    from dermfast.evaluate import EvalError
    from dermfast.train.checkpoint import save_safetensors
    save_safetensors(tmp_path / "c.safetensors", {"w": torch.zeros(1)}, {"stage": "finetune"})
    with pytest.raises(EvalError, match="--stage segment"):
        evaluate_segmentation(eval_args(tmp_path / "c.safetensors"))


@pytest.mark.parametrize("extra, why", [(["--encoder", "no_such_net"], "unknown --encoder"),
                                        (["--init", "INIT"], "--init initialises the ViT encoder"),
                                        (["--dice-weight", "-1"], "--dice-weight")])
def test_bad_options_are_refused_before_any_data(tmp_path, capsys, extra, why):
    from dermfast.train.cli import main
    (tmp_path / "w.safetensors").write_bytes(b"")
    extra = [str(tmp_path / "w.safetensors") if a == "INIT" else a for a in extra]
    assert main(["--stage", "segment", "--out", str(tmp_path / "r"), "--no-progress", *extra]) == 2
    assert why in capsys.readouterr().err and not (tmp_path / "r").exists()
