"""MaskedAttention: timm's `Attention` with dermfast's masked-patch attention as its core, its rotary siblings
(MaskedEvaAttention, MaskedAttentionRope: timm's EvaAttention / AttentionRope, dense tokens only), and `patch_timm`
(which also swaps BEiT's relative-position-bias attention for `dermfast.models.patch_beit.MaskedBeitAttention`).

Why a subclass: same parameters, buffers and state_dict keys as `timm.layers.Attention` (qkv, q_norm, k_norm,
norm, proj, ...), so pretrained timm checkpoints load unchanged and `patch_timm(model)` can swap the class of
an existing module in place (`module.__class__ = MaskedAttention`: nothing is copied or re-created, hooks and
optimiser references stay valid). Only the attention core differs: `dermfast.ops.masked_attention`, which also
takes ragged input:

    attn(x)                                  x [B, N, C] dense (what timm's Block passes): same result as timm
    attn(x, lengths=lengths)                 x [B, N, C] padded; rows >= lengths[b] attend nowhere (their
                                             attention output is 0, so the module returns proj.bias there)
    attn(x, cu_seqlens=cu, max_seqlen=m)     x [T, C] or [1, T, C] packed visible tokens of B images
    attn(x, attn_mask=RaggedLayout(...))     either ragged form, handed over as one object (what a Block passes)

What the op does not do is delegated to timm's own forward, unchanged: an arbitrary `attn_mask` tensor,
`is_causal`, and attention-weight dropout while training (attn_drop.p > 0). Combining those with lengths /
cu_seqlens is an error, never a silent change of semantics.

Ragged input through whole blocks: timm's `Block.forward(x, attn_mask)` hands `attn_mask` to its attention
unchanged, so a `RaggedLayout` passed as `block(x, attn_mask=layout)` reaches the MaskedAttention inside while
the block is called through its module: whatever wraps the block runs (activation checkpointing's
`checkpoint_wrapper`, which recomputes the call with the same arguments in backward; FSDP2's per-block
all-gather hooks; forward hooks). `block_forward(block, x, cu_seqlens=...)` does exactly that and checks that
the layout arrived. Calling `block.norm1`, `block.attn`, ... one by one instead would skip every wrapper
silently.

This module imports timm; `import dermfast` does not (dermfast.patch_timm / dermfast.models.MaskedAttention
are resolved lazily).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from timm.layers import Attention, AttentionRope
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from torch import nn

from dermfast.models.patch import (PatchReport, attention_like, autocast_qkv, biased_qkv, qualname,
                                   set_report)
from dermfast.models.patch_beit import MaskedBeitAttention
from dermfast.ops.masked_attention_op import masked_attention


@dataclass(eq=False)
class RaggedLayout:
    """How a ragged batch is laid out, handed to `MaskedAttention` (directly or through a Block) as `attn_mask`.

    cu_seqlens: int32 [B+1] on the tokens' device (packed x [T, C]); or lengths: int [B] (padded x [B, N, C]).
    max_seqlen: the longest segment (packed; spares the torch backend a device read).
    host: the values of cu_seqlens (or lengths) as a tuple of host ints: validation reads these instead of the
        device tensor, so a step makes no host sync (`masked_attention(host_index=...)`).
    positions: int [T] (packed only, optional): each token's index in the model's patch grid, -1 for prefix
        tokens (class / register tokens). Rotary attention (EVA-02, RoPE ViTs after `patch_timm`) needs it: each
        token is rotated by its own position (e.g. MAE's visible patches), never by its place in the packed row.
    uses: how many attention calls consumed this layout (`block_forward` checks it moved).

    Build it from host counts with `RaggedLayout.packed(seqlens, device)` / `RaggedLayout.padded(lengths, device)`.
    """

    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: Optional[int] = None
    lengths: Optional[torch.Tensor] = None
    host: Optional[tuple[int, ...]] = None
    positions: Optional[torch.Tensor] = None
    uses: int = field(default=0, repr=False)

    def __post_init__(self):
        if (self.cu_seqlens is None) == (self.lengths is None):
            raise ValueError("RaggedLayout: give cu_seqlens (packed tokens) or lengths (padded), exactly one")

    @classmethod
    def packed(cls, seqlens: Sequence[int], device) -> "RaggedLayout":
        """Packed layout of segments of `seqlens` host ints: cu_seqlens int32 [B+1] copied to `device` (a
        host-to-device copy, nothing read back), max_seqlen and host values from the ints."""
        cu = [0]
        for n in seqlens:
            cu.append(cu[-1] + int(n))
        t = torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True)
        return cls(cu_seqlens=t, max_seqlen=max(seqlens, default=0), host=tuple(cu))

    @classmethod
    def padded(cls, lengths: Sequence[int], device) -> "RaggedLayout":
        """Padded layout: lengths int32 [B] copied to `device`, host values from the ints."""
        host = tuple(int(n) for n in lengths)
        return cls(lengths=torch.tensor(host, dtype=torch.int32).to(device, non_blocking=True), host=host)


class MaskedAttention(Attention):
    """timm `Attention` computed by `dermfast.ops.masked_attention` (dense, padded with lengths, or packed).

    `backend` (class default None = automatic) may be set per instance ("triton", "torch").
    """

    backend: Optional[str] = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, *,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        host = None
        if isinstance(attn_mask, RaggedLayout):
            if cu_seqlens is not None or lengths is not None or max_seqlen is not None:
                raise ValueError("MaskedAttention: pass a RaggedLayout or cu_seqlens / max_seqlen / lengths, "
                                 "not both")
            layout, attn_mask = attn_mask, None
            layout.uses += 1
            cu_seqlens, max_seqlen, lengths, host = (layout.cu_seqlens, layout.max_seqlen, layout.lengths,
                                                     layout.host)
        ragged = cu_seqlens is not None or lengths is not None
        dropout = self.training and self.attn_drop.p > 0
        if attn_mask is not None or is_causal or dropout:
            if ragged:
                why = "attn_mask" if attn_mask is not None else "is_causal" if is_causal else "attention dropout"
                raise ValueError(f"MaskedAttention: {why} cannot be combined with cu_seqlens / lengths")
            if attn_mask is None and not is_causal:
                return super().forward(x)
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

        H, Dh = self.num_heads, self.head_dim
        attn_dim = getattr(self, "attn_dim", H * Dh)  # older timm: no attn_dim attribute
        gate_layer = getattr(self, "gate", None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        if cu_seqlens is not None:
            if x.dim() == 3 and x.shape[0] != 1:
                raise ValueError(f"MaskedAttention: packed x must be [T, C] or [1, T, C], got {tuple(x.shape)}")
            tokens = x.reshape(-1, x.shape[-1])
            T = tokens.shape[0]
            q, k, v = self.qkv(tokens).reshape(T, 3, H, Dh).unbind(1)  # [T, H, Dh] strided views
            q, k, v = autocast_qkv(x, self.q_norm(q), self.k_norm(k), v)
            o = masked_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=self.scale,
                                 backend=self.backend, host_index=host)
            o = o.reshape(*x.shape[:-1], attn_dim)
        else:
            B, N, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh]
            q, k, v = autocast_qkv(x, self.q_norm(q), self.k_norm(k), v)
            o = masked_attention(q, k, v, lengths=lengths, scale=self.scale, backend=self.backend,
                                 host_index=host)
            o = o.transpose(1, 2).reshape(B, N, attn_dim)
        norm = getattr(self, "norm", None)
        if norm is not None:
            o = norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))


class _RopeMasked:
    """The forward shared by MaskedEvaAttention and MaskedAttentionRope: timm's own projection, q / k norm and
    rotary embedding (timm's `apply_rot_embed_cat`, on the tokens after the `num_prefix_tokens` prefix, cast back
    with `.type_as(v)` exactly as timm's forward does), grouped k / v heads expanded by `repeat_interleave` as
    timm does, then `masked_attention` (dense) instead of SDPA. attn_mask, is_causal and attention dropout while
    training go to timm's forward unchanged. Packed tokens (a RaggedLayout with cu_seqlens) need the layout's
    `positions`: each token is rotated by its own grid position (dermfast.models.patch_rope); padded layouts are
    refused (pack them)."""

    backend: Optional[str] = None

    def _project(self, x: torch.Tensor):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if isinstance(attn_mask, RaggedLayout):
            if attn_mask.cu_seqlens is None:
                raise ValueError(f"{type(self).__name__}: rotary attention takes packed tokens (RaggedLayout with "
                                 "cu_seqlens and positions), not a padded layout")
            if rope is not None and attn_mask.positions is None:
                raise ValueError(f"{type(self).__name__}: packed tokens with rope need RaggedLayout.positions (each "
                                 "token's grid index, -1 for prefix tokens)")
            from dermfast.models.patch_rope import rope_attention_packed
            attn_mask.uses += 1
            out = rope_attention_packed(self, x, rope, attn_mask.positions, attn_mask.cu_seqlens,
                                        attn_mask.max_seqlen, attn_mask.host, self.backend)
            return out.reshape(x.shape)
        if attn_mask is not None or is_causal or (self.training and self.attn_drop.p > 0):
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self._project(x)  # [B, H (kv heads for k, v), N, Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        q, k, v = autocast_qkv(x, q, k, v)
        o = masked_attention(q, k, v, scale=self.scale, backend=self.backend)
        o = self.norm(o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))


class MaskedEvaAttention(_RopeMasked, EvaAttention):
    """timm `EvaAttention` (eva02_*, vit_*_rope_* with attn_type 'eva') computed by `masked_attention`."""

    def _project(self, x):
        B, N, _ = x.shape
        if self.qkv is not None:  # timm/models/eva.py EvaAttention.forward, transcribed
            qkv = biased_qkv(self, x)
            return qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return tuple(p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                     for p in (self.q_proj, self.k_proj, self.v_proj))


class MaskedAttentionRope(_RopeMasked, AttentionRope):
    """timm `AttentionRope` (vit_*_rope_* with attn_type 'rope', dinov3, deepseek_vit) computed by
    `masked_attention`; grouped-query k / v heads are expanded as timm does."""

    def _project(self, x):
        B, N, _ = x.shape
        if self.qkv is not None:  # timm/layers/attention.py AttentionRope.forward, transcribed
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            return qkv.unbind(0)
        q = self.q_proj(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v


# timm class -> its dermfast swap (exact class match: a subclass may have its own forward)
SWAPS = {Attention: MaskedAttention, EvaAttention: MaskedEvaAttention, AttentionRope: MaskedAttentionRope,
         BeitAttention: MaskedBeitAttention}


def _why_left(module: nn.Module) -> str:
    if getattr(module, "relative_position_bias_table", None) is not None:
        return "relative position bias in a class dermfast does not swap (only timm.models.beit.Attention)"
    for base in SWAPS:
        if isinstance(module, base):
            return f"subclass of timm {base.__name__} with its own forward (only the exact class is swapped)"
    return "not a timm Attention / EvaAttention / AttentionRope / beit.Attention"


def patch_timm(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Swap every timm `Attention`, `EvaAttention`, `AttentionRope` and BEiT `timm.models.beit.Attention` in
    `model` for its dermfast subclass (`MaskedAttention`, `MaskedEvaAttention`, `MaskedAttentionRope`,
    `MaskedBeitAttention`: relative position bias through `dermfast.ops.attention_bias`), in place; returns
    `model`.

    Only modules whose class is exactly one of those four are swapped (subclasses with their own forward are
    left alone; modules already swapped are kept). Weights, state_dict keys, hooks and parameter identity are
    unchanged. `backend` is stored on each module (None = automatic). Leaves a report on the model
    (`dermfast.patch_report(model)`): each module swapped, and each attention-like module left with the reason
    (e.g. a relative-position-bias attention of another class). Raises ValueError if the model holds nothing
    to swap.
    """
    report = PatchReport("timm")
    swapped_classes = tuple(SWAPS.values())
    for name, module in model.named_modules():
        old = type(module)
        if old in SWAPS:
            module.__class__ = SWAPS[old]
        if type(module) in swapped_classes:
            notes = [module.describe()] if hasattr(module, "describe") else []
            note = ", ".join(notes + (["already swapped"] if old is type(module) else []))
            if backend is not None:
                module.backend = backend
            drop = module.attn_drop.p
            if drop > 0:
                why = f"attention dropout p={drop:g}: timm's own forward while training"
                note = f"{note}, {why}" if note else why
            report.swapped.append((name, old.__name__, type(module).__name__, note))
        elif attention_like(module):
            report.left.append((name, qualname(module), _why_left(module)))
    if not report.swapped:
        left = "".join(f"; left {n or '<model>'}: {why}" for n, _, why in report.left[:3])
        raise ValueError(f"patch_timm: {type(model).__name__} holds no timm.layers.Attention, EvaAttention, "
                         f"AttentionRope or beit.Attention module to swap{left}")
    set_report(model, report)
    return model


def block_forward(block: nn.Module, x: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
                  max_seqlen: Optional[int] = None, lengths: Optional[torch.Tensor] = None,
                  layout: Optional[RaggedLayout] = None) -> torch.Tensor:
    """Run a timm ViT `Block` whose attn is a MaskedAttention on ragged input: packed x [T, C] with cu_seqlens,
    or padded x [B, N, C] with lengths (or a prepared `layout`, which also carries the host values).

    The block is called through its module, `block(x, attn_mask=layout)`, so checkpoint wrappers, FSDP2 hooks
    and forward hooks run; timm's Block.forward hands attn_mask to its attention, and everything else in a
    Block works per token, so packed tokens go through it unchanged. Raises ValueError if the block's
    attention is not a MaskedAttention, or if the block's forward did not hand the layout to it.
    """
    if not isinstance(getattr(block, "attn", None), MaskedAttention):
        raise ValueError("block_forward: block.attn is not a MaskedAttention (call dermfast.patch_timm first)")
    if layout is None:
        layout = RaggedLayout(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, lengths=lengths)
    elif cu_seqlens is not None or max_seqlen is not None or lengths is not None:
        raise ValueError("block_forward: pass layout or cu_seqlens / max_seqlen / lengths, not both")
    before = layout.uses
    out = block(x, attn_mask=layout)
    if layout.uses == before:
        raise ValueError(f"block_forward: {type(block).__name__}.forward did not hand attn_mask to its "
                         f"attention, so the ragged layout never reached it")
    return out
