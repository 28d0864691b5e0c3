"""dermfast.patch_transformers on a tiny Hugging Face ViTMAEForPreTraining built from a config (no weights).

The peer is the unpatched HF model itself (transformers, models/vit_mae/modeling_vit_mae.py): given the same
`noise`, the patched model's loss, logits, mask, ids_restore and every gradient equal HF's in float64.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

import dermfast  # noqa: E402


def tiny_mae(**kw):
    cfg = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=48, decoder_hidden_size=16, decoder_num_hidden_layers=1,
               decoder_num_attention_heads=2, decoder_intermediate_size=24, mask_ratio=0.75, norm_pix_loss=True,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(ViTMAEConfig(**cfg)).double()
    with torch.no_grad():  # random weights everywhere (zero-initialised biases / tokens would hide paths)
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


def count_calls(monkeypatch, name):
    import dermfast.models.patch_transformers as pt
    calls = []
    op = getattr(pt, name)

    def spy(*args, **kw):
        calls.append(1)
        return op(*args, **kw)
    monkeypatch.setattr(pt, name, spy)
    return calls


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_patched_vitmae_equals_hf_given_noise(mode, norm_pix, monkeypatch):
    model = tiny_mae(norm_pix_loss=norm_pix)
    original = copy.deepcopy(model)
    calls = {n: count_calls(monkeypatch, n) for n in ("masked_attention", "mae_loss", "random_masking")}
    assert dermfast.patch_transformers(model) is model
    getattr(model, mode)(), getattr(original, mode)()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(3, 16, dtype=torch.float64)
    got, want = model(x, noise=noise), original(x, noise=noise)
    assert torch.equal(got.mask, want.mask) and torch.equal(got.ids_restore, want.ids_restore)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-12, rtol=1e-12)
    (got.loss + got.logits.sin().mean()).backward()
    (want.loss + want.logits.sin().mean()).backward()
    for (name, a), (_, b) in zip(model.named_parameters(), original.named_parameters()):
        if b.grad is None:
            assert a.grad is None, name
        else:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12, msg=name)
    # the fused ops ran: 2 encoder + 1 decoder attention layers, one loss; with noise, HF's masking meaning
    assert len(calls["masked_attention"]) == 3 and len(calls["mae_loss"]) == 1 and not calls["random_masking"]


def test_without_noise_masks_with_dermfast_hash():
    from dermfast.ops import random_masking_ref
    model = dermfast.patch_transformers(tiny_mae(), seed=7).eval()
    emb = model.vit.embeddings
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a, b = model(x), model(x)
    assert emb.masking_step == 2
    tokens = torch.randn(2, 16, 32, dtype=torch.float64)
    for step, out in enumerate((a, b)):
        ref = random_masking_ref(tokens, 0.75, seed=7, step=step)
        assert torch.equal(out.ids_restore, ref.ids_restore)
        assert torch.equal(out.mask, ref.mask.float())
        assert out.mask.sum(1).tolist() == [12.0, 12.0]
    assert not torch.equal(a.ids_restore, b.ids_restore)
    emb.masking_step = 0  # resume at step 0: the same keep-set again
    assert torch.equal(model(x).ids_restore, a.ids_restore)
    assert model(x).loss.dtype == torch.float64


def test_without_noise_equals_hf_given_the_hash_as_noise():
    """dermfast's keep-set is argsort of (hash << 20 | patch) (random_masking_op.py); handed to HF as `noise`
    (exact in float64: < 2^52), the unpatched model computes the same loss and logits."""
    from dermfast.ops.random_masking_op import masking_noise_ref
    model = tiny_mae()
    original = copy.deepcopy(model)
    dermfast.patch_transformers(model, seed=3)
    model.vit.embeddings.masking_step = 11
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    key = (masking_noise_ref(2, 16, seed=3, step=11) << 20) | torch.arange(16)
    got, want = model(x), original(x, noise=key.double())
    assert torch.equal(got.ids_restore, want.ids_restore)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-12, rtol=1e-12)


def test_what_dermfast_cannot_do_goes_to_hf_and_report():
    model = tiny_mae(attention_probs_dropout_prob=0.5)
    original = copy.deepcopy(model)
    dermfast.patch_transformers(model)
    text = str(dermfast.patch_report(model))
    assert text.splitlines()[0] == "dermfast.patch_transformers: 5 swapped, 0 left"
    assert "swapped  vit.embeddings  ViTMAEEmbeddings -> MaskedViTMAEEmbeddings" in text
    assert "attention dropout p=0.5: HF's own forward while training" in text
    assert "loss: mae_loss" in text
    x, noise = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 16, dtype=torch.float64)
    model.train(), original.train()
    torch.manual_seed(5)
    a = model(x, noise=noise)
    torch.manual_seed(5)
    b = original(x, noise=noise)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-12, rtol=1e-12)
    model.eval(), original.eval()  # attention weights asked for (eager HF attention): HF's forward returns them
    model.set_attn_implementation("eager"), original.set_attn_implementation("eager")
    a = model.vit(x, noise=noise, output_attentions=True)
    b = original.vit(x, noise=noise, output_attentions=True)
    assert a.attentions is not None and len(a.attentions) == 2
    for u, w in zip(a.attentions, b.attentions):
        torch.testing.assert_close(u, w)
    with pytest.raises(ValueError, match="holds no ViTMAE embeddings"):
        dermfast.patch_transformers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_import_dermfast_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, dermfast, dermfast.models; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_prints_report_for_vit_mae(capsys):
    from dermfast.patch import main
    assert main(["vit_mae", "--library", "transformers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "vit_mae (transformers, ViTMAEForPreTraining)"
    assert out[1] == "dermfast.patch_transformers: 22 swapped, 0 left"  # model, embeddings, 12 + 8 attentions
    assert out[2] == "swapped  <model>  ViTMAEForPreTraining -> MaskedViTMAEForPreTraining (loss: mae_loss)"


def test_compiled_equals_hf_and_hash_masking_does_not_recompile():
    import torch._dynamo.testing
    model = tiny_mae().eval()
    original = copy.deepcopy(model)
    dermfast.patch_transformers(model)
    x, noise = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 16, dtype=torch.float64)
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(x, noise=noise)
    want = original(x, noise=noise)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-12, rtol=1e-12)
    trained = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731 (HF freezes pos embeds)
    gg = torch.autograd.grad(got.loss, trained(model), allow_unused=True)
    gw = torch.autograd.grad(want.loss, trained(original), allow_unused=True)
    for a, b in zip(gg, gw):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # without noise the step advances every call; it must not be baked into the graph (a recompile per step)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    compiled(x)
    graphs = counter.frame_count
    for _ in range(3):
        compiled(x)
    assert counter.frame_count == graphs and model.vit.embeddings.masking_step == 4


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
def test_patched_vit_deit_dinov2_attention_equals_hf(family):
    from transformers import DeiTConfig, DeiTModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel
    cfg, cls = {"vit": (ViTConfig, ViTModel), "deit": (DeiTConfig, DeiTModel),
                "dinov2": (Dinov2Config, Dinov2Model)}[family]
    torch.manual_seed(0)
    model = cls(cfg(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=48)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    original = copy.deepcopy(model)
    dermfast.patch_transformers(model)
    report = dermfast.patch_report(model)
    name = {"vit": "ViTAttention", "deit": "DeiTAttention", "dinov2": "Dinov2Attention"}[family]
    assert [(old, new) for _, old, new, _ in report.swapped] == [(name, f"Masked{name}")] * 2
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(original, mode)()
        got, want = model(x).last_hidden_state, original(x).last_hidden_state
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        gg = torch.autograd.grad(got.sin().sum(), list(model.parameters()), allow_unused=True)
        gw = torch.autograd.grad(want.sin().sum(), list(original.parameters()), allow_unused=True)
        for a, b in zip(gg, gw):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
