"""`patch_transformers(model)`: dermfast's ops inside Hugging Face ViTMAE (masking, attention, loss) and the
self-attention of HF ViT / DeiT / Dinov2.

Like `patch_timm`, it swaps the class of existing modules in place (`module.__class__ = Subclass`): parameters,
buffers, state_dict keys, hooks and optimiser references stay as they were, HF checkpoints load unchanged.

What changes (transformers' modeling_vit_mae.py is the peer each piece reproduces):
- `ViTMAEEmbeddings.random_masking(sequence, noise=None)`:
    * with `noise` [B, L] (what HF's own tests pass): HF's meaning exactly, ids_shuffle = argsort(noise), the
      first int(L * (1 - mask_ratio)) kept, so outputs and gradients equal the unpatched model's;
    * without `noise` (HF draws torch.rand): dermfast's `random_masking` op, keyed by the counter-based hash of
      (seed, step, sample, patch) instead of the device RNG. The key is held on the embeddings module:
      `masking_seed` (patch_transformers' `seed`, default 0), `masking_step` (starts at 0 and advances by one at
      every call without noise; set it, e.g. to the optimiser step, for an exact resume: it is not in the
      state_dict) and `masking_sample_offset` (0; set rank * per-rank batch under DDP, or every rank masks
      alike). It keeps max(1, int(L * (1 - mask_ratio))) patches, HF keeps int(...) (the same unless that is 0).
- `ViTMAEAttention.forward` (and ViTAttention, DeiTAttention, Dinov2Attention: the same forward in HF):
  `masked_attention` (dense) instead of HF's attention interface. HF's forward runs
  unchanged when an attention_mask is given, when attention weights are asked for (output_attentions), and
  while training with attention_probs_dropout_prob > 0 (the report says so). The fused path returns no
  attention weights (None), as HF's sdpa path does.
- `ViTMAEForPreTraining.forward`: the loss is dermfast's `mae_loss` (norm_pix_loss from the config, eps 1e-6 as
  HF). One difference: a batch that removes no patch gives loss 0, where HF's (loss * mask).sum() / mask.sum()
  gives NaN.

Other attention classes are left and listed in the report (a name heuristic, dermfast.models.patch).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.models.deit import modeling_deit as hf_deit
from transformers.models.dinov2 import modeling_dinov2 as hf_dinov2
from transformers.models.vit import modeling_vit as hf_vit
from transformers.models.vit_mae import modeling_vit_mae as hf

from dermfast.models.patch import PatchReport, attention_like, autocast_qkv, qualname, set_report
from dermfast.ops.mae_loss_op import mae_loss
from dermfast.ops.masked_attention_op import masked_attention
from dermfast.ops.random_masking_op import random_masking


class MaskedViTMAEEmbeddings(hf.ViTMAEEmbeddings):
    """HF ViTMAEEmbeddings whose random_masking is dermfast's op when no noise is given (module docstring)."""

    masking_seed: int = 0
    masking_step: int = 0
    masking_sample_offset: int = 0
    backend: Optional[str] = None

    def random_masking(self, sequence: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """sequence: [B, L, D] -> (visible [B, K, D], mask [B, L] (0 keep, 1 remove; the default float dtype,
        as HF's torch.ones), ids_restore [B, L] int64)."""
        B, L, D = sequence.shape
        if noise is not None:  # transformers modeling_vit_mae.py ViTMAEEmbeddings.random_masking, transcribed
            len_keep = int(L * (1 - self.config.mask_ratio))
            ids_shuffle = torch.argsort(noise, dim=1).to(sequence.device)
            ids_restore = torch.argsort(ids_shuffle, dim=1).to(sequence.device)
            ids_keep = ids_shuffle[:, :len_keep]
            visible = torch.gather(sequence, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
            mask = torch.ones([B, L], device=sequence.device)
            mask[:, :len_keep] = 0
            return visible, torch.gather(mask, dim=1, index=ids_restore), ids_restore
        return self._hash_masking(sequence)

    @torch.compiler.disable
    def _hash_masking(self, sequence: torch.Tensor):
        # Outside torch.compile's graph (one graph break): masking_step is a Python int that changes every call,
        # and dynamo would specialise on it and recompile at every step.
        step = self.masking_step
        self.masking_step = step + 1
        out = random_masking(sequence.contiguous(), float(self.config.mask_ratio), int(self.masking_seed), step,
                             sample_offset=int(self.masking_sample_offset), backend=self.backend)
        return out.visible, out.mask.to(torch.get_default_dtype()), out.ids_restore


class _MaskedHFAttention:
    """The forward of HF ViT / DeiT / Dinov2 / ViTMAE attention (identical in the four modeling files) with
    dermfast's `masked_attention` (dense) as its core; HF's forward for what it cannot do."""

    backend: Optional[str] = None

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        want_weights = kwargs.get("output_attentions") or getattr(self.config, "output_attentions", False)
        dropout = self.training and self.attention_dropout > 0
        if attention_mask is not None or want_weights or dropout:
            return super().forward(hidden_states, attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, N, Dh]
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        q, k, v = autocast_qkv(hidden_states, q, k, v)
        o = masked_attention(q, k, v, scale=self.scaling, backend=self.backend)
        o = o.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(o), None


class MaskedViTMAEAttention(_MaskedHFAttention, hf.ViTMAEAttention):
    """HF ViTMAEAttention computed by dermfast's `masked_attention`."""


class MaskedViTAttention(_MaskedHFAttention, hf_vit.ViTAttention):
    """HF ViTAttention computed by dermfast's `masked_attention`."""


class MaskedDeiTAttention(_MaskedHFAttention, hf_deit.DeiTAttention):
    """HF DeiTAttention computed by dermfast's `masked_attention`."""


class MaskedDinov2Attention(_MaskedHFAttention, hf_dinov2.Dinov2Attention):
    """HF Dinov2Attention computed by dermfast's `masked_attention`."""


class MaskedViTMAEForPreTraining(hf.ViTMAEForPreTraining):
    """HF ViTMAEForPreTraining whose reconstruction loss is dermfast's `mae_loss`."""

    backend: Optional[str] = None

    def forward(self, pixel_values: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                interpolate_pos_encoding: Optional[bool] = None, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> hf.ViTMAEForPreTrainingOutput:
        outputs = self.vit(pixel_values, noise=noise, interpolate_pos_encoding=interpolate_pos_encoding,
                           attention_mask=attention_mask, **kwargs)
        mask, ids_restore = outputs.mask, outputs.ids_restore
        logits = self.decoder(outputs.last_hidden_state, ids_restore,
                              interpolate_pos_encoding=interpolate_pos_encoding).logits
        patch = self.config.patch_size  # HF patchify's checks (without its patchified copy)
        if not interpolate_pos_encoding and (pixel_values.shape[2] != pixel_values.shape[3]
                                             or pixel_values.shape[2] % patch != 0):
            raise ValueError("Make sure the pixel values have a squared size that is divisible by the patch size")
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError("Make sure the number of channels of the pixel values is equal to the one set in the "
                             "configuration")
        loss = mae_loss(pixel_values, logits, mask, patch, norm_pix=bool(self.config.norm_pix_loss),
                        eps=1.0e-6, backend=self.backend)
        return hf.ViTMAEForPreTrainingOutput(loss=loss, logits=logits, mask=mask, ids_restore=ids_restore,
                                             hidden_states=outputs.hidden_states, attentions=outputs.attentions)


SWAPS = {hf.ViTMAEEmbeddings: MaskedViTMAEEmbeddings, hf.ViTMAEAttention: MaskedViTMAEAttention,
         hf.ViTMAEForPreTraining: MaskedViTMAEForPreTraining, hf_vit.ViTAttention: MaskedViTAttention,
         hf_deit.DeiTAttention: MaskedDeiTAttention, hf_dinov2.Dinov2Attention: MaskedDinov2Attention}
_WHAT = {MaskedViTMAEEmbeddings: "random_masking: dermfast op without noise, HF's argsort(noise) with it",
         MaskedViTMAEForPreTraining: "loss: mae_loss"}


def patch_transformers(model: torch.nn.Module, backend: Optional[str] = None, seed: int = 0) -> torch.nn.Module:
    """Swap HF ViTMAE's embeddings (random masking), self-attention and pretraining loss, and the self-attention
    of HF ViT / DeiT / Dinov2, for dermfast's, in place; returns `model`. `backend` is stored on each swapped
    module (None = automatic); `seed` keys the masking hash when no noise is passed (see the module docstring).
    Leaves a report on the model (`dermfast.patch_report(model)`). Raises ValueError if the model holds nothing
    to swap.
    """
    report = PatchReport("transformers")
    swapped = tuple(SWAPS.values())
    for name, module in model.named_modules():
        old = type(module)
        if old in SWAPS:
            module.__class__ = SWAPS[old]
        new = type(module)
        if new in swapped:
            module.backend = backend
            notes = [_WHAT.get(new, "self-attention: masked_attention (dense)")]
            notes += ["already swapped"] if old is new else []
            if new is MaskedViTMAEEmbeddings:
                module.masking_seed = int(seed)
            if isinstance(module, _MaskedHFAttention) and module.attention_dropout > 0:
                notes.append(f"attention dropout p={module.attention_dropout:g}: HF's own forward while training")
            report.swapped.append((name, old.__name__, new.__name__, "; ".join(notes)))
        elif attention_like(module) and not any(isinstance(module, s) for s in swapped):
            report.left.append((name, qualname(module), "not a ViT / DeiT / Dinov2 / ViTMAE attention"))
    if not report.swapped:
        raise ValueError(f"patch_transformers: {type(model).__name__} holds no ViTMAE embeddings or pretraining "
                         f"head, nor ViT / DeiT / Dinov2 / ViTMAE attention to swap")
    set_report(model, report)
    return model
