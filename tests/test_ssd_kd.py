"""SSD-KD loss terms: each against an independent computation (plain-Python loops on tiny tensors, a known
property: zero when student == teacher, RKD's invariances, or the SSD-KD authors' code transcribed below: the
Gram matrix, the ConvReg adapter, the similarity term's rank filter), the composed loss and its weighted terms,
and gradient flow (student only)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dermfast.distill import (PRESETS, ChannelGramLoss, DistillOutputs, RotationHead, SSDKDLoss, SSDKDWeights,
                              channel_gram, inverse_frequency_weights, kd_kl, preset, rkd_angle, rkd_distance,
                              rotate_views, rotated_kd, rotation_loss, sample_similarity_kl, weighted_ce)


def softmax_list(v, tau=1.0):
    e = [math.exp(x / tau) for x in v]
    return [x / sum(e) for x in e]


def smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_paper_preset_weights():
    w = PRESETS["ssd_kd"]
    assert (w.ce, w.kd, w.rot_kd, w.ss, w.rkd_distance, w.rkd_angle, w.gram) == (0.1, 0.9, 2.7, 10, 25, 50, 1000)
    assert (w.temperature, w.ss_tau, w.rotation) == (4.0, 0.5, 0.0)
    assert w.ss_ratio == 0.75  # isic_ssd_kd.py ratio_ss (its ratio_tf is 1.0: the rotated-view KD keeps every view)
    assert preset("soft_kd").rkd_angle == 0 and preset("ssd_kd", gram=0).gram == 0
    with pytest.raises(ValueError, match="unknown SSD-KD preset"):
        preset("nope")
    with pytest.raises(ValueError, match=">= 0"):
        SSDKDWeights(kd=-1.0)


def test_weighted_ce_and_inverse_frequency_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    w = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    ce = [-math.log(softmax_list(s[i].tolist())[y[i]]) for i in range(2)]
    want = (w[1].item() * ce[0] + w[0].item() * ce[1]) / (w[1].item() + w[0].item())
    assert weighted_ce(s, y, w).item() == pytest.approx(want, rel=1e-12)
    iw = inverse_frequency_weights(torch.tensor([6, 2, 0, 4]))
    assert iw.tolist() == pytest.approx([12 / 24, 12 / 8, 0.0, 12 / 16])


def test_kd_kl_by_hand_and_zero_on_equal_logits():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]], dtype=torch.float64)
    T = 4.0
    rows = []
    for i in range(2):
        p, q = softmax_list(t[i].tolist(), T), softmax_list(s[i].tolist(), T)
        rows.append(sum(a * math.log(a / b) for a, b in zip(p, q)))
    assert kd_kl(s, t, T).item() == pytest.approx(T * T * sum(rows) / 2, rel=1e-10)
    assert kd_kl(t, t, T).item() == pytest.approx(0.0, abs=1e-12)
    assert rotated_kd(s, t, 2.0).item() == pytest.approx(kd_kl(s, t, 2.0).item(), rel=1e-12)


def test_rotate_views_labels_content_and_head():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    views, labels = rotate_views(x)
    assert views.shape == (6, 1, 3, 3) and labels.tolist() == [1, 1, 2, 2, 3, 3]
    # 90 degrees counter-clockwise by hand: out[r][c] = in[c][H-1-r]
    img = x[1, 0].tolist()
    rot90 = [[img[c][2 - r] for c in range(3)] for r in range(3)]
    assert views[1, 0].tolist() == rot90  # sample 1's first (90 degree) view
    assert torch.equal(views[2], x[0].flip(-1).flip(-2))  # 180 degrees
    assert torch.equal(torch.rot90(views[4], 1, dims=(-2, -1)), x[0])  # 270 + 90 = identity
    all_views, all_labels = rotate_views(x, include_identity=True)
    assert torch.equal(all_views[:2], x) and all_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="square"):
        rotate_views(torch.randn(2, 3, 4, 5))
    head = RotationHead(5, hidden=0)
    logits = head(torch.randn(8, 5))
    assert logits.shape == (8, 4)
    assert rotation_loss(logits, all_labels).item() == pytest.approx(F.cross_entropy(logits, all_labels).item())


def test_sample_similarity_kl_by_hand_zero_and_scale_invariance():
    torch.manual_seed(1)
    s_aug, s_nor = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    t_aug, t_nor = torch.randn(4, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    tau = 0.5

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    total = 0.0
    for m in range(4):
        a_s = [cos(s_aug[m].tolist(), s_nor[n].tolist()) for n in range(2)]
        a_t = [cos(t_aug[m].tolist(), t_nor[n].tolist()) for n in range(2)]
        p, q = softmax_list(a_t, tau), softmax_list(a_s, tau)
        total += sum(a * math.log(a / b) for a, b in zip(p, q))
    want = tau * tau * total / 4
    assert sample_similarity_kl(s_aug, s_nor, t_aug, t_nor, tau).item() == pytest.approx(want, rel=1e-10)
    assert sample_similarity_kl(t_aug, t_nor, t_aug, t_nor, tau).item() == pytest.approx(0.0, abs=1e-12)
    scaled = sample_similarity_kl(s_aug * torch.rand(4, 1) * 5, s_nor * 3.0, t_aug, t_nor, tau)
    assert scaled.item() == pytest.approx(want, rel=1e-9)  # cosine similarities ignore per-row scale


def test_rkd_distance_and_angle_by_hand():
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], ], dtype=torch.float64)
    pts_s, pts_t = s.tolist(), t.tolist()

    def dist(p, a, b):
        return math.dist(p[a], p[b])

    def norm_dists(p):
        d = [[dist(p, a, b) for b in range(3)] for a in range(3)]
        mean = sum(sum(r) for r in d) / 6
        return [[v / mean for v in r] for r in d]

    ds, dt = norm_dists(pts_s), norm_dists(pts_t)
    assert ds[0][1] == pytest.approx(0.75) and ds[1][2] == pytest.approx(1.25)  # 3-4-5 triangle, mean 4
    want = sum(smooth_l1(ds[a][b] - dt[a][b]) for a in range(3) for b in range(3)) / 9
    assert rkd_distance(s, t).item() == pytest.approx(want, rel=1e-6)

    def angle_cos(p, j, i, k):
        if i == j or k == j:
            return 0.0
        u = [p[i][0] - p[j][0], p[i][1] - p[j][1]]
        v = [p[k][0] - p[j][0], p[k][1] - p[j][1]]
        return (u[0] * v[0] + u[1] * v[1]) / (math.hypot(*u) * math.hypot(*v))

    assert angle_cos(pts_s, 0, 1, 2) == 0.0 and angle_cos(pts_s, 1, 0, 2) == pytest.approx(3 / 5)
    want = sum(smooth_l1(angle_cos(pts_s, j, i, k) - angle_cos(pts_t, j, i, k))
               for j in range(3) for i in range(3) for k in range(3)) / 27
    assert rkd_angle(s, t).item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("d_student", [5, 8])
def test_rkd_invariances(d_student):
    """Translating, rotating (into a wider space too) and scaling the student's embedding of the teacher's
    points changes neither RKD loss: both are 0; a perturbed student is > 0."""
    torch.manual_seed(2)
    t = torch.randn(6, 5, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d_student, 5, dtype=torch.float64))  # orthonormal columns [d, 5]
    s = 2.5 * t @ q.t() + torch.randn(d_student, dtype=torch.float64)
    assert rkd_distance(s, t).item() < 1e-12 and rkd_angle(s, t).item() < 1e-12
    noisy = s + 0.3 * torch.randn_like(s)
    assert rkd_distance(noisy, t).item() > 1e-4 and rkd_angle(noisy, t).item() > 1e-4


def full_outputs(n=4, k=3, d_s=6, d_t=10, c_s=4, c_t=5, grad=False):
    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64).requires_grad_(grad)
    return (DistillOutputs(logits=make(n, k), rot_logits=make(3 * n, k), embed=make(n, d_s),
                           rot_embed=make(3 * n, d_s), feat=make(n, c_s, 3, 3), rot_head=make(3 * n, 4)),
            DistillOutputs(logits=make(n, k), rot_logits=make(3 * n, k), embed=make(n, d_t),
                           rot_embed=make(3 * n, d_t), feat=make(n, c_t, 2, 2)))


def test_ssd_kd_total_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(3)
    weights = preset("ssd_kd", rotation=0.5)
    student, teacher = full_outputs()
    y = torch.tensor([0, 2, 1, 2])
    rot_labels = torch.arange(1, 4).repeat_interleave(4)
    cw = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    crit = SSDKDLoss(weights, student_channels=4, teacher_channels=5, class_weight=cw).double()
    total, terms = crit(student, teacher, y, rot_labels)
    assert set(terms) == {"ce", "kd", "rot_kd", "ss", "rkd_distance", "rkd_angle", "gram", "rotation"}
    want = {
        "ce": F.cross_entropy(student.logits, y, weight=cw),
        "kd": kd_kl(student.logits, teacher.logits, 4.0),
        "rot_kd": kd_kl(student.rot_logits, teacher.rot_logits, 4.0),
        "ss": sample_similarity_kl(student.rot_embed, student.embed, teacher.rot_embed, teacher.embed, 0.5,
                                   keep_ratio=0.75),
        "rkd_distance": rkd_distance(student.embed, teacher.embed),
        "rkd_angle": rkd_angle(student.embed, teacher.embed),
        "gram": crit.gram(student.feat, teacher.feat),
        "rotation": F.cross_entropy(student.rot_head, rot_labels),
    }
    for name, value in want.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-9), name
    manual = sum(getattr(weights, name) * value.item() for name, value in want.items())
    assert total.item() == pytest.approx(manual, rel=1e-9)
    weighted = crit.weighted(terms)  # what the distill stage logs beside the raw terms
    assert set(weighted) == {f"weighted_{name}" for name in want}
    for name, value in want.items():
        assert weighted[f"weighted_{name}"].item() == pytest.approx(getattr(weights, name) * value.item(), rel=1e-9)
    assert sum(v.item() for v in weighted.values()) == pytest.approx(total.item(), rel=1e-9)


def test_ssd_kd_gradients_reach_the_student_only():
    torch.manual_seed(4)
    student, teacher = full_outputs(grad=True)
    crit = SSDKDLoss(preset("ssd_kd", rotation=1.0), student_channels=4, teacher_channels=5).double()
    total, _ = crit(student, teacher, torch.tensor([0, 1, 2, 0]), torch.arange(1, 4).repeat_interleave(4))
    total.backward()
    for name in ("logits", "rot_logits", "embed", "rot_embed", "feat", "rot_head"):
        g = getattr(student, name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    for name in ("logits", "rot_logits", "embed", "rot_embed", "feat"):
        assert getattr(teacher, name).grad is None, name
    for p in crit.gram.adapter.parameters():  # conv weight and bias, BatchNorm affine
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_ssd_kd_zero_weight_terms_are_skipped_and_missing_inputs_are_errors():
    student, teacher = full_outputs()
    soft = SSDKDLoss(preset("soft_kd"))
    total, terms = soft(DistillOutputs(logits=student.logits), DistillOutputs(logits=teacher.logits),
                        torch.tensor([0, 1, 2, 0]))
    assert set(terms) == {"ce", "kd"}
    assert total.item() == pytest.approx(0.1 * terms["ce"].item() + 0.9 * terms["kd"].item())
    with pytest.raises(ValueError, match="'ss' has weight > 0 but student.rot_embed"):
        SSDKDLoss(preset("ssd_kd", gram=0))(DistillOutputs(logits=student.logits, rot_logits=student.rot_logits),
                                            teacher, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="student_channels"):
        SSDKDLoss(preset("ssd_kd"))


# ---------------------------------------------------------------------------------------------------------
# Against the SSD-KD authors' code: enkiwang/Portable-Skin-Lesion-Diagnosis (commit 98963d4),
# experiment/isic/kd_losses/ssd_kd.py (gram_matrix, D_KD.cr_dist), experiment/my_models/my_model.py (ConvReg),
# experiment/isic/isic_ssd_kd.py (the training loop: ratio_ss, ss_T, the rank filter). Transcribed here, not
# imported from dermfast, so dermfast is checked against the peer's formula rather than against itself.
# ---------------------------------------------------------------------------------------------------------


def official_gram_matrix(features):
    """ssd_kd.py gram_matrix(features, normalize=True), verbatim."""
    N, C, H, W = features.shape
    feats = features.view(N, C, H * W)
    feats_t = feats.transpose(1, 2)
    G = feats.bmm(feats_t)
    return G.div(C * H * W)


def official_cr_dist(feat_s, feat_t):
    """ssd_kd.py D_KD.cr_dist: sqrt(MSE) between the Gram matrices (feat_s already through ConvReg)."""
    return F.mse_loss(official_gram_matrix(feat_s), official_gram_matrix(feat_t)).sqrt()


class OfficialConvReg(torch.nn.Module):
    """my_model.py ConvReg for equal spatial sizes (s_H >= t_H branch with s_H == t_H: a 1 x 1 conv, with bias),
    then BatchNorm2d(t_C) and ReLU (use_relu=True)."""

    def __init__(self, s_C, t_C, use_relu=True):
        super().__init__()
        self.use_relu = use_relu
        self.conv = torch.nn.Conv2d(s_C, t_C, kernel_size=(1, 1))
        self.bn = torch.nn.BatchNorm2d(t_C)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        return self.relu(self.bn(x)) if self.use_relu else self.bn(x)


def test_channel_gram_is_official_gram_matrix_by_hand():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]], dtype=torch.float64)  # [1, C=2, H=1, W=2]
    # F F^T = [[5, 11], [11, 25]], divided by C H W = 4 (not by H W = 2)
    assert channel_gram(f)[0].tolist() == [[1.25, 2.75], [2.75, 6.25]]
    x = torch.randn(3, 5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(channel_gram(x), official_gram_matrix(x), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shapes", [((2, 8, 7, 7), (2, 8, 7, 7)), ((3, 6, 4, 4), (3, 6, 2, 3))])
def test_gram_term_with_identity_adapter_is_official_cr_dist(shapes):
    """The Gram term on its own (adapter replaced by an identity) is the official cr_dist, whatever the widths
    (here equal, so no adapter is needed) and spatial sizes."""
    torch.manual_seed(5)
    s, t = (torch.randn(*sh, dtype=torch.float64) for sh in shapes)
    loss = ChannelGramLoss(shapes[0][1], shapes[1][1])
    loss.adapter = torch.nn.Identity()
    assert loss(s, t).item() == pytest.approx(official_cr_dist(s, t).item(), rel=1e-12)
    assert loss(t, t).item() == pytest.approx(0.0, abs=1e-5)  # sqrt(eps) floor


@pytest.mark.parametrize("relu", [True, False])
def test_gram_adapter_is_official_convreg(relu):
    """The adapter is ConvReg at equal spatial size: 1x1 conv with bias -> BatchNorm2d -> ReLU (the ReLU is an
    option: off for a teacher whose feature map is signed); with ConvReg's weights copied in, the whole Gram term
    equals the official cr_dist(ConvReg(feat_s), feat_t), in training mode (batch statistics) and eval mode."""
    torch.manual_seed(6)
    loss = ChannelGramLoss(4, 6, relu=relu).double()
    a = loss.adapter
    assert isinstance(a.conv, torch.nn.Conv2d) and a.conv.kernel_size == (1, 1) and a.conv.bias is not None
    assert (a.conv.in_channels, a.conv.out_channels) == (4, 6)
    assert isinstance(a.bn, torch.nn.BatchNorm2d) and a.bn.num_features == 6
    assert isinstance(a.relu, torch.nn.ReLU if relu else torch.nn.Identity)
    ref = OfficialConvReg(4, 6, use_relu=relu).double()
    ref.load_state_dict(a.state_dict())
    s, t = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 6, 5, 5, dtype=torch.float64).relu()
    for train in (True, False):
        loss.train(train), ref.train(train)
        assert loss(s, t).item() == pytest.approx(official_cr_dist(ref(s), t).item(), rel=1e-10), train
    torch.testing.assert_close(a.bn.running_mean, ref.bn.running_mean)  # the same BN state was updated


def official_ss_loss(s_feat, t_feat, batch, ratio_ss, ss_T):
    """isic_ssd_kd.py, the student loop: loss4 with the rank filter (ratio_ss). s_feat, t_feat: [4 * batch, D]
    in the official layout, image i's rotations by 0, 90, 180, 270 degrees at rows 4i .. 4i + 3.
    The official argsorts are torch's default (order among equal values unspecified); stable=True pins it."""
    nor_index = torch.arange(4 * batch) % 4 == 0
    aug_index = torch.arange(4 * batch) % 4 != 0

    def simi(feat):
        nor_feat = feat[nor_index].unsqueeze(2).expand(-1, -1, 3 * batch).transpose(0, 2)
        aug_feat = feat[aug_index].unsqueeze(2).expand(-1, -1, 1 * batch)
        return F.cosine_similarity(aug_feat, nor_feat, dim=1)

    s_simi = simi(s_feat)
    t_simi = simi(t_feat).detach()
    aug_target = torch.arange(batch).unsqueeze(1).expand(-1, 3).contiguous().view(-1).long()
    rank = torch.argsort(t_simi, dim=1, descending=True, stable=True)
    rank = torch.argmax(torch.eq(rank, aug_target.unsqueeze(1)).long(), dim=1)
    index = torch.argsort(rank, stable=True)
    tmp = torch.nonzero(rank, as_tuple=True)[0]
    wrong_num = tmp.numel()
    correct_num = 3 * batch - wrong_num
    wrong_keep = int(wrong_num * ratio_ss)
    index = index[:correct_num + wrong_keep]
    distill_index_ss = torch.sort(index)[0]
    log_simi = F.log_softmax(s_simi / ss_T, dim=1)
    simi_knowledge = F.softmax(t_simi / ss_T, dim=1)
    loss4 = F.kl_div(log_simi[distill_index_ss], simi_knowledge[distill_index_ss],
                     reduction='batchmean') * ss_T * ss_T
    return loss4, rank, len(distill_index_ss)


