"""dermfast.eval.tta: the views against numpy's own rot90 / flip (the dihedral group D4 of the square written
out), the probability average against a plain loop, and bad input."""
import numpy as np
import pytest
import torch
from torch import nn

from dermfast.eval.tta import TTA_MODES, apply_view, predict_tta, tta_probs, tta_views


def numpy_views(a, mode):
    """The views written with numpy on [H, W] (last two axes): D4 = rot90^k and rot90^k then a mirror."""
    rot = lambda k: np.rot90(a, k, axes=(-2, -1))  # noqa: E731
    if mode == "none":
        return [a]
    if mode == "flips":  # identity, left-right, up-down, both: the four flips evaluate has always used
        return [a, np.flip(a, -1), np.flip(a, -2), np.flip(np.flip(a, -1), -2)]
    return [v for k in range(4) for v in (rot(k), np.flip(rot(k), -1))]


@pytest.mark.parametrize("mode", TTA_MODES)
def test_views_match_numpy(mode):
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    ours = [apply_view(x, v).numpy() for v in tta_views(mode)]
    ref = numpy_views(x.numpy(), mode)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


def test_d4_is_the_whole_dihedral_group():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = {tuple(apply_view(x, v).flatten().tolist()) for v in tta_views("d4")}
    assert len(views) == 8   # all distinct
    for v in tta_views("d4"):  # closed: a view of a view is a view
        for w in tta_views("d4"):
            assert tuple(apply_view(apply_view(x, v), w).flatten().tolist()) in views


class OrientationNet(nn.Module):
    """Not rotation invariant: a linear map of the flattened image."""
    def __init__(self, hw=4, classes=3):
        super().__init__()
        self.fc = nn.Linear(3 * hw * hw, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("mode", TTA_MODES)
def test_probs_are_the_mean_softmax_over_numpy_views(mode):
    net = OrientationNet().double()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    got = tta_probs(net, x, mode)
    ref = np.mean([net(torch.from_numpy(v.copy())).softmax(-1).detach().numpy() for v in numpy_views(x.numpy(), mode)],
                  axis=0)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert got.dtype == torch.float32 and torch.allclose(got.sum(-1), torch.ones(3))


def test_predict_tta_over_a_loader():
    net = OrientationNet()
    batches = [{"image": torch.randn(2, 3, 4, 4), "label": torch.tensor([0, 1])},
               {"image": torch.randn(1, 3, 4, 4), "label": torch.tensor([2])}]
    probs, y = predict_tta(net, batches, torch.device("cpu"), "d4")
    assert probs.shape == (3, 3) and probs.dtype == np.float64 and y.tolist() == [0, 1, 2]
    np.testing.assert_allclose(probs[2], tta_probs(net, batches[1]["image"], "d4")[0].numpy(), rtol=1e-6)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="accepted: none, flips, d4"):
        tta_views("rot")
    with pytest.raises(ValueError, match="square"):
        apply_view(torch.zeros(1, 3, 4, 6), (1, False))
