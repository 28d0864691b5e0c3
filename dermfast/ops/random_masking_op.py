"""MAE random masking, keyed by a counter-based hash; dense or ragged; a torch.library custom op.

Why it is shaped this way: the noise that orders patches comes from a 32-bit integer hash of
(seed, step, sample, patch), not from the device RNG, so every backend (torch, Triton, CUDA) and every device
produce bit-identical keep-sets, and a resumed run masks exactly as the original did. Ties between equal hashes
are broken by patch index: the sort key is (hash << 20) | patch, unique per row, so the order is total.

The hash is Wellons' `lowbias32` finaliser applied in a chain; all device arithmetic is on uint32 values held in
int64 tensors, with each 32x32-bit product split into 16-bit halves so no intermediate exceeds 2^49 (exact in
int64 on every device, and a direct transcription of uint32 wrap-around arithmetic in C or Triton). The first
two rounds (seed, step) are computed on the host in plain Python ints (`step_key`) and reach the kernels as a
scalar argument: no `torch.tensor(seed, device=...)` host-to-device copy, no sync.

`torch.compile` sees the op as `torch.ops.dermfast.random_masking` with one fake implementation for every
backend (the hash never reaches Inductor) and a registered autograd whose backward is its own custom op
(`dermfast::random_masking_backward`, a gather: deterministic). Dense masks (one ratio) have static output
shapes; ragged masks (a tensor of ratios) size their packed output from the ratios' values, which the fake
implementation declares as a data-dependent size. Pass ragged ratios as a CPU tensor: a CUDA one costs one
device-to-host copy (the output size depends on its values).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from dermfast.ops._device import on_device
from dermfast.ops.registry import Query, all_of, define_op, dtype_in, needs_cuda_ext, needs_triton_device

_M32 = 0xFFFFFFFF
MAX_L = 4096  # Triton / CUDA: one row sorted in registers / shared memory; the torch path takes up to 2^20
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MaskingResult(NamedTuple):
    """Output of `random_masking` (mask semantics: 0 keep, 1 remove, as in the MAE paper).

    visible: [B, K, D] (one ratio) or packed [T, D] (ragged) kept tokens (+ pos_embed), x's dtype.
    mask: [B, L] in x's dtype, in patch order.
    ids_restore: [B, L] int64, rank of each patch in the shuffle (< K_b: kept); unshuffles [kept, removed].
    ids_keep: [B, K] or packed [T] int64, kept patch indices in shuffle order.
    cu_seqlens: int32 [B+1], sample b's visible tokens are rows cu_seqlens[b]:cu_seqlens[b+1] of the packed
        layout (for one ratio: b * K).
    """

    visible: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor
    ids_keep: torch.Tensor
    cu_seqlens: torch.Tensor


# The hash (the spec every kernel ports) -----------------------------------------------------------------


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


def hash32_int(x: int) -> int:
    """`hash32` on one Python int (host side, no device tensor)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def step_key(seed: int, step: int) -> int:
    """The host half of the chain: hash(hash(seed) ^ step), a uint32 as a Python int."""
    return hash32_int(hash32_int(int(seed) & _M32) ^ (int(step) & _M32))


def masking_noise_ref(batch: int, length: int, seed: int, step: int, device=None,
                      sample_offset: int = 0) -> torch.Tensor:
    """uint32 noise (int64 tensor [batch, length]) = hash(hash(hash(hash(seed) ^ step) ^ sample) ^ patch).

    `sample_offset` is the global index of row 0 (e.g. rank * per-rank batch), so shards mask differently.
    """
    h = step_key(seed, step)
    samples = torch.arange(batch, dtype=torch.int64, device=device) + sample_offset
    hs = hash32(h ^ samples)[:, None]
    patches = torch.arange(length, dtype=torch.int64, device=device)[None, :]
    return hash32(hs ^ patches)


def keep_count(length: int, mask_ratio: float) -> int:
    """K = max(1, floor(L * (1 - mask_ratio))), in float64 as Python computes it."""
    return max(1, int(length * (1 - mask_ratio)))


def keep_counts(length: int, ratios: torch.Tensor) -> torch.Tensor:
    """Per-sample K (int64, on ratios' device): the same float64 arithmetic as `keep_count`."""
    return torch.floor(length * (1 - ratios.to(torch.float64))).to(torch.int64).clamp_min(1)


