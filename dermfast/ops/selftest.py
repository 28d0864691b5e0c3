"""Proof before dispatch: a non-torch backend serves an op automatically only after it has matched the torch
reference on this device.

The first time (op, backend, device, dtype) is about to be chosen automatically in a process, the op runs once
through that backend on a small fixed input, forward and backward, and its results are compared with the torch
reference (the spec) computed in float64 on the same device, with the per-dtype tolerances the tests use
(dermfast/ops/tolerances.py). A backend that fails (wrong values, non-finite values, an exception, a launch error)
is passed over for the rest of the process, with one warning line naming op, backend, device and what differed;
the next backend serves.

- Verdicts are cached on disk per machine fingerprint (GPU model and capability, driver, dermfast / torch / triton
  versions, a digest of the compiled extension and of the kernel sources) in $DERMFAST_CACHE/selftest/, so a
  process on the same machine and build does not rerun them.
- `DERMFAST_SELFTEST=0` turns the self-test off (the environment is read at each decision, cheap).
- A backend named explicitly (argument, set_backend, DERMFAST_BACKEND) is checked for capability only: the
  registry does not call this module for it.
- Inputs come from a private CPU `torch.Generator`: the global RNGs (CPU and CUDA) do not move, so a resumed run
  draws the same numbers as the run it resumes. The check runs eagerly, with grad on and autocast off; while
  torch.compile traces (torch.compiler.is_compiling()) nothing is run and an unproven backend is passed over.
- Ops share one check per public op: `mae_loss_backward` is proven by the `mae_loss` check (forward and
  backward), `masked_attention_bwd` by `masked_attention`, `random_masking_backward` by `random_masking`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from dermfast.paths import default_cache_dir
from dermfast.ops import registry
from dermfast.ops.tolerances import TOLERANCES, tolerance

ENV_VAR = "DERMFAST_SELFTEST"

# registry op name -> the public op whose check proves it
FAMILY = {"mae_loss_backward": "mae_loss", "masked_attention_bwd": "masked_attention",
          "random_masking_backward": "random_masking"}


class SelfTestWarning(UserWarning):
    """A backend failed its self-test on this device and is not used for the rest of the process."""


@dataclasses.dataclass
class Compare:
    """One result of a check: the backend's value, the float64 reference, and PyTorch's own result in the
    backend's dtype (None when there is none); exact=True for indices and masks, which must be equal."""

    name: str
    got: torch.Tensor
    ref: torch.Tensor
    low: torch.Tensor | None = None
    exact: bool = False


# A check: (backend, device, dtype, generator) -> the Compares of one forward + backward run.
Check = Callable[[str, torch.device, torch.dtype, torch.Generator], "list[Compare]"]
CHECKS: dict[str, Check] = {}


def register_check(op: str) -> Callable[[Check], Check]:
    def deco(fn: Check) -> Check:
        CHECKS[op] = fn
        return fn
    return deco


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip() != "0"


# ------------------------------------------------------------------------------------------------ the checks


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grad_idx: list[int], upstream=None):
    leaves = [x.detach().clone().requires_grad_(i in grad_idx) for i, x in enumerate(inputs)]
    out = fn(*leaves)
    first = out[0] if isinstance(out, (tuple, list)) else out
    up = upstream.to(first.dtype) if upstream is not None else torch.ones_like(first)
    grads = torch.autograd.grad(first, [leaves[i] for i in grad_idx], up)
    return out, grads


