"""Every config of every autotune list is correct, not only the one that wins on the test's GPU.

`@triton.autotune` runs each config once and keeps the fastest for a key; which one wins depends on the GPU, the
shapes and the Triton version, so a config that is wrong (an index mix-up that only shows when BLOCK_M != BLOCK_N,
a tail mask that only matters when a segment straddles a 128-row tile) can sit unnoticed in the list until a user's
GPU picks it. Here each config is pinned in turn and the op is run on one small case that exercises it (packed
segments of 1, 7, 65, 130 and 33 tokens: shorter than a tile, a tile plus one row, longer than the largest tile,
several segments sharing one tile; padded rows of 140 and 67 tokens), forward and backward, against a peer:
PyTorch's `scaled_dot_product_attention` run per segment in float64 (not dermfast's own reference). fp32: within
10x the fp32 tolerance (as tests/test_masked_attention.py); fp16 / bf16: the flash-attention rule, error at most
2x that of textbook attention composed of PyTorch ops in the same dtype.

Pinning: the launchers call ``_tuned(name)`` for the autotuned kernel on a GPU; the test replaces that wrapper
with one that launches the plain @triton.jit kernel with the config's meta-parameters and launch options
(``Config.all_kwargs()``: BLOCK_*, num_warps, num_stages, num_ctas) and records every launch, so the test also
proves the pinned config is the one that ran. The same path runs on a CPU under the Triton interpreter (num_warps
and num_stages mean nothing there, the block shapes and masks do), so CI checks every config's indexing; the GPU
tests add bf16 (bf16 arithmetic is wrong in the interpreter), fp32 with exact dots, and Triton's real lowering of
each config with its num_warps / num_stages. With the GPU path taken, the backward's delta pre-pass runs with its
GPU block (64; the interpreter path uses 16), so CI covers that too.

Autotune lists covered: kernels/masked_attention.py `_FWD_CONFIGS` (forward) and `_BWD_CONFIGS` (backward); the
other kernels (kd_loss, mae_loss, random_masking) pick their tile in the launcher, with no autotune list.
Interpreter cost: about 1-3 s per config and layout on one CPU core.
"""
import pytest
import torch
import torch.nn.functional as F

from dermfast.kernels import masked_attention as kern
from dermfast.ops import masked_attention
from tests.conftest import TOLERANCES

LENGTHS = [1, 7, 65, 130, 33]   # packed: T = 236
PADDED = (140, [140, 67])       # padded: N, lengths
LISTS = {"fwd": (kern._fwd_kernel, kern._FWD_CONFIGS), "bwd": (kern._bwd_kernel, kern._BWD_CONFIGS)}
N_CASES = max(len(c) for _, c in LISTS.values())


def _sdpa(q, k, v):
    """The peer: torch.nn.functional.scaled_dot_product_attention (its math backend in float64)."""
    return F.scaled_dot_product_attention(q, k, v)


def _textbook(q, k, v):
    """softmax(q k^T / sqrt(d)) v composed of plain ops in the inputs' dtype: PyTorch's own low-precision error, as
    flash-attention's tests measure it (tests/test_flash_attn.py, attention_ref with upcast=False)."""
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v