# The reference (the spec) --------------------------------------------------------------------------------


def random_masking_ref(x: torch.Tensor, mask_ratio, seed: int, step: int, pos_embed: torch.Tensor | None = None,
                       sample_offset: int = 0) -> MaskingResult:
    """Per-sample random masking as in MAE (facebookresearch/mae `random_masking`), deterministic by key.

    Args:
        x: [B, L, D] patch tokens (any float dtype, float64 included).
        mask_ratio: float in [0, 1), or a tensor [B] of per-sample ratios (ragged, packed output);
            sample b keeps K_b = max(1, floor(L * (1 - ratio_b))) patches.
        seed, step: the hash key with the sample index (sample_offset + b) and patch index.
        pos_embed: optional [1, L, D] or [L, D], added to the kept tokens in x's dtype.
    Returns: `MaskingResult` (see its docstring for shapes).
    """
    B, L, D = x.shape
    noise = masking_noise_ref(B, L, seed, step, device=x.device, sample_offset=sample_offset)
    key = (noise << 20) | torch.arange(L, device=x.device)  # total order: hash, then patch index
    ids_shuffle = torch.argsort(key, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, L, D).to(x.dtype)
    if isinstance(mask_ratio, torch.Tensor):
        k = keep_counts(L, mask_ratio).to(x.device)
        sel = torch.arange(L, device=x.device)[None, :] < k[:, None]
        ids_keep = ids_shuffle[sel]
        rows = torch.arange(B, device=x.device)[:, None].expand(B, L)[sel]
        visible = x[rows, ids_keep]
    else:
        k = torch.full((B,), keep_count(L, mask_ratio), dtype=torch.int64, device=x.device)
        ids_keep = ids_shuffle[:, :keep_count(L, mask_ratio)]
        visible = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))
    mask = (ids_restore >= k[:, None]).to(x.dtype)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
    cu[1:] = torch.cumsum(k, 0).to(torch.int32)
    return MaskingResult(visible, mask, ids_restore, ids_keep, cu)


# Backends: forward(x, pos, cu, total, h_step, offset, mask_dtype) -> (visible [T, D], mask, ids_restore, keep [T])


