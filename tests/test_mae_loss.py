import pytest
import torch

from dermfast.ops import mae_loss, mae_loss_ref, patchify, unpatchify
from tests.conftest import TOLERANCES


def loss_by_loops(imgs, pred, mask, p, norm_pix):
    """A float64 loop over images and patches: the textbook definition the reference must match."""
    imgs, pred = imgs.double(), pred.double()
    B, C, H, W = imgs.shape
    total, count = 0.0, 0.0
    for b in range(B):
        for i in range(H // p):
            for j in range(W // p):
                l = i * (W // p) + j
                if mask[b, l] == 0:
                    continue
                t = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6) ** 0.5
                total += ((pred[b, l] - t) ** 2).mean().item()
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("B,C,H,W,p", [(1, 3, 8, 8, 4), (2, 3, 28, 14, 14), (3, 1, 12, 20, 4)])
def test_patchify_roundtrip(B, C, H, W, p):
    x = torch.randn(B, C, H, W)
    pt = patchify(x, p)
    assert pt.shape == (B, (H // p) * (W // p), p * p * C)
    assert torch.equal(unpatchify(pt, p, C, height=H // p), x)


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("B,H,p", [(2, 16, 4), (1, 28, 14), (3, 24, 8)])
def test_mae_loss_matches_the_definition(norm_pix, dtype, B, H, p):
    imgs = torch.randn(B, 3, H, H, dtype=dtype)
    L = (H // p) ** 2
    pred = torch.randn(B, L, p * p * 3, dtype=dtype)
    mask = (torch.rand(B, L) < 0.75).to(dtype)
    mask[0, 0] = 1
    got = mae_loss(imgs, pred, mask, p, norm_pix)
    want = loss_by_loops(imgs, pred, mask, p, norm_pix)
    atol, rtol = TOLERANCES[dtype if dtype != torch.float16 else torch.float32]  # fp32 accumulation
    assert got.dtype == torch.float32 or dtype == torch.float64
    assert abs(got.item() - want) <= atol + rtol * abs(want) + (1e-3 if dtype == torch.float16 else 0)


def test_mae_loss_gradient_flows_to_pred_only_on_removed_patches():
    imgs = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 4, 48, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float32)
    mae_loss_ref(imgs, pred, mask, 4).backward()
    nonzero = pred.grad.abs().sum(-1) > 0
    assert torch.equal(nonzero, mask.bool())


def test_mae_loss_shape_errors():
    with pytest.raises(ValueError, match="does not match patchified target"):
        mae_loss(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 48), torch.ones(1, 4), 4)
    with pytest.raises(ValueError, match="not a multiple of patch size"):
        mae_loss(torch.randn(1, 3, 9, 8), torch.randn(1, 4, 48), torch.ones(1, 4), 4)
