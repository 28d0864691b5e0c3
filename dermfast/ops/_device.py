"""The CUDA device a kernel launch runs on, shared by every op's Triton backend.

Triton (unlike a torch op) launches on the *current* CUDA device, not on the device of its arguments: a tensor on
cuda:1 while cuda:0 is current would be read through cuda:0's context (an illegal address, or a silent wrong
result on a peer-mapped device). Each Triton launcher therefore runs inside `on_device(<an input>)`.
"""
from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Context manager that makes t's device the current CUDA device for the launches inside it.

    t: any tensor. CUDA: `torch.cuda.device(t.device)` (restores the previous current device on exit).
    Any other device (CPU under the Triton interpreter, meta): `contextlib.nullcontext()`, which touches no
    CUDA state, so it is safe to call where CUDA is absent.
    """
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
