"""torch.compile of the whole MaskedAutoencoderViT, step after step (CPU here; the same test runs on a GPU).

Masking and the masked patch embedding are custom ops, so Inductor never sees the hash; `step` changes every
call: with `torch.compiler.config.dynamic_sources` naming it, dynamo traces it as a SymInt from the first call
(one compilation in all); left to automatic dynamic shapes it recompiles once, on the first change, then never.
The model is tiny because Inductor's C++ compile dominates on 2 CPU cores.
"""
import pytest
import torch

from dermfast.models.mae import mae_from_preset


def _tiny(device="cpu"):
    torch.manual_seed(0)
    return mae_from_preset("demo", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2).to(device)


def _compiled_steps(model, cmodel, imgs, steps, offset=2):
    for step in steps:
        loss, pred, mask = model(imgs, seed=5, step=step, sample_offset=offset)
        closs, cpred, cmask = cmodel(imgs, seed=5, step=step, sample_offset=offset)
        yield step, (loss, pred, mask), (closs, cpred, cmask)


def test_inductor_compiles_the_whole_model_once_and_matches_eager_every_step():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _tiny()
    imgs = torch.randn(2, 3, 16, 16)
    with torch.compiler.config.patch(dynamic_sources="L['step']"):
        cmodel = torch.compile(model, fullgraph=True)
        masks = set()
        for step, (loss, pred, mask), (closs, cpred, cmask) in _compiled_steps(model, cmodel, imgs, range(4)):
            assert torch.equal(cmask, mask), step  # the keep-set is bit-identical under compile
            torch.testing.assert_close(closs, loss, atol=1e-5, rtol=1e-5, msg=f"step {step}")
            torch.testing.assert_close(cpred, pred, atol=1e-4, rtol=1e-4)
            model.zero_grad()
            loss.backward()
            eager_grad = model.patch_embed.proj.weight.grad.clone()
            model.zero_grad()
            closs.backward()
            torch.testing.assert_close(model.patch_embed.proj.weight.grad, eager_grad, atol=1e-5, rtol=1e-4)
            masks.add(tuple(mask.flatten().tolist()))
    assert len(masks) == 4  # every step masked differently
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # no recompilation at all
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_automatic_dynamic_step_recompiles_at_most_once():
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _tiny()
    imgs = torch.randn(2, 3, 16, 16)
    counter = CompileCounterWithBackend("aot_eager")
    cmodel = torch.compile(model, backend=counter, fullgraph=True)
    for step, (loss, _, mask), (closs, _, cmask) in _compiled_steps(model, cmodel, imgs, [0, 1, 7, 2**31 + 3, 9]):
        assert torch.equal(cmask, mask)
        torch.testing.assert_close(closs, loss, atol=1e-6, rtol=1e-6)
        closs.backward()
    assert counter.frame_count <= 2, counter.frame_count  # first call static, then step is a SymInt


@pytest.mark.gpu
def test_gpu_inductor_bf16_autocast_matches_eager():
    import torch._dynamo

    torch._dynamo.reset()
    model = _tiny("cuda")
    imgs = torch.randn(8, 3, 16, 16, device="cuda")
    with torch.compiler.config.patch(dynamic_sources="L['step']"), torch.autocast("cuda", dtype=torch.bfloat16):
        cmodel = torch.compile(model, fullgraph=True)
        for step, (loss, _, mask), (closs, _, cmask) in _compiled_steps(model, cmodel, imgs, range(3)):
            assert torch.equal(cmask, mask)
            torch.testing.assert_close(closs.float(), loss.float(), atol=2e-2, rtol=2e-2)
            closs.backward()


def test_tedmae_compiles_fullgraph_and_follows_the_ema_teacher():
    """--method tedmae under compile: student + teacher + EC in one graph (fullgraph: no break), `step` symbolic
    (one frame), and the EMA update made between calls (outside the graph) is seen by the next compiled call."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from dermfast.models.exterior_conversion import ec_params
    from dermfast.models.tedmae import TEDMAEOptions, tedmae_from_preset

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tedmae_from_preset("demo", TEDMAEOptions(df_layers=2), img_size=16, patch_size=4, embed_dim=32, depth=2,
                               num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(2, 3, 16, 16)
    counter = CompileCounterWithBackend("aot_eager")
    with torch.compiler.config.patch(dynamic_sources="L['step']"):
        cmodel = torch.compile(model, backend=counter, fullgraph=True)
        for step in range(3):
            s, t = ec_params(2, 3, (1, 3), 5, step), ec_params(2, 3, (1, 3), 5, step, branch=1)
            kw = dict(seed=5, step=step, student_ec=(s.weight, s.alpha), teacher_ec=(t.weight, t.alpha),
                      return_parts=True)
            loss, _, mask, parts = model(imgs, **kw)
            closs, _, cmask, cparts = cmodel(imgs, **kw)
            assert torch.equal(cmask, mask)
            torch.testing.assert_close(cparts["distill_loss"], parts["distill_loss"], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(closs, loss, atol=1e-6, rtol=1e-6)
            closs.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            model.ema_update_(0.5)  # what the stage's after_step does
    assert counter.frame_count == 1, counter.frame_count
