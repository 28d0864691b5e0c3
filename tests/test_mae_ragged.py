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


def _official_mae_loss(imgs, pred, mask, p):
    """facebookresearch/mae, models_mae.py, MaskedAutoencoderViT.forward_loss (norm_pix_loss=True), written out:
        target = self.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True); var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6)**.5
        loss = (pred - target) ** 2; loss = loss.mean(dim=-1)
        loss = (loss * mask).sum() / mask.sum()
    patchify: imgs.reshape(N, 3, h, p, w, p) -> einsum('nchpwq->nhwpqc') -> reshape(N, h * w, p**2 * 3)."""
    n, c, hh, ww = imgs.shape
    h, w = hh // p, ww // p
    x = torch.einsum("nchpwq->nhwpqc", imgs.reshape(n, c, h, p, w, p)).reshape(n, h * w, p * p * c)
    mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
    target = (x - mean) / (var + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def test_dp_batch_makes_the_mean_of_rank_losses_the_loss_over_all_removed_patches():
    # Two "ranks" of batch 4 under DDP average their losses. With ragged masks they remove different numbers of
    # patches, so that mean is not the official loss over the 8 images' removed patches unless each rank's
    # loss is scaled (dp_batch=8).
    m = _tiny().double()
    imgs = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    key = dict(seed=5, step=3, mask_ratio_range=(0.2, 0.9))
    outs = [m(imgs[4 * r:4 * r + 4], sample_offset=4 * r, dp_batch=8, **key) for r in (0, 1)]
    unscaled = [m(imgs[4 * r:4 * r + 4], sample_offset=4 * r, **key)[0] for r in (0, 1)]
    pred, mask = torch.cat([o[1] for o in outs]), torch.cat([o[2] for o in outs])
    assert mask[:4].sum() != mask[4:].sum()  # the ranks really remove different counts
    want = _official_mae_loss(imgs, pred, mask, 4)
    torch.testing.assert_close((outs[0][0] + outs[1][0]) / 2, want, atol=1e-12, rtol=1e-12)
    assert abs(float(((unscaled[0] + unscaled[1]) / 2 - want).detach())) > 1e-4  # what DDP averaged before
    one, _, mask_one = m(imgs, **key)  # one process, batch 8: the same loss, dp_batch or not
    assert torch.equal(mask_one, mask)
    torch.testing.assert_close(one, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(m(imgs, dp_batch=8, **key)[0], one, atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiple of the batch"):
        m(imgs[:3], sample_offset=0, dp_batch=8, **key)
    with pytest.raises(ValueError, match="multiple of the batch"):
        m(imgs[:4], sample_offset=8, dp_batch=8, **key)


def _count_calls(modules):
    """Forward hooks counting calls per module (a hook fires on every __call__, recomputation included)."""
    calls = [0] * len(modules)
    for i, mod in enumerate(modules):
        mod.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_ragged_blocks_recompute_under_activation_checkpointing():
    # The engine's own wrapping (--activation-checkpointing): checkpoint_wrapper around every block. The packed
    # encoder must call each block through that wrapper, so its attention runs again in backward.
    from dermfast.train.distributed import apply_activation_checkpointing, repeated_blocks
    plain, ckpt = _tiny(), _tiny()
    ckpt.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(ckpt, repeated_blocks(ckpt)) == 3  # 2 encoder + 1 decoder blocks
    enc = _count_calls([ckpt.blocks[i].attn for i in range(2)])
    dec = _count_calls([ckpt.decoder_blocks[0].attn])
    imgs = torch.randn(4, 3, 16, 16)
    loss, _, _ = ckpt(imgs, seed=1, step=2, mask_ratio_range=(0.3, 0.9))
    assert enc == [1, 1] and dec == [1]
    loss.backward()
    assert enc == [2, 2] and dec == [2], "the packed encoder blocks were not recomputed in backward"
    want, _, _ = plain(imgs, seed=1, step=2, mask_ratio_range=(0.3, 0.9))
    want.backward()
    torch.testing.assert_close(loss, want, atol=0, rtol=0)
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():  # checkpoint_wrapper keeps the parameter names (its prefix aside)
        name = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# Host reads that are host-side by design in a ragged step: (module, function) of the caller, and why.
HOST_BY_DESIGN = {
    ("dermfast.models.mae", "_host_keep_counts"): "the per-sample mask ratios, CPU by design (ragged_mask_ratios)",
    ("dermfast.ops.random_masking_op", "_cu_seqlens"): "the masking op reads the same CPU ratios for its layout",
}


def _forbid_host_reads(monkeypatch):
    """Make every Tensor -> host read raise unless its caller is named in HOST_BY_DESIGN. On CPU every tensor
    is a host tensor, so the caller is what tells a by-design host read from a device read (a sync on GPU)."""
    import sys
    seen = []

    def guard(name):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, **kw):
            f = sys._getframe(1)
            where = (f.f_globals.get("__name__"), f.f_code.co_name)
            if where not in HOST_BY_DESIGN:
                raise AssertionError(f"host sync: Tensor.{name} called from {where[0]}.{where[1]} "
                                     f"(line {f.f_lineno}) in a steady-state ragged step")
            seen.append(where)
            return orig(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapped)

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        guard(name)
    return seen


def test_steady_state_ragged_step_reads_nothing_back_from_the_device(monkeypatch):
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    imgs = torch.randn(4, 3, 16, 16)

    def step(i):
        loss, _, _ = model(imgs, seed=1, step=i, sample_offset=4, mask_ratio_range=(0.3, 0.9), dp_batch=8)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step(0)  # warm-up
    seen = _forbid_host_reads(monkeypatch)
    for i in (1, 2):  # a new packed layout every step
        step(i)
    assert {w for w in seen} == set(HOST_BY_DESIGN)  # the exemptions are all used: none is stale
    monkeypatch.undo()


@pytest.mark.gpu
def test_gpu_steady_state_ragged_steps_make_no_host_sync():
    torch.manual_seed(0)
    model = mae_from_preset("demo", ragged=True, img_size=64).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)  # the model's step alone (the engine's optimiser: its tests)
    imgs = torch.randn(16, 3, 64, 64, device="cuda")

    def step(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = model(imgs, seed=1, step=i, sample_offset=16, mask_ratio_range=(0.6, 0.9), dp_batch=32)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up: Triton compilation, allocator, optimiser state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 6):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
