"""dermfast.models.MaskedAttention / dermfast.patch_timm on tiny timm ViTs built locally (no weights downloaded)."""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import dermfast  # noqa: E402
from dermfast.models import MaskedAttention  # noqa: E402


def tiny_vit(embed_dim=160, heads=2, depth=2, **kw):
    """32 px, patch 8: 16 patches + cls = 17 tokens; head dim 80 with the defaults."""
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=embed_dim, depth=depth, num_heads=heads,
                             num_classes=5, **kw)


def test_import_dermfast_does_not_import_timm():
    import subprocess
    import sys
    code = "import sys, dermfast, dermfast.ops, dermfast.models; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_same_state_dict_keys_and_weights():
    plain = Attention(64, num_heads=4, qkv_bias=True)
    masked = MaskedAttention(64, num_heads=4, qkv_bias=True)
    assert list(plain.state_dict()) == list(masked.state_dict())
    masked.load_state_dict(plain.state_dict())
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(masked(x), plain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_vit_matches_original(backend):
    model = tiny_vit(qkv_bias=True).eval()
    original = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    assert dermfast.patch_timm(model, backend=backend) is model
    assert sum(type(m) is MaskedAttention for m in model.modules()) == 2
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())  # in place, same tensors
    x = torch.randn(2, 3, 32, 32)
    got, want = model(x), original(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_patch_timm_on_qk_norm_model_and_errors():
    model = tiny_vit(embed_dim=64, heads=4, qk_norm=True).eval()
    original = copy.deepcopy(model)
    dermfast.patch_timm(model)
    dermfast.patch_timm(model, backend="torch")  # again: idempotent, sets the backend
    assert all(m.backend == "torch" for m in model.modules() if isinstance(m, MaskedAttention))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), original(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no timm.layers.Attention"):
        dermfast.patch_timm(torch.nn.Sequential(torch.nn.Linear(2, 2)))


class Fp32LayerNorm(torch.nn.LayerNorm):
    """What CUDA autocast does to qk_norm's LayerNorm (fp32 out); CPU autocast would keep bf16."""

    def forward(self, x):
        return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def test_autocast_with_fp32_qk_norm():
    """q, k come out of qk_norm in fp32 while v is bf16: cast to the autocast dtype like SDPA's autocast rule."""
    attn = MaskedAttention(64, num_heads=2, qk_norm=True, norm_layer=Fp32LayerNorm).eval()
    x = torch.randn(2, 9, 64)
    ref = attn(x)  # no autocast: fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=5e-2, rtol=5e-2)


def per_sample(attn, xs):
    return [attn(x[None])[0] for x in xs]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ragged_packed_and_padded_equal_per_sample_attention(backend):
    plain = Attention(128, num_heads=2, qkv_bias=True).eval()  # head dim 64
    masked = copy.deepcopy(plain)
    dermfast.patch_timm(masked, backend=backend)
    lengths = [5, 1, 12]
    xs = [torch.randn(n, 128) for n in lengths]
    want = per_sample(plain, xs)
    cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
    packed = masked(torch.cat(xs), cu_seqlens=cu, max_seqlen=12)
    assert packed.shape == (18, 128)
    torch.testing.assert_close(packed, torch.cat(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked(torch.cat(xs)[None], cu_seqlens=cu)[0], packed)
    N = max(lengths)
    padded = torch.zeros(len(lengths), N, 128)
    for b, x in enumerate(xs):
        padded[b, :len(x)] = x
    out = masked(padded, lengths=torch.tensor(lengths))
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :n], want[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[b, n:], plain.proj.bias.expand(N - n, -1))  # attention output 0


def test_block_forward_on_packed_tokens():
    from dermfast.models.attention import block_forward
    model = tiny_vit(embed_dim=64, heads=2, depth=1, init_values=0.1).eval()
    block = model.blocks[0]
    xs = [torch.randn(n, 64) for n in (4, 1, 9)]
    want = torch.cat([block(x[None])[0] for x in xs])
    dermfast.patch_timm(model)
    cu = torch.tensor([0, 4, 5, 14], dtype=torch.int32)
    torch.testing.assert_close(block_forward(block, torch.cat(xs), cu_seqlens=cu), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="patch_timm first"):
        block_forward(tiny_vit(embed_dim=64, heads=2, depth=1).blocks[0], torch.cat(xs), cu_seqlens=cu)


def test_what_the_op_cannot_do_goes_to_timm():
    plain = Attention(64, num_heads=4, attn_drop=0.5)
    masked = copy.deepcopy(plain)
    dermfast.patch_timm(masked)
    x = torch.randn(2, 7, 64)
    bool_mask = torch.rand(2, 1, 7, 7) > 0.3
    bool_mask[..., 0] = True
    plain.eval(), masked.eval()
    torch.testing.assert_close(masked(x, attn_mask=bool_mask), plain(x, attn_mask=bool_mask))
    plain.train(), masked.train()  # attention dropout active: timm's own path, same random stream
    torch.manual_seed(3)
    a = masked(x)
    torch.manual_seed(3)
    torch.testing.assert_close(a, plain(x))
    with pytest.raises(ValueError, match="attention dropout cannot be combined"):
        masked(x, lengths=torch.tensor([7, 3]))
    masked.eval()
    with pytest.raises(ValueError, match="attn_mask cannot be combined"):
        masked(x, attn_mask=bool_mask, lengths=torch.tensor([7, 3]))
    with pytest.raises(ValueError, match=r"\[T, C\] or \[1, T, C\]"):
        masked(x, cu_seqlens=torch.tensor([0, 7, 14], dtype=torch.int32))


@pytest.mark.gpu
def test_gpu_patched_vit_bf16():
    model = tiny_vit(embed_dim=1280, heads=16, depth=2).cuda().eval()  # ViT-H width, head dim 80
    original = copy.deepcopy(model)
    dermfast.patch_timm(model, backend="triton")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = model(x), original(x)
    ref = copy.deepcopy(original).double()(x.double())
    err, base = (got.double() - ref).abs().max(), (want.double() - ref).abs().max()
    assert err <= 2 * base + 1e-3


# EvaAttention / AttentionRope (rotary ViTs) and the patch report ------------------------------------------

ROPE_FAMILIES = {  # timm model name -> tiny overrides (no weights: pretrained=False)
    "eva02_tiny_patch14_224": dict(img_size=28, patch_size=7),  # EvaAttention, RotaryEmbeddingCat
    "vit_small_patch16_rope_224": dict(img_size=32, patch_size=8),  # AttentionRope, axial rope
    "vit_small_patch16_rope_mixed_224": dict(img_size=32, patch_size=8),  # AttentionRope, per-head mixed rope
}


def randomize_(model, std=0.3):
    """Random weights everywhere (zero-initialised q / v biases and 1e-5 layer scales would hide attention)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def count_masked_attention(monkeypatch):
    import dermfast.models.attention as attention
    calls = []
    op = attention.masked_attention

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return op(*args, **kw)
    monkeypatch.setattr(attention, "masked_attention", spy)
    return calls


@pytest.mark.parametrize("name", sorted(ROPE_FAMILIES))
def test_patched_rope_vit_matches_original_float64(name, monkeypatch):
    kw = ROPE_FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, embed_dim=48, num_heads=2, depth=2,
                              **kw).double()
    randomize_(model)
    original = copy.deepcopy(model)
    calls = count_masked_attention(monkeypatch)
    assert dermfast.patch_timm(model) is model
    report = dermfast.patch_report(model)
    assert len(report.swapped) == 2 and not report.left
    cls = type(model.blocks[0].attn).__name__
    assert cls in ("MaskedEvaAttention", "MaskedAttentionRope")
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"], dtype=torch.float64)
    for mode in ("eval", "train"):  # the tiny configs have no dropout: train runs the fused path too
        getattr(model, mode)(), getattr(original, mode)()
        model.zero_grad(), original.zero_grad()
        got, want = model(x), original(x)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        (got.sin() * torch.arange(3.0, dtype=torch.float64)).sum().backward()
        (want.sin() * torch.arange(3.0, dtype=torch.float64)).sum().backward()
        for (pname, a), (_, b) in zip(model.named_parameters(), original.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12, msg=pname)
    assert len(calls) == 4  # 2 blocks x (eval, train): the fused op ran, not timm's SDPA
    # the rotary embedding reaches the result: the other rope layout changes it
    for m in model.modules():
        if hasattr(m, "rotate_half"):
            m.rotate_half = not m.rotate_half
    assert (model(x) - original(x)).abs().max() > 1e-3


def test_rope_attention_modules_options():
    """Module level: GQA (AttentionRope, separate projections), rotate_half, qkv_bias_separate, qk_norm, gate,
    scale_norm, prefix tokens, against timm's own forward with a random rope tensor, float64."""
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention
    torch.manual_seed(1)
    N, npt, Dh = 9, 2, 16
    cases = [
        AttentionRope(64, num_heads=4, qkv_fused=False, num_kv_heads=2, rotate_half=True, num_prefix_tokens=npt,
                      qk_norm=True, norm_layer=torch.nn.LayerNorm, gated=True),
        AttentionRope(64, num_heads=4, num_prefix_tokens=npt, scale_norm=True, norm_layer=torch.nn.LayerNorm),
        EvaAttention(64, num_heads=4, qkv_bias_separate=True, num_prefix_tokens=npt, norm_layer=torch.nn.LayerNorm),
        EvaAttention(64, num_heads=4, qkv_fused=False, num_prefix_tokens=npt, rotate_half=True,
                     norm_layer=torch.nn.LayerNorm, qk_norm=True),
    ]
    for plain in cases:
        randomize_(plain.double()).eval()
        masked = copy.deepcopy(plain)
        dermfast.patch_timm(masked)
        assert type(masked).__name__.startswith("Masked")
        x = torch.randn(2, N, 64, dtype=torch.float64, requires_grad=True)
        rope = torch.randn(N - npt, 2 * Dh, dtype=torch.float64)  # [sin | cos], as RotaryEmbeddingCat gives
        got, want = masked(x, rope=rope), plain(x, rope=rope)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        gx, = torch.autograd.grad(got.square().sum(), x)
        wx, = torch.autograd.grad(want.square().sum(), x)
        torch.testing.assert_close(gx, wx, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(masked(x), plain(x), atol=1e-12, rtol=1e-12)  # no rope
        from dermfast.models.attention import RaggedLayout
        with pytest.raises(ValueError, match="padded layout"):
            masked(x, attn_mask=RaggedLayout(lengths=torch.tensor([9, 3])))


def test_rope_dropout_falls_back_to_timm_and_report_says_so():
    from timm.layers import AttentionRope
    plain = AttentionRope(32, num_heads=2, attn_drop=0.5).train()
    model = torch.nn.Sequential(copy.deepcopy(plain))
    dermfast.patch_timm(model)
    assert "attention dropout p=0.5" in str(dermfast.patch_report(model))
    x, rope = torch.randn(2, 5, 32), torch.randn(4, 32)
    torch.manual_seed(3)
    a = model[0](x, rope=rope)
    torch.manual_seed(3)
    torch.testing.assert_close(a, plain(x, rope=rope))


def test_patch_report_lines_and_swin_left():
    from timm.models.swin_transformer import SwinTransformer
    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1,), num_heads=(2,),
                           num_classes=2)  # WindowAttention: relative position bias, not a class dermfast swaps
    with pytest.raises(ValueError, match="relative position bias in a class dermfast does not swap"):
        dermfast.patch_timm(swin)  # nothing to swap: the clear error, with the reason
    with pytest.raises(ValueError, match="was not patched"):
        dermfast.patch_report(swin)
    vit = tiny_vit(embed_dim=32, heads=2, depth=2, global_pool="map")  # attn_pool: AttentionPoolLatent, left
    dermfast.patch_timm(vit)
    text = str(dermfast.patch_report(vit))
    assert "swapped  blocks.0.attn  Attention -> MaskedAttention" in text
    assert "swapped  blocks.1.attn  Attention -> MaskedAttention" in text
    assert "left     attn_pool  AttentionPoolLatent" in text
    assert text.splitlines()[0] == "dermfast.patch_timm: 2 swapped, 1 left"


