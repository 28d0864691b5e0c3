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
