"""dermfast.train.ema: the update against the formula written out (TF ExponentialMovingAverage's num_updates
warm-up) and against timm's own ModelEmaV2 (timm/utils/model_ema.py) once the warm-up is over; integer buffers
copied; the swap restores the model's own weights; the checkpoint state round-trips."""
import pytest
import torch
from torch import nn

from dermfast.train.ema import ModelEma, ema_decay


def small_model():
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def perturb(model, scale=0.1):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_update_matches_the_written_out_formula():
    model = small_model()
    ema = ModelEma(model, 0.9)
    ref = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    for n in range(1, 31):
        perturb(model)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))   # tf.train.ExponentialMovingAverage(decay, num_updates)
        for k, v in model.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double()
    for k in ref:
        torch.testing.assert_close(ema.shadow[k].double(), ref[k], atol=1e-6, rtol=1e-6)


def test_after_warmup_matches_timm_model_ema_v2():
    from timm.utils import ModelEmaV2
    model = small_model()
    ours = ModelEma(model, 0.95)
    ours.updates = 10_000   # past the warm-up: d = decay, as timm's ModelEmaV2 applies from the start
    theirs = ModelEmaV2(model, decay=0.95)
    for _ in range(20):
        perturb(model)
        ours.update(model)
        theirs.update(model)
    for k, v in theirs.module.state_dict().items():
        torch.testing.assert_close(ours.shadow[k], v, atol=1e-6, rtol=1e-6)
    assert ema_decay(0.95, 1) == pytest.approx(2 / 11)


def test_integer_buffers_are_copied_and_bn_stats_averaged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEma(model, 0.5)
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8))
        ema.update(model)
    assert int(ema.shadow["1.num_batches_tracked"]) == 3
    assert not torch.equal(ema.shadow["1.running_mean"], model[1].running_mean)


def test_swap_uses_the_average_and_restores_the_weights():
    model = small_model()
    ema = ModelEma(model, 0.5)
    perturb(model, 1.0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 5)
    with ema.swapped_in(model):
        inside = model(x)
    torch.testing.assert_close(inside, _with(ema.shadow)(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k])


def _with(sd):
    m = small_model()
    m.load_state_dict(sd)
    return m


def test_state_round_trip_continues_exactly():
    model = small_model()
    a = ModelEma(model, 0.9)
    for _ in range(4):
        perturb(model)
        a.update(model)
    tensors, meta = a.state()
    b = ModelEma(small_model(), 0.9)
    b.load_state(tensors, meta)
    perturb(model)
    a.update(model)
    b.update(model)
    assert b.updates == a.updates == 5
    for k in a.shadow:
        assert torch.equal(a.shadow[k], b.shadow[k])


def test_bad_decay_and_mismatched_state_are_clear_errors():
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        ModelEma(small_model(), 1.0)
    ema = ModelEma(small_model(), 0.9)
    with pytest.raises(ValueError, match="do not match the model"):
        ema.load_state({"ema/other": torch.zeros(1)}, {"updates": 1})
