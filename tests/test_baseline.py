"""The trivial baseline (dermfast.eval.baseline): its colour histogram against a plain numpy transcription, its
logistic regression against scikit-learn's own predict_proba on the same features, the saved form (no pickle),
and a finetune run that writes it and `python -m dermfast.evaluate` that scores it beside the model."""
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from dermfast.eval import baseline as B  # noqa: E402


def numpy_colour_histogram(imgs, channel_bins=16, joint_bins=4):
    """The recipe written out with np.histogram / np.histogramdd over [0, 256): per-channel R, G, B histograms,
    then the joint RGB histogram in r-major order, each divided by the pixel count."""
    rows = []
    for im in imgs:
        px = im.reshape(-1, 3).astype(np.float64)
        parts = [np.histogram(px[:, c], bins=channel_bins, range=(0, 256))[0] for c in range(3)]
        joint, _ = np.histogramdd(px, bins=(joint_bins,) * 3, range=((0, 256),) * 3)
        parts.append(joint.ravel())  # C order: index (r, g, b) -> r * jb^2 + g * jb + b
        rows.append(np.concatenate(parts) / len(px))
    return np.stack(rows)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 5), (2, 64, 64)])
def test_colour_histogram_matches_numpy_histograms(shape):
    rng = np.random.default_rng(sum(shape))
    imgs = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    imgs[0, 0, 0] = (0, 255, 128)  # bin edges: 0 in the first bin, 255 in the last
    got = B.colour_histogram(imgs)
    want = numpy_colour_histogram(imgs)
    assert got.shape == (shape[0], 3 * 16 + 64)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got[:, :16].sum(1), 1.0)


def test_colour_histogram_refuses_other_layouts():
    with pytest.raises(ValueError, match="uint8"):
        B.colour_histogram(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="N, H, W, 3"):
        B.colour_histogram(np.zeros((2, 3, 8, 8), np.uint8))


