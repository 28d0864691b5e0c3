"""Each metric against an independent computation (plain loops, pair counting, a brute-force ROC sweep)."""
import numpy as np
import pytest

pytest.importorskip("sklearn")

from dermfast.eval import metrics as M  # noqa: E402


def random_preds(rng, n, c, present=None):
    present = np.arange(c) if present is None else np.asarray(present)
    y = rng.choice(present, size=n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]  # informative but imperfect
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


# -- independent references ------------------------------------------------------------------------------------

def ref_auc_pairs(y, s):
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney)."""
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((sp > sn) + 0.5 * (sp == sn) for sp in pos for sn in neg)
    return wins / (len(pos) * len(neg))


def ref_roc_points(y, s):
    """ROC vertices from a threshold sweep over the distinct scores, highest first (ties move diagonally)."""
    P, N = (y == 1).sum(), (y == 0).sum()
    pts = [(0.0, 0.0)]
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        pts.append(((pred & (y == 0)).sum() / N, (pred & (y == 1)).sum() / P))
    return pts


def ref_area_above_tpr(y, s, min_tpr):
    """Area between the ROC polyline and the line TPR = min_tpr, where the curve is above it (exact)."""
    pts = ref_roc_points(y, s)
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        a, b = y0 - min_tpr, y1 - min_tpr
        w = x1 - x0
        if w == 0:
            continue
        if a >= 0 and b >= 0:
            area += w * (a + b) / 2
        elif a < 0 and b > 0:  # crosses upward inside this segment
            area += w * (b / (b - a)) * b / 2
        elif a > 0 and b < 0:
            area += w * (a / (a - b)) * a / 2
    return area


# -- tests -------------------------------------------------------------------------------------------------------

def test_counting_metrics_against_loops():
    rng = np.random.default_rng(1)
    classes = ["a", "b", "c", "d"]
    y, p = random_preds(rng, 157, 4)
    pred = p.argmax(1)
    assert M.accuracy(y, pred) == pytest.approx(np.mean(y == pred))
    recalls = [np.mean(pred[y == k] == k) for k in range(4)]
    assert M.balanced_accuracy(y, pred) == pytest.approx(np.mean(recalls))
    cm = M.confusion_matrix(y, pred, 4)
    for i in range(4):
        for j in range(4):
            assert cm[i][j] == np.sum((y == i) & (pred == j))
    pc = M.per_class(y, pred, classes)
    f1s = []
    for k, name in enumerate(classes):
        tp = np.sum((y == k) & (pred == k))
        fp = np.sum((y != k) & (pred == k))
        fn = np.sum((y == k) & (pred != k))
        assert pc[name]["support"] == tp + fn
        assert pc[name]["precision"] == pytest.approx(tp / (tp + fp))
        assert pc[name]["recall"] == pytest.approx(tp / (tp + fn))
        prec, rec = tp / (tp + fp), tp / (tp + fn)
        f1s.append(2 * prec * rec / (prec + rec))
        assert pc[name]["f1"] == pytest.approx(f1s[-1])
    assert M.macro_f1(y, pred) == pytest.approx(np.mean(f1s))


def test_auroc_against_pair_counting_binary_and_multiclass():
    rng = np.random.default_rng(2)
    y, p = random_preds(rng, 90, 2)
    p[:10, 1] = np.round(p[:10, 1], 1)  # some ties
    assert M.binary_auroc(y, p[:, 1]) == pytest.approx(ref_auc_pairs(y, p[:, 1]))
    assert M.auroc(y, p) == pytest.approx(ref_auc_pairs(y, p[:, 1]))
    y, p = random_preds(rng, 120, 3)
    per = [ref_auc_pairs((y == k).astype(int), p[:, k]) for k in range(3)]
    assert M.auroc_per_class(y, p) == pytest.approx(per)
    assert M.auroc(y, p) == pytest.approx(np.mean(per))
    from sklearn.metrics import roc_auc_score
    assert M.auroc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))


def test_auroc_over_a_subset_of_classes_averages_the_present_ones():
    rng = np.random.default_rng(3)
    y, p = random_preds(rng, 80, 4, present=[0, 2, 3])
    per = M.auroc_per_class(y, p)
    assert per[1] is None
    assert M.auroc(y, p) == pytest.approx(np.mean([ref_auc_pairs((y == k).astype(int), p[:, k]) for k in (0, 2, 3)]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pauc_above_tpr_is_the_area_above_the_tpr_line(seed):
    rng = np.random.default_rng(seed)
    n = 200
    y = (rng.random(n) < 0.3).astype(int)
    s = rng.normal(size=n) + 1.2 * y
    if seed == 2:
        s = np.round(s, 1)  # ties: diagonal ROC segments
    got = M.pauc_above_tpr(y, s, 0.8)
    assert got == pytest.approx(ref_area_above_tpr(y, s, 0.8), abs=1e-12)
    assert 0.0 <= got <= 0.2
    from sklearn.metrics import roc_auc_score
    assert got != pytest.approx(roc_auc_score(y, s, max_fpr=0.2), abs=1e-3)  # not the McClish value


def test_pauc_known_values():
    y = np.array([0, 0, 1, 1])
    assert M.pauc_above_tpr(y, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(0.2)  # perfect ranking
    assert M.pauc_above_tpr(y, np.array([0.9, 0.8, 0.2, 0.1])) == pytest.approx(0.0)  # reversed
    # one negative above every positive: ROC (0,0) (.5,0) (.5,1) (1,1): the band above 0.8 spans FPR .5..1
    assert M.pauc_above_tpr(y, np.array([0.1, 0.95, 0.8, 0.9])) == pytest.approx(0.5 * 0.2)
    assert M.pauc_above_tpr(y, np.array([0.1, 0.95, 0.8, 0.9]), min_tpr=0.0) == pytest.approx(0.5)


def test_sensitivity_at_specificity_against_threshold_sweep():
    rng = np.random.default_rng(4)
    y = (rng.random(150) < 0.4).astype(int)
    s = np.round(rng.normal(size=150) + y, 2)
    for spec in (0.8, 0.9, 0.95, 1.0):
        best = 0.0
        for t in np.append(np.unique(s), np.inf):
            pred = s >= t
            sp = np.sum(~pred & (y == 0)) / np.sum(y == 0)
            if sp >= spec:
                best = max(best, np.sum(pred & (y == 1)) / np.sum(y == 1))
        assert M.sensitivity_at_specificity(y, s, spec) == pytest.approx(best), spec


def test_ece_against_explicit_bins():
    rng = np.random.default_rng(5)
    y, p = random_preds(rng, 300, 3)
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, 11)
    want = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            want += sel.sum() / len(y) * abs(np.mean(pred[sel] == y[sel]) - conf[sel].mean())
    assert M.ece(y, p, n_bins=10) == pytest.approx(want)
    onehot = np.eye(3)[y]
    assert M.ece(y, onehot) == pytest.approx(0.0)  # confident and right


def test_undefined_is_none_never_zero_or_half():
    y = np.zeros(6, dtype=int)
    p = np.tile([0.7, 0.3], (6, 1))
    assert M.auroc(y, p) is None
    assert M.binary_auroc(y, p[:, 1]) is None
    assert M.pauc_above_tpr(y, p[:, 1]) is None
    assert M.sensitivity_at_specificity(y, p[:, 1]) is None
    pc = M.per_class(y, p.argmax(1), ["benign", "melanoma"])
    assert pc["melanoma"]["precision"] is None and pc["melanoma"]["recall"] is None
    assert pc["melanoma"]["f1"] is None and pc["melanoma"]["support"] == 0
    assert M.accuracy([], []) is None and M.ece(np.zeros(0, int), np.zeros((0, 2))) is None


def test_compute_all_is_json_and_finds_the_positive_class():
    import json
    rng = np.random.default_rng(6)
    y, p = random_preds(rng, 60, 2)
    out = M.compute_all(y, p, ["nevus", "melanoma"])
    json.dumps(out)
    assert out["positive_class"] == "melanoma" and out["n"] == 60
    assert out["pauc_80tpr"] == pytest.approx(ref_area_above_tpr(y, p[:, 1], 0.8))
    assert M.default_positive(["NV", "MEL"]) == "MEL" and M.default_positive(["a", "b"]) is None
    assert M.compute_all(y, p, ["a", "b"])["pauc_80tpr"] is None
    with pytest.raises(ValueError, match="positive class 'x'"):
        M.compute_all(y, p, ["a", "b"], positive="x")


# -- bootstrap confidence intervals (issue 22: tiny test sets) ---------------------------------------------------

def ref_percentile_bootstrap(y, probs, n_boot, seed, stratified, level=0.95):
    """Written out: resample images with replacement (per class, classes ascending, when stratified), compute
    accuracy, balanced accuracy (mean per-class recall, plain loops) and binary AUROC (Mann-Whitney pairs) on each
    resample, take the (1 -/+ level) / 2 quantiles with numpy's default (linear) percentile (Efron & Tibshirani
    1993, ch. 13, the percentile interval)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    if stratified:
        cols = []
        for c in sorted(set(y.tolist())):
            where = np.flatnonzero(y == c)
            cols.append(where[rng.integers(0, len(where), (n_boot, len(where)))])
        draws = np.concatenate(cols, axis=1)
    else:
        draws = rng.integers(0, n, (n_boot, n))
    acc, bacc, auc = [], [], []
    for idx in draws:
        yy, pp = y[idx], probs[idx]
        pred = pp.argmax(1)
        acc.append(np.mean(pred == yy))
        recalls = [np.mean(pred[yy == c] == c) for c in sorted(set(yy.tolist()))]
        bacc.append(np.mean(recalls))
        if probs.shape[1] == 2 and len(set(yy.tolist())) == 2:
            auc.append(ref_auc_pairs(yy, pp[:, 1]))
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return (np.percentile(acc, q), np.percentile(bacc, q), np.percentile(auc, q) if auc else None)


