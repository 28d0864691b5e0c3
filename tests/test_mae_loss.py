"""MAE loss: the reference against the textbook loop, the kernels (Triton under the interpreter on CPU; Triton and
CUDA on a GPU) against the float64 reference, ragged masks, bad input, the custom ops (opcheck, torch.compile)."""
import pytest
import torch

from dermfast import _optional
from dermfast.ops import BackendUnavailable, mae_loss, mae_loss_ref, patchify, unpatchify
from dermfast.ops.mae_loss_op import check_inputs, mae_loss_backward_op, mae_loss_backward_ref, mae_loss_op
from tests.conftest import TOLERANCES

needs_triton = pytest.mark.skipif(not _optional.HAS_TRITON, reason="triton is not importable")
HAS_GPU = torch.cuda.is_available()
CUDA_EXT_OK = _optional.HAS_CUDA_EXT and hasattr(_optional.cuda_ext, "mae_loss_fwd")


def loss_by_loops(imgs, pred, mask, p, norm_pix):
    """A float64 loop over images and patches: the textbook definition the reference must match."""
    imgs, pred = imgs.double(), pred.double()
    B, C, H, W = imgs.shape
    total, count = 0.0, 0.0
    for b in range(B):
        for i in range(H // p):
            for j in range(W // p):
                l = i * (W // p) + j
                if mask[b, l] == 0:
                    continue
                t = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6) ** 0.5
                total += ((pred[b, l] - t) ** 2).mean().item()
                count += 1
    return total / max(count, 1)


def ragged_mask(B, L, dtype=torch.float32):
    """Random per-row ratios; with B >= 2 row 0 keeps everything and the last row removes everything."""
    ratios = torch.rand(B, 1)
    mask = (torch.rand(B, L) < ratios).to(dtype)
    if B >= 2:
        mask[0] = 0
        mask[-1] = 1
    else:
        mask[0, 0] = 1
    return mask


def inputs(B, C, H, W, p, dtype, device="cpu"):
    L = (H // p) * (W // p)
    imgs = (torch.randn(B, C, H, W) * 2 + 0.5).to(device=device, dtype=dtype)
    pred = torch.randn(B, L, p * p * C).to(device=device, dtype=dtype)
    return imgs, pred, ragged_mask(B, L).to(device)


def reference64(imgs, pred, mask, p, norm_pix, grad_imgs=False):
    """Loss and gradients of the spec, in float64, on the same (rounded) input values."""
    i64 = imgs.detach().double().requires_grad_(grad_imgs)
    p64 = pred.detach().double().requires_grad_()
    loss = mae_loss_ref(i64, p64, mask.double(), p, norm_pix)
    loss.backward()
    return loss.detach(), p64.grad, i64.grad


def assert_close(got, want, dtype, what=""):
    """TOLERANCES[dtype], the absolute part relative to the largest value (gradients are ~1 / (P N) small)."""
    atol, rtol = TOLERANCES[dtype]
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got.double(), want.double(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


def run(imgs, pred, mask, p, norm_pix, backend, grad_imgs=False):
    imgs = imgs.detach().clone().requires_grad_(grad_imgs)
    pred = pred.detach().clone().requires_grad_()
    loss = mae_loss(imgs, pred, mask, p, norm_pix, backend=backend)
    loss.backward()
    return loss.detach(), pred.grad, imgs.grad


# ------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("B,C,H,W,p", [(1, 3, 8, 8, 4), (2, 3, 28, 14, 14), (3, 1, 12, 20, 4)])
def test_patchify_roundtrip(B, C, H, W, p):
    x = torch.randn(B, C, H, W)
    pt = patchify(x, p)
    assert pt.shape == (B, (H // p) * (W // p), p * p * C)
    assert torch.equal(unpatchify(pt, p, C, height=H // p), x)


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("B,H,p", [(2, 16, 4), (1, 28, 14), (3, 24, 8)])
def test_mae_loss_matches_the_definition(norm_pix, dtype, B, H, p):
    imgs = torch.randn(B, 3, H, H, dtype=dtype)
    L = (H // p) ** 2
    pred = torch.randn(B, L, p * p * 3, dtype=dtype)
    mask = (torch.rand(B, L) < 0.75).to(dtype)
    mask[0, 0] = 1
    got = mae_loss(imgs, pred, mask, p, norm_pix)
    want = loss_by_loops(imgs, pred, mask, p, norm_pix)
    atol, rtol = TOLERANCES[dtype if dtype != torch.float16 else torch.float32]  # fp32 accumulation
    assert got.dtype == torch.float32 or dtype == torch.float64
    assert abs(got.item() - want) <= atol + rtol * abs(want) + (1e-3 if dtype == torch.float16 else 0)


def test_mae_loss_gradient_flows_to_pred_only_on_removed_patches():
    imgs = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 4, 48, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float32)
    mae_loss_ref(imgs, pred, mask, 4).backward()
    nonzero = pred.grad.abs().sum(-1) > 0
    assert torch.equal(nonzero, mask.bool())


@pytest.mark.parametrize("norm_pix", [True, False])
def test_backward_reference_is_the_gradient_of_the_reference(norm_pix):
    imgs, pred, mask = inputs(3, 3, 16, 12, 4, torch.float64)
    _, want, _ = reference64(imgs, pred, mask, 4, norm_pix)
    got = mae_loss_backward_ref(torch.tensor(2.5, dtype=torch.float64), imgs, pred, mask, 4, norm_pix)
    assert_close(got, 2.5 * want, torch.float64, "backward reference")


@pytest.mark.parametrize("norm_pix", [True, False])
def test_ragged_normalisation_is_global_sum_over_total_removed(norm_pix):
    B, L, p = 3, 16, 4
    imgs, pred, _ = inputs(B, 3, 16, 16, p, torch.float64)
    mask = torch.zeros(B, L)
    mask[0, :1] = 1  # sample 0 removes 1 patch, sample 1 removes 5, sample 2 all 16
    mask[1, 3:8] = 1
    mask[2] = 1
    per_patch = ((pred - (patchify(imgs, p) if not norm_pix else _normed(patchify(imgs, p)))) ** 2).mean(-1)
    want = (per_patch * mask).sum() / 22
    assert_close(mae_loss(imgs, pred, mask, p, norm_pix), want, torch.float64, "ragged")
    assert abs(loss_by_loops(imgs, pred, mask, p, norm_pix) - want.item()) < 1e-10


def _normed(t):
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5


# ------------------------------------------------------------------------------------------- triton kernel


SHAPES = [(1, 3, 16, 16, 4), (2, 3, 28, 28, 7), (3, 3, 24, 16, 8), (2, 3, 28, 28, 14), (2, 1, 28, 14, 7),
          (3, 3, 20, 28, 4)]


@needs_triton
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,C,H,W,p", SHAPES)
def test_triton_matches_float64_reference(B, C, H, W, p, dtype, norm_pix):
    imgs, pred, mask = inputs(B, C, H, W, p, dtype)
    loss, g_pred, _ = run(imgs, pred, mask, p, norm_pix, "triton")
    want_loss, want_grad, _ = reference64(imgs, pred, mask, p, norm_pix)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, want_loss, torch.float32, "loss")  # fp32 accumulation whatever the input dtype
    assert g_pred.dtype == dtype and g_pred.shape == pred.shape
    assert_close(g_pred, want_grad, dtype, "grad wrt pred")
    kept = mask == 0
    assert torch.all(g_pred[kept] == 0), "kept patches must get an exact zero gradient"
    assert torch.all(g_pred[~kept].abs().sum(-1) > 0)


@needs_triton
@pytest.mark.parametrize("norm_pix", [True, False])
def test_triton_agrees_with_torch_backend_on_ragged_masks(norm_pix):
    imgs, pred, mask = inputs(3, 3, 16, 24, 4, torch.float32)
    mask[1] = (torch.arange(24) % 3 == 0).float()  # a third removed; rows 0 and 2 keep all / remove all
    a = run(imgs, pred, mask, 4, norm_pix, "triton")
    b = run(imgs, pred, mask, 4, norm_pix, "torch")
    assert_close(a[0], b[0], torch.float32, "loss")
    assert_close(a[1], b[1], torch.float32, "grad")


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_batch_removing_nothing_gives_zero_loss_and_gradient(backend):
    imgs, pred, mask = inputs(2, 3, 16, 16, 4, torch.float32)
    loss, g, _ = run(imgs, pred, torch.zeros_like(mask), 4, True, backend)
    assert loss.item() == 0.0
    assert torch.count_nonzero(g) == 0


@needs_triton
def test_mask_dtypes_give_the_same_result():
    imgs, pred, mask = inputs(2, 3, 16, 16, 4, torch.float32)
    results = [run(imgs, pred, mask.to(dt), 4, True, "triton")
               for dt in (torch.float32, torch.bool, torch.uint8, torch.int64, torch.float16, torch.float64)]
    for loss, g, _ in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(g, results[0][1])


@needs_triton
def test_non_contiguous_inputs_are_read_in_place():
    imgs, pred, mask = inputs(2, 3, 16, 24, 4, torch.float32)
    want = run(imgs, pred, mask, 4, True, "torch")
    big = torch.randn(2, pred.shape[1] + 1, pred.shape[2])
    big[:, 1:] = pred
    pred_view = big[:, 1:]  # the model's decoder_pred(...)[:, 1:]
    canvas = torch.randn(2, 3, 20, 30)
    canvas[:, :, 2:18, 3:27] = imgs
    variants = {
        "channels_last imgs": (imgs.to(memory_format=torch.channels_last), pred, mask),
        "sliced imgs": (canvas[:, :, 2:18, 3:27], pred, mask),
        "pred slice view": (imgs, pred_view, mask),
        "transposed mask": (imgs, pred, mask.t().contiguous().t()),
        "pred with inner stride": (imgs, torch.stack([pred, pred], -1)[..., 0], mask),
    }
    for name, (i, p_, m) in variants.items():
        assert not (i.is_contiguous() and p_.is_contiguous() and m.is_contiguous()), name
        got = run(i, p_, m, 4, True, "triton")
        assert_close(got[0], want[0], torch.float32, name)
        assert_close(got[1], want[1], torch.float32, name)


@needs_triton
def test_triton_is_deterministic():
    imgs, pred, mask = inputs(3, 3, 28, 28, 7, torch.float32)
    a, b = run(imgs, pred, mask, 7, True, "triton"), run(imgs, pred, mask, 7, True, "triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_writes_exactly_its_outputs(dtype):
    """Poisoned outputs, with sentinel guards around them: every element written, nothing past the end."""
    from dermfast.kernels import mae_loss as kernel
    B, C, H, W, p = 2, 3, 28, 21, 7
    imgs, pred, mask = inputs(B, C, H, W, p, dtype)
    n, guard = pred.numel(), 37
    buf = torch.full((n + 2 * guard,), float("nan"), dtype=dtype)
    buf[:guard] = 7.0
    buf[-guard:] = 7.0
    out = buf[guard:guard + n].view(pred.shape)
    kernel.mae_loss_bwd(torch.tensor(1.0), imgs, pred, mask, p, True, 1e-6, out=out)
    assert torch.all(buf[:guard] == 7.0) and torch.all(buf[-guard:] == 7.0)
    assert torch.isfinite(out).all()
    assert_close(out, reference64(imgs, pred, mask, p, True)[1], dtype, "poisoned grad")
    lbuf = torch.full((3,), float("nan"))
    kernel.mae_loss_fwd(imgs, pred, mask, p, True, 1e-6, out=lbuf[1])
    assert torch.isnan(lbuf[0]) and torch.isnan(lbuf[2]) and torch.isfinite(lbuf[1])
    assert_close(lbuf[1], reference64(imgs, pred, mask, p, True)[0], torch.float32, "poisoned loss")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_gradient_to_imgs_when_asked(backend, norm_pix):
    imgs, pred, mask = inputs(2, 3, 16, 16, 4, torch.float32)
    _, g_pred, g_imgs = run(imgs, pred, mask, 4, norm_pix, backend, grad_imgs=True)
    _, want_pred, want_imgs = reference64(imgs, pred, mask, 4, norm_pix, grad_imgs=True)
    assert_close(g_pred, want_pred, torch.float32, "pred")
    assert_close(g_imgs, want_imgs, torch.float32, "imgs")


# ------------------------------------------------------------------------------------------- bad input


def _bad_cases():
    i, pr, m = torch.randn(2, 3, 16, 16), torch.randn(2, 16, 48), torch.ones(2, 16)
    return {
        "pred P": ((i, torch.randn(2, 16, 47), m, 4), "does not match patchified target"),
        "pred L": ((i, torch.randn(2, 15, 48), m, 4), "does not match patchified target"),
        "pred B": ((i, torch.randn(3, 16, 48), m, 4), "does not match patchified target"),
        "pred rank": ((i, torch.randn(32, 48), m, 4), r"pred must be \[B, L, P\]"),
        "imgs rank": ((i[0], pr, m, 4), r"imgs must be \[B, C, H, W\]"),
        "mask shape": ((i, pr, torch.ones(2, 15), 4), r"mask \(2, 15\) must be \[B, L\]"),
        "mask rank": ((i, pr, torch.ones(32), 4), r"must be \[B, L\]"),
        "not a multiple": ((torch.randn(2, 3, 18, 16), pr, m, 4), "not a multiple of patch size"),
        "patch 0": ((i, pr, m, 0), "patch must be a positive int"),
        "patch float": ((i, pr, m, 4.0), "patch must be a positive int"),
        "int imgs": ((i.to(torch.uint8), pr, m, 4), "must be float16, bfloat16, float32 or float64"),
        "int pred": ((i, pr.to(torch.int32), m, 4), "must be float16, bfloat16, float32 or float64"),
        "complex mask": ((i, pr, m.to(torch.complex64), 4), "mask must be real"),
        "device": ((i, pr.to("meta"), m, 4), "one device"),
        "one pixel patch": ((torch.randn(1, 1, 4, 4), torch.randn(1, 16, 1), torch.ones(1, 16), 1),
                            "at least 2 values per patch"),
    }


@pytest.mark.parametrize("backend", [None, "torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_a_clear_error(case, backend):
    args, msg = _bad_cases()[case]
    with pytest.raises(ValueError, match=msg):
        mae_loss(*args, backend=backend)


def test_bad_eps_and_direct_custom_op_calls_are_validated():
    i, pr, m = torch.randn(2, 3, 16, 16), torch.randn(2, 16, 48), torch.ones(2, 16)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be"):
            mae_loss(i, pr, m, 4, eps=eps)
    with pytest.raises(ValueError, match="does not match patchified target"):  # never reaches a kernel
        torch.ops.dermfast.mae_loss(i, pr[:, :15], m, 4, True, 1e-6, "triton")
    with pytest.raises(ValueError, match="grad must be a 0-dim"):
        torch.ops.dermfast.mae_loss_backward(torch.ones(2), i, pr, m, 4, True, 1e-6, None)


def test_backends_that_cannot_serve_say_why():
    i, pr, m = inputs(1, 3, 8, 8, 4, torch.float64)
    with pytest.raises(BackendUnavailable, match="cuda: .*triton: .*torch: would fit"):
        mae_loss(i, pr, m, 4, backend="cuda")
    if _optional.HAS_TRITON:
        with pytest.raises(BackendUnavailable, match="dtype float64 not in"):
            mae_loss(i, pr, m, 4, backend="triton")
    assert mae_loss_op.select(check_and_query(i, pr)).backend == "torch"  # CPU automatic choice
    assert set(mae_loss_op.impls) == set(mae_loss_backward_op.impls) == {"torch", "triton", "cuda"}


def check_and_query(i, pr):
    from dermfast.ops.mae_loss_op import _query
    check_inputs(i, pr, torch.ones(pr.shape[:2]), 4, True, 1e-6)
    return _query(i, pr, 4)


# ------------------------------------------------------------------------------------------- custom ops


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_opcheck(backend):
    imgs, pred, mask = inputs(2, 3, 16, 12, 4, torch.float32)
    torch.library.opcheck(torch.ops.dermfast.mae_loss.default,
                          (imgs, pred.requires_grad_(), mask, 4, True, 1e-6, backend))
    torch.library.opcheck(torch.ops.dermfast.mae_loss.default,
                          (imgs, pred.detach(), mask.bool(), 4, False, 1e-6, backend))
    torch.library.opcheck(torch.ops.dermfast.mae_loss_backward.default,
                          (torch.tensor(0.5), imgs, pred.detach(), mask, 4, True, 1e-6, backend))


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=needs_triton)])
def test_torch_compile_fullgraph(backend):
    imgs, pred, mask = inputs(2, 3, 16, 16, 4, torch.float32)

    def step(imgs, pred, mask):
        return 3.0 * mae_loss(imgs, torch.tanh(pred), mask, 4, backend=backend) + pred.mean()

    compiled = torch.compile(step, fullgraph=True)
    for k in range(2):  # a second call with new values must reuse the graph and stay equal to eager
        pe = (pred + k).detach().requires_grad_()
        pc = (pred + k).detach().requires_grad_()
        want = step(imgs, pe, mask)
        got = compiled(imgs, pc, mask)
        want.backward()
        got.backward()
        assert_close(got.detach(), want.detach(), torch.float32, "compiled loss")
        assert_close(pc.grad, pe.grad, torch.float32, "compiled grad")


def test_backend_is_chosen_inside_the_op_at_run_time():
    """The global choice is read when the op runs, not when it is traced: a compiled graph follows it."""
    from dermfast.ops import use_backend
    imgs, pred, mask = inputs(1, 3, 8, 8, 4, torch.float32)
    f = torch.compile(lambda a, b, c: mae_loss(a, b, c, 4), backend="aot_eager", fullgraph=True)
    want = mae_loss_ref(imgs, pred, mask, 4)
    assert torch.equal(f(imgs, pred, mask), want)
    with use_backend("cuda"):
        with pytest.raises(BackendUnavailable, match="'cuda' was requested"):
            f(imgs, pred, mask)
    if _optional.HAS_TRITON:
        with use_backend("triton"):
            assert_close(f(imgs, pred, mask), want, torch.float32, "triton via the global setter")


# ------------------------------------------------------------------------------------------- GPU


# fp32 accumulation of up to ~10^7 terms with the GPU's approximate sqrt: looser than the interpreter's exact fp32,
# still 17x tighter than the biased-variance error (1 / (P - 1) = 1.7e-3 at P = 588).
GPU_LOSS_RTOL = 1e-4
GPU_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_EXT_OK,
                                                                        reason="dermfast._C lacks mae_loss"))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("imgs_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_gpu_vit_h_shapes_bf16(backend, imgs_dtype, norm_pix):
    B, C, H, p = 64, 3, 224, 14
    imgs, pred, mask = inputs(B, C, H, H, p, torch.bfloat16, "cuda")
    imgs = imgs.to(imgs_dtype)
    mask = mask.to(torch.bfloat16)  # the model's mask has x's dtype: bf16 under autocast
    loss, g, _ = run(imgs, pred, mask, p, norm_pix, backend)
    want_loss, want_grad, _ = reference64(imgs, pred, mask, p, norm_pix)
    torch.testing.assert_close(loss.double(), want_loss, rtol=GPU_LOSS_RTOL, atol=0)
    assert g.dtype == torch.bfloat16
    assert_close(g, want_grad, torch.bfloat16, "grad")
    assert torch.all(g[mask == 0] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,C,H,W,p", [(3, 3, 64, 48, 16), (5, 3, 56, 56, 8), (2, 1, 42, 70, 14), (4, 3, 60, 60, 4)])
def test_gpu_kernels_match_float64_reference(backend, dtype, B, C, H, W, p):
    imgs, pred, mask = inputs(B, C, H, W, p, dtype, "cuda")
    loss, g, _ = run(imgs, pred, mask, p, True, backend)
    want_loss, want_grad, _ = reference64(imgs, pred, mask, p, True)
    torch.testing.assert_close(loss.double(), want_loss, rtol=GPU_LOSS_RTOL, atol=0)
    assert_close(g, want_grad, dtype, "grad")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_deterministic_and_non_contiguous(backend):
    imgs, pred, mask = inputs(16, 3, 224, 224, 16, torch.bfloat16, "cuda")
    a, b = run(imgs, pred, mask, 16, True, backend), run(imgs, pred, mask, 16, True, backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = run(imgs.to(memory_format=torch.channels_last), pred, mask.bool(), 16, True, backend)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_EXT_OK, reason="dermfast._C lacks mae_loss")
def test_gpu_cuda_kernel_writes_exactly_its_output():
    from dermfast.ops.mae_loss_op import _cuda_args
    imgs, pred, mask = inputs(4, 3, 56, 56, 14, torch.bfloat16, "cuda")
    n, guard = pred.numel(), 1000
    buf = torch.full((n + 2 * guard,), float("nan"), dtype=pred.dtype, device="cuda")
    buf[:guard] = 7.0
    buf[-guard:] = 7.0
    out = buf[guard:guard + n]
    m, kw = _cuda_args(imgs, pred, mask, 14, True, 1e-6)
    grad, scale = torch.ones((), device="cuda"), torch.empty((), device="cuda")
    _optional.cuda_ext.mae_loss_bwd(grad.data_ptr(), imgs.data_ptr(), pred.data_ptr(), m.data_ptr(),
                                    scale.data_ptr(), out.data_ptr(), **kw)
    torch.cuda.synchronize()
    assert torch.all(buf[:guard] == 7.0) and torch.all(buf[-guard:] == 7.0)
    assert_close(out.view(pred.shape), reference64(imgs, pred, mask, 14, True)[1], torch.bfloat16, "grad")


@pytest.mark.gpu
def test_gpu_automatic_choice_and_compile():
    imgs, pred, mask = inputs(8, 3, 224, 224, 14, torch.bfloat16, "cuda")
    from dermfast.ops.mae_loss_op import _query
    assert mae_loss_op.select(_query(imgs, pred, 14)).backend == ("cuda" if CUDA_EXT_OK else "triton")
    eager = run(imgs, pred, mask, 14, True, None)
    p = pred.detach().clone().requires_grad_()
    got = torch.compile(lambda a, b, c: mae_loss(a, b, c, 14), fullgraph=True)(imgs, p, mask)
    got.backward()
    assert torch.equal(got.detach(), eager[0]) and torch.equal(p.grad, eager[1])


# ------------------------------------------------------------------------------------------- compiler


_COMPILE_SM90 = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile
from dermfast.kernels import mae_loss as kern
ptrs = dict(imgs_ptr="*bf16", pred_ptr="*bf16", mask_ptr="*u8", part_ptr="*fp32", loss_ptr="*fp32",
            grad_ptr="*fp32", scale_ptr="*fp32", out_ptr="*bf16")
def build(fn, consts, **opts):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in ("inv_p", "inv_pm1", "eps", "two_over_p")
                                                     else "i64" if n.startswith("s_") else "i32")
           for n in fn.arg_names}
    return triton_compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                          target=GPUTarget("cuda", 90, 32), options=opts)
for P, norm in ((48, True), (588, True), (588, False), (3072, True)):  # BLOCK_L 16, 4, 4, 1
    bl, bp = kern._blocks(P)
    for fn in (kern._mae_loss_fwd_kernel, kern._mae_loss_bwd_kernel):
        assert "cubin" in build(fn, dict(NORM=norm, BLOCK_L=bl, BLOCK_P=bp), num_warps=8).asm
for fn in (kern._mae_loss_reduce_kernel, kern._mae_loss_scale_kernel):
    assert "cubin" in build(fn, dict(BLOCK=kern._REDUCE_BLOCK), num_warps=4).asm
print("compiled")
"""


@needs_triton
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """Lower every Triton kernel to an sm_90 cubin (no GPU needed): the interpreter never runs Triton's compiler,
    so lowering errors would otherwise only show on a GPU. bf16 imgs / pred, bool mask, BLOCK_L from 16 down to 1.
    A subprocess, because this process runs with TRITON_INTERPRET=1."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
