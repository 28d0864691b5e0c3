"""Masked autoencoder ViT (He et al. 2021) built from timm blocks and dermfast ops.

The encoder sees only the visible patches: the keep-set comes from `dermfast.ops.random_masking_indices` and
only the kept pixel patches are embedded (`dermfast.ops.masked_patch_embed`); a light decoder reconstructs every
patch; the loss is `dermfast.ops.mae_loss` on removed patches. Blocks are injected (`block_layer`), so the
fused-attention block drops in without touching this file. Position embeddings are fixed 2-D sin-cos, as in
the paper. Presets are registered by name with `@register_preset`; no special cases by model name.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from dermfast.ops import mae_loss, masked_patch_embed, random_masking, random_masking_indices
from dermfast.ops.random_masking_op import hash32_int, keep_count, step_key

_RATIO_SALT = 0x5BD1E995  # separates the ratio stream from the masking noise of the same (seed, step)


def ragged_mask_ratios(batch: int, lo: float, hi: float, seed: int, step: int,
                       sample_offset: int = 0) -> torch.Tensor:
    """Per-sample mask ratios [batch] float64 on the CPU, uniform in [lo, hi), a pure function of
    (seed, step, sample_offset + b): the masking's hash family (`step_key`, `hash32_int`) with a salt, computed
    in plain Python on the host (no device tensor, no sync). lo == hi gives that ratio for every sample."""
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"mask ratio range must satisfy 0 <= lo <= hi < 1, got ({lo}, {hi})")
    h = hash32_int(step_key(seed, step) ^ _RATIO_SALT)
    u = [hash32_int(h ^ ((sample_offset + b) & 0xFFFFFFFF)) / 2.0 ** 32 for b in range(batch)]
    return torch.tensor([min(lo + (hi - lo) * x, hi) for x in u], dtype=torch.float64)


def _host_keep_counts(num_patches: int, ratios: torch.Tensor) -> list[int]:
    """Per-sample keep counts K_b as host ints, the arithmetic of `keep_count` (and so of the masking op's
    `keep_counts`). `ratios` is a CPU tensor by design: reading it is no device sync."""
    return [keep_count(num_patches, r) for r in ratios.tolist()]


@dataclass(frozen=True)
class MAEPreset:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    blr: float = 1.5e-4  # base learning rate per 256 images (the paper's); lr = blr * batch / 256

    def to_dict(self) -> dict:
        return asdict(self)


_PRESETS: dict[str, MAEPreset] = {}


def register_preset(name: str) -> Callable[[Callable[[], MAEPreset]], Callable[[], MAEPreset]]:
    def deco(fn: Callable[[], MAEPreset]) -> Callable[[], MAEPreset]:
        _PRESETS[name] = fn()
        return fn
    return deco


def presets() -> dict[str, MAEPreset]:
    return dict(_PRESETS)


def get_preset(name: str) -> MAEPreset:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; accepted: {', '.join(_PRESETS)}")
    return _PRESETS[name]


@register_preset("demo")
def _demo() -> MAEPreset:
    # Small enough to pretrain for a few epochs on 2 CPU cores in about a minute.
    return MAEPreset(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3,
                     decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, blr=5e-3)


@register_preset("vit_b16")
def _vit_b16() -> MAEPreset:
    return MAEPreset(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_preset("vit_l16")
def _vit_l16() -> MAEPreset:
    return MAEPreset(patch_size=16, embed_dim=1024, depth=24, num_heads=16)


@register_preset("vit_h14")
def _vit_h14() -> MAEPreset:
    return MAEPreset(patch_size=14, embed_dim=1280, depth=32, num_heads=16)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (MAE `get_2d_sincos_pos_embed`, no cls token)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    gh, gw = torch.meshgrid(coords, coords, indexing="ij")

    def emb(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb(gw), emb(gh)], dim=1).float()


def _default_block() -> Callable[..., nn.Module]:
    from timm.models.vision_transformer import Block  # timm imported lazily: `import dermfast` stays light
    return Block


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder. forward(imgs [B, C, H, W], seed, step) -> (loss, pred [B, L, p*p*C], mask [B, L]).

    Ragged batches: `forward(..., mask_ratio_range=(lo, hi))` draws one ratio per sample
    (`ragged_mask_ratios`); the encoder then runs on packed visible tokens (each sample's cls token first in its
    segment) through `dermfast.models.MaskedAttention` blocks (`patch_timm` swaps them in at construction; same
    weights), and the decoder scatters each sample's tokens back to all L positions and runs dense.

    Mask semantics: 0 keep, 1 remove. The mask is a pure function of (seed, step, sample index), so the same
    call reproduces the same masking on any device. The whole model compiles with `torch.compile`: masking and
    the masked patch embedding are custom ops, and `step` is a plain int that dynamo makes symbolic after its
    first change (one recompilation, then none per step).
    """

    def __init__(self, cfg: MAEPreset, block_layer: Callable[..., nn.Module] | None = None, ragged: bool = False):
        super().__init__()
        from timm.layers import PatchEmbed

        block_layer = block_layer or _default_block()
        self.cfg = cfg
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.grid = cfg.img_size // cfg.patch_size
        self.num_patches = self.grid * self.grid
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.embed_dim, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList([block_layer(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True)
                                     for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed",
                             sincos_pos_embed_2d(cfg.decoder_embed_dim, self.grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList([
            block_layer(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True)
            for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size ** 2 * cfg.in_chans)
        self._init_weights()
        self.ragged = ragged
        if ragged:
            from dermfast.models.attention import patch_timm
            patch_timm(self.blocks)  # encoder only: the decoder always sees all L tokens, dense

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def masking(self, batch: int, seed: int, step: int, mask_ratio: float | None = None,
                sample_offset: int = 0, device=None):
        """The keep-set of a batch (`MaskingResult`; `visible` is empty): a pure function of the key."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        return random_masking_indices(batch, self.num_patches, ratio, seed, step, sample_offset=sample_offset,
                                      device=device if device is not None else self.pos_embed.device)

    def forward_encoder(self, imgs: torch.Tensor, seed: int, step: int, mask_ratio: float | None = None,
                        sample_offset: int = 0):
        """imgs [B, C, H, W] -> (latent [B, 1 + K, D], mask [B, L] float32 (0 keep, 1 remove), ids_restore [B, L]).

        Only the kept pixel patches are embedded (`masked_patch_embed`): 4x fewer patch-embed FLOPs at 0.75.
        """
        latent, m = self.forward_encoder_keep(imgs, seed, step, mask_ratio, sample_offset)
        return latent, m.mask, m.ids_restore

    def forward_encoder_keep(self, imgs: torch.Tensor, seed: int, step: int, mask_ratio: float | None = None,
                             sample_offset: int = 0):
        """`forward_encoder` returning (latent [B, 1 + K, D], the `MaskingResult`): latent[:, 1 + j] is the patch
        at position ids_keep[:, j] (what TEDMAE's distillation gathers its targets with)."""
        m = self.masking(imgs.shape[0], seed, step, mask_ratio, sample_offset, imgs.device)
        proj = self.patch_embed.proj
        x = masked_patch_embed(imgs, proj.weight, proj.bias, self.cfg.patch_size, m.ids_keep, self.pos_embed)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), m

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        B, n_vis, D = x.shape[0], x.shape[1] - 1, x.shape[2]
        L = ids_restore.shape[1]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(B, L - n_vis, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, D))
        x = torch.cat([x[:, :1], tokens + self.decoder_pos_embed.to(tokens.dtype)], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:].contiguous()

    def forward_encoder_ragged(self, imgs: torch.Tensor, ratios: torch.Tensor, seed: int, step: int,
                               sample_offset: int = 0):
        """Packed encoder. ratios: CPU [B] per-sample mask ratios. Returns (latent [T + B, D] packed, sample b's
        rows cu[b]:cu[b+1] = its cls token then its K_b visible tokens in shuffle order; cu int32 [B+1] on the
        device; mask [B, L] float32; ids_restore [B, L]).

        Every block is called through its module with the packed layout (`block_forward`), so activation
        checkpointing and FSDP wrappers run. The layout is built on the host from the keep counts and copied
        to the device; nothing is read back (the attention validates from the host values)."""
        from dermfast.models.attention import RaggedLayout, block_forward
        if not self.ragged:
            raise ValueError("MaskedAutoencoderViT: ragged masking needs a model built with ragged=True")
        if ratios.device.type != "cpu" or ratios.shape != (imgs.shape[0],):
            raise ValueError(f"ratios must be a CPU tensor [B={imgs.shape[0]}], got {tuple(ratios.shape)} "
                             f"on {ratios.device}")
        B, dev = imgs.shape[0], imgs.device
        x = self.patch_embed(imgs)  # [B, L, D]; the packed keep-set is gathered by random_masking below
        m = random_masking(x.contiguous(), ratios, seed, step, pos_embed=self.pos_embed,
                           sample_offset=sample_offset)
        # Host-side layout (ratios live on the CPU): segment b = [cls, K_b visible tokens]. Index tensors go to
        # the device as plain host-to-device copies; nothing is read back.
        ks = _host_keep_counts(self.num_patches, ratios)
        layout = RaggedLayout.packed([kb + 1 for kb in ks], dev)
        T = sum(ks)
        k = torch.tensor(ks, dtype=torch.int64)
        cu = torch.tensor(layout.host, dtype=torch.int64)
        seg = torch.repeat_interleave(torch.arange(B), k + 1, output_size=T + B)  # segment of each packed row
        rank = torch.arange(T + B) - cu[:-1][seg]  # 0 = cls, j = visible token j - 1
        vis_start = cu[:-1] - torch.arange(B)  # first visible row of sample b in m.visible
        src_idx = torch.where(rank == 0, 0, 1 + vis_start[seg] + rank - 1)  # into cat([cls, visible])
        src = torch.cat([self.cls_token.reshape(1, -1).to(m.visible.dtype), m.visible], dim=0)
        x = src[src_idx.to(dev, non_blocking=True)]
        for blk in self.blocks:
            x = block_forward(blk, x, layout=layout)
        return self.norm(x), layout.cu_seqlens, m.mask, m.ids_restore

    def forward_decoder_ragged(self, latent: torch.Tensor, cu: torch.Tensor, ids_restore: torch.Tensor
                               ) -> torch.Tensor:
        """Packed latent [T + B, D] (layout of `forward_encoder_ragged`) -> pred [B, L, p*p*C]: each sample's
        tokens scattered back to its L positions (mask token elsewhere), then the dense decoder."""
        x = self.decoder_embed(latent)
        B, L = ids_restore.shape
        D = x.shape[1]
        start = cu[:-1].to(torch.int64)[:, None]  # device-side index arithmetic: no host sync
        k = cu[1:].to(torch.int64)[:, None] - start - 1
        kept = ids_restore < k
        # into cat([mask_token, packed]): 0 = mask token, 1 + row otherwise
        patch_idx = torch.where(kept, 1 + start + 1 + ids_restore, 0)
        idx = torch.cat([1 + start, patch_idx], dim=1)  # [B, 1 + L]: cls first
        src = torch.cat([self.mask_token.reshape(1, D).to(x.dtype), x], dim=0)
        x = src[idx]
        pos = torch.cat([torch.zeros_like(self.decoder_pos_embed[:, :1]), self.decoder_pos_embed], dim=1)
        x = x + pos.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:].contiguous()

    def forward(self, imgs: torch.Tensor, seed: int = 0, step: int = 0, mask_ratio: float | None = None,
                sample_offset: int = 0, mask_ratio_range: tuple[float, float] | None = None,
                dp_batch: int | None = None):
        """`sample_offset`: global index of this batch's first sample (rank * per-rank batch under DDP), so
        every rank draws different masks. `mask_ratio_range=(lo, hi)`: ragged batch, one ratio per sample
        (needs `ragged=True`); the returned mask [B, L] then has a different number of ones per row.

        `dp_batch`: the data-parallel batch this batch is one equal slice of (world size x B: the samples
        0 .. dp_batch - 1 of the key (seed, step), this one at sample_offset). With ragged masks the ranks
        remove different numbers of patches, so the mean of the ranks' losses (what DDP / FSDP gradient
        averaging takes) is not the loss over all removed patches of the data-parallel batch; given dp_batch,
        the loss is scaled by this batch's removed count / the mean removed count per slice (host ints from
        the keys, no communication, no sync), which makes it so. None: this batch is the whole batch.
        Fixed-ratio batches remove the same count on every rank and need no scaling."""
        if dp_batch is not None:
            B = imgs.shape[0]
            if not isinstance(dp_batch, int) or B < 1 or dp_batch % B or not 0 <= sample_offset <= dp_batch - B:
                raise ValueError(f"dp_batch={dp_batch!r} must be a multiple of the batch ({B}) that holds "
                                 f"samples sample_offset={sample_offset} .. {sample_offset + B - 1}")
        if mask_ratio_range is not None:
            ratios = ragged_mask_ratios(imgs.shape[0], *mask_ratio_range, seed, step, sample_offset)
            latent, cu, mask, ids_restore = self.forward_encoder_ragged(imgs, ratios, seed, step, sample_offset)
            pred = self.forward_decoder_ragged(latent, cu, ids_restore)
        else:
            latent, mask, ids_restore = self.forward_encoder(imgs, seed, step, mask_ratio, sample_offset)
            pred = self.forward_decoder(latent, ids_restore)
        loss = mae_loss(imgs, pred, mask, self.cfg.patch_size, self.cfg.norm_pix_loss)
        if mask_ratio_range is not None and dp_batch is not None and dp_batch != imgs.shape[0]:
            loss = loss * self._dp_loss_scale(imgs.shape[0], mask_ratio_range, seed, step, sample_offset, dp_batch)
        return loss, pred, mask

    def _dp_loss_scale(self, batch: int, mask_ratio_range: tuple[float, float], seed: int, step: int,
                       sample_offset: int, dp_batch: int) -> float:
        """removed(this slice) * (dp_batch / batch) / removed(dp batch): rank r's loss S_r / n_r times this is
        S_r * W / N, and the mean over W ranks is sum_r S_r / N, the loss over every removed patch."""
        L = self.num_patches
        ratios = ragged_mask_ratios(dp_batch, *mask_ratio_range, seed, step)
        removed = [L - k for k in _host_keep_counts(L, ratios)]
        total = sum(removed)
        if total == 0:  # nothing removed anywhere: every loss is 0
            return 1.0
        return sum(removed[sample_offset:sample_offset + batch]) * (dp_batch // batch) / total


def mae_from_preset(name: str, ragged: bool = False, **overrides) -> MaskedAutoencoderViT:
    cfg = get_preset(name)
    if overrides:
        cfg = MAEPreset(**{**cfg.to_dict(), **overrides})
    return MaskedAutoencoderViT(cfg, ragged=ragged)
