"""Rotary attention on packed / ragged tokens: each token rotated by its own position.

timm's EvaAttention / AttentionRope rotate the tokens after the `num_prefix_tokens` prefix by the rows of a rope
tensor built for the whole patch grid (`[N, 2 Dh]`, RotaryEmbeddingCat; `[H, N, 2 Dh]` per head, mixed rope),
row i for token i. With MAE masking the tokens that remain are a per-sample subset of the grid: visible token j of
image b sits at grid position ids_keep[b, j], not at j, and with per-sample keep counts the batch is packed
([T, C] with cu_seqlens). Here every token carries its own grid position:

    positions: int [T] (packed) -- the grid index of each token's rope row, or -1 for a prefix token (cls /
    registers), which timm never rotates.

`rope_rows(rope, positions)` gathers one rope row per token (the identity rotation, sin 0 / cos 1, for prefix
tokens: x cos + rot(x) sin = x exactly), and `rope_attention_packed(attn, x, rope, positions, cu_seqlens)` runs a
timm rotary attention module on packed tokens: its own projection and q / k norm, the rotation by timm's
`apply_rot_embed_cat` with the gathered rows, grouped k / v heads expanded as timm does, and dermfast's packed
`masked_attention`, so each image attends to its own tokens only. The per-sample, unpacked computation (timm's
forward on image b's tokens with rope[ids_keep[b]]) is the spec (tests/test_patch_rope.py).

This module imports timm; `import dermfast` does not.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat

from dermfast.models.patch import autocast_qkv
from dermfast.ops.masked_attention_op import masked_attention


def rope_rows(rope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One rope row per token.

    rope: [N, 2 Dh] (one rotation for all heads) or [H, N, 2 Dh] (per head), sin then cos halves, as timm's
        rotary embeddings give it for the full grid. positions: int [T], each in [-1, N) (-1: prefix token).
    Returns [T, 1, 2 Dh] or [T, H, 2 Dh] (rows broadcast over heads of packed q / k [T, H, Dh]); prefix tokens get
    sin 0, cos 1.
    """
    if rope.dim() not in (2, 3) or rope.shape[-1] % 2:
        raise ValueError(f"rope_rows: rope must be [N, 2 Dh] or [H, N, 2 Dh], got {tuple(rope.shape)}")
    if positions.dim() != 1 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rope_rows: positions must be a 1-D int tensor, got {positions.dtype} of shape "
                         f"{tuple(positions.shape)}")
    N, half = rope.shape[-2], rope.shape[-1] // 2
    if not torch.compiler.is_compiling() and positions.numel():
        lo, hi = int(positions.min()), int(positions.max())  # one host read, outside compiled graphs
        if lo < -1 or hi >= N:
            raise ValueError(f"rope_rows: positions must lie in [-1, {N}) (-1: prefix token), got [{lo}, {hi}]")
    identity = torch.cat([rope.new_zeros(*rope.shape[:-2], 1, half), rope.new_ones(*rope.shape[:-2], 1, half)], -1)
    table = torch.cat([rope, identity], dim=-2)  # row N: the identity rotation
    idx = torch.where(positions < 0, N, positions).long()
    rows = table.index_select(-2, idx)  # [T, 2 Dh] or [H, T, 2 Dh]
    return rows[:, None, :] if rows.dim() == 2 else rows.transpose(0, 1)


def rope_attention_packed(attn: torch.nn.Module, x: torch.Tensor, rope: Optional[torch.Tensor],
                          positions: Optional[torch.Tensor], cu_seqlens: torch.Tensor,
                          max_seqlen: Optional[int] = None, host_index: Optional[Sequence[int]] = None,
                          backend: Optional[str] = None) -> torch.Tensor:
    """A dermfast MaskedEvaAttention / MaskedAttentionRope (timm's classes after `patch_timm`) on packed tokens.

    x: [T, C] or [1, T, C], the tokens of B images one after another (segment b = cu_seqlens[b]:cu_seqlens[b+1]).
    rope: the grid's rope ([N, 2 Dh] or [H, N, 2 Dh], see `rope_rows`), or None (no rotation).
    positions: int [T], each token's grid index (-1 for prefix tokens); required with rope.
    cu_seqlens, max_seqlen, host_index, backend: as `dermfast.ops.masked_attention`.
    Returns x's shape. Attention dropout is not applied: call it in eval mode or with attn_drop.p == 0.
    """
    if attn.training and attn.attn_drop.p > 0:
        raise ValueError("rope_attention_packed: attention dropout cannot be combined with packed tokens")
    if x.dim() == 3 and x.shape[0] != 1:
        raise ValueError(f"rope_attention_packed: packed x must be [T, C] or [1, T, C], got {tuple(x.shape)}")
    tokens = x.reshape(1, -1, x.shape[-1])  # [1, T, C]: timm's projection code runs unchanged
    T = tokens.shape[1]
    if rope is not None and (positions is None or positions.shape != (T,)):
        raise ValueError(f"rope_attention_packed: with rope, positions must be an int tensor of shape [{T}], got "
                         f"{None if positions is None else tuple(positions.shape)}")
    gate = attn.gate(tokens).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn._project(tokens)  # [1, H (kv heads for k, v), T, Dh]
    q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # [T, H, Dh]
    if rope is not None:
        rows, half = rope_rows(rope, positions), getattr(attn, "rotate_half", False)
        if rows.shape[1] not in (1, k.shape[1]):
            raise ValueError(f"rope_attention_packed: a per-head rope of {rows.shape[1]} heads cannot rotate "
                             f"{k.shape[1]} key heads")
        q = apply_rot_embed_cat(q, rows, half=half).type_as(v)  # the .type_as(v) of timm's forward
        k = apply_rot_embed_cat(k, rows, half=half).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    q, k, v = autocast_qkv(x, q, k, v)
    o = masked_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=attn.scale,
                         backend=backend, host_index=host_index)
    o = attn.norm(o.reshape(1, T, attn.num_heads * attn.head_dim))
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o)).reshape(x.shape[:-1] + (-1,))
