"""`python -m dermfast.export`: ONNX and TorchScript files with their sidecar, parity, dynamic batch, and the
refusals (an operator ONNX cannot express, a checkpoint of another stage, a failed parity check)."""
import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")

import dermfast.export as E  # noqa: E402
from dermfast.models.classifier import ClassifierSpec, build_classifier, classifier_metadata  # noqa: E402
from dermfast.models.mae import MAEPreset  # noqa: E402

TINY = MAEPreset(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                 decoder_depth=1, decoder_num_heads=2)
CLASSES = ["nevus", "melanoma"]


def save_checkpoint(path, model, metadata):
    """The checkpoint format both the old and the new engine write: safetensors, JSON-encoded metadata values."""
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={k: json.dumps(v) for k, v in metadata.items()})


@pytest.fixture
def run_dir(tmp_path):
    spec = ClassifierSpec("mae_vit", 2, 32, mae_preset=TINY.to_dict(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = build_classifier(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_checkpoint(tmp_path / "checkpoint.safetensors", model, classifier_metadata(spec, CLASSES))
    return tmp_path, model.eval()


def test_onnx_export_sidecar_parity_and_dynamic_batch(run_dir, capsys):
    pytest.importorskip("onnxruntime")
    d, model = run_dir
    assert E.main(["--checkpoint", str(d), "--format", "onnx", "--exporter", "legacy"]) == 0
    out = capsys.readouterr().out
    assert "parity on 8 images via onnxruntime" in out and "ms at batch 32" in out
    side = json.loads((d / "model.json").read_text())
    assert side["class_names"] == CLASSES and side["mean"] == [0.5] * 3 and side["std"] == [0.25] * 3
    assert side["input"]["size"] == 32 and side["input"]["shape"] == ["batch", 3, 32, 32]
    assert side["parity"]["max_abs_diff_probs"] < 1e-5 and set(side["cpu_latency_ms_per_image"]) == {"1", "32"}
    assert side["opset"] == 17  # the legacy exporter's cap
    import onnxruntime as ort
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)  # not the export batch: the batch dimension is dynamic
    got = sess.run(["probs"], {"image": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).softmax(-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_torchscript_export(run_dir, capsys):
    d, model = run_dir
    assert E.main(["--checkpoint", str(d / "checkpoint.safetensors"), "--format", "torchscript",
                   "--out", str(d / "ts/student.pt"), "--no-latency"]) == 0
    side = json.loads((d / "ts/student.json").read_text())
    assert side["format"] == "torchscript" and side["parity"]["max_abs_diff_probs"] < 1e-6
    loaded = torch.jit.load(str(d / "ts/student.pt"))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x).softmax(-1))


@pytest.mark.skipif(not E._has("onnxscript"), reason="the dynamo exporter needs onnxscript")
def test_onnx_dynamo_exporter(run_dir, capsys):
    d, _ = run_dir
    assert E.main(["--checkpoint", str(d), "--format", "onnx", "--exporter", "dynamo", "--no-latency"]) == 0
    assert json.loads((d / "model.json").read_text())["exporter"] == "dynamo"


@torch.library.custom_op("dermfast_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class CustomOpNet(torch.nn.Module):
    def forward(self, x):
        return torch.ops.dermfast_test.twice(x).mean((2, 3))


def test_unexportable_operator_is_refused_by_name(tmp_path):
    with pytest.raises(E.ExportError, match="operator dermfast_test::twice is not supported"):
        E.export_onnx(CustomOpNet(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", exporter="legacy")


def test_bad_input_and_failed_parity(run_dir, tmp_path, capsys, monkeypatch):
    d, _ = run_dir
    from dermfast.models.mae import MaskedAutoencoderViT
    (tmp_path / "mae").mkdir()
    save_checkpoint(tmp_path / "mae/checkpoint.safetensors", MaskedAutoencoderViT(TINY), {"stage": "mae"})
    assert E.main(["--checkpoint", str(tmp_path / "mae"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a 'mae' checkpoint" in err[0]

    real = E.runner
    monkeypatch.setattr(E, "runner", lambda fmt, path: ((lambda x, fn=real(fmt, path)[0]: fn(x) + 1e-2), "perturbed"))
    assert E.main(["--checkpoint", str(d), "--format", "torchscript", "--no-latency"]) == 1
    assert "parity check failed: max |probs diff| 1.00e-02" in capsys.readouterr().err


# -- the sidecar's preprocess block ------------------------------------------------------------------------------
# An independent reading of the sidecar, PIL + numpy only, no dermfast code. Each step is what the block states;
# the block states what torchvision does to a PIL image in dermfast's evaluation transform (torchvision
# transforms/functional.py: `_compute_resized_output_size` floors int(short * long / short_side), `resize` hands a
# PIL image to Image.resize with the PIL filter and returns an image already of the size as is, `center_crop`
# takes int(round((h - crop) / 2.0)) with Python's round; `to_tensor` divides uint8 by 255; `normalize` computes
# (x - mean) / std).

def sidecar_pixels(path, pre, filter_=None, round_=round) -> np.ndarray:
    """One image file -> [3, S, S] float32 from the sidecar's preprocess block alone."""
    from PIL import Image
    assert pre["decode"]["library"] == "PIL" and pre["decode"]["mode"] == "RGB"
    im = Image.open(path).convert("RGB")
    w, h = im.size
    short = pre["resize"]["shorter_side"]
    assert pre["resize"]["longer_side"] == f"floor({short} * longer / shorter)"
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    assert pre["resize"]["interpolation"] == "bicubic"
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC if filter_ is None else filter_)
    ch, cw = pre["crop"]["size"]
    assert pre["crop"]["position"] == "centre" and pre["crop"]["rounding"].startswith("half to even")
    top, left = int(round_((nh - ch) / 2)), int(round_((nw - cw) / 2))
    im = im.crop((left, top, left + cw, top + ch))
    assert pre["scale"] == "uint8 / 255 -> float32" and pre["channel_order"] == "RGB"
    x = np.asarray(im, dtype=np.float32) / np.float32(255)
    mean = np.asarray(pre["normalize"]["mean"], np.float32)
    std = np.asarray(pre["normalize"]["std"], np.float32)
    x = (x - mean) / std
    assert pre["layout"] == "NCHW" and pre["dtype"] == "float32"
    return x.transpose(2, 0, 1)


def half_up(v):
    return np.floor(v + 0.5)


@pytest.fixture
def odd_images(tmp_path):
    """Noise images (so resampling filters differ visibly) of odd sizes: for a 32 px crop out of a 37 px resize,
    40x40 and 45x37 give crop offsets of x.5 (2.5 and 6.5), where round half to even and half up disagree."""
    from PIL import Image
    rng = np.random.default_rng(3)
    sizes = {"nevus": [(40, 40), (45, 37), (50, 61)], "melanoma": [(33, 70), (64, 48), (37, 37)]}
    for cls, whs in sizes.items():
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(whs):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext = "png" if i == 2 else "jpg"
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{cls}{i}.{ext}")
    return tmp_path / "imgs"


def test_sidecar_alone_reproduces_evaluate_through_onnxruntime(run_dir, odd_images, tmp_path, capsys, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("sklearn")
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    d, _ = run_dir
    assert E.main(["--checkpoint", str(d), "--format", "onnx", "--exporter", "legacy", "--no-latency"]) == 0
    side = json.loads((d / "model.json").read_text())
    pre = side["preprocess"]
    assert pre["resize"]["shorter_side"] == 37 and pre["crop"]["size"] == [32, 32]  # round(32 / 0.875)
    assert pre["normalize"]["mean"] == side["mean"] and pre["normalize"]["std"] == side["std"]

    from dermfast.evaluate import main as eval_main
    assert eval_main(["--checkpoint", str(d), "--data", str(odd_images), "--out", str(tmp_path / "ev"),
                      "--no-report"]) == 0
    import csv
    with open(tmp_path / "ev/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    want = np.array([[float(r[f"p_{c}"]) for c in side["class_names"]] for r in rows])
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])

    def probs(**variant):
        x = np.stack([sidecar_pixels(r["image"], pre, **variant) for r in rows])
        return sess.run(["probs"], {"image": x})[0]

    np.testing.assert_allclose(probs(), want, atol=1e-4)
    # the tolerance is tight enough to tell: a bilinear resize, or the crop offset rounded half up, misses it
    from PIL import Image
    assert np.abs(probs(filter_=Image.BILINEAR) - want).max() > 1e-3
    assert np.abs(probs(round_=half_up) - want).max() > 1e-3


def test_preprocess_block_round_trips_and_refuses_what_it_cannot_run():
    from dermfast.data.augment import Augment
    from dermfast.data.torch_loader import eval_transform
    for aug in (Augment(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), Augment(size=224),
                Augment(size=64, crop_fraction=0.9)):
        spec = E.preprocessing_spec(aug)
        back = E.augment_from_spec(json.loads(json.dumps(spec)))
        assert (back.size, back.mean, back.std) == (aug.size, aug.mean, aug.std)
        assert repr(eval_transform(back)) == repr(eval_transform(aug))  # the same Resize / CenterCrop sizes
    spec = E.preprocessing_spec(Augment(size=32))
    for key, value, expected in (("interpolation", "bilinear", "interpolation 'bilinear' (supported: 'bicubic')"),
                                 ("channel_order", "BGR", "channel_order 'BGR'"),
                                 ("layout", "NHWC", "layout 'NHWC'")):
        bad = json.loads(json.dumps(spec))
        (bad["resize"] if key == "interpolation" else bad)[key] = value
        with pytest.raises(E.ExportError, match=re.escape(f"does not implement: {expected}")):
            E.augment_from_spec(bad)
    with pytest.raises(E.ExportError, match="incomplete"):
        E.augment_from_spec({"resize": {}})
