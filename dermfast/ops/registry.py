"""Backend registry: every op declares, per backend, what it supports; a dispatcher picks the first that fits.

Backends: dermfast's own, cuda (csrc/, compiled extension) and triton (kernels/); torch (the reference, which
runs anywhere); and peers, other libraries' kernels wrapped as backends of an op (masked_attention: flash_attn,
sdpa, sdpa_nested, flex; kd_loss: liger; see dermfast/ops/attention_peers.py, kd_loss_peers.py). A backend
implementation answers a `Query` (device, dtype, named sizes) with `None` when it can serve it, or a one-line
reason when it cannot.

Order of automatic choice, among the backends that are capable and proven (below):
- Measured, where a measurement exists: the dispatch table that `python -m dermfast.bench` writes for this GPU
  (dermfast/ops/dispatch_table.py), keyed by op, dtype, pass (fwd / fwd+bwd) and the op's shape class
  (`Op.shape_class`): the fastest measured backend serves, so dermfast's kernel is used where it measured faster
  than every peer and the peer otherwise. Backends the table does not list follow in the default order.
- Documented, where none does (`Op.default_order`, per device type). On a CPU the torch reference comes first:
  it is the CPU path (DESIGN.md), exact in float64, and CPU timings are never measured; other backends serve CPU
  tensors only when named. On a GPU an op module sets its order from what is known before measuring, and says
  why in its docstring: for masked_attention the peers come before dermfast's Triton kernel (the rule "a kernel
  is not the default until it measures >= its best peer": FlashAttention-2's varlen backward does 5 GEMMs per
  tile where ours does 7, and ours has never been timed on a GPU); for kd_loss dermfast's kernels come first (one
  read of each logit matrix, where the Liger composition reads them at least three times: a bytes floor, not a
  guess). An op that sets nothing uses cuda, triton, then torch, then its peers: the compiled and the Triton
  kernel are the fused paths the op was written for, and the reference is the slowest by construction.

- Automatic choice (no backend asked for): the first backend in that order that fits serves; the torch
  reference always fits.
- The Triton interpreter (`TRITON_INTERPRET=1`, how CI runs Triton kernels on CPU tensors) serves CPU tensors
  only when triton is asked for explicitly: automatic choice on CPU never picks an interpreted kernel.
- Explicit choice (`backend=` argument, `set_backend()`, or the environment variable `DERMFAST_BACKEND`, read
  once at import): if that backend cannot serve the call, `BackendUnavailable` is raised listing the reason
  of every backend, as xformers' dispatcher does.
- Capability comes first: the cuda backend is refused when the device's compute capability is not among the
  archs dermfast._C was compiled for, or the driver is older than the runtime it was linked with; triton when
  Triton cannot target the device or dtype. Then proof: an automatically chosen non-torch backend serves only
  once it has passed its self-test on this device and dtype (dermfast/ops/selftest.py; DERMFAST_SELFTEST=0 turns
  it off). A backend named explicitly (a peer included) is checked for capability only, and is honoured whatever
  the dispatch table says.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

BACKENDS: tuple[str, ...] = ("cuda", "triton", "torch")   # dermfast's own backends and the reference
NATIVE: tuple[str, ...] = ("cuda", "triton")               # dermfast's kernels (ratio_to_best_peer is theirs)
# Peer backends (other libraries' kernels), named here so that DERMFAST_BACKEND, read at import before any op
# module registers them, knows them: name -> what it wraps. A global request for a peer applies to every op, and
# an op without that peer refuses it (BackendUnavailable), as for any backend.
PEERS: dict[str, str] = {
    "flash_attn": "flash_attn.flash_attn_varlen_func / flash_attn_func (FlashAttention-2)",
    "sdpa": "torch.nn.functional.scaled_dot_product_attention on [B, H, N, Dh] (cuDNN / flash / efficient / math)",
    "sdpa_nested": "scaled_dot_product_attention on jagged NestedTensors (torch.nested, layout=torch.jagged)",
    "flex": "torch.nn.attention.flex_attention with a document / length BlockMask",
    "liger": "Liger-Kernel's LigerJSD (beta=0: forward KL) + LigerCrossEntropyLoss",
}
ENV_VAR = "DERMFAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot serve a call; the message lists every reason."""


