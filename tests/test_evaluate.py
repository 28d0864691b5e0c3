"""`python -m dermfast.evaluate`: metrics.json and report.html on a small generated dataset, ensembles, TTA,
class matching by name, the bad-input refusals; Grad-CAM and attention rollout against explicit computations."""
import base64
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from dermfast.eval import explain as ex  # noqa: E402
from dermfast.evaluate import main  # noqa: E402
from dermfast.models.classifier import ClassifierSpec, build_classifier, classifier_metadata  # noqa: E402
from dermfast.models.mae import MAEPreset, MaskedAutoencoderViT  # noqa: E402

def save_checkpoint(path, model, metadata):
    """The checkpoint format both the old and the new engine write: safetensors, JSON-encoded metadata values."""
    import json
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={k: json.dumps(v) for k, v in metadata.items()})


TINY = MAEPreset(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                 decoder_depth=1, decoder_num_heads=2)
MODEL_CLASSES = ["nevus", "bcc", "melanoma"]  # not the dataset's (alphabetical) order: matched by name


def make_folder(root, counts: dict, seed=0):
    """root/<class>/*.jpg: dark blobs for melanoma, light ones otherwise, so a model has something to see."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(150, 230, size=(40, 40, 3)).astype(np.uint8)
            r = rng.integers(6, 14)
            yy, xx = np.mgrid[:40, :40]
            blob = (yy - 20 - rng.integers(-5, 5)) ** 2 + (xx - 20) ** 2 < r * r
            img[blob] = (40, 30, 30) if cls == "melanoma" else (170, 120, 90)
            Image.fromarray(img).save(root / cls / f"{cls}_{i}.jpg", quality=90)
    return root


def make_run(path, arch="mae_vit", seed=0, classes=MODEL_CLASSES, stage="finetune"):
    torch.manual_seed(seed)
    spec = ClassifierSpec(arch, len(classes), 32, mae_preset=TINY.to_dict() if arch == "mae_vit" else None)
    model = build_classifier(spec)
    with torch.no_grad():  # a head that is not near-zero, so probabilities differ between images
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path.mkdir(parents=True)
    save_checkpoint(path / "best.safetensors", model, classifier_metadata(spec, classes, stage=stage))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), {"melanoma": 7, "nevus": 9})


def read_preds(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def run(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr()


def test_metrics_json_and_report(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    ckpt = make_run(tmp_path / "a")
    rc, out = run(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "ev")], capsys)
    assert rc == 0, out.err
    m = json.loads((tmp_path / "ev/metrics.json").read_text())
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "pauc_80tpr", "ece", "per_class",
              "confusion_matrix", "n", "positive_class", "checkpoint", "data"):
        assert k in m, k
    assert m["n"] == 16 and m["positive_class"] == "melanoma" and m["checkpoint"].endswith("best.safetensors")
    assert m["per_class"]["bcc"]["support"] == 0 and m["per_class"]["bcc"]["recall"] is None
    assert m["per_class"]["melanoma"]["support"] == 7 and m["per_class"]["nevus"]["support"] == 9

    rows = read_preds(tmp_path / "ev/predictions.csv")
    assert all(r["label"] == ("melanoma" if "/melanoma/" in r["image"] else "nevus") for r in rows)  # by name
    from dermfast.eval.metrics import compute_all
    y = np.array([MODEL_CLASSES.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in MODEL_CLASSES] for r in rows])
    want = compute_all(y, probs, MODEL_CLASSES)
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "pauc_80tpr", "ece"):
        assert m[k] == pytest.approx(want[k], abs=1e-5), k
    assert m["confusion_matrix"] == want["confusion_matrix"]

    page = (tmp_path / "ev/report.html").read_text()
    pngs = page.count("data:image/png;base64,")
    n_errors = sum(r["label"] != r["predicted"] for r in rows)
    assert pngs == 3 + min(n_errors, 4) * 0 + sum(  # figures + error thumbnails + 4 explanations
        min(4, sum(1 for r in rows if r["label"] == c and r["predicted"] != c)) for c in MODEL_CLASSES) + 4
    assert "attention rollout" in page and "balanced accuracy" in page and "reliability" in page
    start = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    assert base64.b64decode(page[start:page.index('"', start)])[:8] == b"\x89PNG\r\n\x1a\n"


def test_ensemble_reports_members_and_averages(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    a, b = make_run(tmp_path / "a", seed=1), make_run(tmp_path / "b", seed=2)
    for name, ck in (("ea", [a]), ("eb", [b]), ("ens", [a, b])):
        rc, out = run(["--checkpoint", *map(str, ck), "--data", str(data), "--out", str(tmp_path / name),
                       "--no-report"], capsys)
        assert rc == 0, out.err
    pa, pb, pe = (np.array([[float(r[f"p_{c}"]) for c in MODEL_CLASSES]
                            for r in read_preds(tmp_path / n / "predictions.csv")]) for n in ("ea", "eb", "ens"))
    np.testing.assert_allclose(pe, (pa + pb) / 2, atol=2e-6)
    m = json.loads((tmp_path / "ens/metrics.json").read_text())
    assert len(m["members"]) == 2 and len(m["checkpoint"]) == 2
    assert m["members"][0]["accuracy"] == json.loads((tmp_path / "ea/metrics.json").read_text())["accuracy"]


def test_tta_and_a_cnn_get_gradcam(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    ck = make_run(tmp_path / "cnn", arch="convnext_atto")
    rc, out = run(["--checkpoint", str(ck), "--data", str(data), "--out", str(tmp_path / "plain"), "--no-report"],
                  capsys)
    assert rc == 0, out.err
    rc, out = run(["--checkpoint", str(ck), "--data", str(data), "--out", str(tmp_path / "tta"), "--tta",
                   "--explain", "2"], capsys)
    assert rc == 0, out.err
    assert json.loads((tmp_path / "tta/metrics.json").read_text())["tta"] == "flips"
    plain = [r["p_melanoma"] for r in read_preds(tmp_path / "plain/predictions.csv")]
    tta = [r["p_melanoma"] for r in read_preds(tmp_path / "tta/predictions.csv")]
    assert plain != tta
    assert "Grad-CAM" in (tmp_path / "tta/report.html").read_text()


@pytest.mark.parametrize("case,expected", [
    ("mae", "is a 'mae' checkpoint; this needs a classifier from --stage finetune or distill"),
    ("unknown_class", "the dataset holds class(es) 'akiec' the model does not know"),
    ("single_class", "the evaluation set holds a single class ('nevus', 5 images)"),
    ("empty", "holds no images"),
    ("bad_positive", "--positive 'mel' is not a model class"),
    ("class_mismatch", "4 class names but the model has 3 outputs"),
    ("ensemble_classes", "ensemble members disagree on classes"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, data, capsys, monkeypatch, case, expected):
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    ck = make_run(tmp_path / "run")
    argv = ["--checkpoint", str(ck), "--data", str(data), "--out", str(tmp_path / "ev")]
    if case == "mae":
        (tmp_path / "mae").mkdir()
        save_checkpoint(tmp_path / "mae/checkpoint.safetensors", MaskedAutoencoderViT(TINY), {"stage": "mae"})
        argv[1] = str(tmp_path / "mae")
    elif case == "unknown_class":
        argv[3] = str(make_folder(tmp_path / "d", {"nevus": 3, "akiec": 2}))
    elif case == "single_class":
        argv[3] = str(make_folder(tmp_path / "d", {"nevus": 5}))
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        argv[3] = str(tmp_path / "empty")
    elif case == "bad_positive":
        argv += ["--positive", "mel"]
    elif case == "class_mismatch":
        from safetensors.torch import load_file
        meta = classifier_metadata(ClassifierSpec("mae_vit", 3, 32, mae_preset=TINY.to_dict()), MODEL_CLASSES)
        meta["classes"] = MODEL_CLASSES + ["df"]
        model = build_classifier(ClassifierSpec("mae_vit", 3, 32, mae_preset=TINY.to_dict()))
        model.load_state_dict(load_file(str(ck / "best.safetensors")))
        save_checkpoint(ck / "best.safetensors", model, meta)
    elif case == "ensemble_classes":
        argv[2:2] = [str(make_run(tmp_path / "other", classes=["nevus", "melanoma", "df"]))]
    rc, out = run(argv, capsys)
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.err
    assert "Traceback" not in out.err


# -- explanations ---------------------------------------------------------------------------------------------

class PoolHead(torch.nn.Module):
    """forward_features -> [B, C, h, w]; forward_head = linear over the global mean: Grad-CAM's weights are
    then W[target] / (h * w) exactly, so the map is ReLU(sum_c W[t, c] A_c) up to scale."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.fc = torch.nn.Linear(6, 3)

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, f):
        return self.fc(f.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_gradcam_matches_the_closed_form():
    model = PoolHead()
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([0, 2])
    got = ex.gradcam(model, x, target)
    with torch.no_grad():
        a = model.conv(x)
        cam = torch.relu(torch.einsum("bchw,bc->bhw", a, model.fc.weight[target]))
    want = ex._normalise(cam, (32, 32))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == (2, 32, 32) and got.min() >= 0 and got.max() == pytest.approx(1.0)


def test_attention_rollout_matches_explicit_attention_probabilities():
    model = build_classifier(ClassifierSpec("mae_vit", 2, 32, mae_preset=TINY.to_dict())).eval()
    assert ex.supports_rollout(model) and not ex.supports_rollout(PoolHead())
    x = torch.randn(2, 3, 32, 32)
    got = ex.attention_rollout(model, x)
    captured = []
    for blk in model.blocks:  # the unfused path materialises the softmax and passes it through attn_drop
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o.mean(1)))
    with torch.no_grad():
        model(x)
    roll = torch.eye(17).expand(2, 17, 17)
    for a in captured:
        a = 0.5 * a + 0.5 * torch.eye(17)
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    want = ex._normalise(roll[:, 0, 1:].reshape(2, 4, 4), (32, 32))
    np.testing.assert_allclose(got, want, atol=1e-5)
    img = np.zeros((32, 32, 3), np.uint8)
    assert ex.overlay(img, got[0]).shape == (32, 32, 3)


