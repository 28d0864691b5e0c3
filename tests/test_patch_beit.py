"""patch_timm on BEiT / BEiT v2 (timm.models.beit.Attention: relative position bias) against timm itself, float64.

The peer is the unpatched timm model (its fused path: F.scaled_dot_product_attention with the bias as attn_mask).
Tiny configs built without weights: 32 px, patch 8 -> a 4 x 4 window, 17 tokens (odd), 2 heads."""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import dermfast  # noqa: E402

CONFIGS = {  # name -> (timm model, overrides): each way BEiT builds its bias
    "beit_rel_pos": ("beit_base_patch16_224", {}),  # per-block table (use_rel_pos_bias)
    "beitv2_rel_pos": ("beitv2_base_patch16_224", {}),
    "beit_shared_rel_pos": ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
    "beit_both": ("beit_base_patch16_224", dict(use_shared_rel_pos_bias=True)),  # block table + shared
    "beit_no_rel_pos": ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_abs_pos_emb=True)),
}


def tiny_beit(config, **kw):
    name, over = CONFIGS[config]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2,
                              num_heads=2, num_classes=3, init_values=0.1, **{**over, **kw}).double()
    with torch.no_grad():  # random weights everywhere: zero-initialised bias tables would hide the bias path
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def spy(monkeypatch, name):
    import dermfast.models.patch_beit as pb
    calls = []
    op = getattr(pb, name)

    def wrapped(*args, **kw):
        calls.append(kw.get("backend"))
        return op(*args, **kw)
    monkeypatch.setattr(pb, name, wrapped)
    return calls


def assert_grads_equal(model, original):
    for (name, a), (_, b) in zip(model.named_parameters(), original.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_patched_beit_equals_timm_float64(config, monkeypatch):
    model = tiny_beit(config)
    original = copy.deepcopy(model)
    keys, params = list(model.state_dict()), dict(model.named_parameters())
    calls = {n: spy(monkeypatch, n) for n in ("attention_bias", "masked_attention")}
    assert dermfast.patch_timm(model) is model
    assert [type(b.attn).__name__ for b in model.blocks] == ["MaskedBeitAttention"] * 2
    assert list(model.state_dict()) == keys and all(p is params[n] for n, p in model.named_parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for mode in ("eval", "train"):  # no dropout in these configs: train runs the fused path too
        getattr(model, mode)(), getattr(original, mode)()
        model.zero_grad(), original.zero_grad()
        got, want = model(x), original(x)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        (got.sin() * torch.arange(3.0, dtype=torch.float64)).sum().backward()
        (want.sin() * torch.arange(3.0, dtype=torch.float64)).sum().backward()
        assert_grads_equal(model, original)
    with_bias = config != "beit_no_rel_pos"
    assert (len(calls["attention_bias"]), len(calls["masked_attention"])) == ((4, 0) if with_bias else (0, 4))
    if with_bias:  # the bias reaches the result and its table gets a gradient through the fused path
        table = next(p for n, p in model.named_parameters() if "relative_position_bias_table" in n)
        assert table.grad is not None and table.grad.abs().max() > 0
        with torch.no_grad():
            table.add_(torch.randn_like(table))  # (a constant would not change a softmax)
        assert (model(x) - original(x)).abs().max() > 1e-6


def test_flex_backend_in_a_patched_beit_forward_cpu():
    """FlexAttention's score_mod path through the whole model (CPU: forward only, PyTorch's flex has no CPU
    backward)."""
    model = tiny_beit("beit_both").eval()
    original = copy.deepcopy(model)
    dermfast.patch_timm(model, backend="flex")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-12, rtol=1e-12)
    with pytest.raises(dermfast.ops.BackendUnavailable, match="FlexAttention has no backward on CPU"):
        model(x)


def test_compiled_patched_beit_equals_timm():
    model = tiny_beit("beit_both").train()
    original = copy.deepcopy(model).train()
    dermfast.patch_timm(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    want = original(x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    got.square().sum().backward()
    want.square().sum().backward()
    assert_grads_equal(model, original)


def test_dropout_falls_back_to_timm_and_report_says_so():
    model = tiny_beit("beit_rel_pos", attn_drop_rate=0.5)
    original = copy.deepcopy(model)
    dermfast.patch_timm(model)
    text = str(dermfast.patch_report(model))
    assert text.splitlines()[0] == "dermfast.patch_timm: 2 swapped, 0 left"
    assert ("swapped  blocks.0.attn  Attention -> MaskedBeitAttention (relative position bias: attention_bias, "
            "attention dropout p=0.5: timm's own forward while training)") in text
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.train(), original.train()
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(a, original(x), atol=0, rtol=0)  # timm's own forward: the same dropout draws
    model.eval(), original.eval()
    torch.testing.assert_close(model(x), original(x), atol=1e-12, rtol=1e-12)


def test_other_relative_bias_attention_is_left_with_reason():
    from timm.models.swin_transformer import SwinTransformer
    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1,), num_heads=(2,),
                           num_classes=2)
    with pytest.raises(ValueError, match="relative position bias in a class dermfast does not swap"):
        dermfast.patch_timm(swin)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "torch"])
def test_gpu_patched_beit_bf16(backend):
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=64, patch_size=16,
                              embed_dim=256, depth=2, num_heads=4, num_classes=3).cuda()  # head dim 64, 17 tokens
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 1)
    original = copy.deepcopy(model)
    dermfast.patch_timm(model, backend=backend)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = model(x), original(x)
        got.float().square().sum().backward()
    ref = copy.deepcopy(original).double()(x.double())
    err, base = (got.double() - ref).abs().max(), (want.double() - ref).abs().max()
    assert err <= 2 * base + 1e-3
    assert model.blocks[0].attn.relative_position_bias_table.grad.abs().max() > 0
