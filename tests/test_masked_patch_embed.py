import pytest
import torch

from dermfast.ops import masked_patch_embed, masked_patch_embed_ref, random_masking_indices
from dermfast.ops.masked_patch_embed_op import gather_patches
from dermfast.ops.mae_loss_op import patchify

from .conftest import TOLERANCES

gpu = pytest.mark.gpu


def _inputs(B, C, H, W, p, D, ratio=0.75, dtype=torch.float32, device="cpu", conv_weight=True):
    imgs = torch.randn(B, C, H, W, dtype=dtype, device=device)
    weight = torch.randn(D, C, p, p, dtype=dtype, device=device) * 0.1
    if not conv_weight:
        weight = weight.reshape(D, -1).contiguous()
    bias = torch.randn(D, dtype=dtype, device=device)
    L = (H // p) * (W // p)
    pos = torch.randn(1, L, D, dtype=dtype, device=device)
    ids = random_masking_indices(B, L, ratio, seed=3, step=1, device=device).ids_keep
    return imgs, weight, bias, ids, pos


def test_gathered_patches_are_the_kept_rows_of_patchify():
    imgs, _, _, ids, _ = _inputs(2, 3, 12, 8, 4, 5)
    got = gather_patches(imgs, 4, ids)
    full = imgs.reshape(2, 3, 3, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(2, 6, 48)  # (c, i, j) order
    assert torch.equal(got, torch.gather(full, 1, ids[:, :, None].expand(-1, -1, 48)))
    assert patchify(imgs, 4).shape == full.shape  # same grid as MAE's (p, q, c) patchify


@pytest.mark.parametrize("B,C,H,W,p,D", [(1, 3, 8, 8, 4, 16), (3, 3, 16, 24, 8, 33), (2, 1, 14, 14, 7, 5)])
@pytest.mark.parametrize("ratio", [0.0, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("conv_weight", [True, False])
def test_equals_patch_embed_then_mask(B, C, H, W, p, D, ratio, dtype, conv_weight):
    imgs, weight, bias, ids, pos = _inputs(B, C, H, W, p, D, ratio, dtype, conv_weight=conv_weight)
    got = masked_patch_embed(imgs, weight, bias, p, ids, pos)
    ref = masked_patch_embed_ref(imgs.double(), weight.double(), bias.double(), p, ids, pos.double())
    atol, rtol = TOLERANCES[dtype]
    assert got.shape == (B, ids.shape[1], D) and got.dtype == dtype
    torch.testing.assert_close(got, ref.to(dtype), atol=atol * 10, rtol=rtol * 10)
    no_bias = masked_patch_embed(imgs, weight, None, p, ids)
    torch.testing.assert_close(no_bias, masked_patch_embed_ref(imgs, weight, None, p, ids), atol=atol * 10,
                               rtol=rtol * 10)


def test_gradients_match_the_reference():
    imgs, weight, bias, ids, pos = _inputs(2, 3, 16, 16, 4, 12, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (imgs, weight, bias, pos)]
    refs = [t.clone().requires_grad_() for t in (imgs, weight, bias, pos)]
    out = masked_patch_embed(leaves[0], leaves[1], leaves[2], 4, ids, leaves[3])
    ref = masked_patch_embed_ref(refs[0], refs[1], refs[2], 4, ids, refs[3])
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, refs, g)
    for name, a, b in zip(("imgs", "weight", "bias", "pos"), got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)
    # removed patches get no pixel gradient
    torch.autograd.gradcheck(lambda w, b: masked_patch_embed(imgs[:1, :, :8, :8], w, b, 4, ids[:1, :1] % 4),
                             (weight.clone().requires_grad_(), bias.clone().requires_grad_()))


def test_autocast_casts_like_linear():
    imgs, weight, bias, ids, pos = _inputs(2, 3, 8, 8, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_patch_embed(imgs, weight, bias, 4, ids, pos)
    assert out.dtype == torch.bfloat16
    ref = masked_patch_embed(imgs, weight, bias, 4, ids, pos)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_bad_input_is_a_clear_error():
    imgs, weight, bias, ids, pos = _inputs(2, 3, 8, 8, 4, 8)
    with pytest.raises(ValueError, match=r"imgs must be \[B, C, H, W\]"):
        masked_patch_embed(imgs[0], weight, bias, 4, ids)
    with pytest.raises(ValueError, match="not a multiple of patch size"):
        masked_patch_embed(imgs, weight, bias, 3, ids)
    with pytest.raises(ValueError, match=r"weight must be \[D, 3, 4, 4\]"):
        masked_patch_embed(imgs, weight[:, :2], bias, 4, ids)
    with pytest.raises(ValueError, match=r"bias must be a floating \[D\]"):
        masked_patch_embed(imgs, weight, bias[:3], 4, ids)
    with pytest.raises(ValueError, match=r"ids_keep must be \[B, K\]"):
        masked_patch_embed(imgs, weight, bias, 4, ids[0])
    with pytest.raises(ValueError, match="ids_keep must be int64"):
        masked_patch_embed(imgs, weight, bias, 4, ids.int())
    with pytest.raises(ValueError, match=r"ids_keep must lie in \[0, L=4\)"):
        masked_patch_embed(imgs, weight, bias, 4, ids + 4)
    with pytest.raises(ValueError, match=r"pos_embed must be a floating \[1, L, D\]"):
        masked_patch_embed(imgs, weight, bias, 4, ids, pos[:, :3])
    with pytest.raises(ValueError, match="imgs must be floating point"):
        masked_patch_embed(imgs.to(torch.uint8), weight, bias, 4, ids)


def test_opcheck():
    imgs, weight, bias, ids, pos = _inputs(2, 3, 8, 8, 4, 8)
    w2 = weight.reshape(8, -1).clone().requires_grad_()
    b = bias.clone().requires_grad_()
    p = pos.reshape(4, 8).clone().requires_grad_()
    torch.library.opcheck(torch.ops.dermfast.masked_patch_embed.default,
                          (imgs.clone().requires_grad_(), w2, b, 4, ids, p, None))
    torch.library.opcheck(torch.ops.dermfast.masked_patch_embed.default, (imgs, w2, None, 4, ids, None, "torch"))


def test_compiles_fullgraph():
    imgs, weight, bias, ids, pos = _inputs(2, 3, 8, 8, 4, 8)
    w = weight.clone().requires_grad_()
    f = torch.compile(lambda: masked_patch_embed(imgs, w, bias, 4, ids, pos), backend="aot_eager", fullgraph=True)
    out = f()
    out.sum().backward()
    assert torch.equal(out, masked_patch_embed(imgs, w, bias, 4, ids, pos)) and w.grad is not None


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_vit_h_shapes(dtype):
    imgs, weight, bias, ids, pos = _inputs(64, 3, 224, 224, 14, 1280, dtype=dtype, device="cuda")
    got = masked_patch_embed(imgs, weight, bias, 14, ids, pos)
    ref = masked_patch_embed_ref(imgs.double(), weight.double(), bias.double(), 14, ids, pos.double())
    torch.testing.assert_close(got.double(), ref, atol=5e-2 if dtype != torch.float32 else 1e-3, rtol=2e-2)


def test_gradients_with_repeated_ids_keep_accumulate():
    """ids_keep with a patch listed twice in a sample (accepted input; the forward gathers it twice): its pixel
    and pos_embed gradients are the sum of both rows' gradients, as the reference's autograd says."""
    imgs, weight, bias, _, pos = _inputs(2, 3, 8, 12, 4, 7, dtype=torch.float64)
    ids = torch.tensor([[0, 5, 0, 2], [3, 3, 3, 1]])
    leaves = [t.clone().requires_grad_() for t in (imgs, weight, bias, pos)]
    refs = [t.clone().requires_grad_() for t in (imgs, weight, bias, pos)]
    out = masked_patch_embed(leaves[0], leaves[1], leaves[2], 4, ids, leaves[3])
    ref = masked_patch_embed_ref(refs[0], refs[1], refs[2], 4, ids, refs[3])
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, refs, g)
    for name, a, b in zip(("imgs", "weight", "bias", "pos"), got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@gpu
def test_gpu_negative_ids_keep_fail_instead_of_wrapping():
    """On CUDA ids_keep is checked by an async device assert (no host sync); it poisons the CUDA context, so the
    check runs in a subprocess, which must fail rather than embed the wrapped-around last patch."""
    import subprocess
    import sys
    code = ("import torch\nfrom dermfast.ops import masked_patch_embed\n"
            "imgs = torch.randn(1, 3, 8, 8, device='cuda'); w = torch.randn(5, 3, 4, 4, device='cuda')\n"
            "ids = torch.tensor([[-1, 0]], device='cuda')\n"
            "masked_patch_embed(imgs, w, None, 4, ids); torch.cuda.synchronize(); print('no error')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no error" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
