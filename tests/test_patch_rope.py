"""Rotary attention on packed / ragged tokens (dermfast.models.patch_rope): each token rotated by its own grid
position. The spec is the unpacked, per-sample computation by timm itself: image b's visible tokens (prefix +
grid positions ids_keep[b], a per-sample keep count) through timm's own EvaAttention / AttentionRope forward with
rope[ids_keep[b]]; the packed batch must equal the concatenation, float64, forward and backward."""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.layers import AttentionRope  # noqa: E402
from timm.models.eva import EvaAttention  # noqa: E402

import dermfast  # noqa: E402
from dermfast.models.patch_rope import rope_attention_packed, rope_rows  # noqa: E402

GRID, DH = 16, 16  # a 4 x 4 patch grid, head dim 16
KEEP = [5, 1, 12]  # per-sample keep counts (ragged), one image keeping a single patch


def modules():
    return {
        "eva_prefix": (EvaAttention(64, num_heads=4, num_prefix_tokens=1, qkv_bias_separate=True,
                                    norm_layer=torch.nn.LayerNorm), 1, (GRID, 2 * DH)),
        "eva_rotate_half_qk_norm": (EvaAttention(64, num_heads=4, qkv_fused=False, num_prefix_tokens=2,
                                                 rotate_half=True, qk_norm=True, norm_layer=torch.nn.LayerNorm),
                                    2, (GRID, 2 * DH)),
        "rope_gqa_gated": (AttentionRope(64, num_heads=4, qkv_fused=False, num_kv_heads=2, num_prefix_tokens=1,
                                         gated=True), 1, (GRID, 2 * DH)),
        "rope_mixed_per_head": (AttentionRope(64, num_heads=4, num_prefix_tokens=1), 1, (4, GRID, 2 * DH)),
    }


def randomize_(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("case", sorted(modules()))
def test_packed_rope_equals_per_sample_timm(case):
    plain, npt, rope_shape = modules()[case]
    plain = randomize_(plain.double()).eval()
    masked = copy.deepcopy(plain)
    dermfast.patch_timm(masked)
    rope = torch.randn(*rope_shape, dtype=torch.float64)
    ids_keep = [torch.randperm(GRID)[:n] for n in KEEP]  # each image's visible grid positions, any order
    xs = [torch.randn(npt + n, 64, dtype=torch.float64, requires_grad=True) for n in KEEP]
    # per sample, unpacked: timm's own forward with the rope rows of that image's visible patches
    want = [plain(x[None], rope=rope[..., ids, :])[0] for x, ids in zip(xs, ids_keep)]
    positions = torch.cat([torch.cat([torch.full((npt,), -1), ids]) for ids in ids_keep])
    seqlens = [npt + n for n in KEEP]
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    got = rope_attention_packed(masked, torch.cat(xs), rope, positions, cu, max_seqlen=max(seqlens))
    torch.testing.assert_close(got, torch.cat(want), atol=1e-12, rtol=1e-12)
    g = torch.randn_like(got)
    gg = torch.autograd.grad(got, xs, g)
    gw = torch.autograd.grad(torch.cat(want), xs, g)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # 0..n-1 instead of each token's own position gives another result (the positions matter)
    wrong = torch.cat([torch.cat([torch.full((npt,), -1), torch.arange(n)]) for n in KEEP])
    assert (rope_attention_packed(masked, torch.cat(xs), rope, wrong, cu) - got).abs().max() > 1e-3


def test_rope_rows_prefix_is_identity_and_bad_input():
    rope = torch.randn(GRID, 2 * DH, dtype=torch.float64)
    rows = rope_rows(rope, torch.tensor([-1, 3, 0]))
    assert rows.shape == (3, 1, 2 * DH)
    torch.testing.assert_close(rows[1, 0], rope[3], atol=0, rtol=0)
    torch.testing.assert_close(rows[2, 0], rope[0], atol=0, rtol=0)
    assert torch.equal(rows[0, 0], torch.cat([torch.zeros(DH), torch.ones(DH)]).double())  # sin 0, cos 1
    with pytest.raises(ValueError, match=r"positions must lie in \[-1, 16\)"):
        rope_rows(rope, torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="1-D int tensor"):
        rope_rows(rope, torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"rope must be \[N, 2 Dh\]"):
        rope_rows(torch.randn(2, 3, GRID, 2 * DH), torch.tensor([0]))


def test_packed_rope_refuses_dropout_and_missing_positions():
    m = dermfast.patch_timm(torch.nn.Sequential(EvaAttention(32, num_heads=2, attn_drop=0.5,
                                                                            norm_layer=torch.nn.LayerNorm)))[0]
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="attention dropout cannot be combined"):
        rope_attention_packed(m.train(), torch.randn(3, 32), None, None, cu)
    with pytest.raises(ValueError, match=r"positions must be an int tensor of shape \[3\]"):
        rope_attention_packed(m.eval(), torch.randn(3, 32), torch.randn(4, 32), None, cu)


def test_eva_block_with_packed_layout_uses_each_tokens_position():
    """Through timm's own EvaBlock (the path a patched model's blocks take): a RaggedLayout with `positions`
    as attn_mask gives, per packed segment, what timm's block gives on that image alone with rope[ids_keep]."""
    from timm.models.eva import EvaBlock

    from dermfast.models.attention import RaggedLayout
    npt = 1
    plain = randomize_(EvaBlock(64, num_heads=4, num_prefix_tokens=npt, attn_head_dim=DH).double()).eval()
    block = copy.deepcopy(plain)
    dermfast.patch_timm(block)
    rope = torch.randn(GRID, 2 * DH, dtype=torch.float64)
    ids_keep = [torch.randperm(GRID)[:n] for n in KEEP]
    xs = [torch.randn(npt + n, 64, dtype=torch.float64) for n in KEEP]
    want = torch.cat([plain(x[None], rope=rope[ids])[0] for x, ids in zip(xs, ids_keep)])
    layout = RaggedLayout.packed([npt + n for n in KEEP], "cpu")
    layout.positions = torch.cat([torch.cat([torch.full((npt,), -1), ids]) for ids in ids_keep])
    got = block(torch.cat(xs)[None], rope=rope, attn_mask=layout)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert layout.uses == 1
    with pytest.raises(ValueError, match="need RaggedLayout.positions"):
        block(torch.cat(xs)[None], rope=rope, attn_mask=RaggedLayout.packed([npt + n for n in KEEP], "cpu"))
    with pytest.raises(ValueError, match="takes packed tokens"):
        block(torch.zeros(3, 13, 64, dtype=torch.float64), rope=rope,
              attn_mask=RaggedLayout.padded([13, 2, 6], "cpu"))
