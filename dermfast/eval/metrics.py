"""Classification metrics the skin-lesion literature reports, with undefined values reported as undefined.

Inputs throughout: `y_true` [N] int class indices in [0, C), `probs` [N, C] float class probabilities (rows sum
to 1), `y_score` [N] float score of the positive class for the binary metrics. scikit-learn computes what it
computes the same way (accuracy, balanced accuracy, P/R/F1 + support, ROC curves, AUROC, confusion matrix);
this module adds what it lacks or computes differently:

- `pauc_above_tpr`: the ISIC 2024 challenge score, the raw partial area under the ROC curve above a TPR of 0.8
  (a value in [0, 0.2]), computed as the competition's metric did: labels flipped, scores negated, the area of
  that ROC curve up to FPR 0.2 with the curve cut by linear interpolation. scikit-learn's
  `roc_auc_score(max_fpr=...)` is a different number (McClish-standardised, and over low FPR, not high TPR).
- `sensitivity_at_specificity`: the best TPR among ROC operating points whose specificity is at least the target.
- `ece`: expected calibration error of the top-label confidence over equal-width bins (Guo et al. 2017).
- `bootstrap_ci`: percentile bootstrap intervals over images (stratified by class by default), and
  `small_test_warning`: a set too small to compare models (< 30 images or < 10 of the positive class).

A metric that is undefined on the data given (AUROC when only one class is present, precision of a class never
predicted, recall of a class absent from `y_true`) is None, never 0 or 0.5.
"""
from __future__ import annotations

import math

import numpy as np

# sklearn is imported inside functions: `import dermfast.eval.metrics` works without it (clear error on use).


def _sk():
    try:
        import sklearn.metrics as skm
    except ImportError as e:
        raise ImportError("dermfast metrics need scikit-learn: pip install 'dermfast[eval]'") from e
    return skm


def _none_if_nan(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _check(y_true, probs=None) -> tuple[np.ndarray, np.ndarray | None]:
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    if probs is None:
        return y, None
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be [N, C] with N = len(y_true) = {y.shape[0]}, got {list(p.shape)}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got [{y.min()}, {y.max()}]")
    return y, p


def _binary(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true and y_score must have the same length, got {y.shape[0]} and {s.shape[0]}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("binary metrics need y_true in {0, 1} (1 = positive)")
    return y, s


def accuracy(y_true, y_pred) -> float | None:
    """Fraction of correct predictions; None for an empty set."""
    y, p = np.asarray(y_true), np.asarray(y_pred)
    return float(_sk().accuracy_score(y, p)) if y.size else None


def balanced_accuracy(y_true, y_pred) -> float | None:
    """Mean recall over the classes present in y_true; None for an empty set."""
    y, p = np.asarray(y_true), np.asarray(y_pred)
    if not y.size:
        return None
    present = np.unique(y)
    # sklearn's balanced_accuracy_score is the mean recall of the classes in y_true (it drops classes seen only
    # in y_pred, with a warning); computing it over `present` explicitly gives the same value without the warning.
    _, recall, _, _ = _sk().precision_recall_fscore_support(y, p, labels=present, zero_division=np.nan)
    return float(np.mean(recall))


def confusion_matrix(y_true, y_pred, num_classes: int) -> list[list[int]]:
    """[C, C] counts, row = true class, column = predicted class."""
    return _sk().confusion_matrix(y_true, y_pred, labels=np.arange(num_classes)).astype(int).tolist()


def per_class(y_true, y_pred, classes: list[str]) -> dict[str, dict]:
    """{class: {precision, recall, f1, support}}; precision None when never predicted, recall and F1 None when
    the class is absent from y_true and never predicted (F1 is 0 for a class predicted but absent)."""
    skm = _sk()
    labels = np.arange(len(classes))
    prec, rec, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=np.nan)
    out = {}
    y, p = np.asarray(y_true), np.asarray(y_pred)
    for k, name in enumerate(classes):
        tp, fp, fn = int(np.sum((y == k) & (p == k))), int(np.sum((y != k) & (p == k))), int(np.sum((y == k) & (p != k)))
        f = None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)  # sklearn gives nan or 0 depending on version
        out[name] = {"precision": _none_if_nan(prec[k]), "recall": _none_if_nan(rec[k]),
                     "f1": f, "support": int(support[k])}
    return out


