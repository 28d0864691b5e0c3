"""Backend registry: every op declares, per backend, what it supports; a dispatcher picks the first that fits.

Backends in priority order: cuda (csrc/, compiled extension), triton (kernels/), torch (the reference, which
runs anywhere). A backend implementation answers a `Query` (device, dtype, named sizes) with `None` when it
can serve it, or a one-line reason when it cannot.

- Automatic choice (no backend asked for): the first backend that fits serves; the torch reference always fits.
- The Triton interpreter (`TRITON_INTERPRET=1`, how CI runs Triton kernels on CPU tensors) serves CPU tensors
  only when triton is asked for explicitly: automatic choice on CPU never picks an interpreted kernel.
- Explicit choice (`backend=` argument, `set_backend()`, or the environment variable `DERMFAST_BACKEND`, read
  once at import): if that backend cannot serve the call, `BackendUnavailable` is raised listing the reason
  of every backend, as xformers' dispatcher does.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

BACKENDS: tuple[str, ...] = ("cuda", "triton", "torch")
ENV_VAR = "DERMFAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot serve a call; the message lists every reason."""


def _parse_backend(value: str | None, source: str) -> str | None:
    if value is None or value.strip() in ("", "auto"):
        return None
    value = value.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source}={value!r} is not a backend; accepted: auto, {', '.join(BACKENDS)}")
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
    """A named op with one implementation per backend (at most), dispatched by capability."""

    def __init__(self, name: str, doc: str = ""):
        self.name = name
        self.doc = doc
        self.impls: dict[str, Impl] = {}

    def register(self, backend: str, supports: Supports | None = None) -> Callable[[Callable], Callable]:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = Impl(backend, fn, supports or (lambda q: None))
            return fn

        return deco

    def reasons(self, q: Query) -> dict[str, str | None]:
        """For each backend in priority order: None if it can serve `q`, else why not."""
        out: dict[str, str | None] = {}
        for b in BACKENDS:
            impl = self.impls.get(b)
            out[b] = f"no {b} implementation of {self.name} yet" if impl is None else impl.supports(q)
        return out

    def select(self, q: Query, backend: str | None = None) -> Impl:
        wanted = _parse_backend(backend, "backend") if backend is not None else _requested
        if wanted is not None:
            impl = self.impls.get(wanted)
            reason = f"no {wanted} implementation of {self.name} yet" if impl is None else impl.supports(q)
            if reason is None:
                return impl
            lines = "; ".join(f"{b}: {r or 'would fit'}" for b, r in self.reasons(q).items())
            raise BackendUnavailable(
                f"{self.name}: backend {wanted!r} was requested but cannot serve "
                f"device={q.device.type}, dtype={str(q.dtype).removeprefix('torch.')}, sizes={dict(q.sizes)}"
                f" ({lines})"
            )
        for b in BACKENDS:
            impl = self.impls.get(b)
            if impl is not None and impl.supports(q) is None and not (b == "triton" and q.device.type == "cpu"):
                return impl
        lines = "; ".join(f"{b}: {r}" for b, r in self.reasons(q).items())
        raise BackendUnavailable(f"{self.name}: no backend can serve this call ({lines})")

    def __call__(self, q: Query, *args, backend: str | None = None, **kwargs):
        return self.select(q, backend).fn(*args, **kwargs)


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


def needs_triton_device(q: Query) -> str | None:
    """Triton serves CUDA tensors, and CPU tensors under the interpreter (explicit requests only, see select)."""
    from dermfast import _optional
    if not _optional.HAS_TRITON:
        return f"triton is not importable ({_optional.TRITON_REASON})"
    if q.device.type == "cuda" or (q.device.type == "cpu" and triton_interpreter_on()):
        return None
    return f"needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got a {q.device.type} tensor"


def needs_cuda_ext(q: Query) -> str | None:
    """The compiled csrc/ extension, built with nvcc, and a CUDA tensor."""
    from dermfast import _optional
    if not _optional.HAS_CUDA_EXT:
        return f"the compiled extension dermfast._C is not importable ({_optional.CUDA_EXT_REASON})"
    return needs_cuda_device(q)


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
