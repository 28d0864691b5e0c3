"""TEDMAE: a masked autoencoder whose encoder is also distilled from an EMA copy of itself, with Exterior
Conversion (EC, `exterior_conversion.py`) and Dynamic Feature fusion (DF). The paper gives an abstract only; this
file is what dermfast built, and why.

Student: the usual `MaskedAutoencoderViT` (masked input, pixel reconstruction with `mae_loss`), plus a linear
regression head `distill_head` on its visible tokens (data2vec's `final_proj`: the encoder output feeds the
decoder too, so the distillation target is predicted through a head, not imposed on the encoder's output).

Teacher: an EMA of the student encoder (patch embedding, cls token, blocks, norm) that sees the whole image, all L
tokens, under no_grad. It is held OUTSIDE the module tree (not a registered submodule): its tensors are not in
`state_dict()` (a TEDMAE checkpoint has exactly the MAE keys plus `distill_head.*`), not in `parameters()` (no
optimiser state, no DDP bucket, no FSDP shard), and it is moved with the model by `_apply`. The stage saves it
through its checkpoint `extra_state` and updates it after each applied optimiser step (`ema_update_`, outside
autograd and outside the compiled graph) with the BYOL / DINO cosine momentum schedule (`ema_momentum`).

Target (per token, at the student's visible positions, `distill_target`):
- DF off: LN(h_last), the teacher's last block output, layer-normed (no affine).
- DF on: z_l = LN(h_l) for the top `df_layers` blocks; q = mean_l z_l (the consensus, data2vec's target);
  w = softmax_l(<z_l, q> / (D tau)); target = LN(sum_l w_l z_l). <z_l, q> / D is a cosine-like agreement in
  [-1, 1] (|z_l|^2 = D), so a layer that disagrees with the others at this token, in this image, counts less:
  input-dependent, attention-weighted over layers; tau -> infinity is data2vec's uniform mean of the layer-normed
  top-K layers. The weights are computed from the teacher's own features under no_grad and have no parameters:
  nothing the distillation loss can move, so the loss cannot make the target trivially matchable (a learnt fusion
  trained by the same loss can, e.g. by putting all weight on the layer the student already matches, or on the
  shallowest one). The teacher is "learnt" only through the EMA of the student.
Loss: smooth-L1 (beta 1) between the head's output and the target, mean over visible tokens and channels
(data2vec's regression loss on layer-normed targets; smooth-L1 is robust to the few large-magnitude channels of
ViT features, where MSE on layer-normed vectors equals 2 D (1 - cos) and over-weights them).
total = mae_loss + distill_weight * distill_loss.

Cost: one extra encoder forward on all L tokens (no backward): at mask ratio 0.75 the student encoder runs on L/4
tokens forward + backward (about 3 x L/4 token-passes), the teacher on L forward, so the encoder's compute roughly
doubles (see the README for ViT-B numbers).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dermfast.models.exterior_conversion import exterior_conversion
from dermfast.models.mae import MAEPreset, MaskedAutoencoderViT
from dermfast.ops import mae_loss

ENCODER_PREFIXES = ("patch_embed.", "cls_token", "blocks.", "norm.")  # what the teacher copies (same key names)


@dataclass(frozen=True)
class TEDMAEOptions:
    distill_weight: float = 1.0  # total = mae_loss + distill_weight * distill_loss
    df: bool = True              # Dynamic Feature fusion of the top df_layers teacher blocks; off: the last block
    df_layers: int = 3           # how many of the teacher's last blocks DF fuses
    df_temperature: float = 0.1  # softmax temperature of DF's layer weights (large: uniform mean)
    smooth_l1_beta: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def ema_momentum(k: int, total: int, start: float, end: float = 1.0) -> float:
    """Momentum after step k of `total` (k = 0 for the first update): end - (end - start) (cos(pi k / K) + 1) / 2,
    BYOL's tau schedule (Grill et al. 2020, eq. in sec. 3.2, with end = 1) and DINO's `cosine_scheduler(m0, 1)`."""
    if total <= 0:
        return start
    k = min(max(k, 0), total)
    return end - (end - start) * (math.cos(math.pi * k / total) + 1) / 2


def distill_target(layers: list[torch.Tensor], df: bool, temperature: float) -> torch.Tensor:
    """layers: teacher block outputs [B, N, D], oldest first (the last is the last block). Returns the layer-normed
    target [B, N, D] float32 (module docstring: DF off = LN(last); DF on = LN of the attention-weighted fusion)."""
    D = layers[-1].shape[-1]
    if not df:
        return F.layer_norm(layers[-1].float(), (D,))
    z = torch.stack([F.layer_norm(h.float(), (D,)) for h in layers], dim=2)  # [B, N, S, D]
    q = z.mean(dim=2, keepdim=True)
    w = torch.softmax((z * q).sum(-1) / (D * temperature), dim=-1)  # [B, N, S]
    return F.layer_norm((w.unsqueeze(-1) * z).sum(2), (D,))


class TeacherEncoder(nn.Module):
    """The student encoder's copy: patch_embed, cls_token, blocks, norm (same names), no gradient, eval mode.
    forward(imgs [B, C, H, W], n) -> the last n block outputs, patch tokens only: n tensors [B, L, D]."""

    def __init__(self, student: MaskedAutoencoderViT):
        super().__init__()
        self.patch_embed = copy.deepcopy(student.patch_embed)
        self.cls_token = nn.Parameter(student.cls_token.detach().clone())
        self.register_buffer("pos_embed", student.pos_embed.detach().clone(), persistent=False)
        self.blocks = copy.deepcopy(student.blocks)
        self.norm = copy.deepcopy(student.norm)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TeacherEncoder":
        return super().train(False)  # always eval (no dropout / drop-path in the teacher)

    def forward(self, imgs: torch.Tensor, n: int) -> list[torch.Tensor]:
        x = self.patch_embed(imgs) + self.pos_embed.to(imgs.dtype)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        out = []
        first = len(self.blocks) - n
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= first:
                out.append(x[:, 1:])
        return out


class TEDMAE(MaskedAutoencoderViT):
    """MaskedAutoencoderViT + EMA teacher + distillation head. forward(imgs, seed, step, ..., student_ec=None,
    teacher_ec=None, return_parts=False) -> (loss, pred, mask) like the MAE, or with return_parts also
    {"rec_loss", "distill_loss"}. student_ec / teacher_ec: (weight [B, C, C, K, K], alpha [B]) from
    `ec_params` (tensors on the images' device), or None for the plain image. The student reconstructs the
    pixels it was given (its converted image), so the MAE task stays well posed; the invariance to the
    conversion comes from matching the teacher's features of the other view."""

    def __init__(self, cfg: MAEPreset, options: TEDMAEOptions = TEDMAEOptions(), block_layer=None):
        super().__init__(cfg, block_layer=block_layer, ragged=False)
        if options.df and not 1 <= options.df_layers <= cfg.depth:
            raise ValueError(f"df_layers must be in 1..{cfg.depth} (the encoder depth), got {options.df_layers}")
        if options.df_temperature <= 0 or options.distill_weight < 0 or options.smooth_l1_beta < 0:
            raise ValueError(f"bad TEDMAE options {options}: df_temperature > 0, distill_weight >= 0, beta >= 0")
        self.options = options
        self.distill_head = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        nn.init.xavier_uniform_(self.distill_head.weight)
        nn.init.zeros_(self.distill_head.bias)
        # not a registered submodule: see the module docstring
        object.__setattr__(self, "teacher", TeacherEncoder(self))

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher tensors, student tensors) paired by name: every teacher parameter."""
        student = dict(self.named_parameters())
        names = [n for n, _ in self.teacher.named_parameters()]
        missing = [n for n in names if n not in student]
        if missing:
            raise RuntimeError(f"teacher tensors with no student counterpart: {missing[:3]}")
        return [p for _, p in self.teacher.named_parameters()], [student[n] for n in names]

    @torch.no_grad()
    def ema_update_(self, momentum: float) -> None:
        """teacher <- m teacher + (1 - m) student, in place, one foreach launch (lerp with weight 1 - m)."""
        t, s = self.ema_pairs()
        torch._foreach_lerp_(t, [p.detach().to(q.dtype) for p, q in zip(s, t)], 1.0 - momentum)

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's tensors under the student encoder's key names (an MAE encoder checkpoint)."""
        return {k: v for k, v in self.teacher.state_dict().items()}

    def load_teacher_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.teacher.load_state_dict(sd, strict=True)

    def forward(self, imgs: torch.Tensor, seed: int = 0, step: int = 0, mask_ratio: float | None = None,
                sample_offset: int = 0, mask_ratio_range=None, dp_batch: int | None = None,
                student_ec: tuple[torch.Tensor, torch.Tensor] | None = None,
                teacher_ec: tuple[torch.Tensor, torch.Tensor] | None = None, return_parts: bool = False):
        if mask_ratio_range is not None:
            raise ValueError("TEDMAE does not support ragged mask ratios (mask_ratio_range) yet")
        x_s = imgs if student_ec is None else exterior_conversion(imgs, *student_ec)
        x_t = imgs if teacher_ec is None else exterior_conversion(imgs, *teacher_ec)
        latent, m = self.forward_encoder_keep(x_s, seed, step, mask_ratio, sample_offset)
        pred = self.forward_decoder(latent, m.ids_restore)
        rec = mae_loss(x_s, pred, m.mask, self.cfg.patch_size, self.cfg.norm_pix_loss)
        o = self.options
        with torch.no_grad():
            layers = self.teacher(x_t, o.df_layers if o.df else 1)
            target = distill_target(layers, o.df, o.df_temperature)
            D = target.shape[-1]
            target = torch.gather(target, 1, m.ids_keep[:, :, None].expand(-1, -1, D))  # [B, K, D]
        feat = self.distill_head(latent[:, 1:])
        dist = F.smooth_l1_loss(feat.float(), target, beta=o.smooth_l1_beta)
        loss = rec + o.distill_weight * dist
        if return_parts:
            return loss, pred, m.mask, {"rec_loss": rec.detach(), "distill_loss": dist.detach()}
        return loss, pred, m.mask


def tedmae_from_preset(name: str, options: TEDMAEOptions = TEDMAEOptions(), **overrides) -> TEDMAE:
    from dermfast.models.mae import get_preset
    cfg = get_preset(name)
    if overrides:
        cfg = MAEPreset(**{**cfg.to_dict(), **overrides})
    return TEDMAE(cfg, options)