def _fwd_torch(x, pos, cu, total, h_step, sample_offset, mask_dtype):
    B, L, D = x.shape
    samples = torch.arange(B, dtype=torch.int64, device=x.device) + sample_offset
    hs = hash32(h_step ^ samples)[:, None]
    patches = torch.arange(L, dtype=torch.int64, device=x.device)
    ids_shuffle = torch.argsort((hash32(hs ^ patches[None, :]) << 20) | patches[None, :], dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    cu64 = cu.to(torch.int64)
    k = cu64[1:] - cu64[:-1]
    mask = (ids_restore >= k[:, None]).to(mask_dtype)
    # packed row t belongs to sample rows[t] at rank t - cu[rows[t]]: index arithmetic, no boolean
    # indexing (that would be a nonzero(), a host sync on CUDA)
    t = torch.arange(total, device=x.device)
    rows = torch.searchsorted(cu64[1:], t, right=True)
    ids_keep = ids_shuffle[rows, t - cu64[rows]]
    if D == 0:
        return x.new_empty(total, 0), mask, ids_restore, ids_keep
    src = x + pos[None] if pos is not None else x
    return src[rows, ids_keep], mask, ids_restore, ids_keep


def _bwd_torch(g, ids_restore, cu, need_x, need_pos):
    B, L = ids_restore.shape
    D = g.shape[1]
    k = (cu[1:] - cu[:-1]).to(torch.int64)
    kept = ids_restore < k[:, None]
    src = torch.where(kept, ids_restore + cu[:-1, None].to(torch.int64), 0)
    gx = torch.where(kept[:, :, None], g[src.reshape(-1)].reshape(B, L, D), 0).to(g.dtype)
    gp = gx.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(g.dtype) if need_pos else g.new_empty(0)
    return (gx if need_x else g.new_empty(0)), gp


def _fwd_triton(x, pos, cu, total, h_step, sample_offset, mask_dtype):
    from dermfast.kernels import random_masking as k
    with on_device(x):
        return k.masking_fwd(x, pos, cu, total, h_step, sample_offset, mask_dtype)


def _bwd_triton(g, ids_restore, cu, need_x, need_pos):
    from dermfast.kernels import random_masking as k
    with on_device(g):
        return k.masking_bwd(g, ids_restore, cu, need_x, need_pos)


_CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _fwd_cuda(x, pos, cu, total, h_step, sample_offset, mask_dtype):
    from dermfast import _optional
    B, L, D = x.shape
    vis = torch.empty(total, D, device=x.device, dtype=x.dtype)
    mask = torch.empty(B, L, device=x.device, dtype=mask_dtype)
    restore = torch.empty(B, L, device=x.device, dtype=torch.int64)
    keep = torch.empty(total, device=x.device, dtype=torch.int64)
    if B > 0:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _optional.cuda_ext.random_masking_fwd(
            x.data_ptr(), pos.data_ptr() if pos is not None else 0, vis.data_ptr(), mask.data_ptr(),
            restore.data_ptr(), keep.data_ptr(), cu.data_ptr(), B, L, D, _CUDA_DTYPES[x.dtype],
            _CUDA_DTYPES[mask_dtype], h_step, sample_offset, x.device.index, stream)
    return vis, mask, restore, keep


def _max_l(limit: int):
    def check(q: Query) -> str | None:
        L = q.sizes.get("L", 0)
        return None if L <= limit else f"L={L} > {limit} (one row is sorted on chip)"
    return check


def _cuda_ext_has_masking(q: Query) -> str | None:
    from dermfast import _optional
    ok = hasattr(_optional.cuda_ext, "random_masking_fwd")
    return None if ok else "dermfast._C was built without random_masking_fwd (rebuild the extension)"


def _mask_dtype_ok(q: Query) -> str | None:
    md = q.sizes.get("mask_dtype", 0)
    return None if md in (0, 1, 2) else "mask dtype not in (float32, float16, bfloat16)"


masking_fwd_op = define_op("random_masking", "MAE per-sample random masking (hash-keyed, dense or ragged)")
masking_fwd_op.register("torch")(_fwd_torch)
masking_fwd_op.register("triton", all_of(needs_triton_device,
                                         dtype_in(torch.float16, torch.bfloat16, torch.float32),
                                         _max_l(MAX_L)))(_fwd_triton)
masking_fwd_op.register("cuda", all_of(needs_cuda_ext, _cuda_ext_has_masking,
                                       dtype_in(torch.float16, torch.bfloat16, torch.float32),
                                       _max_l(MAX_L), _mask_dtype_ok))(_fwd_cuda)

masking_bwd_op = define_op("random_masking_backward", "gradient of random_masking's visible tokens (a gather)")
masking_bwd_op.register("torch")(_bwd_torch)
masking_bwd_op.register("triton", all_of(needs_triton_device,
                                         dtype_in(torch.float16, torch.bfloat16, torch.float32)))(_bwd_triton)


# The custom ops ------------------------------------------------------------------------------------------


def _cu_seqlens(B: int, L: int, ratio: float, ratios: torch.Tensor | None, device) -> tuple[torch.Tensor, int]:
    """cu_seqlens int32 [B+1] on `device` and T (host int). Ragged ratios are read on the host here."""
    if ratios is None:
        K = keep_count(L, ratio)
        return torch.arange(B + 1, dtype=torch.int32, device=device) * K, B * K
    r = ratios.detach().to("cpu", torch.float64)
    if not bool(torch.all((r >= 0) & (r < 1))):
        bad = r[~((r >= 0) & (r < 1))][:4].tolist()
        raise ValueError(f"random_masking: every mask_ratio must be in [0, 1), got {bad}")
    k = keep_counts(L, r)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(k, 0).to(torch.int32)
    if torch.device(device).type == "cuda":  # an asynchronous copy from pinned memory: no stream sync
        cu = cu.pin_memory()
    return cu.to(device, non_blocking=True), int(cu[-1])


@torch.library.custom_op("dermfast::random_masking", mutates_args=())
def _masking_custom(x: torch.Tensor, pos_embed: Optional[torch.Tensor], mask_ratio: float,
                    ratios: Optional[torch.Tensor], seed: int, step: int, sample_offset: int,
                    mask_dtype: torch.dtype, backend: Optional[str]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, D = x.shape
    cu, total = _cu_seqlens(B, L, mask_ratio, ratios, x.device)
    sizes = {"L": L, "D": D, "mask_dtype": _CUDA_DTYPES.get(mask_dtype, -1)}
    impl = masking_fwd_op.select(Query(x.device, x.dtype, sizes, x.requires_grad), backend)
    vis, mask, restore, keep = impl.fn(x, pos_embed, cu, total, step_key(seed, step), sample_offset, mask_dtype)
    if ratios is None:
        K = total // B if B else keep_count(L, mask_ratio)
        vis, keep = vis.view(B, K, D), keep.view(B, K)
    return vis, mask, restore, keep, cu


@_masking_custom.register_fake
def _masking_fake(x, pos_embed, mask_ratio, ratios, seed, step, sample_offset, mask_dtype, backend):
    B, L, D = x.shape
    if ratios is None:
        K = keep_count(L, mask_ratio)
        vis, keep = x.new_empty(B, K, D), x.new_empty(B, K, dtype=torch.int64)
    else:
        T = torch.library.get_ctx().new_dynamic_size()
        vis, keep = x.new_empty(T, D), x.new_empty(T, dtype=torch.int64)
    return (vis, x.new_empty(B, L, dtype=mask_dtype), x.new_empty(B, L, dtype=torch.int64), keep,
            x.new_empty(B + 1, dtype=torch.int32))


@torch.library.custom_op("dermfast::random_masking_backward", mutates_args=())
def _masking_bwd_custom(grad_visible: torch.Tensor, ids_restore: torch.Tensor, cu_seqlens: torch.Tensor,
                        need_x: bool, need_pos: bool, backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_visible: [T, D] contiguous. Returns grad_x [B, L, D] and grad_pos [L, D] (empty [0] if not needed).

    The backward has torch and Triton implementations; a forward run on `cuda` picks the best of those.
    """
    if backend == "cuda":
        backend = None
    sizes = {"L": ids_restore.shape[1], "D": grad_visible.shape[1]}
    impl = masking_bwd_op.select(Query(grad_visible.device, grad_visible.dtype, sizes), backend)
    return impl.fn(grad_visible, ids_restore, cu_seqlens, need_x, need_pos)


@_masking_bwd_custom.register_fake
def _masking_bwd_fake(grad_visible, ids_restore, cu_seqlens, need_x, need_pos, backend):
    B, L = ids_restore.shape
    D = grad_visible.shape[1]
    gx = grad_visible.new_empty(B, L, D) if need_x else grad_visible.new_empty(0)
    gp = grad_visible.new_empty(L, D) if need_pos else grad_visible.new_empty(0)
    return gx, gp


def _masking_setup_context(ctx, inputs, output):
    x, pos_embed, _, _, _, _, _, _, backend = inputs
    _, _, ids_restore, _, cu = output
    ctx.save_for_backward(ids_restore, cu)
    ctx.D = x.shape[2]
    ctx.has_pos = pos_embed is not None
    ctx.backend = backend


def _masking_backward(ctx, g_vis, g_mask, g_restore, g_keep, g_cu):
    ids_restore, cu = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_pos = ctx.has_pos and ctx.needs_input_grad[1]
    gx = gp = None
    if need_x or need_pos:
        gx, gp = torch.ops.dermfast.random_masking_backward(g_vis.reshape(-1, ctx.D).contiguous(), ids_restore,
                                                           cu, need_x, need_pos, ctx.backend)
    return (gx if need_x else None, gp if need_pos else None, None, None, None, None, None, None, None)


_masking_custom.register_autograd(_masking_backward, setup_context=_masking_setup_context)


# Functional form -----------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _validate(x, mask_ratio, seed, step, pos_embed, sample_offset):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"random_masking: x must be [B, L, D], got shape {shape}")
    B, L, D = x.shape
    if x.dtype not in _FLOATS:
        raise ValueError(f"random_masking: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("random_masking: x must be contiguous (call .contiguous())")
    if L < 1 or L >= 1 << 20:
        raise ValueError(f"random_masking: need 1 <= L < 2^20 patches, got L={L}")
    if B * L >= 1 << 31:
        raise ValueError(f"random_masking: B * L must be < 2^31, got {B} * {L}")
    if isinstance(mask_ratio, torch.Tensor):
        if mask_ratio.dim() != 1 or mask_ratio.shape[0] != B:
            raise ValueError(f"random_masking: a mask_ratio tensor must be [B] = [{B}], got "
                             f"{tuple(mask_ratio.shape)}")
        if not mask_ratio.is_floating_point():
            raise ValueError(f"random_masking: a mask_ratio tensor must be floating point, got {mask_ratio.dtype}")
    elif isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise ValueError(f"random_masking: mask_ratio must be a float or a [B] tensor, got "
                         f"{type(mask_ratio).__name__}")
    elif not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"random_masking: mask_ratio must be in [0, 1), got {mask_ratio}")
    for name, v in (("seed", seed), ("step", step), ("sample_offset", sample_offset)):
        if not _is_int(v):
            raise ValueError(f"random_masking: {name} must be an int, got {type(v).__name__}")
        if isinstance(v, int) and not -(1 << 63) <= v < 1 << 63:
            raise ValueError(f"random_masking: {name} must fit in int64 (the hash uses its low 32 bits), got {v}")
    if isinstance(sample_offset, int) and not 0 <= sample_offset < 1 << 62:
        raise ValueError(f"random_masking: sample_offset must be >= 0, got {sample_offset}")
    if pos_embed is not None:
        if not isinstance(pos_embed, torch.Tensor) or tuple(pos_embed.shape) not in ((1, L, D), (L, D)):
            shape = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
            raise ValueError(f"random_masking: pos_embed must be [1, L, D] or [L, D] = [1, {L}, {D}] for x of "
                             f"shape {tuple(x.shape)}, got {shape}")
        if not pos_embed.is_floating_point():
            raise ValueError(f"random_masking: pos_embed must be floating point, got {pos_embed.dtype}")
        if pos_embed.device != x.device:
            raise ValueError(f"random_masking: pos_embed is on {pos_embed.device}, x on {x.device}")
        if not pos_embed.is_contiguous():
            raise ValueError("random_masking: pos_embed must be contiguous (call .contiguous())")


def random_masking(x: torch.Tensor, mask_ratio, seed: int, step: int, pos_embed: torch.Tensor | None = None,
                   sample_offset: int = 0, backend: str | None = None) -> MaskingResult:
    """MAE random masking (see `random_masking_ref`, the spec), on the best backend for x.

    x: [B, L, D] contiguous float tokens; mask_ratio: float in [0, 1) or a floating tensor [B] (ragged:
    `visible` packed [T, D], `ids_keep` packed [T]); seed, step, sample_offset: ints keying the hash;
    pos_embed: [1, L, D] or [L, D], cast to x's dtype and added to the visible tokens. Differentiable in x and
    pos_embed. Returns `MaskingResult(visible, mask, ids_restore, ids_keep, cu_seqlens)`.
    """
    _validate(x, mask_ratio, seed, step, pos_embed, sample_offset)
    L, D = x.shape[1], x.shape[2]
    pos = pos_embed.reshape(L, D).to(x.dtype) if pos_embed is not None else None
    ratios = mask_ratio if isinstance(mask_ratio, torch.Tensor) else None
    ratio = 0.0 if ratios is not None else float(mask_ratio)
    out = torch.ops.dermfast.random_masking(x, pos, ratio, ratios, seed, step, sample_offset, x.dtype, backend)
    return MaskingResult(*out)


def random_masking_indices(batch: int, length: int, mask_ratio, seed: int, step: int, sample_offset: int = 0,
                           device=None, mask_dtype: torch.dtype = torch.float32,
                           backend: str | None = None) -> MaskingResult:
    """The keep-set alone (what a masked patch embedding needs before any token exists).

    Same keys and fields as `random_masking`; `visible` is an empty [B, K, 0] (or [T, 0]) tensor.
    """
    x = torch.empty(batch, length, 0, device=device, dtype=mask_dtype)
    return random_masking(x, mask_ratio, seed, step, sample_offset=sample_offset, backend=backend)
