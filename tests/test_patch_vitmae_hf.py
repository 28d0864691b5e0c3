"""Hugging Face's own ViTMAE modelling tests, run on the dermfast-patched model.

The installed transformers wheel does not ship its tests (no transformers/tests; only transformers.testing_utils),
so the checks of transformers' tests/models/vit_mae/test_modeling_vit_mae.py (huggingface/transformers) are
written out here with the same tester configuration (ViTMAEModelTester: batch 13, image 30, patch 2, hidden 32,
2 layers, 4 heads, intermediate 37, dropout 0.1, mask_ratio 0.5, attn_implementation "eager"), each test naming
the HF test it mirrors. Where HF seeds the device RNG to make the random mask reproducible, the patched model
without `noise` masks with dermfast's seeded hash instead (its masking_step restarts at 0 on a fresh model), and
HF's integration tests pass `noise` (np.random.uniform), which the patched model honours with HF's meaning.
"""
import math
import tempfile

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel  # noqa: E402

import dermfast  # noqa: E402

BATCH, IMAGE, PATCH, CHANNELS, HIDDEN, LAYERS, HEADS, MASK_RATIO = 13, 30, 2, 3, 32, 2, 4, 0.5


def mae_tester_config(**kw):
    """ViTMAEModelTester.get_config (test_modeling_vit_mae.py)."""
    cfg = dict(image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS, hidden_size=HIDDEN,
               num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=37, hidden_act="gelu",
               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, is_decoder=False,
               initializer_range=0.02, mask_ratio=MASK_RATIO, decoder_hidden_size=HIDDEN,
               decoder_intermediate_size=37, decoder_num_attention_heads=HEADS, decoder_num_hidden_layers=LAYERS,
               attn_implementation="eager")
    cfg.update(kw)
    return ViTMAEConfig(**cfg)


def pixels(channels=CHANNELS, batch=BATCH):
    return torch.rand(batch, channels, IMAGE, IMAGE)  # HF floats_tensor: uniform [0, 1)


def patched(model_class, config):
    torch.manual_seed(0)
    return dermfast.patch_transformers(model_class(config)).eval()


