"""Exterior Conversion (EC, TEDMAE): a random convolution per image, mixed with the original.

    out_b = (1 - alpha_b) * x_b + alpha_b * conv(reflect_pad(x_b, k_b // 2), W_b)     W_b [C, C, k_b, k_b]

k_b is drawn from a set of odd kernel sizes, W_b ~ N(0, 1 / (C k_b^2)) (fan-in scaled, so the output keeps the
input's scale), alpha_b ~ U(lo, hi): the random-convolution augmentation of Xu et al. 2021 ("Robust and
Generalizable Visual Representation Learning via Random Convolutions"), used by TEDMAE to change intensities and
textures, never geometry: every output pixel is a mix of the input pixels at most k_b // 2 away, the image keeps
its size, alpha 0 is the identity.

Why the batch op is shaped as it is: kernels of every drawn size are zero-embedded in the centre of one k_max x
k_max kernel, so the whole batch is ONE grouped convolution (input [1, B*C, H, W], groups=B) with no per-sample
or per-size Python loop. Centring a k x k kernel in a k_max x k_max one after reflect-padding by k_max // 2 reads
exactly the pixels a k x k kernel reads after reflect-padding by k // 2 (reflection is defined per offset), so
the batch op equals the per-sample reference (`exterior_conversion_ref`, the spec) to float rounding.

Randomness: the kernels and alphas are drawn on the host (`ec_params`) from a torch.Generator seeded by a hash of
(seed, step, sample, branch) (the masking hash family), never the global RNG, so a resumed run draws the same
conversions, every rank draws its own samples' and a compiled model sees plain tensor inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dermfast.ops.random_masking_op import hash32_int, step_key

_EC_SALT = 0x2C1B3C6D  # separates EC's stream from the masking noise and the ragged ratios of the same key


@dataclass
class ECParams:
    """One batch's conversions. weight: [B, C, C, K, K] float32 (each sample's k x k kernel centred, zeros
    around it; K = the largest size of the set); alpha: [B] float32; sizes: the drawn k per sample (host ints)."""
    weight: torch.Tensor
    alpha: torch.Tensor
    sizes: list[int]

    def to(self, device) -> "ECParams":
        return ECParams(self.weight.to(device, non_blocking=True), self.alpha.to(device, non_blocking=True),
                        self.sizes)

    def kernels(self) -> list[torch.Tensor]:
        """The per-sample kernels [C, C, k_b, k_b] (the centre crops of `weight`), for the reference."""
        K = self.weight.shape[-1]
        out = []
        for b, k in enumerate(self.sizes):
            o = (K - k) // 2
            out.append(self.weight[b, :, :, o:o + k, o:o + k])
        return out


def check_kernel_sizes(sizes) -> tuple[int, ...]:
    sizes = tuple(int(k) for k in sizes)
    if not sizes or any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"EC kernel sizes must be odd and >= 1 (a centred kernel), got {list(sizes)}")
    return sizes


def sample_seed(seed: int, step: int, sample: int, branch: int = 0) -> int:
    """The 32-bit generator seed of one sample's conversion: a pure function of (seed, step, sample, branch)."""
    h = hash32_int(step_key(seed, step) ^ _EC_SALT ^ (branch * 0x9E3779B9 & 0xFFFFFFFF))
    return hash32_int(h ^ (sample & 0xFFFFFFFF))


def ec_params(batch: int, channels: int, kernel_sizes, seed: int, step: int, sample_offset: int = 0,
              alpha_range: tuple[float, float] = (0.0, 1.0), branch: int = 0) -> ECParams:
    """Draw a batch's conversions on the CPU: sample b uses its own torch.Generator seeded by
    `sample_seed(seed, step, sample_offset + b, branch)` (branch: 0 student, 1 teacher), so its draw does not
    depend on the batch it is in, the rank or the global RNG. Draw order per sample: size index, alpha, weights."""
    sizes = check_kernel_sizes(kernel_sizes)
    lo, hi = alpha_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"EC alpha range must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    K = max(sizes)
    weight = torch.zeros(batch, channels, channels, K, K)
    alpha = torch.empty(batch)
    drawn = []
    for b in range(batch):  # host draws of a few hundred numbers per sample; the convolution is batched
        g = torch.Generator().manual_seed(sample_seed(seed, step, sample_offset + b, branch))
        k = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
        alpha[b] = lo + (hi - lo) * torch.rand((), generator=g)
        o = (K - k) // 2
        weight[b, :, :, o:o + k, o:o + k] = torch.randn(channels, channels, k, k, generator=g) / math.sqrt(
            channels * k * k)
        drawn.append(k)
    return ECParams(weight, alpha, drawn)


def _check(imgs: torch.Tensor, pad: int) -> None:
    if imgs.dim() != 4:
        raise ValueError(f"EC takes images [B, C, H, W], got shape {tuple(imgs.shape)}")
    if pad >= min(imgs.shape[-2:]):
        raise ValueError(f"EC kernel size {2 * pad + 1} is too large for {imgs.shape[-2]}x{imgs.shape[-1]} images "
                         f"(reflect padding needs the image side > {pad})")


def exterior_conversion_ref(imgs: torch.Tensor, kernels: list[torch.Tensor], alpha: torch.Tensor) -> torch.Tensor:
    """The specification, one sample at a time. imgs [B, C, H, W]; kernels: B tensors [C, C, k_b, k_b] (odd k_b);
    alpha [B]. Returns [B, C, H, W]: (1 - alpha_b) x_b + alpha_b conv(reflect_pad(x_b, k_b // 2), kernel_b)."""
    if len(kernels) != imgs.shape[0] or alpha.shape != (imgs.shape[0],):
        raise ValueError(f"EC needs one kernel and one alpha per image ({imgs.shape[0]}), got {len(kernels)} "
                         f"kernels and alpha {tuple(alpha.shape)}")
    out = []
    for b, w in enumerate(kernels):
        p = w.shape[-1] // 2
        _check(imgs, p)
        x = imgs[b:b + 1]
        y = F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), w.to(x.dtype))
        out.append((1 - alpha[b]) * x + alpha[b] * y)
    return torch.cat(out)


def exterior_conversion(imgs: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The batch op: one grouped convolution. imgs [B, C, H, W] (any float dtype, any device); weight
    [B, C, C, K, K] (odd K, e.g. `ECParams.weight`); alpha [B]. Same result as `exterior_conversion_ref` on
    the centre crops of `weight`. Differentiable in imgs (not needed for EC: its inputs are data)."""
    B, C = imgs.shape[:2] if imgs.dim() == 4 else (0, 0)
    if weight.dim() != 5 or weight.shape[:3] != (B, C, C) or weight.shape[3] != weight.shape[4] \
            or weight.shape[3] % 2 == 0:
        raise ValueError(f"EC weight must be [B={B}, C={C}, C={C}, K, K] with K odd, got {tuple(weight.shape)} "
                         f"for images {tuple(imgs.shape)}")
    if alpha.shape != (B,):
        raise ValueError(f"EC alpha must be [B={B}], got {tuple(alpha.shape)}")
    p = weight.shape[-1] // 2
    _check(imgs, p)
    H, W = imgs.shape[-2:]
    x = F.pad(imgs, (p, p, p, p), mode="reflect").reshape(1, B * C, H + 2 * p, W + 2 * p)
    y = F.conv2d(x, weight.reshape(B * C, C, 2 * p + 1, 2 * p + 1).to(imgs.dtype), groups=B).reshape(B, C, H, W)
    a = alpha.to(imgs.dtype).reshape(B, 1, 1, 1)
    return imgs + a * (y - imgs)
