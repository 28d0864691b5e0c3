import pytest
import torch

from dermfast.ops import random_masking, random_masking_ref
from dermfast.ops.random_masking_op import hash32, masking_noise_ref

M32 = 0xFFFFFFFF


def lowbias32_py(x: int) -> int:
    """Independent plain-Python uint32 transcription of the hash (the C / Triton kernels will mirror it)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def test_hash_matches_plain_uint32_arithmetic():
    xs = torch.randint(0, 2**32, (4096,), dtype=torch.int64)
    xs[:3] = torch.tensor([0, 1, M32])
    got = hash32(xs)
    assert got.tolist() == [lowbias32_py(int(v)) for v in xs]


@pytest.mark.parametrize("B,L", [(1, 1), (3, 7), (2, 65), (2, 257)])
def test_noise_is_the_documented_chain(B, L):
    seed, step, off = 123456789, 42, 5
    noise = masking_noise_ref(B, L, seed, step, sample_offset=off)
    for b in range(B):
        h = lowbias32_py(lowbias32_py(lowbias32_py(seed) ^ step) ^ (b + off))
        assert noise[b].tolist() == [lowbias32_py(h ^ p) for p in range(L)]


@pytest.mark.parametrize("B,L,D", [(1, 1, 4), (3, 7, 5), (2, 65, 16), (2, 257, 8)])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_masking_contract(B, L, D, ratio, dtype):
    x = torch.randn(B, L, D, dtype=dtype)
    pos = torch.randn(1, L, D, dtype=dtype)
    xm, mask, ids_restore, ids_keep = random_masking(x, ratio, seed=7, step=3, pos_embed=pos)
    keep = max(1, int(L * (1 - ratio)))
    assert xm.shape == (B, keep, D) and xm.dtype == dtype
    assert mask.shape == (B, L) and ids_restore.shape == (B, L) and ids_keep.shape == (B, keep)
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - keep), dtype=dtype))
    for b in range(B):
        assert sorted(ids_restore[b].tolist()) == list(range(L))  # a permutation
        assert len(set(ids_keep[b].tolist())) == keep
        assert torch.all(mask[b, ids_keep[b]] == 0)  # 0 keep, 1 remove
        torch.testing.assert_close(xm[b], (x + pos)[b, ids_keep[b]])
    # ids_restore undoes the shuffle: position of patch l in [kept, removed] order
    shuffled = torch.argsort(ids_restore, dim=1)
    assert torch.equal(shuffled[:, :keep], ids_keep)


def test_masking_is_a_function_of_the_key():
    x = torch.randn(4, 49, 8)
    a = random_masking_ref(x, 0.75, seed=1, step=10)
    b = random_masking_ref(x.clone(), 0.75, seed=1, step=10)
    assert torch.equal(a[3], b[3]) and torch.equal(a[1], b[1])
    other_step = random_masking_ref(x, 0.75, seed=1, step=11)[1]
    other_seed = random_masking_ref(x, 0.75, seed=2, step=10)[1]
    assert not torch.equal(a[1], other_step) and not torch.equal(a[1], other_seed)
    # every sample differs from the others, and a shard offset gives the later rows' masks
    assert len({tuple(r.tolist()) for r in a[1]}) == 4
    shard = random_masking_ref(x[2:], 0.75, seed=1, step=10, sample_offset=2)[1]
    assert torch.equal(shard, a[1][2:])


def test_keep_fraction_is_uniform_over_patches():
    x = torch.randn(512, 16, 1)
    mask = random_masking_ref(x, 0.75, seed=3, step=0)[1]
    removed = mask.mean(0)  # per-patch removal frequency, about 0.75 each
    assert torch.all((removed - 0.75).abs() < 0.08), removed


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"x must be \[B, L, D\]"):
        random_masking(torch.randn(4, 4), 0.5, 0, 0)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(torch.randn(1, 4, 4), 1.0, 0, 0)
