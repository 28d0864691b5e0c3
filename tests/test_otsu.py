"""The Otsu baseline: the threshold against scikit-image's formula (written out; the library when installed), and
the whole recipe on a synthetic dermoscopy-like image."""
import numpy as np
import pytest

from dermfast.eval.otsu import largest_component, otsu_segment, otsu_threshold
from dermfast.eval.segmentation import dice


def skimage_threshold_otsu(image, nbins=256):
    """scikit-image, skimage/filters/thresholding.py `threshold_otsu` (histogram of a float image over its
    range, `nbins` bins): returns the CENTRE of the last bin of the dark class; skimage's foreground is
    `image > threshold`."""
    counts, edges = np.histogram(image.ravel(), bins=nbins, range=(image.min(), image.max()))
    bin_centers = (edges[:-1] + edges[1:]) / 2
    counts = counts.astype(np.float32, copy=False)
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * bin_centers) / weight1
    mean2 = (np.cumsum((counts * bin_centers)[::-1]) / weight2[::-1])[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    idx = np.argmax(variance12)
    return bin_centers[idx], edges[idx + 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_splits_where_skimage_does(seed):
    rng = np.random.default_rng(seed)
    v = np.concatenate([rng.normal(60, 12, 3000), rng.normal(170, 25, 5000)]).clip(0, 255)
    ours = otsu_threshold(v)
    centre, upper_edge = skimage_threshold_otsu(v)
    # same bin chosen: dermfast returns that bin's upper edge (the histogram split), skimage its centre
    assert ours == pytest.approx(upper_edge, rel=1e-9)
    assert ours - centre == pytest.approx((v.max() - v.min()) / 512, rel=1e-6)
    assert 60 < ours < 170


def test_against_skimage_itself_when_installed():
    filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.normal(50, 10, 2000), rng.normal(200, 20, 2000)]).clip(0, 255)
    width = (v.max() - v.min()) / 256
    assert otsu_threshold(v) == pytest.approx(filters.threshold_otsu(v) + width / 2, rel=1e-6)


def test_constant_and_empty_input():
    assert otsu_threshold(np.full(10, 7.0)) == 7.0
    with pytest.raises(ValueError, match="empty"):
        otsu_threshold(np.zeros(0))


def test_largest_component_8_connected():
    m = np.zeros((10, 10), bool)
    m[0:2, 0:2] = True           # 4 px
    m[5, 5] = m[6, 6] = m[7, 7] = m[8, 8] = m[9, 9] = True  # 5 px joined diagonally only
    out = largest_component(m)
    assert out.sum() == 5 and out[7, 7] and not out[0, 0]
    assert not largest_component(np.zeros((4, 4), bool)).any()


def synthetic_dermoscopy(rng, h=120, w=160):
    """Skin (light, blue ~170) with a dark-blue-absorbing elliptical lesion holding a bright hole (a
    regression area), a distractor dark speck, hair-like line and noise. Returns (rgb uint8, true mask)."""
    yy, xx = np.mgrid[:h, :w]
    lesion = ((yy - 60) / 35.0) ** 2 + ((xx - 85) / 50.0) ** 2 <= 1
    hole = ((yy - 60) / 6.0) ** 2 + ((xx - 85) / 6.0) ** 2 <= 1
    img = np.empty((h, w, 3), np.float32)
    img[:] = (225, 185, 170)
    img[lesion] = (120, 70, 50)
    img[hole] = (220, 180, 165)              # bright inside: must be filled
    img[5:9, 5:9] = (110, 60, 45)            # a small dark speck: not the largest component
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lesion


def test_otsu_segment_on_synthetic_image():
    rng = np.random.default_rng(0)
    img, truth = synthetic_dermoscopy(rng)
    pred = otsu_segment(img)
    assert pred.shape == truth.shape and pred.dtype == bool
    assert dice(pred, truth) > 0.95
    assert pred[60, 85]                      # the hole is filled
    assert not pred[6, 6]                    # the speck is dropped


def test_otsu_uses_the_blue_channel():
    """A lesion visible only in blue is found; one visible only in red is not (flat blue: nothing to split)."""
    h, w = 64, 64
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= 15 ** 2
    img = np.full((h, w, 3), 200, np.uint8)
    img[..., 2][disc] = 60
    assert dice(otsu_segment(img), disc) > 0.95
    red_only = np.full((h, w, 3), 200, np.uint8)
    red_only[..., 0][disc] = 60
    assert not otsu_segment(red_only).any()


def test_bad_input():
    with pytest.raises(ValueError, match="RGB"):
        otsu_segment(np.zeros((8, 8)))
