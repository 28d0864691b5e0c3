"""Ragged MAE: one mask ratio per sample, packed tokens through the encoder (MaskedAttention), dense decoder.

CPU, tiny models; the packed attention runs its automatic (torch) backend here.
"""
import pytest
import torch

from dermfast.models.mae import mae_from_preset, ragged_mask_ratios

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)


def _tiny(ragged=True, seed=0):
    torch.manual_seed(seed)
    return mae_from_preset("demo", ragged=ragged, **TINY)


def test_ratios_are_a_pure_function_of_the_key_and_in_range():
    r = ragged_mask_ratios(64, 0.6, 0.9, seed=3, step=5, sample_offset=8)
    assert r.device.type == "cpu" and r.dtype == torch.float64 and r.shape == (64,)
    assert bool(((r >= 0.6) & (r <= 0.9)).all()) and r.std() > 0.05  # spread over the range
    assert torch.equal(r, ragged_mask_ratios(64, 0.6, 0.9, seed=3, step=5, sample_offset=8))
    # sample offset shifts the stream: rank 1's first sample is rank 0's ninth under the same global key
    assert torch.equal(r[4:], ragged_mask_ratios(60, 0.6, 0.9, seed=3, step=5, sample_offset=12))
    assert not torch.equal(r, ragged_mask_ratios(64, 0.6, 0.9, seed=3, step=6, sample_offset=8))
    assert torch.equal(ragged_mask_ratios(4, 0.7, 0.7, 0, 0), torch.full((4,), 0.7, dtype=torch.float64))
    with pytest.raises(ValueError, match="0 <= lo <= hi < 1"):
        ragged_mask_ratios(4, 0.9, 0.6, 0, 0)


def test_ragged_forward_is_finite_masks_per_sample_and_backward_reaches_every_part():
    m = _tiny()
    imgs = torch.randn(5, 3, 16, 16)
    loss, pred, mask = m(imgs, seed=1, step=2, mask_ratio_range=(0.3, 0.9))
    L = m.num_patches
    assert pred.shape == (5, L, 4 * 4 * 3) and pred.is_contiguous() and mask.shape == (5, L)
    assert torch.isfinite(loss)
    ratios = ragged_mask_ratios(5, 0.3, 0.9, seed=1, step=2)
    expect_removed = L - torch.clamp((L * (1 - ratios)).floor(), min=1)
    assert torch.equal(mask.sum(1).double(), expect_removed)
    assert len(set(mask.sum(1).tolist())) > 1  # really ragged
    loss.backward()
    for name in ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "mask_token",
                 "decoder_pred.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_equal_ratios_give_the_dense_loss():
    dense, ragged = _tiny(ragged=False), _tiny(ragged=True)
    ragged.load_state_dict(dense.state_dict())
    imgs = torch.randn(4, 3, 16, 16)
    for ratio in (0.75, 0.6):
        loss_d, pred_d, mask_d = dense(imgs, seed=7, step=3, mask_ratio=ratio, sample_offset=4)
        loss_r, pred_r, mask_r = ragged(imgs, seed=7, step=3, sample_offset=4, mask_ratio_range=(ratio, ratio))
        assert torch.equal(mask_r, mask_d)
        torch.testing.assert_close(loss_r, loss_d, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pred_r, pred_d, atol=1e-4, rtol=1e-4)
        loss_d.backward()
        loss_r.backward()
        torch.testing.assert_close(ragged.blocks[0].attn.qkv.weight.grad, dense.blocks[0].attn.qkv.weight.grad,
                                   atol=1e-4, rtol=1e-3)
        dense.zero_grad()
        ragged.zero_grad()


def test_ragged_needs_a_ragged_model():
    with pytest.raises(ValueError, match="ragged=True"):
        _tiny(ragged=False)(torch.randn(2, 3, 16, 16), mask_ratio_range=(0.6, 0.9))


def test_cli_trains_a_few_ragged_steps(tmp_path, monkeypatch):
    import csv
    from dermfast.train.cli import main
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["--stage", "mae", "--mask-ratio-range", "0.6", "0.9", "--max-steps", "3", "--batch-size", "4",
                 "--img-size", "32", "--toy-images", "32", "--toy-image-size", "32", "--workers", "0",
                 "--loader", "torch", "--augment", "none", "--out", str(out), "--no-progress",
                 "--log-every", "1", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert len(rows) >= 3 and all(float(r["loss"]) == float(r["loss"]) for r in rows)  # logged, not NaN
    assert "mask_ratio_range" in (out / "config.yaml").read_text()


def test_mask_ratio_range_is_validated():
    from dermfast.train.mae import MAEConfig
    from dermfast.train.config import ConfigError
    for bad in ((0.9, 0.6), (-0.1, 0.5), (0.5, 1.0)):
        with pytest.raises(ConfigError, match="mask-ratio-range"):
            MAEConfig(mask_ratio_range=bad).validate()
    with pytest.raises(ConfigError, match="--compile does not support --mask-ratio-range"):
        MAEConfig(mask_ratio_range=(0.6, 0.9), compile=True).validate()


@pytest.mark.gpu
def test_gpu_bf16_ragged_matches_dense_at_equal_ratios_and_trains():
    torch.manual_seed(0)
    dense = mae_from_preset("demo", img_size=64).cuda()
    ragged = mae_from_preset("demo", ragged=True, img_size=64).cuda()
    ragged.load_state_dict(dense.state_dict())
    imgs = torch.randn(32, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_d, _, mask_d = dense(imgs, seed=1, step=4, mask_ratio=0.75)
        loss_r, _, mask_r = ragged(imgs, seed=1, step=4, mask_ratio_range=(0.75, 0.75))
        assert torch.equal(mask_r, mask_d)
        torch.testing.assert_close(loss_r.float(), loss_d.float(), atol=2e-2, rtol=2e-2)
        loss, pred, mask = ragged(imgs, seed=1, step=5, mask_ratio_range=(0.6, 0.9))
    assert torch.isfinite(loss) and pred.is_contiguous()
    loss.backward()
    assert torch.isfinite(ragged.blocks[0].attn.qkv.weight.grad).all()