def test_cli_prints_report_for_named_models(capsys):
    from dermfast.patch import main
    assert main(["eva02_tiny_patch14_224"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["eva02_tiny_patch14_224 (timm, Eva)", "dermfast.patch_timm: 12 swapped, 0 left",
                       "swapped  blocks.0.attn  EvaAttention -> MaskedEvaAttention"]
    assert main(["vit_small_patch16_rope_224", "--library", "timm"]) == 0
    assert "swapped  blocks.11.attn  AttentionRope -> MaskedAttentionRope" in capsys.readouterr().out
    assert main(["beit_base_patch16_224"]) == 0  # relative position bias: attention_bias
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == ["dermfast.patch_timm: 12 swapped, 0 left", "swapped  blocks.0.attn  Attention -> "
                        "MaskedBeitAttention (relative position bias: attention_bias)"]
    assert main(["swin_tiny_patch4_window7_224"]) == 1  # nothing to swap: the clear error, with the reason
    err = capsys.readouterr().err
    assert err.startswith("error: patch_timm: SwinTransformer holds no timm.layers.Attention")
    assert ("left layers.0.blocks.0.attn: relative position bias in a class dermfast does not swap "
            "(only timm.models.beit.Attention)") in err
    assert main(["no_such_model_xyz"]) == 1
    assert "timm has no model 'no_such_model_xyz'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["vit_base_patch16_224", "--libary", "timm"])
    assert e.value.code == 2 and "did you mean --library?" in capsys.readouterr().err


def test_compiled_patched_eva_matches_original():
    torch.manual_seed(0)
    model = randomize_(timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=3, embed_dim=48,
                                         num_heads=2, depth=2, img_size=28, patch_size=7).double()).eval()
    original = copy.deepcopy(model)
    dermfast.patch_timm(model)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    want = original(x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(ROPE_FAMILIES))
def test_gpu_patched_rope_vit_bf16(name):
    kw = ROPE_FAMILIES[name]
    model = timm.create_model(name, pretrained=False, num_classes=3, embed_dim=256, num_heads=4, depth=2,
                              **kw).cuda().eval()  # head dim 64
    original = copy.deepcopy(model)
    dermfast.patch_timm(model, backend="triton")
    x = torch.randn(4, 3, kw["img_size"], kw["img_size"], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = model(x), original(x)
    ref = copy.deepcopy(original).double()(x.double())
    err, base = (got.double() - ref).abs().max(), (want.double() - ref).abs().max()
    assert err <= 2 * base + 1e-3