def test_tiny_test_set_gets_intervals_and_a_warning(tmp_path, capsys, monkeypatch):
    """Issue 22: on 3 images the metrics come with 95% bootstrap intervals (metrics.json, report.html, the printed
    line) and a plain warning that the set is too small to compare models."""
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    tiny = make_folder(tmp_path / "tiny", {"melanoma": 1, "nevus": 2})
    ckpt = make_run(tmp_path / "a")
    rc, out = run(["--checkpoint", str(ckpt), "--data", str(tiny), "--out", str(tmp_path / "ev"),
                   "--bootstrap", "200", "--explain", "0"], capsys)
    assert rc == 0, out.err
    m = json.loads((tmp_path / "ev/metrics.json").read_text())
    ci = m["ci"]
    assert ci["level"] == 0.95 and ci["n_boot"] == 200 and ci["stratified"] is True
    rows = read_preds(tmp_path / "ev/predictions.csv")
    from dermfast.eval.metrics import bootstrap_ci
    y = np.array([MODEL_CLASSES.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in MODEL_CLASSES] for r in rows])
    want = bootstrap_ci(y, probs, MODEL_CLASSES, "melanoma", n_boot=200, seed=0)
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "pauc_80tpr"):
        assert ci[k] == pytest.approx(want[k], abs=1e-5), k
    assert "too small to compare models: 3 images, 1 of the positive class 'melanoma'" in m["small_test_set"]
    assert "warning: the evaluation set is too small" in out.err
    bal = ci["balanced_accuracy"]
    assert f"[{bal[0]:.2f}, {bal[1]:.2f}]" in out.out  # beside the point value on the printed line
    page = (tmp_path / "ev/report.html").read_text()
    assert f"[{bal[0]:.3f}, {bal[1]:.3f}]" in page and "percentile bootstrap over images" in page
    assert "too small to compare models" in page

    rc, out = run(["--checkpoint", str(ckpt), "--data", str(tiny), "--out", str(tmp_path / "ev0"),
                   "--bootstrap", "0", "--no-report"], capsys)
    assert rc == 0 and "ci" not in json.loads((tmp_path / "ev0/metrics.json").read_text())