def _per_segment(attend, q, k, v, cu=None, lengths=None):
    """`attend` over each packed segment / each padded sample's live rows; padded rows at or past a sample's
    length are 0, as masked_attention defines them."""
    if cu is not None:
        b = cu.tolist()
        return torch.cat([attend(*(x[s:e].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
                          for s, e in zip(b[:-1], b[1:])])
    out = torch.zeros_like(q)
    for i, n in enumerate(lengths.tolist()):
        out[i, :, :n] = attend(q[i, :, :n], k[i, :, :n], v[i, :, :n])
    return out


class _Pinned:
    """Stands in for ``kern._tuned(name)``: launches `kernel` with `config` and records what it launched."""

    def __init__(self, kernel, config, launches: list):
        self.kernel, self.config, self.launches = kernel, config, launches

    def __getitem__(self, grid):
        opts = self.config.all_kwargs()
        meta = self.config.kwargs
        fixed = grid(meta) if callable(grid) else grid

        def launch(*args, **kw):
            self.launches.append(opts)
            return self.kernel[fixed](*args, **kw, **opts)
        return launch


def _pin(monkeypatch, i: int) -> dict:
    """Pin forward config i and backward config i (each list wraps around); returns {name: (config, launches)}."""
    pinned = {}
    for name, (kernel, configs) in LISTS.items():
        cfg, launches = configs[i % len(configs)], []
        monkeypatch.setitem(kern._TUNED, name, _Pinned(kernel, cfg, launches))
        pinned[name] = (cfg, launches)
    monkeypatch.setattr(kern, "_interpreting", lambda: False)  # the GPU launch path (-> _tuned), also on a CPU
    return pinned


def _case(layout, dtype, D, device):
    gen = torch.Generator(device="cpu").manual_seed(17)
    if layout == "packed":
        shape, kw = (sum(LENGTHS), 2, D), {"cu_seqlens": torch.tensor([0] + LENGTHS, device=device).cumsum(0).int()}
    else:
        n, lens = PADDED
        shape, kw = (len(lens), 2, n, D), {"lengths": torch.tensor(lens, device=device)}
    q, k, v, g = (torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(4))
    return q, k, v, g, kw


def _fwd_bwd(fn, q, k, v, g, **kw):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def _check_config(monkeypatch, i, layout, dtype, D, device):
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32: exact "ieee" dots
    pinned = _pin(monkeypatch, i)
    q, k, v, g, kw = _case(layout, dtype, D, device)
    got = _fwd_bwd(masked_attention, q, k, v, g, backend="triton", **kw)
    ref_kw = {"cu": kw["cu_seqlens"].cpu()} if layout == "packed" else {"lengths": kw["lengths"].cpu()}
    ref = _fwd_bwd(lambda *a, **kw: _per_segment(_sdpa, *a, **kw), *(x.cpu().double() for x in (q, k, v, g)),
                   **ref_kw)
    low = None if dtype == torch.float32 else _fwd_bwd(  # PyTorch's own error in this dtype, on this device
        lambda *a, **kw: _per_segment(_textbook, *a, **kw), q, k, v, g, **{n: t.to(device) for n, t in ref_kw.items()})
    which = {name: f"{name} config {i % len(LISTS[name][1])} {cfg}" for name, (cfg, _) in pinned.items()}
    for j, name in enumerate(("out", "dq", "dk", "dv")):
        a, r = got[j].double().cpu(), ref[j]
        where = which["fwd"] if name == "out" else f"{which['fwd']} + {which['bwd']}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values with {where}"
        if dtype == torch.float32:
            atol, rtol = TOLERANCES[torch.float32]
            torch.testing.assert_close(a, r, atol=10 * atol, rtol=10 * rtol, msg=lambda m: f"{name}, {where}: {m}")
        else:  # the flash-attention rule: at most 2x PyTorch's own error in the same dtype
            err, base = (a - r).abs().max().item(), (low[j].double().cpu() - r).abs().max().item()
            assert err <= 2 * base + 1e-5, f"{name}: error {err:.3g} > 2x PyTorch {dtype} error {base:.3g}, {where}"
    for name, (cfg, launches) in pinned.items():  # the pinned config is the one that ran, once per pass
        assert launches == [cfg.all_kwargs()], f"{name}: launches {launches} != the pinned {cfg}"


def test_lists_are_what_the_autotuner_is_given(monkeypatch):
    """The lists iterated here are the ones `_tuned` hands to triton.autotune (no copy that could drift), around the
    kernels pinned here. Building the Autotuner launches nothing, so this runs under the interpreter too."""
    monkeypatch.setattr(kern, "_TUNED", {})
    for name, (kernel, configs) in LISTS.items():
        tuned = kern._tuned(name)
        assert tuned.configs is configs and tuned.fn is kernel, name
        assert len(configs) >= 1
        keys = {"BLOCK_M", "BLOCK_N"} if name == "fwd" else {"BLOCK_MAJOR", "BLOCK_MINOR"}
        for c in configs:
            assert set(c.kwargs) == keys, (name, c)
            assert all(b >= 16 and b & (b - 1) == 0 for b in c.kwargs.values()), (name, c)  # tl.dot needs >= 16


@pytest.mark.parametrize("layout,dtype,D", [("packed", torch.float32, 80), ("padded", torch.float16, 64)])
@pytest.mark.parametrize("i", range(N_CASES))
def test_every_config_under_the_interpreter(monkeypatch, i, layout, dtype, D):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_every_config_on_the_gpu runs these configs compiled")
    _check_config(monkeypatch, i, layout, dtype, D, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("layout,dtype,D", [("packed", torch.bfloat16, 80), ("padded", torch.float16, 64),
                                            ("packed", torch.float32, 64)])
@pytest.mark.parametrize("i", range(N_CASES))
def test_every_config_on_the_gpu(monkeypatch, i, layout, dtype, D):
    _check_config(monkeypatch, i, layout, dtype, D, "cuda")
