"""dermfast.eval.threshold.choose_threshold: against a written-out brute-force search over every threshold that
matters, and against scikit-learn's roc_curve (balanced accuracy = (tpr + 1 - fpr) / 2 at each of its
thresholds, sklearn/metrics/_ranking.py: a sample is positive when score >= threshold)."""
import numpy as np
import pytest

from dermfast.eval.threshold import balanced_accuracy_at, choose_threshold


def brute_force(y, s):
    """Every threshold worth trying, written out: each distinct score, each midpoint between neighbours, and
    one below / above all scores; the balanced accuracy of `s >= t` as the plain mean of the class recalls."""
    u = np.unique(s)
    cands = np.concatenate([u, (u[1:] + u[:-1]) / 2, [u[0] - 1e-9, u[-1] + 1e-9, 0.0, 1.0 + 1e-9]])
    best = -1.0
    for t in cands:
        pred = s >= t
        ba = 0.5 * (np.mean(pred[y == 1]) + np.mean(~pred[y == 0]))
        best = max(best, ba)
    return best


def cases():
    rng = np.random.default_rng(7)
    out = []
    for n in (2, 3, 7, 22, 65):
        y = rng.integers(0, 2, n)
        y[0], y[-1] = 0, 1
        out.append((y, rng.random(n)))                                   # random scores
        out.append((y, np.round(rng.random(n), 1)))                      # many ties
        out.append((y, np.clip(0.3 * y + 0.5 * rng.random(n), 0, 1)))   # informative, off-centre
    out.append((np.array([0, 0, 1, 1]), np.array([0.0, 0.0, 1.0, 1.0])))  # the ends 0 and 1
    out.append((np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])))  # anti-ranked: no cut beats chance
    return out


@pytest.mark.parametrize("y,s", cases())
def test_threshold_reaches_the_brute_force_best(y, s):
    t = choose_threshold(y, s)
    assert balanced_accuracy_at(y, s, t) == pytest.approx(brute_force(y, s), abs=1e-12)


@pytest.mark.parametrize("y,s", cases())
def test_threshold_reaches_sklearn_roc_best(y, s):
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(y, s)
    best = np.max((tpr + 1 - fpr) / 2)   # the ROC curve's best point, drop_intermediate keeps the corners
    assert balanced_accuracy_at(y, s, choose_threshold(y, s)) == pytest.approx(best, abs=1e-12)


def test_threshold_is_the_midpoint_between_neighbouring_scores():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.05, 0.10, 0.20, 0.30, 0.90])
    assert choose_threshold(y, s) == pytest.approx(0.25)   # between 0.20 and 0.30, not on either score


def test_off_centre_ranking_gets_its_threshold_where_0_5_fails():
    y = np.array([0] * 8 + [1] * 4)
    s = np.array([0.01, 0.02, 0.03, 0.05, 0.06, 0.08, 0.1, 0.12, 0.2, 0.25, 0.3, 0.4])
    t = choose_threshold(y, s)
    assert balanced_accuracy_at(y, s, 0.5) == 0.5
    assert balanced_accuracy_at(y, s, t) == 1.0 and t == pytest.approx(0.16)


def test_equal_cuts_prefer_the_one_nearest_half():
    # cuts at 0.2 and 0.8 both give 0.75: two equally good intervals; the midpoint nearest 0.5 wins
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, 0.3, 0.7, 0.9])
    t = choose_threshold(y, s)
    assert balanced_accuracy_at(y, s, t) == 0.75
    assert t == pytest.approx(0.2) or t == pytest.approx(0.8)
    y2, s2 = np.array([0, 1, 0, 1]), np.array([0.1, 0.45, 0.7, 0.9])  # 0.275 is nearer 0.5 than 0.8
    assert choose_threshold(y2, s2) == pytest.approx(0.275)


def test_no_cut_calls_nothing_positive_above_one():
    y = np.array([1, 0])
    s = np.array([0.0, 1.0])   # anti-ranked, ends at 0 and 1: every rule is chance; 0.5's neighbourhood wins
    t = choose_threshold(y, s)
    assert balanced_accuracy_at(y, s, t) == 0.5


@pytest.mark.parametrize("y,s,msg", [
    (np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]), "both classes"),
    (np.array([0, 2]), np.array([0.1, 0.2]), "0 / 1"),
    (np.array([0, 1]), np.array([0.1, np.nan]), "finite"),
    (np.array([0, 1]), np.array([0.1, 1.5]), r"\[0, 1\]"),
    (np.array([0, 1]), np.array([0.1]), "one length"),
])
def test_bad_input_is_one_clear_error(y, s, msg):
    with pytest.raises(ValueError, match=msg):
        choose_threshold(y, s)


def test_too_few_of_a_class_keeps_the_arg_max_rule():
    """A threshold chosen on fewer than MIN_PER_CLASS images of either class is noise: None (arg-max) then."""
    from dermfast.eval.threshold import MIN_PER_CLASS, threshold_if_estimable
    rng = np.random.default_rng(0)
    few = np.array([1] * (MIN_PER_CLASS - 1) + [0] * 40)
    assert threshold_if_estimable(few, rng.random(len(few))) is None
    assert threshold_if_estimable(1 - few, rng.random(len(few))) is None
    enough = np.array([1] * MIN_PER_CLASS + [0] * MIN_PER_CLASS)
    s = rng.random(len(enough))
    assert threshold_if_estimable(enough, s) == choose_threshold(enough, s)
