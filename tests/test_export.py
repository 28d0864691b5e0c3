"""`python -m dermfast.export`: ONNX and TorchScript files with their sidecar, parity, dynamic batch, and the
refusals (an operator ONNX cannot express, a checkpoint of another stage, a failed parity check)."""
import json

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