@register_check("mae_loss")
def _check_mae_loss(backend, device, dtype, gen):
    from dermfast.ops.mae_loss_op import mae_loss
    B, C, H, p = 2, 3, 16, 4
    L = (H // p) ** 2
    imgs, pred = _randn(gen, B, C, H, H, dtype=torch.float64, device=device), _randn(gen, B, L, p * p * C,
                                                                                   dtype=torch.float64, device=device)
    mask = (torch.rand(B, L, generator=gen, dtype=torch.float64) < 0.75).to(device, torch.float64)
    mask[0, 0], mask[1, 1] = 1, 0

    def run(b, dt):
        (loss,), (gp,) = _fwd_bwd(lambda i, q: (mae_loss(i, q, mask.to(dt), p, True, backend=b),),
                                  [imgs.to(dt), pred.to(dt)], [1])
        return loss, gp

    got, ref, low = run(backend, dtype), run("torch", torch.float64), run("torch", dtype)
    return [Compare(n, g, r, lo) for n, g, r, lo in zip(("loss", "d pred"), got, ref, low)]


@register_check("kd_loss")
def _check_kd_loss(backend, device, dtype, gen):
    from dermfast.ops.kd_loss_op import kd_loss
    N, C = 5, 37
    s, t = (_randn(gen, N, C, dtype=torch.float64, device=device) * 3 for _ in range(2))
    y = torch.randint(0, C, (N,), generator=gen).to(device)

    def run(b, dt):
        (loss,), (gs,) = _fwd_bwd(lambda a, c: (kd_loss(a, c, y, 2.0, 0.5, None, "mean", b),),
                                  [s.to(dt), t.to(dt)], [0])
        return loss, gs

    got, ref, low = run(backend, dtype), run("torch", torch.float64), run("torch", dtype)
    return [Compare(n, g, r, lo) for n, g, r, lo in zip(("loss", "d student"), got, ref, low)]


def _attention_form(backend, device, dtype, D, L) -> tuple[str, bool]:
    """(layout, with backward) the check runs `backend` in: packed when it serves packed (the MAE encoder's
    form), else dense (sdpa serves only that); the backward wherever the backend has one on this device."""
    from dermfast.ops.masked_attention_op import masked_attention_fwd_op
    impl = masked_attention_fwd_op.impls.get(backend)
    for layout, code in (("packed", 1), ("dense", 0)):
        for grad in (True, False):
            q = registry.Query(torch.device(device), dtype, {"D": D, "packed": code, "layout": code, "L": L}, grad)
            if impl is not None and impl.supports(q) is None:
                return layout, grad
    return "packed", True


@register_check("masked_attention")
def _check_masked_attention(backend, device, dtype, gen):
    from dermfast.ops.masked_attention_op import masked_attention
    lengths = [3, 5, 1] if device.type == "cpu" else [7, 65, 1]  # the interpreter is slow: tiny on CPU
    H, D = (2, 16) if device.type == "cpu" else (3, 64)
    layout, grad = _attention_form(backend, device, dtype, D, max(lengths))
    if layout == "dense":  # every sequence as long as the longest
        lengths = [max(lengths)] * 2
    T = sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    qkv = [_randn(gen, T, H, D, dtype=torch.float64, device=device) for _ in range(3)]
    g = _randn(gen, T, H, D, dtype=torch.float64, device=device)
    if layout == "dense":
        qkv, g = ([x.view(len(lengths), lengths[0], H, D).transpose(1, 2) for x in (*qkv, g)][:3],
                  g.view(len(lengths), lengths[0], H, D).transpose(1, 2))

    def attend(b):
        if layout == "dense":
            return lambda q, k, v: (masked_attention(q, k, v, backend=b),)
        return lambda q, k, v: (masked_attention(q, k, v, cu, max(lengths), backend=b),)

    def run(b, dt):
        if not grad:
            with torch.no_grad():
                return (attend(b)(*(x.to(dt) for x in qkv))[0],)
        out, grads = _fwd_bwd(attend(b), [x.to(dt) for x in qkv], [0, 1, 2], g)
        return (out[0], *grads)

    got, ref, low = run(backend, dtype), run("torch", torch.float64), run("torch", dtype)
    return [Compare(n, a, r, lo) for n, a, r, lo in zip(("out", "dq", "dk", "dv"), got, ref, low)]


@register_check("random_masking")
def _check_random_masking(backend, device, dtype, gen):
    from dermfast.ops.random_masking_op import random_masking
    B, L, D = 3, 16, 8
    x = _randn(gen, B, L, D, dtype=torch.float64, device=device)
    pos = _randn(gen, L, D, dtype=torch.float64, device=device)
    g = _randn(gen, B, L // 4, D, dtype=torch.float64, device=device)  # keep 4 of 16 at ratio 0.75

    def run(b, dt):
        res = []

        def fn(a, c):
            r = random_masking(a, 0.75, 1234, 5, c, backend=b)
            res.append(r)
            return (r.visible,)

        (vis,), (gx, gp) = _fwd_bwd(fn, [x.to(dt), pos.to(dt)], [0, 1], g)
        r = res[0]
        return vis, gx, gp, r.mask, r.ids_restore, r.ids_keep

    got, ref, low = run(backend, dtype), run("torch", torch.float64), run("torch", dtype)
    names = ("visible", "d x", "d pos_embed", "mask", "ids_restore", "ids_keep")
    return [Compare(n, a, r, lo, exact=i >= 3) for i, (n, a, r, lo) in enumerate(zip(names, got, ref, low))]


# ------------------------------------------------------------------------------------------------ comparison


def compare(op: str, results: list[Compare], dtype: torch.dtype) -> str | None:
    """None if every result is within tolerance, else what differed (first failure)."""
    for c in results:
        got, ref = c.got.detach(), c.ref.detach()
        if tuple(got.shape) != tuple(ref.shape):
            return f"{c.name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if c.exact:
            if not torch.equal(got.to("cpu", torch.float64), ref.to("cpu", torch.float64)):
                n = int((got.to("cpu", torch.float64) != ref.to("cpu", torch.float64)).sum())
                return f"{c.name}: {n} of {got.numel()} values differ (must be equal)"
            continue
        g64, r64 = got.double(), ref.double()
        if not torch.isfinite(g64).all():
            return f"{c.name}: {int((~torch.isfinite(g64)).sum())} non-finite values"
        atol, rtol = tolerance(op, dtype if dtype in TOLERANCES else torch.float32)
        scale = float(r64.abs().max()) if r64.numel() else 1.0
        scale = scale or 1.0
        err = (g64 - r64).abs()
        if bool((err <= atol * scale + rtol * r64.abs()).all()):
            continue
        worst = float(err.max())
        if c.low is not None:  # within twice PyTorch's own error in this dtype also passes
            own = float((c.low.detach().double() - r64).abs().max())
            if worst <= 2 * own + atol * scale:
                continue
        return (f"{c.name}: max abs error {worst:.3g} vs the float64 reference (allowed {atol:.0e} x {scale:.3g}"
                f" + {rtol:.0e} x |ref|)")
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


_local = threading.local()


def run_check(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> tuple[str | None, float]:
    """Run `op`'s check through `backend` now: (None if it passed else why, seconds taken)."""
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0x5E1F7E57)
    t0 = time.perf_counter()
    _local.running = getattr(_local, "running", 0) + 1
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            results = CHECKS[op](backend, device, dtype, gen)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous launch error surfaces here, as an exception
            why = compare(op, results, dtype)
    except Exception as e:  # a failing backend is a verdict, not a crash: the next backend serves
        why = _one_line(e)
    finally:
        _local.running -= 1
    return why, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ verdicts


def _device_str(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


_memo: dict[tuple[str, str, str, str], str | None] = {}
_lock = threading.Lock()


def reset() -> None:
    """Forget this process's verdicts (the disk cache stays)."""
    with _lock:
        _memo.clear()
        _fingerprints.clear()


def verdict(op_name: str, backend: str, q) -> str | None:
    """None if `backend` may serve `op_name` for Query `q` (proven, or nothing to prove), else why not."""
    if backend == "torch" or not enabled() or getattr(_local, "running", 0):
        return None  # the reference is the spec; self-test off; a check's own inner dispatch
    op = FAMILY.get(op_name, op_name)
    if op not in CHECKS:
        return None  # no check written for this op: nothing to prove it with
    device = torch.device(q.device)
    dtype_name = str(q.dtype).removeprefix("torch.")
    key = (op, backend, _device_str(device), dtype_name)
    if key in _memo:
        return _memo[key]
    cache = _cache_file(device)
    stored = _read_cache(cache).get(f"{op}|{backend}|{dtype_name}", _MISSING)
    if stored is not _MISSING:
        why = stored
    elif torch.compiler.is_compiling():
        return "not proven on this device yet (the self-test never runs while torch.compile traces)"
    else:
        why, _ = run_check(op, backend, device, q.dtype)
        _write_cache(cache, fingerprint(device), f"{op}|{backend}|{dtype_name}", why)
    with _lock:
        first = key not in _memo
        _memo[key] = None if why is None else f"failed its self-test on this device: {why}"
    if why is not None and first:
        warnings.warn(f"dermfast: {op} backend {backend} on {key[2]} ({device_name(device)}, {dtype_name}) failed its "
                      f"self-test and is not used in this process: {why}", SelfTestWarning, stacklevel=3)
    return _memo[key]


# ------------------------------------------------------------------------------------------------ disk cache

_MISSING = object()
_fingerprints: dict[str, dict] = {}


def cache_dir() -> Path:
    return default_cache_dir()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _digest_files(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        try:
            h.update(p.name.encode())
            h.update(p.read_bytes())
        except OSError:
            h.update(b"?")
    return h.hexdigest()[:16]


def fingerprint(device: torch.device) -> dict:
    """What a verdict depends on: GPU model, driver, dermfast version, the build (extension, kernels), versions."""
    dev = _device_str(device)
    if dev in _fingerprints:
        return _fingerprints[dev]
    import dermfast
    from dermfast import _optional
    here = Path(__file__).resolve().parent
    kernels = here.parent / "kernels"
    fp = {"device": device_name(device), "dermfast": dermfast.__version__, "torch": torch.__version__,
          "triton": getattr(_optional.triton, "__version__", "none"),
          "sources": _digest_files([*here.glob("*.py"), *kernels.glob("*.py")])}
    if device.type == "cuda":
        fp["capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
        fp["cuda"] = torch.version.cuda or torch.version.hip or "none"
    ext = _optional.cuda_ext
    if ext is not None:
        fp["driver"] = ext.cuda_driver_version()
        fp["ext"] = _digest_files([Path(ext.__file__)]) + "/" + ext.compiled_cuda_archs()
    _fingerprints[dev] = fp
    return fp


def _cache_file(device: torch.device) -> Path:
    fp = fingerprint(device)
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "selftest" / f"{key}.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data.get("verdicts", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, fp: dict, entry: str, why: str | None) -> None:
    """Add one verdict (temporary name, then rename: a reader never sees half a file). An unwritable cache
    is reported once and only means that the next process tests again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        verdicts = _read_cache(path)
        verdicts[entry] = why
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "verdicts": verdicts}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        if not _cache_warned:
            _cache_warned.append(path)
            warnings.warn(f"dermfast: cannot write the self-test cache {path} ({_one_line(e)}); verdicts are "
                          "kept for this process only", SelfTestWarning, stacklevel=4)


_cache_warned: list[Path] = []


registry.set_prover(verdict)