def official_to_view_major(feat, n):
    """[4N, D] official layout -> (normal views [N, D], rotated views [3N, D] view-major as rotate_views)."""
    f = feat.reshape(n, 4, -1)
    return f[:, 0], f[:, 1:].transpose(0, 1).reshape(3 * n, -1)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.7, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_similarity_rank_filter_is_official(ratio, seed):
    """The teacher ranks each rotated view's own image among the N normal ones; every view it ranks first is
    kept, and of the others the best-ranked floor(wrong * ratio_ss); the KL averages over the kept views."""
    g = torch.Generator().manual_seed(seed)
    n, d = 7, 5
    t_nor = torch.randn(n, d, generator=g, dtype=torch.float64)
    # a mix of views the teacher matches to their image (small noise) and views it does not (large noise)
    noise = torch.where(torch.rand(n, 3, 1, generator=g) < 0.4, 0.2, 3.0).to(torch.float64)
    t_aug = t_nor[:, None] + noise * torch.randn(n, 3, d, generator=g, dtype=torch.float64)
    t_feat = torch.cat([t_nor[:, None], t_aug], 1).reshape(4 * n, d)
    s_feat = torch.randn(4 * n, 3, generator=g, dtype=torch.float64)
    want, rank, kept = official_ss_loss(s_feat, t_feat, n, ratio, 0.5)
    wrong = int((rank > 0).sum())
    assert 0 < wrong < 3 * n, rank  # both kinds present, so the filter has something to do
    s_n, s_a = official_to_view_major(s_feat, n)
    t_n, t_a = official_to_view_major(t_feat, n)
    got = sample_similarity_kl(s_a, s_n, t_a, t_n, 0.5, keep_ratio=ratio)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    if ratio < 1.0 and kept < 3 * n:  # filtering changed the loss
        assert got.item() != pytest.approx(sample_similarity_kl(s_a, s_n, t_a, t_n, 0.5).item(), rel=1e-6)