@pytest.mark.parametrize("k", [2, 3])
def test_fit_equals_sklearn_logistic_regression(tmp_path, k):
    """Our saved-and-reloaded numpy predictor gives scikit-learn's own predict_proba of
    StandardScaler + LogisticRegression(C=1, class_weight='balanced') fitted on the same features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 60)
    y[:k] = np.arange(k)
    x = rng.normal(size=(60, 12)) + y[:, None] * 0.3
    x[:, 5] = 0.25  # a constant feature (scale 1 in StandardScaler)
    classes = ["a", "b", "c"][:k]
    base = B.fit(x, y, classes)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000)).fit(x, y)
    xt = rng.normal(size=(9, 12))
    np.testing.assert_allclose(base.predict_proba(xt), ref.predict_proba(xt), atol=1e-10)
    base.save(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["baseline.safetensors", "spec.json"]
    again = B.load(tmp_path / "b")
    np.testing.assert_allclose(again.predict_proba(xt), ref.predict_proba(xt), atol=1e-10)
    spec = json.loads((tmp_path / "b/spec.json").read_text())
    assert spec["classes"] == classes and spec["n_train"] == 60 and spec["size"] == 64


def test_a_class_missing_from_training_gets_probability_zero():
    rng = np.random.default_rng(0)
    y = np.array([0, 2] * 10)
    x = rng.normal(size=(20, 4)) + y[:, None]
    base = B.fit(x, y, ["a", "b", "c"])
    p = base.predict_proba(rng.normal(size=(5, 4)))
    assert p.shape == (5, 3) and (p[:, 1] == 0).all()
    np.testing.assert_allclose(p.sum(1), 1.0)
    with pytest.raises(ValueError, match="two classes"):
        B.fit(x, np.zeros(20, int), ["a", "b"])


def test_load_image_is_the_whole_image_resized(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(50, 90, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    got = B.load_image((tmp_path / "x.png").read_bytes())
    want = np.asarray(Image.fromarray(arr).resize((64, 64), Image.BILINEAR))
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_subsample_keeps_rare_classes_whole():
    labels = np.array([0] * 100 + [1] * 5 + [2] * 30)
    idx = B.subsample(labels, 40, seed=0)
    assert len(idx) == 40 and len(np.unique(idx)) == 40
    counts = np.bincount(labels[idx])
    assert counts[1] == 5 and counts[0] + counts[2] == 35 and abs(int(counts[0]) - int(counts[2])) <= 1
    np.testing.assert_array_equal(B.subsample(labels, 1000), np.arange(len(labels)))


def test_verdict_is_plain_words():
    assert B.verdict({"balanced_accuracy": 0.7, "auroc": 0.8}, {"balanced_accuracy": 0.6, "auroc": 0.7}) is None
    v = B.verdict({"balanced_accuracy": 0.5, "auroc": 0.8}, {"balanced_accuracy": 0.6, "auroc": 0.7})
    assert v.startswith("the model does not beat the trivial baseline") and "balanced accuracy 0.5000 vs 0.6000" in v
    assert "AUROC" not in v
    assert "AUROC 0.7000 vs 0.7000" in B.verdict({"balanced_accuracy": 0.9, "auroc": 0.7},
                                                 {"balanced_accuracy": 0.6, "auroc": 0.7})  # a tie does not beat


# -- end to end: finetune writes it, evaluate scores it on other data ------------------------------------------

SMALL = ["--toy-images", "96", "--toy-image-size", "48", "--batch-size", "16", "--loader", "torch",
         "--workers", "0", "--no-progress", "--log-every", "1"]


def test_finetune_writes_the_baseline_and_evaluate_scores_it_on_other_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    from dermfast.train.cli import main as train_main
    from tests.test_evaluate import make_folder
    run = tmp_path / "ft"
    assert train_main(["--stage", "finetune", "--model", "resnet10t", "--img-size", "32", "--max-steps", "1",
                       "--out", str(run), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "trivial baseline (colour histogram + logistic regression" in printed
    spec = json.loads((run / "baseline/spec.json").read_text())
    n_train = sum(1 for line in (run / "splits.csv").read_text().splitlines() if line.endswith(",train"))
    assert spec["n_train"] == n_train and "val" in spec
    classes = spec["classes"]

    # other data: two of the model's classes, by name
    other = make_folder(tmp_path / "other", {classes[4]: 6, classes[5]: 7})
    from dermfast.evaluate import main as eval_main
    assert eval_main(["--checkpoint", str(run), "--data", str(other), "--out", str(tmp_path / "ev"),
                      "--explain", "0", "--bootstrap", "50"]) == 0
    out = capsys.readouterr()
    m = json.loads((tmp_path / "ev/metrics.json").read_text())
    b = m["baseline"]
    # independently: features of the other images, the saved coefficients, scikit-learn's metrics
    from dermfast.data.adapters import open_any
    from dermfast.eval.metrics import compute_all
    from safetensors.numpy import load_file
    rec = open_any(str(other))
    rows = [line.split(",")[0] for line in (tmp_path / "ev/predictions.csv").read_text().splitlines()[1:]]
    assert rows == list(rec.paths)
    t = load_file(str(run / "baseline/baseline.safetensors"))
    x = B.colour_histogram(np.stack([B.load_image(rec.read_bytes(i)) for i in range(len(rec))]))
    z = ((x - t["mean"]) / t["scale"]) @ t["coef"].T + t["intercept"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    fitted = [classes.index(c) for c in spec["fitted_classes"]]
    probs = np.zeros((len(rec), len(classes)))
    probs[:, fitted] = p
    y = np.array([classes.index(rec.classes[k]) for k in rec.labels])
    want = compute_all(y, probs, classes, m["positive_class"])
    for k in ("accuracy", "balanced_accuracy", "auroc", "macro_f1", "ece"):
        assert b[k] == pytest.approx(want[k], abs=1e-9), k
    assert set(b["ci"]) >= {"balanced_accuracy", "auroc"} and b["n_train"] == n_train
    assert "trivial baseline (colour histogram + logistic regression): balanced accuracy " in out.out
    beats = m["balanced_accuracy"] > b["balanced_accuracy"] and m["auroc"] > b["auroc"]
    page = (tmp_path / "ev/report.html").read_text()
    assert "<th>trivial baseline</th>" in page
    if beats:
        assert m["baseline_verdict"] is None
    else:
        assert m["baseline_verdict"].startswith("the model does not beat the trivial baseline")
        assert f"warning: {m['baseline_verdict']}" in out.err and "does not beat the trivial baseline" in page
