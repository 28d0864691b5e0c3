"""`--stage finetune` end to end on a small embedded dataset: MAE run -> fine-tune from it (keys listed) ->
evaluate on the run's own test split -> export; a timm model from scratch; layer-wise lr decay; bad input."""
import json

import pytest
import torch

pytest.importorskip("sklearn")

from dermfast.train.cli import main as train_main  # noqa: E402

SMALL = ["--toy-images", "192", "--toy-image-size", "64", "--batch-size", "32", "--loader", "torch",
         "--workers", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def mae_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mae"
    assert train_main(["--stage", "mae", "--max-steps", "2", "--out", str(out), *SMALL]) == 0
    return out


def meta_of(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in f.metadata().items()}


def test_mae_to_finetune_to_evaluate_to_export(mae_run, tmp_path, capsys):
    out = tmp_path / "ft"
    assert train_main(["--stage", "finetune", "--init", str(mae_run), "--max-steps", "2", "--eval-every", "1",
                       "--mixup", "0.8", "--cutmix", "1.0", "--class-weights", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "missing (left at initial values), 5: pos_embed, fc_norm.weight, fc_norm.bias, head.weight" in printed
    assert "unexpected (unused)" in printed and "decoder_blocks" in printed
    rep = json.loads((out / "init_report.json").read_text())
    assert "blocks.0.attn.qkv.weight" in rep["loaded"] and "mask_token" in rep["unexpected"]
    assert set(rep["missing"]) == {"pos_embed", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}

    from safetensors.torch import load_file
    mae_w, ft_w = load_file(str(mae_run / "checkpoint.safetensors")), load_file(str(out / "checkpoint.safetensors"))
    assert not torch.equal(mae_w["blocks.0.attn.qkv.weight"], ft_w["blocks.0.attn.qkv.weight"])  # trained
    assert (mae_w["blocks.0.attn.qkv.weight"] - ft_w["blocks.0.attn.qkv.weight"]).abs().max() < 0.05  # from it

    for name in ("best.safetensors", "checkpoint.safetensors"):
        meta = meta_of(out / name)
        assert meta["stage"] == "finetune" and meta["model"]["arch"] == "mae_vit"
        assert meta["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"] and meta["positive"] == "mel"
    assert "balanced_accuracy" in (out / "eval.csv").read_text().splitlines()[0]

    from dermfast.evaluate import main as eval_main
    assert eval_main(["--checkpoint", str(out), "--explain", "1", "--errors", "1"]) == 0
    m = json.loads((out / "eval/metrics.json").read_text())
    assert m["checkpoint"].endswith("best.safetensors") and "test split" in m["data"]
    assert m["n"] == sum(1 for line in (out / "splits.csv").read_text().splitlines() if line.endswith(",test"))
    assert (out / "eval/report.html").stat().st_size > 10_000

    pytest.importorskip("onnx")
    from dermfast.export import main as export_main
    assert export_main(["--checkpoint", str(out), "--format", "onnx", "--exporter", "legacy", "--no-latency"]) == 0
    side = json.loads((out / "model.json").read_text())
    assert side["class_names"] == meta["classes"] and side["input"]["size"] == 64


def test_timm_model_from_scratch_with_layer_decay(cache, tmp_path):
    out = tmp_path / "cnn"
    assert train_main(["--stage", "finetune", "--model", "convnext_atto", "--img-size", "32", "--max-steps", "1",
                       "--select", "pauc", "--out", str(out), *SMALL]) == 0
    meta = meta_of(out / "checkpoint.safetensors")
    assert meta["model"]["arch"] == "convnext_atto" and meta["config"]["img_size"] == 32
    best = meta_of(out / "best.safetensors")  # kept by --select pauc (the positive class: mel)
    assert set(best["best"]) == {"pauc"} and 0.0 <= best["best"]["pauc"] <= 0.2


def test_layer_decay_groups_scale_with_depth():
    from dermfast.models.classifier import ClassifierSpec, build_classifier
    from dermfast.models.mae import get_preset
    from dermfast.train.finetune import FinetuneConfig, FinetuneStage
    model = build_classifier(ClassifierSpec("mae_vit", 3, 64, mae_preset=get_preset("demo").to_dict()))
    groups = FinetuneStage().param_groups(model, FinetuneConfig(layer_decay=0.5))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = len(model.blocks)  # layers: 0 embeddings, 1..depth blocks, depth + 1 the head and final norms
    assert scale[id(named["head.weight"])] == 1.0
    assert scale[id(named["patch_embed.proj.weight"])] == pytest.approx(0.5 ** (depth + 1))
    assert scale[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(0.5 ** depth)
    assert scale[id(named[f"blocks.{depth - 1}.mlp.fc1.weight"])] == pytest.approx(0.5)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(named["pos_embed"])] == 0.0 and decay[id(named["blocks.0.norm1.weight"])] == 0.0
    assert FinetuneStage().param_groups(model, FinetuneConfig(layer_decay=1.0)) is None


@pytest.mark.parametrize("flags,expected", [
    (["--init", "/no/such/run"], "--init '/no/such/run' does not exist"),
    (["--model", "resnet_9000"], "unknown --model 'resnet_9000'"),
    (["--layer-decay", "0"], "--layer-decay must be in (0, 1]"),
    (["--positive", "melanoma"], "--positive 'melanoma' is not a class of the data"),
    (["--init", "MAE", "--model", "convnext_atto"], "is an MAE checkpoint: it initialises --model mae_vit"),
])
def test_bad_input_is_one_line_exit_2(mae_run, tmp_path, capsys, flags, expected):
    flags = [str(mae_run) if f == "MAE" else f for f in flags]
    assert train_main(["--stage", "finetune", "--max-steps", "1", "--out", str(tmp_path / "x"), *SMALL, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_min_steps_raises_epochs_and_warmup_counts_steps(cache, tmp_path, capsys):
    out = tmp_path / "steps"
    assert train_main(["--stage", "finetune", "--model", "convnext_atto", "--img-size", "32", "--epochs", "1",
                       "--min-steps", "7", "--warmup-steps", "3", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    import yaml
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    per_epoch = 153 // 32  # the toy set's 192 images: 153 in the training split, batches of 32 (last dropped)
    assert cfg["epochs"] == 2 and cfg["min_steps"] == 7 and cfg["warmup_steps"] == 3
    assert f"--epochs raised from 1 to 2 ({per_epoch} optimiser steps per epoch, 8 steps)" in printed
    assert "warmup 3 ->" in printed and "; 8 steps" in printed
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[-1].split(",")[1] == "8"


def test_ema_resume_is_exact_and_the_saved_model_is_the_average(cache, tmp_path):
    from safetensors.torch import load_file
    args = ["--stage", "finetune", "--model", "convnext_atto", "--img-size", "32", "--epochs", "2", "--ema", "0.9",
            "--tta", "flips", "--checkpoint-every", "2", "--keep-checkpoints", "10", "--threads", "1", *SMALL]
    ref = tmp_path / "ref"
    assert train_main([*args, "--out", str(ref)]) == 0
    meta = meta_of(ref / "checkpoint.safetensors")
    assert meta["ema"] == 0.9 and meta["tta"] == "flips"
    final = load_file(str(ref / "checkpoint.safetensors"))
    raw = load_file(str(ref / "checkpoints" / "step_00000008" / "model.safetensors"))
    ema = load_file(str(ref / "checkpoints" / "step_00000008" / "extra.safetensors"))
    k = "head.fc.weight"
    assert torch.equal(final[k], ema[f"stage/ema/{k}"]) and not torch.equal(final[k], raw[k])

    (ref / "checkpoint.safetensors").unlink()  # resume the same run from its step-2 checkpoint
    assert train_main([*args, "--out", str(ref), "--resume", str(ref / "checkpoints" / "step_00000002")]) == 0
    resumed = load_file(str(ref / "checkpoint.safetensors"))
    for key, v in final.items():
        assert torch.equal(v, resumed[key]), key
