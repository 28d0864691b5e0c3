"""MAE random masking, keyed by a counter-based hash.

Why it is shaped this way: the noise that orders patches comes from a 32-bit integer hash of
(seed, step, sample, patch), not from the device RNG, so every backend (torch here; Triton and CUDA later)
and every device produce bit-identical keep-sets, and a resumed run masks exactly as the original did.
Ties between equal hashes are broken by patch index, so the order is total and sorting is deterministic.

The hash is Wellons' `lowbias32` finaliser applied in a chain; all arithmetic is on uint32 values held in
int64 tensors, with each 32x32-bit product split into 16-bit halves so no intermediate exceeds 2^49 (exact
in int64 on every device, and a direct transcription of uint32 wrap-around arithmetic in C or Triton).
"""
from __future__ import annotations

import torch

from dermfast.ops.registry import Query, define_op

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) (int64 tensor) and a constant c in [0, 2^32)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16 (uint32 in int64)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def masking_noise_ref(batch: int, length: int, seed: int, step: int, device=None,
                      sample_offset: int = 0) -> torch.Tensor:
    """uint32 noise (int64 tensor [batch, length]) = hash(hash(hash(hash(seed) ^ step) ^ sample) ^ patch).

    `sample_offset` is the global index of row 0 (e.g. rank * per-rank batch), so shards mask differently.
    """
    h = hash32(torch.tensor(seed & _M32, dtype=torch.int64, device=device))
    h = hash32(h ^ (step & _M32))
    samples = torch.arange(batch, dtype=torch.int64, device=device) + sample_offset
    h = hash32(h ^ samples)[:, None]
    patches = torch.arange(length, dtype=torch.int64, device=device)[None, :]
    return hash32(h ^ patches)


def random_masking_ref(x: torch.Tensor, mask_ratio: float, seed: int, step: int,
                       pos_embed: torch.Tensor | None = None, sample_offset: int = 0):
    """Per-sample random masking as in MAE (facebookresearch/mae `random_masking`), deterministic by key.

    Args:
        x: [B, L, D] patch tokens (any float dtype).
        mask_ratio: fraction of patches removed, in [0, 1); keeps len_keep = int(L * (1 - mask_ratio)) >= 1.
        seed, step: the hash key with the sample index and patch index.
        pos_embed: optional [1, L, D] or [L, D], added to the kept tokens (as the MAE encoder does before masking).
    Returns:
        x_masked: [B, len_keep, D] visible tokens (plus position embedding), in x's dtype.
        mask: [B, L] float, 0 keep, 1 remove, in the original patch order.
        ids_restore: [B, L] int64, the permutation that unshuffles [kept, removed] back to patch order.
        ids_keep: [B, len_keep] int64, the kept patch indices in shuffle order.
    """
    if x.dim() != 3:
        raise ValueError(f"random_masking: x must be [B, L, D], got shape {tuple(x.shape)}")
    B, L, D = x.shape
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"random_masking: mask_ratio must be in [0, 1), got {mask_ratio}")
    if L >= 1 << 20:
        raise ValueError(f"random_masking: at most 2^20 patches, got L={L}")
    len_keep = max(1, int(L * (1 - mask_ratio)))
    noise = masking_noise_ref(B, L, seed, step, device=x.device, sample_offset=sample_offset)
    key = (noise << 20) | torch.arange(L, device=x.device)  # total order: hash, then patch index
    ids_shuffle = torch.argsort(key, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, L, D).to(x.dtype)
    x_masked = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_masked, mask, ids_restore, ids_keep


random_masking_op = define_op("random_masking", "MAE per-sample random masking (hash-keyed)")
random_masking_op.register("torch")(random_masking_ref)


def random_masking(x: torch.Tensor, mask_ratio: float, seed: int, step: int,
                   pos_embed: torch.Tensor | None = None, sample_offset: int = 0, backend: str | None = None):
    """Functional form; dispatches to the best backend for x. See `random_masking_ref` for the contract."""
    q = Query(x.device, x.dtype, {"L": x.shape[1] if x.dim() == 3 else 0, "D": x.shape[-1]}, x.requires_grad)
    return random_masking_op(q, x, mask_ratio, seed, step, pos_embed, sample_offset, backend=backend)