def test_sample_similarity_rank_filter_edges():
    torch.manual_seed(7)
    s_n, s_a, t_n = torch.randn(4, 3), torch.randn(12, 3), torch.randn(4, 3)
    t_a = t_n.repeat(3, 1)  # the teacher matches every view: nothing is filtered
    assert sample_similarity_kl(s_a, s_n, t_a, t_n, keep_ratio=0.0).item() == pytest.approx(
        sample_similarity_kl(s_a, s_n, t_a, t_n).item(), rel=1e-6)
    # a view-major layout needs M a multiple of N
    with pytest.raises(ValueError, match="multiple"):
        sample_similarity_kl(s_a[:10], s_n, t_a[:10], t_n, keep_ratio=0.75)
    t_wrong = t_n.roll(1, 0).repeat(3, 1)  # every view matches another image: all ranked wrong
    assert sample_similarity_kl(s_a, s_n, t_wrong, t_n, keep_ratio=0.3).item() > 0  # floor(12 * 0.3) = 3 kept
    # floor(12 * 0.05) = 0: no view kept, the term is 0 (the official batchmean over no rows would be NaN)
    assert sample_similarity_kl(s_a, s_n, t_wrong, t_n, keep_ratio=0.05).item() == 0.0
    with pytest.raises(ValueError, match="ss_ratio"):
        SSDKDWeights(ss_ratio=1.5)