@pytest.mark.parametrize("n,stratified", [(3, True), (11, True), (11, False)])
def test_bootstrap_ci_matches_a_written_out_percentile_bootstrap(n, stratified):
    rng = np.random.default_rng(n)
    y = np.array([0, 1, 1] if n == 3 else [0] * 5 + [1] * 6)
    logits = rng.normal(size=(n, 2)) + 1.0 * np.eye(2)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = M.bootstrap_ci(y, probs, ["benign", "malignant"], n_boot=300, seed=5, stratified=stratified)
    acc, bacc, auc = ref_percentile_bootstrap(y, probs, 300, 5, stratified)
    np.testing.assert_allclose(got["accuracy"], acc, atol=1e-12)
    np.testing.assert_allclose(got["balanced_accuracy"], bacc, atol=1e-12)
    np.testing.assert_allclose(got["auroc"], auc, atol=1e-12)
    assert got["level"] == 0.95 and got["stratified"] is stratified and "percentile bootstrap" in got["method"]
    assert got["pauc_80tpr"] is not None  # 'malignant' is the default positive class
    for k in M.CI_METRICS:
        assert got[k][0] <= got[k][1]
    import json
    json.dumps(got)  # goes into metrics.json as it is


def test_bootstrap_ci_of_accuracy_agrees_with_the_normal_approximation():
    """On a large set the percentile interval of an accuracy approaches the Wald interval p +- 1.96 sqrt(p(1-p)/n)."""
    rng = np.random.default_rng(0)
    y, probs = random_preds(rng, 600, 3)
    got = M.bootstrap_ci(y, probs, ["a", "b", "c"], n_boot=400, seed=1, stratified=False)
    p = np.mean(probs.argmax(1) == y)
    half = 1.96 * np.sqrt(p * (1 - p) / len(y))
    np.testing.assert_allclose(got["accuracy"], [p - half, p + half], atol=0.012)


