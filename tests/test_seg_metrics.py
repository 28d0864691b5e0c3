"""Segmentation metrics against peers' formulas, written out here with their source, on random blobs.

Peers (neither is installed in the test venv; the library itself is used when present):
- medpy (github.com/loli/medpy, medpy/metric/binary.py): `dc`, `jc`, `hd95` with `__surface_distances`.
- MONAI's compute_hausdorff_distance(percentile=95) takes the percentile of each direction separately and then
  the max (monai/metrics/hausdorff_distance.py); dermfast follows medpy's pooled percentile, as the lesion
  segmentation papers (and the TEDMAE / PH2 numbers) that cite medpy do, so MONAI is not the reference here.
"""
import numpy as np
import pytest
from scipy.ndimage import binary_erosion, distance_transform_edt, gaussian_filter, generate_binary_structure

from dermfast.eval import segmentation as S


# --- medpy, medpy/metric/binary.py (transcribed; voxelspacing None, connectivity 1) ---------------------------------
def medpy_dc(result, reference):
    result = np.atleast_1d(result.astype(bool))
    reference = np.atleast_1d(reference.astype(bool))
    intersection = np.count_nonzero(result & reference)
    size_i1 = np.count_nonzero(result)
    size_i2 = np.count_nonzero(reference)
    try:
        dc = 2. * intersection / float(size_i1 + size_i2)
    except ZeroDivisionError:
        dc = 0.0
    return dc


def medpy_jc(result, reference):
    result = np.atleast_1d(result.astype(bool))
    reference = np.atleast_1d(reference.astype(bool))
    intersection = np.count_nonzero(result & reference)
    union = np.count_nonzero(result | reference)
    return float(intersection) / float(union)


def medpy_surface_distances(result, reference, connectivity=1):
    result = np.atleast_1d(result.astype(bool))
    reference = np.atleast_1d(reference.astype(bool))
    footprint = generate_binary_structure(result.ndim, connectivity)
    if 0 == np.count_nonzero(result):
        raise RuntimeError('The first supplied array does not contain any binary object.')
    if 0 == np.count_nonzero(reference):
        raise RuntimeError('The second supplied array does not contain any binary object.')
    result_border = result ^ binary_erosion(result, structure=footprint, iterations=1)
    reference_border = reference ^ binary_erosion(reference, structure=footprint, iterations=1)
    dt = distance_transform_edt(~reference_border, sampling=None)
    sds = dt[result_border]
    return sds


def medpy_hd95(result, reference):
    hd1 = medpy_surface_distances(result, reference)
    hd2 = medpy_surface_distances(reference, result)
    return np.percentile(np.hstack((hd1, hd2)), 95)


def blob(rng, h, w, frac=0.3):
    """A random lesion-like blob: thresholded smoothed noise (several components and holes can occur)."""
    noise = gaussian_filter(rng.standard_normal((h, w)), sigma=min(h, w) / 8)
    return noise > np.quantile(noise, 1 - frac)


SHAPES = [(7, 9), (33, 33), (64, 48), (97, 130)]


@pytest.mark.parametrize("shape", SHAPES)
def test_dice_jaccard_hd95_match_medpy_on_random_blobs(shape):
    rng = np.random.default_rng(sum(shape))
    for trial in range(5):
        p, t = blob(rng, *shape, frac=rng.uniform(0.1, 0.6)), blob(rng, *shape, frac=rng.uniform(0.1, 0.6))
        assert p.any() and t.any()
        assert S.dice(p, t) == pytest.approx(medpy_dc(p, t), abs=1e-12)
        assert S.jaccard(p, t) == pytest.approx(medpy_jc(p, t), abs=1e-12)
        assert S.hd95(p, t) == pytest.approx(medpy_hd95(p, t), abs=1e-9)
        assert S.hd95(p, t) == pytest.approx(S.hd95(t, p), abs=1e-9)  # symmetric


def test_against_medpy_itself_when_installed():
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(1)
    p, t = blob(rng, 50, 70), blob(rng, 50, 70)
    assert S.dice(p, t) == pytest.approx(binary.dc(p, t))
    assert S.jaccard(p, t) == pytest.approx(binary.jc(p, t))
    assert S.hd95(p, t) == pytest.approx(binary.hd95(p, t))


def test_known_values_by_hand():
    t = np.zeros((20, 20), bool)
    t[5:15, 5:15] = True                      # 100 px
    p = np.zeros_like(t)
    p[5:15, 8:18] = True                      # shifted 3 columns: overlap 70 px
    assert S.dice(p, t) == pytest.approx(140 / 200)
    assert S.jaccard(p, t) == pytest.approx(70 / 130)
    assert S.hd95(t, t) == 0.0
    assert S.dice(t, t) == S.jaccard(t, t) == 1.0


def test_empty_mask_conventions():
    e = np.zeros((30, 40), bool)
    t = np.zeros_like(e)
    t[10:20, 10:20] = True
    assert (S.dice(e, e), S.jaccard(e, e), S.hd95(e, e)) == (1.0, 1.0, 0.0)
    assert (S.dice(e, t), S.jaccard(e, t)) == (0.0, 0.0)
    assert S.hd95(e, t) == S.hd95(t, e) == pytest.approx(50.0)  # the diagonal of a 30 x 40 image
    sc = S.SegScores()
    sc.add(e, t)
    sc.add(t, t)
    sc.add(e, e)
    s = sc.summary()
    assert s["n"] == 3 and s["hd95_worst"] == 1 and s["empty_truth"] == 1
    assert s["dice"] == pytest.approx(2 / 3) and s["hd95"] == pytest.approx(50 / 3)


def test_mean_is_per_image_not_pooled():
    big_t = np.ones((10, 10), bool)
    small_t = np.zeros((10, 10), bool)
    small_t[0, 0] = True
    sc = S.SegScores()
    sc.add(big_t, big_t)                       # Dice 1 on 100 px
    sc.add(np.zeros((10, 10), bool), small_t)  # Dice 0 on 1 px
    assert sc.summary()["dice"] == pytest.approx(0.5)  # pooled would be 200 / 201


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="resize the prediction"):
        S.dice(np.zeros((4, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        S.hd95(np.full((4, 4), 0.7), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="2-D"):
        S.jaccard(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))


def test_resize_prob_back_to_original_resolution():
    prob = np.zeros((8, 8), np.float32)
    prob[2:6, 2:6] = 1
    up = S.resize_prob(prob, 33, 17)
    assert up.shape == (33, 17)
    m = up >= 0.5
    # the square covers the middle half of each axis at any resolution
    assert m[16, 8] and not m[2, 8] and not m[16, 1]
    assert abs(m[:, 8].sum() - 33 / 2) <= 2 and abs(m[16].sum() - 17 / 2) <= 2