def _parse_backend(value: str | None, source: str) -> str | None:
    if value is None or value.strip() in ("", "auto"):
        return None
    value = value.strip().lower()
    if value not in BACKENDS and value not in PEERS:
        raise ValueError(f"{source}={value!r} is not a backend; accepted: auto, {', '.join((*BACKENDS, *PEERS))}")
    return value


_requested: str | None = _parse_backend(os.environ.get(ENV_VAR), ENV_VAR)


def get_backend() -> str | None:
    """The globally requested backend (None = automatic)."""
    return _requested


def set_backend(name: str | None) -> None:
    """Request a backend for every op ('auto' or None for automatic choice)."""
    global _requested
    _requested = _parse_backend(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of `set_backend`, restoring the previous choice on exit."""
    previous = _requested
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@dataclass(frozen=True)
class Query:
    """What a backend needs to know to accept a call: device, dtype and the op's named sizes."""

    device: torch.device
    dtype: torch.dtype
    sizes: Mapping[str, int] = field(default_factory=dict)
    requires_grad: bool = False


Supports = Callable[[Query], "str | None"]


@dataclass
class Impl:
    backend: str
    fn: Callable
    supports: Supports


class Op:
    """A named op with one implementation per backend (at most), dispatched by capability, proof and order."""

    def __init__(self, name: str, doc: str = ""):
        self.name = name
        self.doc = doc
        self.impls: dict[str, Impl] = {}
        # device type -> documented automatic order (see the module docstring); unset: cuda, triton, torch, peers
        self.default_order: dict[str, tuple[str, ...]] = {}
        # Query -> the shape class of the dispatch table ("" = one class); set by the op module
        self.shape_class: Callable[[Query], str] = lambda q: ""

    def register(self, backend: str, supports: Supports | None = None) -> Callable[[Callable], Callable]:
        if backend not in BACKENDS and backend not in PEERS:
            raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join((*BACKENDS, *PEERS))}")

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = Impl(backend, fn, supports or (lambda q: None))
            return fn

        return deco

    def backends(self) -> tuple[str, ...]:
        """dermfast's backends (implemented or not) then this op's peers."""
        return BACKENDS + tuple(b for b in self.impls if b not in BACKENDS)

    def reasons(self, q: Query) -> dict[str, str | None]:
        """For each backend (`backends()`): None if it can serve `q`, else why not."""
        out: dict[str, str | None] = {}
        for b in self.backends():
            impl = self.impls.get(b)
            out[b] = f"no {b} implementation of {self.name} yet" if impl is None else impl.supports(q)
        return out

    def order(self, q: Query) -> tuple[list[str], str]:
        """(the automatic order for q, where it came from: 'measured' or 'default')."""
        default = list(self.default_order.get(q.device.type) or (*BACKENDS, *(b for b in self.impls
                                                                            if b not in BACKENDS)))
        default += [b for b in self.impls if b not in default]
        if q.device.type == "cpu":
            return default, "default"  # CPU timings are never measured: the reference first, by design
        from dermfast.ops import dispatch_table
        measured = dispatch_table.measured_order(
            self.name, q.device, dispatch_table.entry_key(q.dtype, q.requires_grad, self.shape_class(q)))
        if not measured:
            return default, "default"
        return [b for b in measured if b in self.impls] + [b for b in default if b not in measured], "measured"

    def select(self, q: Query, backend: str | None = None, among: tuple[str, ...] | None = None) -> Impl:
        """The implementation that serves q: `backend` (or the global request) if named, else automatic.
        `among`: only these backends may serve (a caller that can run only some kinds of implementation)."""
        wanted = _parse_backend(backend, "backend") if backend is not None else _requested
        if wanted is not None:
            impl = self.impls.get(wanted)
            reason = f"no {wanted} implementation of {self.name} yet" if impl is None else impl.supports(q)
            if reason is None and among is not None and wanted not in among:
                reason = f"{wanted} cannot serve this form of {self.name} (only {', '.join(among)})"
            if reason is None:
                return impl
            lines = "; ".join(f"{b}: {r or 'would fit'}" for b, r in self.reasons(q).items())
            raise BackendUnavailable(
                f"{self.name}: backend {wanted!r} was requested but cannot serve "
                f"device={q.device.type}, dtype={str(q.dtype).removeprefix('torch.')}, sizes={dict(q.sizes)}"
                f" ({reason}; {lines})"
            )
        failed: dict[str, str] = {}
        for b in self.order(q)[0]:
            impl = self.impls.get(b)
            if among is not None and b not in among:
                continue
            if impl is not None and impl.supports(q) is None and not (b == "triton" and q.device.type == "cpu"):
                why = None if b == "torch" else _unproven(self, b, q)  # the torch reference is the spec
                if why is None:
                    return impl
                failed[b] = why
        lines = "; ".join(f"{b}: {failed.get(b, r)}" for b, r in self.reasons(q).items())
        raise BackendUnavailable(f"{self.name}: no backend can serve this call ({lines})")

    def __call__(self, q: Query, *args, backend: str | None = None, **kwargs):
        return self.select(q, backend).fn(*args, **kwargs)