def test_bootstrap_is_seeded_and_stratified_keeps_class_counts():
    y = np.array([0] * 4 + [1] * 2 + [2] * 5)
    idx = M.bootstrap_indices(y, 50, seed=3)
    assert idx.shape == (50, 11)
    assert all((np.bincount(y[row], minlength=3) == [4, 2, 5]).all() for row in idx)
    np.testing.assert_array_equal(idx, M.bootstrap_indices(y, 50, seed=3))
    assert not np.array_equal(idx, M.bootstrap_indices(y, 50, seed=4))


def test_small_test_set_warning_thresholds():
    classes = ["nevus", "melanoma"]
    assert M.small_test_warning([0, 1, 1], classes) is not None  # 3 images
    many_few_pos = [0] * 100 + [1] * 9
    msg = M.small_test_warning(many_few_pos, classes)
    assert msg and "9 of the positive class 'melanoma'" in msg
    assert M.small_test_warning([0] * 100 + [1] * 10, classes) is None
    assert M.small_test_warning([0] * 19 + [1] * 10, classes) is not None  # 29 images
    assert M.small_test_warning([0] * 20 + [1] * 10, classes) is None  # 30 images, 10 positives: the floor
    msg = M.small_test_warning([0] * 50 + [1] * 50 + [2] * 4, ["a", "b", "c"])  # no positive: the rarest class
    assert msg and "rarest class 'c'" in msg


def test_vectorised_resample_metrics_equal_the_metric_functions():
    """bootstrap_ci computes every resample at once; each row must equal the one-set functions (sklearn-based)."""
    rng = np.random.default_rng(2)
    y, probs = random_preds(rng, 40, 4, present=[0, 1, 3])  # class 2 absent from y (predicted now and then)
    idx = np.vstack([np.arange(40), M.bootstrap_indices(y, 6, seed=0, stratified=False)])
    rows = M.resample_metrics(y, probs, idx, k=3)
    for b, i in enumerate(idx):
        yy, pp = y[i], probs[i]
        pred = pp.argmax(1)
        ref = {"accuracy": M.accuracy(yy, pred), "balanced_accuracy": M.balanced_accuracy(yy, pred),
               "macro_f1": M.macro_f1(yy, pred), "auroc": M.auroc(yy, pp),
               "pauc_80tpr": M.pauc_above_tpr(yy == 3, pp[:, 3])}
        for k, v in ref.items():
            assert rows[k][b] == pytest.approx(v, abs=1e-12), (k, b)
