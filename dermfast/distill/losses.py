"""SSD-KD's loss terms (Wang et al., "SSD-KD: a self-supervised diverse knowledge distillation method for
lightweight skin lesion classification"), as small composable torch functions and modules.

SSD-KD combines, with the paper's weights (the `ssd_kd` preset), as the authors' code does
(enkiwang/Portable-Skin-Lesion-Diagnosis: experiment/isic/isic_ssd_kd.py, kd_losses/ssd_kd.py):
    0.1  class-weighted CE(student, y)
    0.9  T^2 KL(teacher || student) on the logits, T = 4                          (Hinton KD)
    2.7  T^2 KL on the logits of the 90 / 180 / 270 degree rotated views         (SSKD's transformed-view KD)
    10   tau^2 KL between the teacher's and the student's sample-similarity
         distributions (cosine similarity of each rotated view to every normal view, softmax over the normal
         views at temperature tau = 0.5), over the rotated views that survive the teacher's rank filter
         (ratio_ss = 0.75, `SSDKDWeights.ss_ratio`)                             (SSKD's self-supervised KD)
    25   RKD distance, 50 RKD angle on embeddings                                 (Park et al., relational KD)
    1000 sqrt(MSE) between per-instance channel Gram matrices F F^T / (C H W) of feature maps, the student's
         through an adapter (1x1 conv + BatchNorm + ReLU: the official ConvReg) to the teacher's width
                                                                                  (intra-instance relations)
Each term's weight lives in `SSDKDWeights`; a term with weight 0 is not computed. Every term treats the teacher
as a constant (its tensors are detached here), so gradients reach the student (and the adapter) only.

Where this differs from the official code (the weights above mean what they mean there):
- the rank filter of the rotated-view KD (official ratio_tf) is not implemented: the official value 1.0 keeps
  every view, so the term is the same;
- the similarity term compares the networks' pooled embeddings; the official code passes them through a
  Linear-ReLU-Linear projection head first (the teacher's trained on the rotation-matching task beforehand,
  the student's trained with the student);
- the Gram adapter keeps the student's spatial size (the Gram matrix is [C, C] whatever H W): the official
  ConvReg resamples a student map of another size to the teacher's with a strided / transposed / larger
  conv, and is the 1x1 conv used here when the sizes are equal (the paper's 7 x 7 maps). Its ReLU is an
  option (`relu=False`) for a teacher whose feature map is signed (a ViT's tokens), where it would make the
  teacher's negative Gram entries unreachable.

Rotation self-supervision: `rotate_views` makes the rotated views of a batch with their 4-way labels;
`RotationHead` is the 4-way classifier (trained with `rotation_loss`, on the teacher before distillation as in
SSKD, optionally on the student through `SSDKDWeights.rotation`, 0 in the paper's preset).

Shapes: logits [N, K]; embeddings [N, D] (D may differ between student and teacher: RKD and the similarity terms
compare relations, not vectors); feature maps [N, C, H, W] (spatial sizes may differ: a channel Gram is [C, C]).
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
    gram: float = 1000.0        # sqrt(MSE) between channel Gram matrices F F^T / (C H W) (student through the adapter)
    rotation: float = 0.0       # 4-way rotation CE on the student's rotation head (not in the paper's objective)
    temperature: float = 4.0    # T of both logit KL terms
    ss_tau: float = 0.5         # tau of the sample-similarity term
    ss_ratio: float = 0.75      # similarity term: share of the rotated views the teacher ranks wrong that are kept
                                # (the official ratio_ss; 1 = no filter): see `similarity_rank_keep`

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v != v or v < 0:
                raise ValueError(f"SSDKDWeights.{f.name} must be a number >= 0, got {v!r}")
        if self.temperature <= 0 or self.ss_tau <= 0:
            raise ValueError(f"SSDKDWeights: temperature and ss_tau must be > 0, got {self.temperature}, "
                             f"{self.ss_tau}")
        if self.ss_ratio > 1:
            raise ValueError(f"SSDKDWeights.ss_ratio must be in [0, 1], got {self.ss_ratio}")


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


def similarity_rank_keep(teacher_sim: torch.Tensor, ratio: float) -> torch.Tensor:
    """SSKD's rank filter of the similarity term, as the SSD-KD authors' code applies it (isic_ssd_kd.py,
    ratio_ss): which rotated views the similarity KL keeps. bool [M].

    teacher_sim: [M, N], the teacher's similarity of each rotated view to every normal view, rows view-major as
    `rotate_views` makes them (row m is a view of image m % N; M = R N). A view's rank is the position of its
    own image in its row sorted by decreasing similarity (0: the teacher matches it). Kept: every view of rank 0,
    and of the W others the floor(W * ratio) of lowest rank. Among equal ranks the official layout's order
    decides (image, then rotation: what a stable argsort of the official code gives; its own argsort leaves that
    order unspecified). On the device, no host sync.
    """
    m, n = teacher_sim.shape
    if m % n:
        raise ValueError(f"similarity_rank_keep: {m} rotated views are not a multiple of {n} images (view-major "
                         "rows as rotate_views makes them)")
    rows = torch.arange(m, device=teacher_sim.device)
    image, view = rows % n, rows // n
    order = torch.argsort(teacher_sim, dim=1, descending=True, stable=True)
    rank = (order == image[:, None]).long().argmax(dim=1)
    key = rank * m + image * (m // n) + view  # unique: rank first, then the official row order
    pos = torch.empty_like(rows).scatter_(0, torch.argsort(key), rows)  # each view's place in the ranking
    wrong = (rank > 0).sum()
    # float64 as the official int(wrong_num * ratio_ss) (a float32 product can floor one lower, e.g. 10 * 0.7)
    keep_n = (m - wrong) + torch.floor(wrong.to(torch.float64) * ratio).long()
    return pos < keep_n


def sample_similarity_kl(student_aug: torch.Tensor, student_nor: torch.Tensor, teacher_aug: torch.Tensor,
                         teacher_nor: torch.Tensor, tau: float = 0.5, keep_ratio: float = 1.0) -> torch.Tensor:
    """tau^2 * KL(softmax(A_t / tau) || softmax(A_s / tau)) averaged over the kept rows (SSKD).

    A[m, n] = cos(aug_m, nor_n): each rotated view's similarity to every normal view, [M, N]; the row
    distributions say which normal image a view "comes from". aug: [M, D], nor: [N, D] (D per network).
    keep_ratio < 1 applies the teacher's rank filter (`similarity_rank_keep`; aug rows view-major, M = R N);
    1 keeps every row. When no row is kept the term is 0 (the official batchmean over no rows is NaN).
    """
    a_s = cosine_similarity_matrix(student_aug, student_nor)
    a_t = cosine_similarity_matrix(teacher_aug.detach(), teacher_nor.detach())
    log_q = F.log_softmax(a_s / tau, dim=1)
    log_p = F.log_softmax(a_t / tau, dim=1)
    if keep_ratio >= 1.0:
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (tau * tau)
    keep = similarity_rank_keep(a_t, keep_ratio).to(log_q.dtype)
    rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)
    return (rows * keep).sum() / keep.sum().clamp_min(1.0) * (tau * tau)


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
    """[N, C, H, W] -> [N, C, C]: G = F F^T / (C H W), F the [C, H*W] map of each instance (the SSD-KD authors'
    gram_matrix, kd_losses/ssd_kd.py, so the paper's weight 1000 means what it meant there)."""
    n, c = feat.shape[:2]
    f = feat.reshape(n, c, -1)
    return f @ f.transpose(1, 2) / (c * f.shape[-1])


class GramAdapter(nn.Module):
    """The student's feature map to the teacher's width: 1x1 conv (with bias) -> BatchNorm2d -> ReLU, the SSD-KD
    authors' ConvReg (experiment/my_models/my_model.py) for equal spatial sizes; the spatial size is kept (see
    the module docstring). relu=False leaves the ReLU out (an nn.Identity), for a teacher with signed features.
    [N, C_s, H, W] -> [N, C_t, H, W]."""

    def __init__(self, student_channels: int, teacher_channels: int, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(teacher_channels)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ChannelGramLoss(nn.Module):
    """sqrt(MSE(G(adapter(student_feat)), G(teacher_feat))): intra-instance channel relations (the official
    D_KD.cr_dist with G = `channel_gram`).

    adapter: a `GramAdapter` (conv + BatchNorm + ReLU, the official ConvReg; relu=False drops the ReLU), a
    separate module so the Gram term can be checked on its own (replace it by an nn.Identity when the widths
    match). Feature maps [N, C_s, H_s, W_s] and [N, C_t, H_t, W_t]; spatial sizes may differ. The sqrt is taken
    of max(MSE, eps) so its gradient stays finite at zero.
    """

    def __init__(self, student_channels: int, teacher_channels: int, relu: bool = True, eps: float = 1e-12):
        super().__init__()
        self.adapter = GramAdapter(student_channels, teacher_channels, relu)
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
    """The weighted sum of the SSD-KD terms; forward returns (total, {term: detached unweighted value});
    `weighted(terms)` gives each term times its weight (they sum to the total).

    student_channels / teacher_channels: feature-map widths for the Gram term's adapter (needed when
    weights.gram > 0); adapter_relu: the adapter's ReLU (the official ConvReg's; off for a signed teacher map).
    class_weight: [K] CE weights (e.g. `inverse_frequency_weights(class_counts)`).
    """

    def __init__(self, weights: SSDKDWeights | None = None, student_channels: int | None = None,
                 teacher_channels: int | None = None, class_weight: torch.Tensor | None = None,
                 adapter_relu: bool = True):
        super().__init__()
        self.weights = weights if weights is not None else SSDKDWeights()
        self.gram = None
        if self.weights.gram > 0:
            if student_channels is None or teacher_channels is None:
                raise ValueError("SSDKDLoss: the gram term needs student_channels and teacher_channels")
            self.gram = ChannelGramLoss(student_channels, teacher_channels, relu=adapter_relu)
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
                                               w.ss_tau, keep_ratio=w.ss_ratio)
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

    def weighted(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"weighted_<term>": weight * value} for the terms forward returned: their share of the total."""
        weights = asdict(self.weights)
        return {f"weighted_{name}": weights[name] * value for name, value in terms.items()}
