"""Exterior Conversion (dermfast/models/exterior_conversion.py): the grouped batch op against the per-sample
reference, geometry preserved, identity at alpha 0, draws that are a pure function of (seed, step, sample)."""
import pytest
import torch
import torch.nn.functional as F

from dermfast.models.exterior_conversion import ec_params, exterior_conversion, exterior_conversion_ref


@pytest.mark.parametrize("B,C,H,W,sizes", [(1, 3, 8, 8, (3,)), (5, 3, 9, 11, (1, 3, 5)), (7, 1, 7, 13, (1, 5)),
                                           (4, 2, 6, 6, (5,))])
def test_grouped_conv_equals_the_per_sample_loop(B, C, H, W, sizes):
    imgs = torch.randn(B, C, H, W, dtype=torch.float64)
    p = ec_params(B, C, sizes, seed=3, step=11, sample_offset=2)
    assert set(p.sizes) <= set(sizes) and p.weight.shape == (B, C, C, max(sizes), max(sizes))
    out = exterior_conversion(imgs, p.weight.double(), p.alpha.double())
    ref = exterior_conversion_ref(imgs, [k.double() for k in p.kernels()], p.alpha.double())
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    # and the reference is what it says: one conv2d per sample on its reflect-padded image, mixed by alpha
    b, k = B - 1, p.sizes[B - 1]
    w = p.kernels()[b].double()
    y = F.conv2d(F.pad(imgs[b:b + 1], (k // 2,) * 4, mode="reflect"), w)
    torch.testing.assert_close(out[b:b + 1], (1 - p.alpha[b].double()) * imgs[b:b + 1] + p.alpha[b].double() * y)


def test_float32_batch_op_is_close_to_float64_reference():
    imgs = torch.rand(6, 3, 16, 16)
    p = ec_params(6, 3, (1, 3, 5, 7), seed=0, step=0)
    out = exterior_conversion(imgs, p.weight, p.alpha)
    ref = exterior_conversion_ref(imgs.double(), [k.double() for k in p.kernels()], p.alpha.double())
    assert out.dtype == torch.float32 and out.shape == imgs.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_geometry_a_delta_stays_where_it_was():
    """A delta image: every output pixel farther than k // 2 from the delta is exactly zero (the conversion moves
    nothing), and the energy's centroid stays within k // 2 of the delta."""
    B, C, S = 8, 3, 21
    imgs = torch.zeros(B, C, S, S, dtype=torch.float64)
    cy, cx = 10, 9
    imgs[:, :, cy, cx] = 1.0
    p = ec_params(B, C, (1, 3, 5, 7), seed=1, step=2, alpha_range=(0.5, 1.0))
    out = exterior_conversion(imgs, p.weight.double(), p.alpha.double())
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    for b, k in enumerate(p.sizes):
        far = ((yy - cy).abs() > k // 2) | ((xx - cx).abs() > k // 2)
        assert out[b][:, far].abs().max() == 0, (b, k)
        e = out[b].pow(2).sum(0)
        centroid = ((e * yy).sum() / e.sum(), (e * xx).sum() / e.sum())
        assert abs(centroid[0] - cy) <= k // 2 and abs(centroid[1] - cx) <= k // 2
    assert any(k > 1 for k in p.sizes)


def test_alpha_zero_is_the_identity_and_one_by_one_kernels_only_mix_colours():
    imgs = torch.randn(4, 3, 8, 8)
    p = ec_params(4, 3, (3, 5), seed=0, step=0, alpha_range=(0.0, 0.0))
    assert torch.equal(exterior_conversion(imgs, p.weight, p.alpha), imgs)
    q = ec_params(4, 3, (1,), seed=0, step=0, alpha_range=(1.0, 1.0))
    mixed = torch.einsum("boc,bchw->bohw", q.weight[..., 0, 0], imgs)  # a 1x1 conv: a per-pixel colour matrix
    torch.testing.assert_close(exterior_conversion(imgs, q.weight, q.alpha), mixed)


def test_draws_are_a_pure_function_of_seed_step_sample_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    a = ec_params(6, 3, (1, 3, 5), seed=7, step=4, sample_offset=0)
    assert torch.equal(torch.get_rng_state(), state)
    b = ec_params(6, 3, (1, 3, 5), seed=7, step=4, sample_offset=0)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.alpha, b.alpha) and a.sizes == b.sizes
    # sample 4 drawn alone (another rank's batch, or batch 1) is the same conversion
    c = ec_params(1, 3, (1, 3, 5), seed=7, step=4, sample_offset=4)
    assert torch.equal(c.weight[0], a.weight[4]) and c.sizes[0] == a.sizes[4]
    for other in (dict(seed=8, step=4), dict(seed=7, step=5)):
        d = ec_params(6, 3, (1, 3, 5), **other)
        assert not torch.equal(d.alpha, a.alpha)
    e = ec_params(6, 3, (1, 3, 5), seed=7, step=4, branch=1)  # the teacher's view: its own draws
    assert not torch.equal(e.alpha, a.alpha)
    assert len(set(a.alpha.tolist())) == 6  # per-sample draws


def test_weights_are_fan_in_scaled():
    p = ec_params(64, 3, (5,), seed=0, step=0)
    std = p.weight.std().item()
    assert abs(std - (1 / (3 * 25)) ** 0.5) < 0.02, std


@pytest.mark.parametrize("call,match", [
    (lambda: ec_params(2, 3, (2, 3), 0, 0), "must be odd"),
    (lambda: ec_params(2, 3, (), 0, 0), "must be odd"),
    (lambda: ec_params(2, 3, (3,), 0, 0, alpha_range=(0.5, 0.2)), "alpha range"),
    (lambda: exterior_conversion(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 3, 9, 9), torch.zeros(2)), "too large"),
    (lambda: exterior_conversion(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 3, 4, 4), torch.zeros(2)), "K odd"),
    (lambda: exterior_conversion(torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 3, 3, 3), torch.zeros(2)), "weight"),
    (lambda: exterior_conversion(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 3, 3, 3), torch.zeros(3)), "alpha"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
