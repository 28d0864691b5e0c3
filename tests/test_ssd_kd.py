"""SSD-KD loss terms: each against an independent computation (plain-Python loops on tiny tensors, or a known
property: zero when student == teacher, RKD's invariances), the composed loss, and gradient flow (student only)."""
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


def test_channel_gram_by_hand_and_zero_on_equal_features():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]], dtype=torch.float64)  # [1, 2, 1, 2]: channels (1,2), (3,4)
    assert channel_gram(f)[0].tolist() == [[2.5, 5.5], [5.5, 12.5]]
    t = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)  # gram [[0.5, 0], [0, 0.5]]
    loss = ChannelGramLoss(2, 2).double()
    want = math.sqrt(((2.5 - 0.5) ** 2 + 5.5 ** 2 * 2 + (12.5 - 0.5) ** 2) / 4)
    assert loss(f, t).item() == pytest.approx(want, rel=1e-12)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-5)  # identity adapter at init; sqrt(eps) floor
    wide = ChannelGramLoss(4, 2)
    assert wide(torch.randn(3, 4, 5, 5), torch.randn(3, 2, 2, 3)).shape == ()  # other width and spatial size


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
        "ss": sample_similarity_kl(student.rot_embed, student.embed, teacher.rot_embed, teacher.embed, 0.5),
        "rkd_distance": rkd_distance(student.embed, teacher.embed),
        "rkd_angle": rkd_angle(student.embed, teacher.embed),
        "gram": crit.gram(student.feat, teacher.feat),
        "rotation": F.cross_entropy(student.rot_head, rot_labels),
    }
    for name, value in want.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-9), name
    manual = sum(getattr(weights, name) * value.item() for name, value in want.items())
    assert total.item() == pytest.approx(manual, rel=1e-9)


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
    assert crit.gram.adapter.weight.grad is not None and crit.gram.adapter.weight.grad.abs().sum() > 0


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