# (op name, backend, Query) -> None if the backend has proven itself there, else why not. dermfast.ops.selftest
# installs it when dermfast.ops is imported (which importing this module does first); the arrow points from the
# self-test to the registry, never back.
Prover = Callable[[str, str, Query], "str | None"]
_prover: Prover | None = None


def set_prover(fn: Prover | None) -> None:
    global _prover
    _prover = fn


def _unproven(op: Op, backend: str, q: Query) -> str | None:
    """None once `backend` has passed the self-test of `op` on q's device and dtype, else why not."""
    return None if _prover is None else _prover(op.name, backend, q)


_OPS: dict[str, Op] = {}


def define_op(name: str, doc: str = "") -> Op:
    if name in _OPS:
        raise ValueError(f"op {name!r} is already defined")
    _OPS[name] = op = Op(name, doc)
    return op


def ops() -> dict[str, Op]:
    """Every op defined so far, by name (importing dermfast.ops defines all of them)."""
    return dict(_OPS)


# Shared capability checks ------------------------------------------------------------------------------


def needs_cuda_device(q: Query) -> str | None:
    return None if q.device.type == "cuda" else f"needs a CUDA tensor, got a {q.device.type} tensor"


def triton_interpreter_on() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors (slowly); set by tests/conftest.py without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# What Triton can target: NVIDIA GPUs of compute capability >= 7.5 (its documented minimum); bf16 from sm_80
# (earlier GPUs have no bf16 instructions). Under the interpreter bf16 arithmetic is wrong (raw bits: see
# DESIGN.md, "Interpreter facts"), so interpreted bf16 is refused.
TRITON_MIN_CAPABILITY = (7, 5)
TRITON_BF16_MIN_CAPABILITY = (8, 0)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device (tests monkeypatch this to fake a GPU); None when this
    process has no usable CUDA: a question about a hypothetical GPU (`info` on a CPU machine) cannot check the
    architecture, and the other checks still answer."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def needs_triton_device(q: Query) -> str | None:
    """Triton serves CUDA tensors, and CPU tensors under the interpreter (explicit requests only, see select)."""
    from dermfast import _optional
    if not _optional.HAS_TRITON:
        return f"triton is not importable ({_optional.TRITON_REASON})"
    if q.device.type == "cpu" and triton_interpreter_on():
        if q.dtype == torch.bfloat16:
            return "bfloat16 is computed wrongly by the Triton interpreter (TRITON_INTERPRET=1); use a GPU"
        return None
    if q.device.type != "cuda":
        return f"needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got a {q.device.type} tensor"
    cap = device_capability(q.device) if torch.version.hip is None else None
    if cap is not None:
        if cap < TRITON_MIN_CAPABILITY:
            return f"Triton needs compute capability >= 7.5, this GPU is sm_{cap[0]}{cap[1]}"
        if q.dtype == torch.bfloat16 and cap < TRITON_BF16_MIN_CAPABILITY:
            return f"bfloat16 needs compute capability >= 8.0, this GPU is sm_{cap[0]}{cap[1]}"
    return None