def test_trivial_baseline_beside_the_model_and_the_verdict(tmp_path, data, capsys, monkeypatch):
    """Issue 18: RUN/baseline/ (colour histograms + logistic regression) is scored on the same images; a model
    that does not beat it is told so in plain words (stderr, metrics.json, report.html); a run without one says so."""
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    from dermfast.data.adapters import open_any
    from dermfast.eval import baseline as B
    ckpt = make_run(tmp_path / "a")
    rc, out = run(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "ev0"), "--explain", "0",
                   "--bootstrap", "0"], capsys)
    m = json.loads((tmp_path / "ev0/metrics.json").read_text())
    assert rc == 0 and m["baseline"] is None and m["baseline_verdict"] is None
    assert "no trivial baseline" in (tmp_path / "ev0/report.html").read_text()

    rec = open_any(str(data))  # dark (melanoma) vs light blobs: colour alone separates them
    y = np.array([MODEL_CLASSES.index(rec.classes[k]) for k in rec.labels])
    B.fit(B.record_features(rec), y, MODEL_CLASSES).save(ckpt / "baseline")
    rc, out = run(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "ev"), "--explain", "0",
                   "--bootstrap", "0"], capsys)
    assert rc == 0, out.err
    m = json.loads((tmp_path / "ev/metrics.json").read_text())
    b = m["baseline"]
    assert b["n"] == 16 and b["balanced_accuracy"] == 1.0 and b["n_train"] == 16
    assert m["balanced_accuracy"] < 1.0  # a random model
    assert m["baseline_verdict"].startswith("the model does not beat the trivial baseline")
    assert f"balanced accuracy {m['balanced_accuracy']:.4f} vs 1.0000" in m["baseline_verdict"]
    assert f"warning: {m['baseline_verdict']}" in out.err
    assert "trivial baseline (colour histogram + logistic regression): balanced accuracy 1.0000" in out.out
    page = (tmp_path / "ev/report.html").read_text()
    assert "<th>trivial baseline</th>" in page and "does not beat the trivial baseline" in page

    (ckpt / "baseline/spec.json").write_text(json.dumps({"format": "pickle"}))
    rc, out = run(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "ev2")], capsys)
    assert rc == 2 and "not a dermfast-colour-histogram-logreg version 1 baseline" in out.err
