"""SSD-KD's loss terms (Wang et al., "SSD-KD: a self-supervised diverse knowledge distillation method for
lightweight skin lesion classification"), as small composable torch functions and modules.

SSD-KD combines, with the paper's weights (the `ssd_kd` preset):
    0.1  class-weighted CE(student, y)
    0.9  T^2 KL(teacher || student) on the logits, T = 4                          (Hinton KD)
    2.7  T^2 KL on the logits of the 90 / 180 / 270 degree rotated views         (SSKD's transformed-view KD)
    10   tau^2 KL between the teacher's and the student's sample-similarity
         distributions (cosine similarity of each rotated view to every normal view, softmax over the normal
         views at temperature tau = 0.5)                                          (SSKD's self-supervised KD)
    25   RKD distance, 50 RKD angle on embeddings                                 (Park et al., relational KD)
    1000 sqrt(MSE) between per-instance channel Gram matrices of feature maps, the student's through a 1x1
         adapter conv to the teacher's width                                      (intra-instance relations)
Each term's weight lives in `SSDKDWeights`; a term with weight 0 is not computed. Every term treats the teacher
as a constant (its tensors are detached here), so gradients reach the student (and the adapter) only.

Rotation self-supervision: `rotate_views` makes the rotated views of a batch with their 4-way labels;
`RotationHead` is the 4-way classifier (trained with `rotation_loss`, on the teacher before distillation as in
SSKD, optionally on the student through `SSDKDWeights.rotation`, 0 in the paper's preset).

Shapes: logits [N, K]; embeddings [N, D] (D may differ between student and teacher: RKD and the similarity terms
compare relations, not vectors); feature maps [N, C, H, W] (spatial sizes may differ: a channel Gram is [C, C]).
Not included: SSKD's rank-based filtering of noisy rotated views (keeping only views the teacher ranks right).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from dermfast.ops import kd_loss


@dataclass(frozen=True)
class SSDKDWeights:
    """The weight of each term (0 turns a term off) and the two temperatures."""

    ce: float = 0.1             # class-weighted cross-entropy on the labels
    kd: float = 0.9             # T^2 KL on the logits of the normal views
    rot_kd: float = 2.7         # T^2 KL on the logits of the rotated views
    ss: float = 10.0            # tau^2 KL between sample-similarity distributions
    rkd_distance: float = 25.0  # RKD distance on embeddings
    rkd_angle: float = 50.0     # RKD angle on embeddings
    gram: float = 1000.0        # sqrt(MSE) between channel Gram matrices (student through the 1x1 adapter)
    rotation: float = 0.0       # 4-way rotation CE on the student's rotation head (not in the paper's objective)
    temperature: float = 4.0    # T of both logit KL terms
    ss_tau: float = 0.5         # tau of the sample-similarity term

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v != v or v < 0:
                raise ValueError(f"SSDKDWeights.{f.name} must be a number >= 0, got {v!r}")
        if self.temperature <= 0 or self.ss_tau <= 0:
            raise ValueError(f"SSDKDWeights: temperature and ss_tau must be > 0, got {self.temperature}, "
                             f"{self.ss_tau}")


TERMS = ("ce", "kd", "rot_kd", "ss", "rkd_distance", "rkd_angle", "gram", "rotation")
PRESETS: dict[str, SSDKDWeights] = {
    "ssd_kd": SSDKDWeights(),  # the paper's weights
    "soft_kd": SSDKDWeights(rot_kd=0.0, ss=0.0, rkd_distance=0.0, rkd_angle=0.0, gram=0.0),  # CE + T^2 KL only
}


def preset(name: str, **overrides) -> SSDKDWeights:
    """A named weight set (`ssd_kd`, `soft_kd`) with optional per-field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown SSD-KD preset {name!r}; accepted: {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------------------
# Logit terms
# ---------------------------------------------------------------------------------------------------------


def inverse_frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """Class weights n / (K * n_c) for class counts [K] ("balanced": a uniform class mix weighs 1 each).
    A class with no sample gets weight 0."""
    counts = counts.to(torch.float64)
    total, k = counts.sum(), counts.numel()
    w = torch.where(counts > 0, total / (k * counts.clamp_min(1)), torch.zeros_like(counts))
    return w.float()


def weighted_ce(student_logits: torch.Tensor, target: torch.Tensor,
                class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """F.cross_entropy(weight=class_weight): sum_i w[y_i] CE_i / sum_i w[y_i]. logits [N, K], target [N]."""
    w = class_weight.to(student_logits.dtype) if class_weight is not None else None
    return F.cross_entropy(student_logits, target, weight=w)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) averaged over rows (the fused dermfast.ops.kd_loss, KD term only)."""
    return kd_loss(student_logits, teacher_logits.detach(), None, temperature)


def rotate_views(x: torch.Tensor, include_identity: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of a batch of square images and their 4-way rotation labels.

    x: [N, C, H, H]. Returns (views [R*N, C, H, H], labels [R*N] int64 in {0, 1, 2, 3} = k * 90 degrees
    counter-clockwise, torch.rot90 over (H, W)), view-major: sample i's k-th view is row (k - k0) * N + i with
    k0 = 0 if include_identity else 1 (R = 4 or 3).
    """
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate_views: x must be [N, C, H, H] (square, so every rotation keeps the shape), "
                         f"got {tuple(x.shape)}")
    ks = range(0 if include_identity else 1, 4)
    views = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in ks])
    labels = torch.arange(ks.start, 4, device=x.device).repeat_interleave(x.shape[0])
    return views, labels