def parse_archs(archs: str) -> list[tuple[int, int, str]]:
    """CMAKE_CUDA_ARCHITECTURES as recorded by dermfast._C ('80,90', '90a-real', '86-virtual') ->
    [(major, minor, kind)], kind 'sass+ptx' (a plain number), 'sass' (-real), 'ptx' (-virtual), 'specific'
    (an 'a'/'f' arch: SASS for exactly that GPU). Entries it cannot read (all, native, unknown) are skipped."""
    out = []
    for item in archs.replace(";", ",").split(","):
        item = item.strip().lower()
        kind = "sass+ptx"
        if item.endswith("-real"):
            item, kind = item[:-5], "sass"
        elif item.endswith("-virtual"):
            item, kind = item[:-8], "ptx"
        if item[-1:] in ("a", "f"):
            item, kind = item[:-1], "specific"
        if item.isdigit() and len(item) >= 2:
            out.append((int(item[:-1]), int(item[-1]), kind))
    return out


def arch_reason(cap: tuple[int, int], archs: str, ptx_jit: bool = True) -> str | None:
    """None if code compiled for `archs` runs on a GPU of compute capability `cap`, else why not.

    CUDA's rules: SASS for sm_XY runs on sm_XZ with Z >= Y (same major); an arch-specific 'a' cubin only on
    exactly that GPU; PTX for compute_XY is JIT-compiled by the driver for any GPU >= XY (not when the driver is
    older than the runtime: ptx_jit=False). Archs the build could not name ('all', 'native') are trusted."""
    parsed = parse_archs(archs)
    if not parsed:
        return None
    for major, minor, kind in parsed:
        if kind == "specific" and cap == (major, minor):
            return None
        if kind in ("sass", "sass+ptx") and cap[0] == major and cap[1] >= minor:
            return None
        if ptx_jit and kind in ("ptx", "sass+ptx") and cap >= (major, minor):
            return None
    return (f"dermfast._C was compiled for CUDA archs {archs}, which cannot run on this sm_{cap[0]}{cap[1]} GPU "
            f"(rebuild with DERMFAST_CUDA_ARCHS={cap[0]}{cap[1]})")


def _version_str(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def needs_cuda_ext(q: Query) -> str | None:
    """The compiled csrc/ extension, built with nvcc, a CUDA tensor, a driver at least as new as the runtime
    linked into the extension, and code for the device's architecture."""
    from dermfast import _optional
    if not _optional.HAS_CUDA_EXT:
        return f"the compiled extension dermfast._C is not importable ({_optional.CUDA_EXT_REASON})"
    reason = needs_cuda_device(q)
    if reason is not None:
        return reason
    ext = _optional.cuda_ext
    runtime, driver = ext.cuda_runtime_version(), ext.cuda_driver_version()
    if driver < runtime and driver // 1000 != runtime // 1000:  # minor-version compatibility holds within a major
        return (f"the driver supports CUDA {_version_str(driver)} but dermfast._C links the CUDA "
                f"{_version_str(runtime)} runtime (update the driver)" if driver else
                "no CUDA driver was found by dermfast._C")
    cap = device_capability(q.device)
    return None if cap is None else arch_reason(cap, ext.compiled_cuda_archs(), ptx_jit=driver >= runtime)


def dtype_in(*dtypes: torch.dtype) -> Supports:
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)

    def check(q: Query) -> str | None:
        return None if q.dtype in dtypes else f"dtype {str(q.dtype).removeprefix('torch.')} not in ({names})"

    return check


def all_of(*checks: Supports) -> Supports:
    def check(q: Query) -> str | None:
        for c in checks:
            reason = c(q)
            if reason is not None:
                return reason
        return None

    return check
