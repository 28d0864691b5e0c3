"""TEDMAE (dermfast/models/tedmae.py, `--stage mae --method tedmae`): the teacher is outside autograd and the
state dict, the EMA follows BYOL's schedule, the target is data2vec's at DF temperature -> infinity, the student
is the plain MAE, and the run resumes bit-exactly (teacher included) and writes MAE-loadable checkpoints."""
import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dermfast.models.exterior_conversion import ec_params, exterior_conversion
from dermfast.models.mae import MaskedAutoencoderViT
from dermfast.models.tedmae import TEDMAEOptions, distill_target, ema_momentum, tedmae_from_preset
from dermfast.ops import mae_loss
from dermfast.train.cli import main

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)


def _tiny(**opts):
    torch.manual_seed(0)
    return tedmae_from_preset("demo", TEDMAEOptions(**opts), **TINY)


def test_teacher_is_outside_the_state_dict_the_optimiser_and_autograd():
    model = _tiny()
    mae_keys = set(MaskedAutoencoderViT(model.cfg).state_dict())
    assert set(model.state_dict()) == mae_keys | {"distill_head.weight", "distill_head.bias"}
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert teacher_ids and not teacher_ids & {id(p) for p in model.parameters()}
    assert set(model.teacher_state_dict()) <= mae_keys  # the encoder's key names
    p = ec_params(2, 3, (1, 3), 0, 0)
    loss, _, _ = model(torch.randn(2, 3, 16, 16), seed=1, step=2, student_ec=(p.weight, p.alpha))
    loss.backward()
    assert all(t.grad is None and not t.requires_grad for t in model.teacher.parameters())
    assert model.blocks[0].attn.qkv.weight.grad is not None and model.distill_head.weight.grad is not None
    model.train()
    assert not model.teacher.training  # the teacher stays in eval mode
    model.double()
    assert all(t.dtype == torch.float64 for t in model.teacher.parameters())  # moved with the model


def test_momentum_schedule_is_byols():
    # BYOL (Grill et al. 2020, sec. 3.2): tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2
    K, base = 37, 0.996
    for k in (0, 1, 10, 18, 36, 37):
        byol = 1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2
        assert ema_momentum(k, K, base, 1.0) == pytest.approx(byol, abs=1e-15)
    # DINO's cosine_scheduler(base_value=m0, final_value=m1): m1 + 0.5 (m0 - m1) (1 + cos(pi k / K))
    assert ema_momentum(9, 20, 0.99, 0.999) == pytest.approx(0.999 + 0.5 * (0.99 - 0.999) * (1 + math.cos(
        math.pi * 9 / 20)), abs=1e-15)


def test_ema_update_is_the_written_out_formula():
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in model.teacher_state_dict().items()}
    student = dict(model.named_parameters())
    m = 0.9
    model.ema_update_(m)
    after = model.teacher_state_dict()
    for k, t0 in before.items():
        torch.testing.assert_close(after[k], m * t0 + (1 - m) * student[k].detach(), atol=1e-6, rtol=1e-6)
    model.ema_update_(0.0)  # momentum 0 copies the student
    assert all(torch.equal(v, student[k]) for k, v in model.teacher_state_dict().items())


def test_df_target_tends_to_data2vecs_mean_and_weights_follow_the_input():
    B, N, D = 2, 5, 16
    layers = [torch.randn(B, N, D) for _ in range(3)]
    # data2vec (fairseq examples/data2vec/models/data2vec_vision.py, make targets): each of the top-K layers
    # layer-normed without affine (layer_norm_target_layer), averaged, the average layer-normed (layer_norm_targets)
    d2v = F.layer_norm(sum(F.layer_norm(h, (D,)) for h in layers) / len(layers), (D,))
    torch.testing.assert_close(distill_target(layers, True, 1e9), d2v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(distill_target(layers, False, 0.1), F.layer_norm(layers[-1], (D,)))
    # input-dependent: two layers agree, one is the negative of them: the target is (nearly) the agreeing layers
    a = torch.randn(B, N, D)
    target = distill_target([a, a, -a], True, 0.05)
    torch.testing.assert_close(target, F.layer_norm(a, (D,)), atol=1e-3, rtol=1e-3)
    # and where the odd one out is another layer, the weights move with it
    torch.testing.assert_close(distill_target([-a, a, a], True, 0.05), F.layer_norm(a, (D,)), atol=1e-3,
                               rtol=1e-3)


def test_the_student_is_the_plain_mae_and_the_distillation_loss_is_smooth_l1_on_the_teachers_target():
    model = _tiny(distill_weight=0.7)
    with torch.no_grad():  # a teacher that differs from the student
        for t in model.teacher.parameters():
            t.add_(0.1 * torch.randn_like(t))
    imgs = torch.randn(3, 3, 16, 16)
    p = ec_params(3, 3, (1, 3, 5), seed=4, step=9)
    loss, pred, mask, parts = model(imgs, seed=4, step=9, student_ec=(p.weight, p.alpha), return_parts=True)
    plain = MaskedAutoencoderViT(model.cfg)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("distill_head.")})
    x_s = exterior_conversion(imgs, p.weight, p.alpha)
    rec, pred_plain, mask_plain = plain(x_s, seed=4, step=9)
    assert torch.equal(mask, mask_plain)
    torch.testing.assert_close(parts["rec_loss"], rec.detach())
    torch.testing.assert_close(pred, pred_plain)
    # the distillation loss, recomputed: teacher on the unconverted image, all tokens, top 3 blocks
    with torch.no_grad():
        x = model.teacher.patch_embed(imgs) + model.teacher.pos_embed
        x = torch.cat([model.teacher.cls_token.expand(3, -1, -1), x], 1)
        hs = []
        for blk in model.teacher.blocks:
            x = blk(x)
            hs.append(x[:, 1:])
        target = distill_target(hs[-3:], True, 0.1)
    latent, m = plain.forward_encoder_keep(x_s, seed=4, step=9)
    keep = torch.gather(target, 1, m.ids_keep[:, :, None].expand(-1, -1, target.shape[-1]))
    dist = F.smooth_l1_loss(model.distill_head(latent[:, 1:]), keep, beta=1.0)
    torch.testing.assert_close(parts["distill_loss"], dist.detach())
    torch.testing.assert_close(loss, rec + 0.7 * dist)
    assert mae_loss is not None