class RotationHead(nn.Module):
    """4-way rotation classifier on pooled embeddings [N, D] -> logits [N, 4] (one hidden layer, as SSKD's
    projection head; hidden=0 for a single linear layer)."""

    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__()
        self.net = (nn.Linear(in_features, 4) if hidden == 0 else
                    nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4)))

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.net(embed)


def rotation_loss(rotation_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 4-way rotation head: logits [M, 4], labels [M] from `rotate_views`."""
    return F.cross_entropy(rotation_logits, labels)


def rotated_kd(student_rot_logits: torch.Tensor, teacher_rot_logits: torch.Tensor,
               temperature: float = 4.0) -> torch.Tensor:
    """T^2 KL on the class logits of the rotated views ([M, K] each), averaged over views."""
    return kd_kl(student_rot_logits, teacher_rot_logits, temperature)


# ---------------------------------------------------------------------------------------------------------
# Relational terms
# ---------------------------------------------------------------------------------------------------------


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[M, D] x [N, D] -> [M, N] cosine similarities."""
    return F.normalize(a, dim=1, eps=eps) @ F.normalize(b, dim=1, eps=eps).t()


def sample_similarity_kl(student_aug: torch.Tensor, student_nor: torch.Tensor, teacher_aug: torch.Tensor,
                         teacher_nor: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """tau^2 * KL(softmax(A_t / tau) || softmax(A_s / tau)) averaged over the M rows (SSKD).

    A[m, n] = cos(aug_m, nor_n): each rotated view's similarity to every normal view, [M, N]; the row
    distributions say which normal image a view "comes from". aug: [M, D], nor: [N, D] (D per network).
    """
    a_s = cosine_similarity_matrix(student_aug, student_nor)
    a_t = cosine_similarity_matrix(teacher_aug.detach(), teacher_nor.detach())
    log_q = F.log_softmax(a_s / tau, dim=1)
    log_p = F.log_softmax(a_t / tau, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (tau * tau)


def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[N, D] -> [N, N] Euclidean distances, 0 on the diagonal (clamped before the sqrt so its gradient is finite)."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (e @ e.t())).clamp_min(eps)
    off = 1.0 - torch.eye(e.shape[0], device=e.device, dtype=e.dtype)
    return d2.sqrt() * off


def rkd_distance(student_embed: torch.Tensor, teacher_embed: torch.Tensor) -> torch.Tensor:
    """RKD distance loss (Park et al. 2019): smooth-L1 (beta 1) between the pairwise-distance matrices, each
    divided by its mean over the N (N - 1) off-diagonal pairs. [N, D_s], [N, D_t], N >= 2.
    Invariant to translating, rotating and uniformly scaling either embedding."""
    if student_embed.shape[0] < 2:
        raise ValueError("rkd_distance: needs at least 2 samples")
    n = student_embed.shape[0]
    pairs = n * (n - 1)
    t_d = _pairwise_distances(teacher_embed.detach())
    t_d = t_d / (t_d.sum() / pairs)
    s_d = _pairwise_distances(student_embed)
    s_d = s_d / (s_d.sum() / pairs)
    return F.smooth_l1_loss(s_d, t_d, reduction="mean")


def _angles(e: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N, N]: cos of the angle at vertex j between (i - j) and (k - j), as RKD (normalised
    differences; a zero difference stays 0)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # diff[j, i] = unit(e_i - e_j)
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_angle(student_embed: torch.Tensor, teacher_embed: torch.Tensor) -> torch.Tensor:
    """RKD angle loss (Park et al. 2019): smooth-L1 (beta 1) between the triplet angle cosines [N, N, N].
    [N, D_s], [N, D_t], N >= 3. Invariant to translating, rotating and scaling either embedding."""
    if student_embed.shape[0] < 3:
        raise ValueError("rkd_angle: needs at least 3 samples")
    return F.smooth_l1_loss(_angles(student_embed), _angles(teacher_embed.detach()), reduction="mean")


def channel_gram(feat: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, C]: G = F F^T / (H W), F the [C, H*W] map of each instance."""
    n, c = feat.shape[:2]
    f = feat.reshape(n, c, -1)
    return f @ f.transpose(1, 2) / f.shape[-1]


class ChannelGramLoss(nn.Module):
    """sqrt(MSE(G(adapter(student_feat)), G(teacher_feat))): intra-instance channel relations.

    adapter: a 1x1 conv (no bias) from the student's channels to the teacher's (identity-initialised when the
    widths match, so an equal pair starts at zero loss). Feature maps [N, C_s, H_s, W_s] and [N, C_t, H_t, W_t];
    spatial sizes may differ. The sqrt is taken of max(MSE, eps) so its gradient stays finite at zero.
    """

    def __init__(self, student_channels: int, teacher_channels: int, eps: float = 1e-12):
        super().__init__()
        self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        if student_channels == teacher_channels:
            with torch.no_grad():
                self.adapter.weight.copy_(torch.eye(teacher_channels)[:, :, None, None])
        self.eps = eps

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        if student_feat.dim() != 4 or teacher_feat.dim() != 4 or student_feat.shape[0] != teacher_feat.shape[0]:
            raise ValueError(f"ChannelGramLoss: feature maps must be [N, C, H, W] with the same N, got "
                             f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}")
        g_s = channel_gram(self.adapter(student_feat))
        g_t = channel_gram(teacher_feat.detach().to(g_s.dtype))
        return F.mse_loss(g_s, g_t).clamp_min(self.eps).sqrt()


# ---------------------------------------------------------------------------------------------------------
# The composed objective
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DistillOutputs:
    """What one network produced for a batch; fields a term needs must be set when its weight is > 0.

    logits [N, K] (normal views); rot_logits [M, K] (rotated views, M = 3N from `rotate_views`);
    embed [N, D] and rot_embed [M, D] (pooled features of the normal / rotated views);
    feat [N, C, H, W] (an intermediate feature map); rot_head [M, 4] (rotation-head logits, student only).
    """

    logits: torch.Tensor | None = None
    rot_logits: torch.Tensor | None = None
    embed: torch.Tensor | None = None
    rot_embed: torch.Tensor | None = None
    feat: torch.Tensor | None = None
    rot_head: torch.Tensor | None = None


class SSDKDLoss(nn.Module):
    """The weighted sum of the SSD-KD terms; forward returns (total, {term: detached value}).

    student_channels / teacher_channels: feature-map widths for the Gram term's adapter (needed when
    weights.gram > 0). class_weight: [K] CE weights (e.g. `inverse_frequency_weights(class_counts)`).
    """

    def __init__(self, weights: SSDKDWeights | None = None, student_channels: int | None = None,
                 teacher_channels: int | None = None, class_weight: torch.Tensor | None = None):
        super().__init__()
        self.weights = weights if weights is not None else SSDKDWeights()
        self.gram = None
        if self.weights.gram > 0:
            if student_channels is None or teacher_channels is None:
                raise ValueError("SSDKDLoss: the gram term needs student_channels and teacher_channels")
            self.gram = ChannelGramLoss(student_channels, teacher_channels)
        self.register_buffer("class_weight", class_weight, persistent=False)

    @staticmethod
    def _need(term: str, **tensors):
        missing = [k for k, v in tensors.items() if v is None]
        if missing:
            raise ValueError(f"SSDKDLoss: term {term!r} has weight > 0 but {', '.join(missing)} is missing")

    def forward(self, student: DistillOutputs, teacher: DistillOutputs, target: torch.Tensor | None = None,
                rot_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        w = self.weights
        T = w.temperature
        terms: dict[str, torch.Tensor] = {}
        if w.ce > 0:
            self._need("ce", **{"student.logits": student.logits, "target": target})
            terms["ce"] = weighted_ce(student.logits, target, self.class_weight)
        if w.kd > 0:
            self._need("kd", **{"student.logits": student.logits, "teacher.logits": teacher.logits})
            terms["kd"] = kd_kl(student.logits, teacher.logits, T)
        if w.rot_kd > 0:
            self._need("rot_kd", **{"student.rot_logits": student.rot_logits,
                                    "teacher.rot_logits": teacher.rot_logits})
            terms["rot_kd"] = rotated_kd(student.rot_logits, teacher.rot_logits, T)
        if w.ss > 0:
            self._need("ss", **{"student.rot_embed": student.rot_embed, "student.embed": student.embed,
                                "teacher.rot_embed": teacher.rot_embed, "teacher.embed": teacher.embed})
            terms["ss"] = sample_similarity_kl(student.rot_embed, student.embed, teacher.rot_embed, teacher.embed,
                                               w.ss_tau)
        if w.rkd_distance > 0:
            self._need("rkd_distance", **{"student.embed": student.embed, "teacher.embed": teacher.embed})
            terms["rkd_distance"] = rkd_distance(student.embed, teacher.embed)
        if w.rkd_angle > 0:
            self._need("rkd_angle", **{"student.embed": student.embed, "teacher.embed": teacher.embed})
            terms["rkd_angle"] = rkd_angle(student.embed, teacher.embed)
        if w.gram > 0:
            self._need("gram", **{"student.feat": student.feat, "teacher.feat": teacher.feat})
            terms["gram"] = self.gram(student.feat, teacher.feat)
        if w.rotation > 0:
            self._need("rotation", **{"student.rot_head": student.rot_head, "rot_labels": rot_labels})
            terms["rotation"] = rotation_loss(student.rot_head, rot_labels)
        if not terms:
            raise ValueError("SSDKDLoss: every weight is 0")
        weights = asdict(w)
        total = sum(weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}