def macro_f1(y_true, y_pred) -> float | None:
    """Unweighted mean F1 over the classes present in y_true or y_pred; None for an empty set."""
    y, p = np.asarray(y_true), np.asarray(y_pred)
    if not y.size:
        return None
    labels = np.union1d(y, p)
    return float(_sk().f1_score(y, p, labels=labels, average="macro", zero_division=0))


def binary_auroc(y_true, y_score) -> float | None:
    """Area under the ROC curve; None unless both classes are present."""
    y, s = _binary(y_true, y_score)
    if len(np.unique(y)) < 2:
        return None
    return float(_sk().roc_auc_score(y, s))


def auroc_per_class(y_true, probs) -> list[float | None]:
    """One-vs-rest AUROC of each class; None for a class absent from y_true (or the only one present)."""
    y, p = _check(y_true, probs)
    return [binary_auroc(y == k, p[:, k]) for k in range(p.shape[1])]


def auroc(y_true, probs) -> float | None:
    """Macro one-vs-rest AUROC over the classes present in y_true (binary AUROC of class 1 when C == 2);
    None when fewer than two classes are present.

    With every class present this equals `sklearn.metrics.roc_auc_score(y, probs, multi_class="ovr")`; an
    evaluation set holding a subset of the model's classes averages over the classes it holds.
    """
    y, p = _check(y_true, probs)
    if len(np.unique(y)) < 2:
        return None
    if p.shape[1] == 2:
        return binary_auroc(y == 1, p[:, 1])
    vals = [v for v in auroc_per_class(y, p) if v is not None]
    return float(np.mean(vals))


def pauc_above_tpr(y_true, y_score, min_tpr: float = 0.8) -> float | None:
    """ISIC 2024 score: partial AUC of the region above TPR = `min_tpr`, raw (in [0, 1 - min_tpr]).

    y_true [N] in {0, 1} (1 = malignant / positive), y_score [N] (higher = more positive). As the competition
    computed it: flip the labels and negate the scores (so the TPR band [min_tpr, 1] becomes the FPR band
    [0, 1 - min_tpr]), take that ROC curve up to FPR = 1 - min_tpr (cut by linear interpolation) and integrate
    with the trapezoid rule. None unless both classes are present. A perfect ranking scores 1 - min_tpr.
    """
    if not 0.0 <= min_tpr < 1.0:
        raise ValueError(f"min_tpr must be in [0, 1), got {min_tpr}")
    y, s = _binary(y_true, y_score)
    if len(np.unique(y)) < 2:
        return None
    skm = _sk()
    max_fpr = 1.0 - min_tpr
    fpr, tpr, _ = skm.roc_curve(1 - y, -s)
    stop = int(np.searchsorted(fpr, max_fpr, "right"))
    if stop < len(fpr):
        tpr = np.append(tpr[:stop], np.interp(max_fpr, [fpr[stop - 1], fpr[stop]], [tpr[stop - 1], tpr[stop]]))
        fpr = np.append(fpr[:stop], max_fpr)
    return float(skm.auc(fpr, tpr))


def sensitivity_at_specificity(y_true, y_score, specificity: float = 0.9) -> float | None:
    """Highest TPR among the ROC operating points (thresholds) whose specificity (1 - FPR) is >= the target.
    None unless both classes are present."""
    if not 0.0 <= specificity <= 1.0:
        raise ValueError(f"specificity must be in [0, 1], got {specificity}")
    y, s = _binary(y_true, y_score)
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = _sk().roc_curve(y, s)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max())  # the first point (threshold inf, FPR 0) always qualifies


