"""`python -m dermfast.evaluate --probe linear|knn` (dermfast.eval.probe): the k-NN against DINO's own
knn_classifier, the features against an explicit unmasked encoder pass, and a tiny MAE run probed end to end."""
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from dermfast.eval import probe as P  # noqa: E402
from dermfast.evaluate import main as eval_main  # noqa: E402


def dino_knn_classifier(train_features, train_labels, test_features, k, T, num_classes):
    """facebookresearch/dino, eval_knn.py `knn_classifier` (one chunk; features L2-normalised by the caller as
    DINO does in extract_features), returning its `probs` before the sort."""
    batch_size = test_features.shape[0]
    similarity = torch.mm(test_features, train_features.t())
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    candidates = train_labels.view(1, -1).expand(batch_size, -1)
    retrieved_neighbors = torch.gather(candidates, 1, indices)
    retrieval_one_hot = torch.zeros(batch_size * k, num_classes, dtype=train_features.dtype)
    retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
    distances_transform = distances.clone().div_(T).exp_()
    probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                distances_transform.view(batch_size, -1, 1)), 1)
    return probs


@pytest.mark.parametrize("n_train,k", [(50, 20), (7, 20), (30, 1)])
def test_knn_equals_dino(n_train, k):
    rng = np.random.default_rng(n_train)
    tx, x = rng.normal(size=(n_train, 16)), rng.normal(size=(9, 16))
    ty = rng.integers(0, 3, n_train)
    got = P.knn_proba(tx, ty, x, 3, k=k, t=0.07)
    nt = torch.nn.functional.normalize(torch.tensor(tx), dim=1)
    nx = torch.nn.functional.normalize(torch.tensor(x), dim=1)
    want = dino_knn_classifier(nt, torch.tensor(ty), nx, min(k, n_train), 0.07, 3)
    np.testing.assert_allclose(got, (want / want.sum(1, keepdim=True)).numpy(), rtol=1e-10)
    assert (got.argmax(1) == want.argmax(1).numpy()).all()


def test_features_are_the_unmasked_encoder_mean_of_patch_tokens():
    from tests.test_evaluate import TINY
    from dermfast.models.mae import MaskedAutoencoderViT
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    got, labels = P.encoder_features(model, [{"image": x, "label": torch.tensor([0, 1, 0])}], torch.device("cpu"))
    with torch.no_grad():  # the timm ViT pass written out: every patch, position embedding, class token first
        t = model.patch_embed(x) + model.pos_embed
        t = torch.cat([model.cls_token.expand(3, -1, -1), t], 1)
        for blk in model.blocks:
            t = blk(t)
        want = model.norm(t)[:, 1:].mean(1)
    assert got.shape == (3, TINY.embed_dim) and labels.tolist() == [0, 1, 0]
    np.testing.assert_allclose(got, want.double().numpy(), atol=1e-5)


SMALL = ["--toy-images", "96", "--toy-image-size", "48", "--batch-size", "16", "--loader", "torch",
         "--workers", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    from dermfast.train.cli import main as train_main
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DERMFAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("runs") / "mae"
        assert train_main(["--stage", "mae", "--max-steps", "1", "--out", str(out), *SMALL]) == 0
        yield out


def split_count(run, name):
    with open(run / "splits.csv", newline="") as f:
        return sum(1 for r in csv.DictReader(f) if r["split"] == name)


@pytest.mark.parametrize("kind", ["linear", "knn"])
def test_probe_an_mae_run(mae_run, kind, capsys):
    assert eval_main(["--checkpoint", str(mae_run), "--probe", kind, "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    out = mae_run / f"probe-{kind}"
    m = json.loads((out / "metrics.json").read_text())
    assert m["probe"] == kind and m["n_train"] == split_count(mae_run, "train")
    assert m["n"] == split_count(mae_run, "test") and "test split" in m["data"]
    assert ("k=20, cosine" in m["probe_method"]) == (kind == "knn")
    assert f"--probe {kind}: " in printed and "balanced accuracy" in printed
    from dermfast.eval.metrics import compute_all
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    classes = m["classes"]
    y = np.array([classes.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    want = compute_all(y, probs, classes, m["positive_class"])
    for k in ("accuracy", "balanced_accuracy", "auroc", "macro_f1"):
        assert m[k] == pytest.approx(want[k], abs=1e-5), k
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_probe_refuses_a_classifier(tmp_path, capsys):
    from tests.test_evaluate import make_run
    ck = make_run(tmp_path / "clf")
    assert eval_main(["--checkpoint", str(ck), "--probe", "linear"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--probe needs an MAE run" in err[0]
