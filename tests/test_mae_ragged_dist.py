"""Ragged MAE (one mask ratio per sample, packed encoder) on 2 processes: FSDP2 (`fully_shard` per block, then
the root) with activation checkpointing, wrapped by the engine's own `dermfast.train.distributed` functions, on
gloo / CPU. Two ranks of batch b must train the weights one process of batch 2b trains.

What this catches: a packed encoder that calls a block's submodules instead of the block (FSDP2's per-block
all-gather never runs: sharded DTensor parameters meet plain tensors, or a silently unsharded forward), blocks
that are not recomputed under checkpointing, and ranks whose ragged losses are averaged with equal weight
although they remove different numbers of patches (`dp_batch`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)
RANGE = (0.2, 0.9)
STEPS, B, LR = 3, 4, 0.5


def _model():
    from dermfast.models.mae import mae_from_preset
    torch.manual_seed(0)
    return mae_from_preset("demo", ragged=True, **TINY)


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2 * B, 3, 16, 16, generator=g) for _ in range(STEPS)]


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as td
    from dermfast.train import distributed as dist
    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model()
        attn = [blk.attn for blk in model.blocks]
        calls = [0]
        for a in attn:
            a.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        assert dist.apply_activation_checkpointing(model, dist.repeated_blocks(model)) == 3
        model = dist.wrap(model, dist.World(rank, world, rank, world), torch.device("cpu"), fsdp=True,
                          blocks=dist.repeated_blocks(model), bf16=False)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        losses = []
        for step, imgs in enumerate(_data()):
            loss, _, _ = model(imgs[rank * B:(rank + 1) * B], seed=3, step=step, sample_offset=rank * B,
                               mask_ratio_range=RANGE, dp_batch=world * B)
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            td.all_reduce(mean)
            losses.append(float(mean) / world)
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save({"state": state, "losses": losses, "encoder_attn_calls": calls[0]}, out)
    finally:
        td.destroy_process_group()


@pytest.mark.slow  # ~30 s of CPU: two spawned interpreters import torch and timm
def test_two_fsdp_ranks_of_batch_b_train_as_one_process_of_batch_2b_ragged(tmp_path: Path):
    import torch.multiprocessing as mp
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step, imgs in enumerate(_data()):
        loss, _, mask = model(imgs, seed=3, step=step, mask_ratio_range=RANGE)
        assert mask[:B].sum() != mask[B:].sum()  # the two ranks remove different numbers of patches
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    # Each encoder attention ran forward and was recomputed in backward on every step: 2 blocks x 2 x STEPS.
    assert got["encoder_attn_calls"] == 2 * 2 * STEPS
    assert got["losses"] == pytest.approx(losses, rel=1e-5)
    assert losses[-1] < losses[0]  # it trained
    want = model.state_dict()
    assert got["state"].keys() == want.keys()  # the wrappers leave the parameter names alone
    moved = 0
    for k, v in want.items():
        torch.testing.assert_close(got["state"][k], v, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
        moved += not torch.equal(v, _model().state_dict()[k])
    assert moved > len(want) // 2
