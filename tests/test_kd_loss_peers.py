"""The liger peer of kd_loss (dermfast/ops/kd_loss_peers.py).

liger_kernel is not installed here (and its kernels need a GPU): the glue is checked with Liger's two losses
replaced by their math as Liger's source writes it, against kd_loss_ref in float64; the real library runs in the
@gpu test when it is importable.
"""
import pytest
import torch
import torch.nn.functional as F

from dermfast.ops import kd_loss, kd_loss_ref, ops
from dermfast.ops.kd_loss_peers import liger_forward
from dermfast.ops.registry import Query


def liger_math():
    """linkedin/Liger-Kernel, src/liger_kernel/ops/jsd.py `_jsd_kernel`, branch beta == 0.0 (forward KL), X = log Q
    (student, first argument), Y = log P (teacher): loss = sum(P * (Y - X)) / n_rows; and LigerCrossEntropyLoss
    with `weight`, which matches torch's weighted mean (its tests compare with torch.nn.CrossEntropyLoss)."""
    def jsd(log_q, log_p):
        return (log_p.exp() * (log_p - log_q)).sum() / log_q.shape[0]

    def ce(weight, reduction):
        return lambda s, y: F.cross_entropy(s, y, weight=weight, reduction=reduction)
    return jsd, ce


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_liger_glue_equals_the_reference(reduction, weighted):
    N, C = 6, 37
    s, t = torch.randn(N, C, dtype=torch.float64) * 3, torch.randn(N, C, dtype=torch.float64) * 3
    y = torch.randint(0, C, (N,))
    w = torch.rand(C, dtype=torch.float64) + 0.1 if weighted else None
    loss, grad = liger_forward(s.float(), t.float(), y, w, 2.0, 0.7, reduction, True, losses=liger_math())
    leaf = s.clone().requires_grad_()
    ref = kd_loss_ref(leaf, t, y, 2.0, 0.7, w, reduction)
    (gref,) = torch.autograd.grad(ref, leaf)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32 and grad.shape == (N, C)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), gref, atol=1e-5, rtol=1e-5)
    # the KD term alone (no target)
    loss, _ = liger_forward(s.float(), t.float(), None, None, 4.0, 0.7, reduction, False, losses=liger_math())
    torch.testing.assert_close(loss.double(), kd_loss_ref(s, t, None, 4.0, 0.7, None, reduction), atol=1e-5, rtol=1e-5)


def test_liger_glue_keeps_dermfasts_nan_contract():
    N, C = 4, 9
    s, t = torch.randn(N, C), torch.randn(N, C)
    s[1, 3] = float("inf")
    y = torch.tensor([0, 1, 2, 3])
    loss, grad = liger_forward(s, t, y, None, 2.0, 0.5, "mean", True, losses=liger_math())
    assert loss.isnan() and grad[1].isnan().all() and torch.isfinite(grad[[0, 2, 3]]).all()
    s[1, 3] = 0.0
    loss, grad = liger_forward(s, t, torch.tensor([0, -100, 2, 3]), None, 2.0, 0.5, "mean", True,
                               losses=liger_math())  # Liger's ignore_index must not make a row vanish
    assert loss.isnan() and grad[1].isnan().all()
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        liger_forward(s, t, y, None, 2.0, 0.5, "none", True, losses=liger_math())


def test_liger_capability_reasons():
    op = ops()["kd_loss"]
    cpu = op.reasons(Query(torch.device("cpu"), torch.float32, {"C": 7, "rows": 0}))["liger"]
    assert "not installed" in cpu or "CUDA tensor" in cpu
    assert op.select(Query(torch.device("cpu"), torch.float32, {"C": 7, "rows": 0})).backend == "torch"


@pytest.mark.gpu
def test_liger_on_gpu_equals_the_reference():
    pytest.importorskip("liger_kernel")
    N, C = 64, 1000
    s, t = torch.randn(N, C, device="cuda") * 3, torch.randn(N, C, device="cuda") * 3
    y = torch.randint(0, C, (N,), device="cuda")
    w = torch.rand(C, device="cuda") + 0.1
    leaf = s.clone().requires_grad_()
    got = kd_loss(leaf, t, y, 4.0, 0.9, w, backend="liger")
    (g,) = torch.autograd.grad(got, leaf)
    l64 = s.double().requires_grad_()
    ref = kd_loss_ref(l64, t.double(), y, 4.0, 0.9, w.double())
    (gref,) = torch.autograd.grad(ref, l64)
    torch.testing.assert_close(got.double(), ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g.double(), gref, atol=1e-5, rtol=1e-4)
