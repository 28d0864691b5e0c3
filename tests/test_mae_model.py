import pytest
import torch

from dermfast.models.mae import MaskedAutoencoderViT, get_preset, mae_from_preset, presets


@pytest.mark.parametrize("name,patch,dim,depth,heads,enc_params", [
    ("vit_b16", 16, 768, 12, 12, 85.6e6),
    ("vit_l16", 16, 1024, 24, 16, 303.1e6),
    ("vit_h14", 14, 1280, 32, 16, 630.4e6),
])
def test_paper_presets(name, patch, dim, depth, heads, enc_params):
    p = get_preset(name)
    assert (p.img_size, p.patch_size, p.embed_dim, p.depth, p.num_heads) == (224, patch, dim, depth, heads)
    assert (p.decoder_embed_dim, p.decoder_depth, p.mask_ratio, p.norm_pix_loss) == (512, 8, 0.75, True)
    with torch.device("meta"):  # paper-size models without allocating their weights
        m = MaskedAutoencoderViT(p)
    enc = sum(v.numel() for k, v in m.named_parameters() if not k.startswith(("decoder", "mask_token")))
    assert abs(enc - enc_params) / enc_params < 0.01  # the MAE paper's encoder sizes: 86M, 304M, 632M


def test_unknown_preset_names_the_accepted_ones():
    with pytest.raises(KeyError, match="accepted: demo, vit_b16"):
        get_preset("vit_giant")
    assert "demo" in presets()


def test_demo_forward_shapes_and_visible_only_encoder():
    m = mae_from_preset("demo", img_size=32)
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = m(imgs, seed=0, step=0)
    L = (32 // 8) ** 2
    assert pred.shape == (3, L, 8 * 8 * 3) and mask.shape == (3, L)
    assert torch.isfinite(loss) and loss.ndim == 0
    latent, mask2, _ = m.forward_encoder(imgs, seed=0, step=0)
    assert latent.shape[1] == 1 + int(L * 0.25)  # cls + visible tokens only
    assert torch.equal(mask, mask2) and mask.dtype == torch.float32
    loss.backward()
    assert m.patch_embed.proj.weight.grad is not None and m.decoder_pred.weight.grad is not None


def test_block_constructor_is_injected():
    from timm.models.vision_transformer import Block
    built = []

    def block(*a, **k):
        built.append(a[0])
        return Block(*a, **k)

    m = MaskedAutoencoderViT(get_preset("demo"), block_layer=block)
    assert built == [192] * 4 + [128] * 2 and len(m.blocks) == 4


def test_masked_patch_embedding_equals_patch_embed_then_mask():
    from dermfast.ops import random_masking

    m = mae_from_preset("demo", img_size=32)
    imgs = torch.randn(3, 3, 32, 32)
    keys = dict(seed=4, step=17, sample_offset=6)
    masking = m.masking(3, **keys)
    tokens = m.patch_embed(imgs).contiguous()  # the encoder before masked patch embedding
    ref = random_masking(tokens, m.cfg.mask_ratio, pos_embed=m.pos_embed, **keys)
    for name in ("mask", "ids_restore", "ids_keep", "cu_seqlens"):
        assert torch.equal(getattr(masking, name), getattr(ref, name).to(getattr(masking, name).dtype)), name
    from dermfast.ops import masked_patch_embed
    proj = m.patch_embed.proj
    got = masked_patch_embed(imgs, proj.weight, proj.bias, 8, masking.ids_keep, m.pos_embed)
    torch.testing.assert_close(got, ref.visible, atol=1e-5, rtol=1e-5)
    _, mask, _ = m.forward_encoder(imgs, **keys)
    assert torch.equal(mask, masking.mask)


def test_sample_offset_gives_the_shard_its_own_masks():
    m = mae_from_preset("demo", img_size=32)
    imgs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _, _, mask = m(imgs, seed=1, step=2)
        _, _, tail = m(imgs[2:], seed=1, step=2, sample_offset=2)
    assert torch.equal(tail, mask[2:])  # rank r with offset r * per-rank batch masks like the global batch
    assert not torch.equal(mask[:2], mask[2:])
