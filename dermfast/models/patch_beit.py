"""MaskedBeitAttention: timm's BEiT / BEiT v2 attention (`timm.models.beit.Attention`, relative position bias)
computed by dermfast's `attention_bias` op, for `patch_timm`.

The same parameters, buffers and state_dict keys as timm's class (qkv, q_bias / k_bias / v_bias,
relative_position_bias_table, relative_position_index, proj), so `patch_timm` swaps the class of an existing
module in place. The forward is timm's (timm/models/beit.py, Attention.forward) with its attention core
replaced:

- the bias is timm's: the module's own relative position bias (`_get_rel_pos_bias()`, [1, H, N, N]) plus the
  model's shared one (`shared_rel_pos_bias` [H, N, N], BEiT's use_shared_rel_pos_bias), or either alone;
- with a bias: `dermfast.ops.attention_bias` (FlexAttention score_mod on a GPU, SDPA with a float attn_mask
  otherwise; the gradient reaches relative_position_bias_table through timm's gather);
- without any (use_rel_pos_bias=False and no shared bias): `masked_attention` (dense), as `MaskedAttention`;
- attention dropout while training (attn_drop.p > 0): timm's own forward, unchanged (patch_timm's report says so).

This module imports timm; `import dermfast` does not.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.models.beit import Attention as BeitAttention

from dermfast.models.patch import autocast_qkv, biased_qkv
from dermfast.ops.attention_bias_op import attention_bias
from dermfast.ops.masked_attention_op import masked_attention


class MaskedBeitAttention(BeitAttention):
    """timm `timm.models.beit.Attention` (beit_*, beitv2_*) computed by `attention_bias` / `masked_attention`.

    `backend` (class default None = automatic) may be set per instance; it is handed to whichever op runs.
    """

    backend: Optional[str] = None

    def describe(self) -> str:
        """What the fused path computes, one phrase for patch_timm's report."""
        if self.relative_position_bias_table is not None:
            return "relative position bias: attention_bias"
        return "no own relative position bias: masked_attention, or attention_bias with a shared bias"

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.training and self.attn_drop.p > 0:
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        B, N, _ = x.shape
        qkv = biased_qkv(self, x)  # timm/models/beit.py Attention.forward, transcribed
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh]
        bias = None
        if self.relative_position_bias_table is not None:
            bias = self._get_rel_pos_bias()  # [1, H, N, N]
            if shared_rel_pos_bias is not None:
                bias = bias + shared_rel_pos_bias
        elif shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias  # [H, N, N]
        q, k, v = autocast_qkv(x, q, k, v)
        if bias is None:
            o = masked_attention(q, k, v, scale=self.scale, backend=self.backend)
        else:
            o = attention_bias(q, k, v, bias, scale=self.scale, backend=self.backend)
        o = o.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(o))