def _run(tmp: Path, out: str, *flags: str, **over) -> subprocess.CompletedProcess:
    cfg = tmp / f"{out}.yaml"
    cfg.write_text(yaml.safe_dump({"toy_images": 32, "toy_image_size": 32, "img_size": 32, "batch_size": 4,
                                   "max_steps": 4, "checkpoint_every": 2, "log_every": 1, "workers": 0,
                                   "loader": "torch", "seed": 3, "method": "tedmae", "ec": "both", **over}))
    env = {**os.environ, "DERMFAST_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "dermfast.train", "--stage", "mae", "--config", str(cfg), "--out",
                        str(tmp / out), "--no-progress", *flags], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_end_to_end_run_resumes_bit_exactly_and_writes_mae_loadable_checkpoints(tmp_path):
    from safetensors.torch import load_file
    _run(tmp_path, "run")
    ref, cut = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(cut, ref)  # the uninterrupted run's files, kept aside
    rows = _rows(ref / "log.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert all(float(r["distill_loss"]) > 0 and float(r["rec_loss"]) > 0 for r in rows)
    # the run as if cut after its step-2 checkpoint, resumed: the same losses, student, optimiser and teacher
    shutil.rmtree(cut / "checkpoints" / "step_00000004")
    for name in ("checkpoint.safetensors", "teacher.safetensors"):
        (cut / name).unlink()
    r = _run(tmp_path, "run", "--resume", "auto")
    assert "at step 2 " in r.stdout, r.stdout
    keys = ("loss", "lr", "grad_norm", "rec_loss", "distill_loss")
    assert [[x[k] for k in keys] for x in _rows(cut / "log.csv")] == [[x[k] for k in keys] for x in rows]
    for name in ("checkpoint.safetensors", "teacher.safetensors", "checkpoints/step_00000004/model.safetensors",
                 "checkpoints/step_00000004/optimizer.safetensors", "checkpoints/step_00000004/extra.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(cut / name))
        assert a.keys() == b.keys(), name
        differ = [k for k in a if not k.startswith("rng/") and not torch.equal(a[k], b[k])]
        assert not differ, (name, differ[:3])
    extra = load_file(str(ref / "checkpoints/step_00000004/extra.safetensors"))
    assert any(k.startswith("stage/teacher/blocks.") for k in extra)
    # RUN/checkpoint.safetensors is an MAE checkpoint (strict load); the teacher holds the encoder keys
    sd = load_file(str(ref / "checkpoint.safetensors"))
    from dermfast.models.mae import mae_from_preset
    mae = mae_from_preset("demo", img_size=32)
    mae.load_state_dict(sd, strict=True)
    teacher = load_file(str(ref / "teacher.safetensors"))
    enc = {k for k in mae.state_dict() if k == "cls_token" or k.startswith(("patch_embed.", "blocks.", "norm."))}
    assert set(teacher) == enc
    assert any(not torch.equal(teacher[k], sd[k]) for k in teacher)  # the EMA lags the student


@pytest.mark.parametrize("flags,expected", [
    (["--mask-ratio-range", "0.5", "0.8"], "--method tedmae does not support --mask-ratio-range"),
    (["--df-layers", "9"], "--df-layers must be in 1..4"),
    (["--ema-start", "0.9", "--ema-end", "0.5"], "--ema-start / --ema-end need"),
    (["--ec-kernel-sizes", "3", "4"], "must be odd"),
    (["--ec-alpha", "0.5", "2"], "--ec-alpha needs"),
])
def test_bad_tedmae_options_are_one_line_errors(flags, expected, capsys, tmp_path):
    assert main(["--stage", "mae", "--method", "tedmae", *flags, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
