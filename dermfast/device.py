"""Which process this is and which device it computes on, for every tool (training, evaluation, synthesis).

`World` is torchrun's view of the process (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; one process without
them) and `resolve_device` turns a --device flag into a torch.device. They sit below dermfast.train (whose
distributed module re-exports them) so that `python -m dermfast.evaluate` and `python -m dermfast.synthesize`
resolve --device by the same rule as training without importing the training package.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env(env=None) -> World:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one process without it."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    ws = int(env["WORLD_SIZE"])
    return World(int(env.get("RANK", 0)), ws, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", ws)))


def resolve_device(name: str = "auto", world: World | None = None) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when a GPU is visible, else cpu; 'cuda' -> cuda:LOCAL_RANK; 'cuda:N' as given
    for one process (under torchrun, N must be LOCAL_RANK: two ranks on one GPU is refused)."""
    world = world_from_env() if world is None else world
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{e}; accepted: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device type {dev.type!r} is not supported; accepted: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if dev.index is None:
        dev = torch.device("cuda", world.local_rank)
    elif world.distributed and dev.index != world.local_rank:
        raise ValueError(f"--device {name} under torchrun: rank {world.rank} must use cuda:{world.local_rank} "
                         "(its LOCAL_RANK); leave --device at auto")
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {dev} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return dev
