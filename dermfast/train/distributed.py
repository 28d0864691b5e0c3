"""Processes, devices and model wrapping: torchrun DDP, FSDP2 (`fully_shard`), activation checkpointing.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) each process trains on `cuda:LOCAL_RANK`
(never a bare `cuda`, which every rank would read as GPU 0) with NCCL, or on the CPU with gloo. Rank 0 logs,
checkpoints and draws the bar; the others compute. Everything here is torch.distributed itself: this module only
chooses and orders the calls.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from dermfast.device import World, resolve_device, world_from_env  # noqa: F401  (defined below dermfast.train)


def init(world: World, device: torch.device) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) and bind the GPU; nothing for one process."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not world.distributed or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    torch.distributed.init_process_group(backend, **kw)


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place: sum / max / mean over ranks (identity for one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        red = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "mean": torch.distributed.ReduceOp.SUM}[op]
        torch.distributed.all_reduce(t, red)
        if op == "mean":
            t /= torch.distributed.get_world_size()
    return t


def broadcast_object(obj, src: int = 0):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src)
    return box[0]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of every nn.ModuleList (a ViT's blocks, a decoder's blocks): the units to shard and to
    checkpoint. A stage with another structure overrides `Stage.blocks`."""
    out: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            out.extend(m.children())
    return out


def apply_activation_checkpointing(model: nn.Module, blocks: list[nn.Module]) -> int:
    """Wrap each block so its activations are recomputed in backward (torch's non-reentrant checkpoint).
    State dict keys are unchanged (the wrapper strips its prefix). Returns the number of blocks wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    targets = {id(b) for b in blocks}
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                setattr(parent, name, checkpoint_wrapper(child))
                n += 1
    return n


def wrap(model: nn.Module, world: World, device: torch.device, *, fsdp: bool, blocks: list[nn.Module],
         bf16: bool) -> nn.Module:
    """DDP, or FSDP2 (each block, then the root, `fully_shard`ed); the model itself for one process."""
    if not world.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for b in blocks:
            fully_shard(b, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, active: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2 requires_gradient_sync)."""
    if not active:
        return contextlib.nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def _fsdp():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return _fsdp()
    return contextlib.nullcontext()