def ece(y_true, probs, n_bins: int = 15) -> float | None:
    """Expected calibration error of the top-label confidence: sum over equal-width confidence bins
    (lo, hi] of |accuracy - mean confidence| * fraction of samples in the bin. None for an empty set."""
    y, p = _check(y_true, probs)
    if not y.size:
        return None
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def reliability(y_true, probs, n_bins: int = 15) -> dict[str, list]:
    """Per-bin (lo, hi] mean confidence, accuracy and count, for the reliability diagram."""
    y, p = _check(y_true, probs)
    conf, correct = p.max(1), (p.argmax(1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    out = {"lo": [], "hi": [], "confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        sel = bins == b
        out["lo"].append(b / n_bins)
        out["hi"].append((b + 1) / n_bins)
        out["count"].append(int(sel.sum()))
        out["confidence"].append(float(conf[sel].mean()) if sel.any() else None)
        out["accuracy"].append(float(correct[sel].mean()) if sel.any() else None)
    return out


POSITIVE_NAMES = ("melanoma", "mel", "malignant")


def default_positive(classes: list[str]) -> str | None:
    """The malignant class for pAUC: melanoma / mel / malignant (case-insensitive) when present, else None."""
    lower = {c.lower(): c for c in classes}
    for name in POSITIVE_NAMES:
        if name in lower:
            return lower[name]
    return None


def compute_all(y_true, probs, classes: list[str], positive: str | None = None) -> dict:
    """Every metric for one set of predictions, as a JSON-able dict (None = undefined).

    `positive` names the class scored one-vs-rest for pAUC above 80% TPR and sensitivity at 90% / 95%
    specificity (default: `default_positive(classes)`; None leaves them undefined).
    """
    y, p = _check(y_true, probs)
    if len(classes) != p.shape[1]:
        raise ValueError(f"{len(classes)} class names for {p.shape[1]} probability columns")
    pred = p.argmax(1)
    positive = positive if positive is not None else default_positive(classes)
    if positive is not None and positive not in classes:
        raise ValueError(f"positive class {positive!r} is not one of {classes}")
    out = {
        "n": int(y.size),
        "accuracy": accuracy(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "macro_f1": macro_f1(y, pred),
        "auroc": auroc(y, p),
        "pauc_80tpr": None,
        "sens_at_90spec": None,
        "sens_at_95spec": None,
        "ece": ece(y, p),
        "positive_class": positive,
        "per_class": per_class(y, pred, classes),
        "confusion_matrix": confusion_matrix(y, pred, len(classes)),
    }
    for name, v in zip(classes, auroc_per_class(y, p)):
        out["per_class"][name]["auroc"] = v
    if positive is not None:
        k = classes.index(positive)
        out["pauc_80tpr"] = pauc_above_tpr(y == k, p[:, k], 0.8)
        out["sens_at_90spec"] = sensitivity_at_specificity(y == k, p[:, k], 0.90)
        out["sens_at_95spec"] = sensitivity_at_specificity(y == k, p[:, k], 0.95)
    return out


# ------------------------------------------------------------------------------------- small evaluation sets
CI_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "pauc_80tpr")
SMALL_TEST_IMAGES = 30    # fewer images than this: too few to compare models (a 95% interval of an accuracy
SMALL_TEST_POSITIVES = 10  # near 0.8 is +-0.15 at n = 30); nor fewer than this of the positive (or rarest) class


def bootstrap_indices(y_true, n_boot: int, seed: int = 0, stratified: bool = True) -> np.ndarray:
    """[n_boot, N] image indices, resampled with replacement. `stratified`: each class keeps its count (classes
    in ascending order, each drawing `rng.integers(0, n_c, (n_boot, n_c))` into its images in index order), so
    every resample holds every class present and AUROC / balanced accuracy stay defined on sets of a few images;
    else `rng.integers(0, N, (n_boot, N))`. rng = numpy.random.default_rng(seed)."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    if not stratified:
        return rng.integers(0, y.size, (n_boot, y.size))
    parts = []
    for c in np.unique(y):
        where = np.flatnonzero(y == c)
        parts.append(where[rng.integers(0, where.size, (n_boot, where.size))])
    return np.concatenate(parts, axis=1) if parts else np.zeros((n_boot, 0), dtype=np.int64)


def _rows_binary_auroc(pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """[B] AUROC of each row (pos [B, N] bool, score [B, N]) by the rank-sum (Mann-Whitney U, ties averaged), which
    equals the trapezoid ROC area `binary_auroc` computes; nan where a row lacks either class."""
    from scipy.stats import rankdata
    n1 = pos.sum(1).astype(np.float64)
    n0 = pos.shape[1] - n1
    u = (rankdata(score, axis=1) * pos).sum(1) - n1 * (n1 + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), u / (n1 * n0), np.nan)


def resample_metrics(y, p, idx: np.ndarray, k: int | None = None) -> dict[str, np.ndarray]:
    """CI_METRICS of every resample at once: idx [B, N] image indices -> {metric: [B] values, nan = undefined}.
    The same definitions as accuracy / balanced_accuracy / macro_f1 / auroc / pauc_above_tpr (from per-resample
    confusion counts and rank sums, vectorised; pAUC through `pauc_above_tpr` per resample, positive index k)."""
    y, p = _check(y, p)
    C = p.shape[1]
    yy, pr = y[idx], p.argmax(1)[idx]
    B = idx.shape[0]
    cm = np.zeros((B, C * C), dtype=np.int64)
    np.add.at(cm, (np.arange(B)[:, None], yy * C + pr), 1)
    cm = cm.reshape(B, C, C)
    tp, support, predicted = np.diagonal(cm, axis1=1, axis2=2), cm.sum(2), cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), np.nan)  # 2TP / (2TP + FP + FN)
        out = {"accuracy": tp.sum(1) / idx.shape[1], "balanced_accuracy": np.nanmean(recall, 1),
               "macro_f1": np.nanmean(f1, 1)}
        if C == 2:
            out["auroc"] = _rows_binary_auroc(yy == 1, p[idx, 1])
        else:
            per = np.stack([_rows_binary_auroc(yy == c, p[idx, c]) for c in range(C)], 1)  # nan: class absent
            defined = np.isfinite(per).sum(1)
            out["auroc"] = np.where(defined > 0, np.nansum(per, 1) / np.maximum(defined, 1), np.nan)
    pauc = np.full(B, np.nan)
    if k is not None:
        for b in range(B):
            v = pauc_above_tpr(yy[b] == k, p[idx[b], k], 0.8)
            pauc[b] = np.nan if v is None else v
    out["pauc_80tpr"] = pauc
    return out


def bootstrap_ci(y_true, probs, classes: list[str], positive: str | None = None, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0, stratified: bool = True) -> dict:
    """Percentile bootstrap confidence intervals of CI_METRICS over images: the metrics of `n_boot` resamples
    (`bootstrap_indices`), and per metric [the (1 - level) / 2, (1 + level) / 2 quantiles] (numpy.percentile,
    linear interpolation) of its defined values; None when no resample defines it. Returns {"method", "level",
    "n_boot", "seed", "stratified", metric: [low, high] or None}. `positive` as compute_all's (pAUC)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y, p = _check(y_true, probs)
    positive = positive if positive is not None else default_positive(classes)
    k = classes.index(positive) if positive is not None else None
    rows = resample_metrics(y, p, bootstrap_indices(y, n_boot, seed, stratified), k)
    values = {m: rows[m][np.isfinite(rows[m])] for m in CI_METRICS}
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    how = "stratified by class (each class keeps its count)" if stratified else "not stratified"
    out = {"method": f"percentile bootstrap over images, {how}, {n_boot} resamples, seed {seed}",
           "level": level, "n_boot": n_boot, "seed": seed, "stratified": stratified}
    for m, vals in values.items():
        out[m] = [float(x) for x in np.percentile(vals, q)] if vals.size else None
    return out


def small_test_warning(y_true, classes: list[str], positive: str | None = None) -> str | None:
    """A plain warning when an evaluation set is too small to compare models: fewer than SMALL_TEST_IMAGES
    images, or fewer than SMALL_TEST_POSITIVES of the positive class (default_positive; without one, of the
    rarest class present). None when it is large enough by these counts."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    positive = positive if positive is not None else default_positive(classes)
    counts = np.bincount(y, minlength=len(classes))
    if positive is not None:
        k, role = classes.index(positive), "positive class"
    else:
        present = np.flatnonzero(counts)
        k, role = (int(present[np.argmin(counts[present])]) if present.size else 0), "rarest class"
    if y.size >= SMALL_TEST_IMAGES and counts[k] >= SMALL_TEST_POSITIVES:
        return None
    return (f"the evaluation set is too small to compare models: {y.size} images, {int(counts[k])} of the {role} "
            f"{classes[k]!r} (want >= {SMALL_TEST_IMAGES} images and >= {SMALL_TEST_POSITIVES} of it); read the "
            "95% intervals: models whose intervals overlap are not shown to differ")
