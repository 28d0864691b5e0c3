"""DullRazor hair removal: dark 1-2 px lines on a smooth lesion-like image are found and filled in, the rest of
the image is untouched; torch (CPU here; the same ops run on CUDA) and OpenCV when installed."""
import pytest
import torch

from dermfast.synth.hair import hair_mask_torch, remove_hair


def hairy(seed=0, size=48):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.stack([0.75 - 0.2 * (xx ** 2 + yy ** 2), 0.55 - 0.15 * (xx ** 2 + yy ** 2),
                        0.45 + 0.05 * xx]).clamp(0, 1)
    base = base + 0.01 * torch.rand(base.shape, generator=g)
    hair = torch.zeros(size, size, dtype=torch.bool)
    hair[size // 3, 4:-4] = True                                       # horizontal hair
    hair[4:-4, size // 2] = True                                       # vertical hair
    idx = torch.arange(6, size - 6)
    hair[idx, idx] = True                                               # diagonal hair
    img = torch.where(hair, torch.full_like(base, 0.08), base)
    return img[None], base[None], hair


def check(clean, mask, img, base, hair):
    m = mask[0, 0]
    assert m.dtype == torch.bool and m[hair].float().mean() > 0.95      # hairs found
    assert m.float().mean() < 0.35                                      # not the whole image
    assert torch.equal(clean[0][:, ~m], img[0][:, ~m])                  # untouched outside the mask
    err_before = (img[0][:, hair] - base[0][:, hair]).abs().mean()
    err_after = (clean[0][:, hair] - base[0][:, hair]).abs().mean()
    assert err_after < 0.25 * err_before, (err_before, err_after)


def test_torch_backend():
    img, base, hair = hairy()
    clean, mask = remove_hair(img, kernel=9, backend="torch")
    check(clean, mask, img, base, hair)


def test_no_hair_little_mask():
    _, base, _ = hairy(1)
    assert hair_mask_torch(base, kernel=9).float().mean() < 0.02


def test_opencv_backend_agrees():
    pytest.importorskip("cv2")
    img, base, hair = hairy(2)
    clean, mask = remove_hair(img, kernel=9, backend="opencv")
    m = mask[0, 0]
    assert m[hair].float().mean() > 0.95 and m.float().mean() < 0.35
    err = (clean[0][:, hair] - base[0][:, hair]).abs().mean()
    assert err < 0.25 * (img[0][:, hair] - base[0][:, hair]).abs().mean()


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        hair_mask_torch(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="odd"):
        hair_mask_torch(torch.rand(1, 3, 8, 8), kernel=4)
    with pytest.raises(ValueError, match="backend"):
        remove_hair(torch.rand(1, 3, 8, 8), backend="gpu")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    img, _, _ = hairy(3, 256)
    a, ma = remove_hair(img, kernel=17, backend="torch")
    b, mb = remove_hair(img.cuda(), kernel=17, backend="torch")
    assert torch.equal(ma, mb.cpu()) and (a - b.cpu()).abs().max() < 1e-4
