"""--folds K: the cross-validation driver (dermfast/train/cv.py), end to end on a tiny binary image folder, its
resume, and evaluate / predict on the CV folder. Fold assignment itself is tested against scikit-learn in
tests/test_splits.py."""
import csv
import json
import math

import numpy as np
import pytest

pytest.importorskip("sklearn")

from dermfast.train.cli import main as train_main  # noqa: E402
from dermfast.train.cv import paired, verdict  # noqa: E402

from .test_evaluate import make_folder  # noqa: E402

TINY = ["--img-size", "32", "--max-steps", "1", "--epochs", "1", "--batch-size", "8",
        "--device", "cpu", "--no-progress", "--loader", "torch", "--workers", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, cache):
    return make_folder(tmp_path_factory.mktemp("cvdata"), {"melanoma": 11, "nevus": 13})


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("cv") / "cv"
    rc = train_main(["--stage", "finetune", "--data", str(data), "--folds", "3", "--out", str(out), *TINY])
    assert rc == 0
    return out


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # the module's 3-fold run (~30 s on 2 busy cores), shared by the tests below
def test_folds_every_file_and_oof_once(cv_run, data):
    for name in ("cv.json", "oof_predictions.csv", "cv_metrics.json", "report.html"):
        assert (cv_run / name).is_file(), name
    assert json.loads((cv_run / "cv.json").read_text())["status"] == "finished"
    rows = _rows(cv_run / "oof_predictions.csv")
    images = sorted(str(p) for p in data.rglob("*.jpg"))
    assert sorted(r["image"] for r in rows) == images  # every image exactly once, named by the user's path
    tests = []
    for k in (1, 2, 3):
        d = cv_run / f"fold-{k}"
        assert (d / "checkpoint.safetensors").is_file() and (d / "baseline" / "spec.json").is_file()
        split = {s: {r["image"] for r in _rows(d / "splits.csv") if r["split"] == s} for s in ("train", "val", "test")}
        assert not (split["test"] & (split["train"] | split["val"]))  # the test fold selects nothing
        assert len(split["val"]) >= 1
        tests.append({str(data / im) for im in split["test"]})
        assert {r["image"] for r in rows if r["fold"] == str(k)} == tests[-1]  # OOF fold = the fold's test split
    m = json.loads((cv_run / "cv_metrics.json").read_text())
    assert m["folds"] == 3 and len(m["per_fold"]) == 3 and m["n_images"] == 24
    assert m["threshold"]["source"] == "oof" and 0.0 <= m["threshold"]["value"] <= 1.0
    # mean / sd over folds and the paired differences, recomputed here from the per-fold numbers
    for key in ("balanced_accuracy", "auroc"):
        mod = [e["model"][key] for e in m["per_fold"]]
        base = [e["baseline"][key] for e in m["per_fold"]]
        if None in mod or None in base:
            continue
        assert m["model"]["mean_std"][key]["mean"] == pytest.approx(np.mean(mod))
        assert m["model"]["mean_std"][key]["std"] == pytest.approx(np.std(mod, ddof=1))
        d = np.subtract(mod, base)
        assert m["paired_difference"][key]["mean"] == pytest.approx(d.mean())
        assert m["paired_difference"][key]["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    assert "baseline" in m["verdict"] and "single fold's numbers are noisy" in m["warning"]
    assert "fold 3" in (cv_run / "report.html").read_text()


def test_pooled_auroc_is_sklearns_on_the_oof_file(cv_run):
    from sklearn.metrics import roc_auc_score
    rows = _rows(cv_run / "oof_predictions.csv")
    y = [r["label"] == "melanoma" for r in rows]
    m = json.loads((cv_run / "cv_metrics.json").read_text())
    assert m["model"]["pooled_oof"]["auroc"] == pytest.approx(roc_auc_score(y, [float(r["p_melanoma"]) for r in rows]),
                                                               abs=1e-5)


def test_rerun_refused_resume_keeps_finished_folds(cv_run, data, capsys):
    argv = ["--stage", "finetune", "--data", str(data), "--folds", "3", "--out", str(cv_run), *TINY]
    assert train_main(argv) == 2
    assert "already holds a finished 3-fold cross-validation" in capsys.readouterr().err
    before = (cv_run / "fold-2" / "checkpoint.safetensors").stat().st_mtime_ns
    assert train_main([*argv, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 3 and (cv_run / "fold-2" / "checkpoint.safetensors").stat().st_mtime_ns == before
    assert train_main([*argv, "--resume", "auto", "--seed", "5"]) == 2  # another recipe is not mixed in
    assert "options differ" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_of_a_half_done_cv(tmp_path, data, capsys):
    import shutil
    out = tmp_path / "cv"
    argv = ["--stage", "finetune", "--data", str(data), "--folds", "3", "--out", str(out), *TINY]
    assert train_main(argv) == 0
    oof = (out / "oof_predictions.csv").read_text()
    kept = (out / "fold-1" / "checkpoint.safetensors").stat().st_mtime_ns
    shutil.rmtree(out / "fold-3")  # killed before fold 3 started
    # killed in fold 2 after its last step checkpoint, before the end's files: the engine writes
    # checkpoint.safetensors before it marks that checkpoint finished
    (out / "fold-2" / "checkpoint.safetensors").unlink()
    for st in (out / "fold-2" / "checkpoints").glob("step_*/state.json"):
        st.write_text(json.dumps({**json.loads(st.read_text()), "finished": False}))
    r2 = json.loads((out / "fold-2" / "run.json").read_text())
    (out / "fold-2" / "run.json").write_text(json.dumps({**r2, "status": "running"}))
    (out / "oof_predictions.csv").unlink()
    capsys.readouterr()
    assert train_main([*argv, "--resume", "auto"]) == 0
    text = capsys.readouterr().out
    assert "fold 1/3 finished earlier" in text and "fold 3/3 -> " in text
    assert (out / "fold-1" / "checkpoint.safetensors").stat().st_mtime_ns == kept
    assert (out / "oof_predictions.csv").read_text() == oof  # same folds, same seed: the same predictions


def test_other_stages_and_bad_combinations_refused(tmp_path, capsys):
    assert train_main(["--stage", "mae", "--folds", "3", "--out", str(tmp_path / "m"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--folds works with --stage finetune or distill" in err or "folds" in err
    assert not (tmp_path / "m").exists()
    assert train_main(["--stage", "distill", "--folds", "3", "--teacher", "vit_tiny_patch16_224",
                       "--out", str(tmp_path / "d"), "--device", "cpu"]) == 2
    assert "leave it out" in capsys.readouterr().err


def test_evaluate_and_predict_on_the_cv_folder(cv_run, data, tmp_path, capsys):
    from dermfast.evaluate import main as eval_main
    from dermfast.models.classifier import load_classifier
    from dermfast.predict import load_predictor
    assert eval_main(["--checkpoint", str(cv_run)]) == 0  # no --data: the CV results
    assert "3 folds, 24 images" in capsys.readouterr().out
    out = tmp_path / "ev"
    assert eval_main(["--checkpoint", str(cv_run), "--data", str(data), "--out", str(out), "--bootstrap", "0",
                      "--no-report"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    cvm = json.loads((cv_run / "cv_metrics.json").read_text())
    assert len(m["members"]) == 3 and m["threshold"]["source"] == "oof"
    assert m["threshold"]["value"] == pytest.approx(cvm["threshold"]["value"])
    # the ensemble is the mean of the three fold models' probabilities
    pred = load_predictor(cv_run, device="cpu")
    res = pred.predict_data(data)
    singles = [load_predictor(cv_run / f"fold-{k}", device="cpu").predict_data(data).probs for k in (1, 2, 3)]
    np.testing.assert_allclose(res.probs, np.mean(singles, axis=0), atol=1e-6)
    pos, t = res.threshold
    assert res.classes[pos] == "melanoma" and t == pytest.approx(cvm["threshold"]["value"])
    np.testing.assert_array_equal(res.index, np.where(res.probs[:, pos] >= t, pos, 1 - pos))
    rows = {r["image"]: r for r in _rows(out / "predictions.csv")}
    for name, p in zip(res.names, res.probs):
        assert float(rows[name]["p_melanoma"]) == pytest.approx(p[pos], abs=1e-5)
    assert load_classifier(cv_run / "fold-1")[1]["classes"] == res.classes


def test_paired_and_verdict_words():
    d = paired([0.7, 0.6, 0.8], [0.5, 0.55, 0.6])
    assert d["mean"] == pytest.approx(np.mean([0.2, 0.05, 0.2]))
    assert d["se"] == pytest.approx(np.std([0.2, 0.05, 0.2], ddof=1) / math.sqrt(3))
    assert verdict({"balanced_accuracy": d, "auroc": d}, "balanced_accuracy").startswith("the model beats")
    worse = paired([0.5, 0.5], [0.6, 0.7])
    assert "does NOT beat" in verdict({"balanced_accuracy": d, "auroc": worse}, "balanced_accuracy")