def test_model_output_shape():
    """ViTMAEModelTester.create_and_check_model: last_hidden_state [B, ceil((1 - mask_ratio) (patches + 1)), D]."""
    model = patched(ViTMAEModel, mae_tester_config())
    assert type(model.embeddings).__name__ == "MaskedViTMAEEmbeddings"
    num_patches = (IMAGE // PATCH) ** 2
    seq_length = int(math.ceil((1 - MASK_RATIO) * (num_patches + 1)))
    assert model(pixels()).last_hidden_state.shape == (BATCH, seq_length, HIDDEN)


def test_for_pretraining_shapes_and_greyscale():
    """ViTMAEModelTester.create_and_check_for_pretraining: logits [B, patches, p^2 C], also for 1 channel."""
    num_patches = (IMAGE // PATCH) ** 2
    for channels in (CHANNELS, 1):
        model = patched(ViTMAEForPreTraining, mae_tester_config(num_channels=channels))
        out = model(pixels(channels))
        assert out.logits.shape == (BATCH, num_patches, PATCH ** 2 * channels)
        assert out.mask.shape == (BATCH, num_patches) and out.loss.dim() == 0 and torch.isfinite(out.loss)


def test_model_get_set_embeddings():
    """ViTMAEModelTest.test_model_get_set_embeddings."""
    for model_class in (ViTMAEModel, ViTMAEForPreTraining):
        model = patched(model_class, mae_tester_config())
        assert isinstance(model.get_input_embeddings(), torch.nn.Module)
        x = model.get_output_embeddings()
        assert x is None or isinstance(x, torch.nn.Linear)


@pytest.mark.parametrize("model_class", [ViTMAEModel, ViTMAEForPreTraining])
def test_save_load(model_class):
    """ViTMAEModelTest.test_save_load: outputs[0] equal (max diff <= 1e-5) after save_pretrained / from_pretrained.
    HF reseeds the device RNG before each forward; the patched model masks with its hash at masking_step 0 on
    both sides. The checkpoint holds HF's keys only: the reloaded HF model is patched again."""
    model = patched(model_class, mae_tester_config())
    inputs = pixels()
    with torch.no_grad():
        out_2 = model(inputs)[0].numpy()
    out_2[np.isnan(out_2)] = 0
    with tempfile.TemporaryDirectory() as tmpdirname:
        model.save_pretrained(tmpdirname)
        loaded = model_class.from_pretrained(tmpdirname)
        assert type(loaded) is model_class  # saved as HF's own model, loadable without dermfast
        dermfast.patch_transformers(loaded).eval()
        with torch.no_grad():
            out_1 = loaded(inputs)[0].numpy()
    out_1[np.isnan(out_1)] = 0
    assert np.amax(np.abs(out_1 - out_2)) <= 1e-5


def test_determinism_given_noise_and_step():
    """HF skips test_determinism because its mask is random each forward; with `noise` (HF's integration tests)
    or with the hash at a fixed masking_step, the patched model is deterministic."""
    model = patched(ViTMAEForPreTraining, mae_tester_config())
    x = pixels()
    noise = torch.from_numpy(np.random.uniform(size=(BATCH, (IMAGE // PATCH) ** 2))).float()
    with torch.no_grad():
        a, b = model(x, noise=noise), model(x, noise=noise)
        torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
        model.vit.embeddings.masking_step = 5
        c = model(x)
        model.vit.embeddings.masking_step = 5
        torch.testing.assert_close(model(x).logits, c.logits, atol=0, rtol=0)


def test_inference_for_pretraining_given_noise_equals_hf():
    """ViTMAEModelIntegrationTest.test_inference_for_pretraining, without its downloaded weights: given
    np.random.uniform noise, the patched model's logits equal the unpatched HF model's (same random weights)."""
    np.random.seed(2)
    config = mae_tester_config()
    torch.manual_seed(0)
    original = ViTMAEForPreTraining(config).eval()
    model = dermfast.patch_transformers(ViTMAEForPreTraining(config)).eval()
    model.load_state_dict(original.state_dict())
    noise = torch.from_numpy(np.random.uniform(size=(1, (IMAGE // PATCH) ** 2)))
    x = pixels(batch=1)
    with torch.no_grad():
        got, want = model(x, noise=noise), original(x, noise=noise)
    assert got.logits.shape == want.logits.shape == (1, (IMAGE // PATCH) ** 2, PATCH ** 2 * CHANNELS)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


def test_inference_interpolate_pos_encoding_equals_hf():
    """ViTMAEModelIntegrationTest.test_inference_interpolate_pos_encoding: a larger, non-square image with
    interpolate_pos_encoding=True and noise over its patches; logits [1, patches, p^2 C] equal HF's."""
    config = mae_tester_config()
    torch.manual_seed(0)
    original = ViTMAEForPreTraining(config).eval()
    model = dermfast.patch_transformers(ViTMAEForPreTraining(config)).eval()
    model.load_state_dict(original.state_dict())
    h, w = 36, 48
    x = torch.rand(1, CHANNELS, h, w)
    noise = torch.from_numpy(np.random.uniform(size=(1, (h // PATCH) * (w // PATCH))))
    with torch.no_grad():
        got = model(x, noise=noise, interpolate_pos_encoding=True)
        want = original(x, noise=noise, interpolate_pos_encoding=True)
    assert got.logits.shape == (1, (h // PATCH) * (w // PATCH), PATCH ** 2 * CHANNELS)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


def test_attention_and_hidden_state_outputs():
    """ModelTesterMixin.test_attention_outputs / test_hidden_states_output (test_modeling_common.py) as HF runs
    them for ViTMAE: attentions [B, heads, seq, seq] per layer (HF's own forward computes them: the fused path
    returns none), hidden_states num_layers + 1 of [B, seq, D]."""
    model = patched(ViTMAEModel, mae_tester_config())
    seq = int(math.ceil((1 - MASK_RATIO) * ((IMAGE // PATCH) ** 2 + 1)))
    out = model(pixels(), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == LAYERS and all(a.shape == (BATCH, HEADS, seq, seq) for a in out.attentions)
    assert len(out.hidden_states) == LAYERS + 1 and all(h.shape == (BATCH, seq, HIDDEN) for h in out.hidden_states)


def test_training():
    """ModelTesterMixin.test_training: in train mode the pretraining loss backpropagates to every trained
    parameter (dropout 0.1 here: HF's own attention forward, the report says so)."""
    model = patched(ViTMAEForPreTraining, mae_tester_config()).train()
    assert "attention dropout p=0.1: HF's own forward while training" in str(dermfast.patch_report(model))
    model(pixels()).loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for n, p in trained), [n for n, p in trained if p.grad is None]
