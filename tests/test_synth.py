"""`--stage synth` end to end on a tiny embedded dataset, then `python -m dermfast.synthesize` on its bundle:
losses fall, sample grids, two samplers, the manifest read back by the data layer (`--synthetic`), an
interrupted sampling run resumed, seeds that regenerate an image, FID with MAE features, bad input (exit 2)."""
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from dermfast.synthesize import main as synth_main  # noqa: E402
from dermfast.train.cli import main as train_main  # noqa: E402

TOY = ["--toy-images", "112", "--toy-image-size", "32"]
SMALL = [*TOY, "--img-size", "16", "--batch-size", "8", "--loader", "torch", "--workers", "0", "--no-progress",
         "--log-every", "1", "--warmup-epochs", "0", "--lr", "2e-3", "--sample-steps", "2"]
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    """A randomly initialised dermfast MAE checkpoint (the file layout an MAE run writes)."""
    from safetensors.torch import save_file

    from dermfast.models.mae import MAEPreset, get_preset
    from dermfast.models.mae import MaskedAutoencoderViT
    preset = MAEPreset(**{**get_preset("demo").to_dict(), "img_size": 32, "patch_size": 8})
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(preset)
    run = tmp_path_factory.mktemp("mae")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "checkpoint.safetensors"),
              metadata={"stage": '"mae"', "preset": json.dumps(preset.to_dict())})
    return run


@pytest.fixture(scope="module")
def synth_run(cache, mae_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "synth"
    assert train_main(["--stage", "synth", "--max-steps", "18", "--vae-steps", "8", "--sample-every", "5",
                       "--grid-per-class", "1", "--perceptual", f"mae:{mae_ckpt}",
                       "--out", str(out), *SMALL]) == 0
    return out


def log_rows(run):
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def test_losses_fall_and_run_files(synth_run):
    rows = log_rows(synth_run)
    assert len(rows) == 18
    rec = [float(r["vae_rec"]) for r in rows[:8]]
    mse = [float(r["mse"]) for r in rows[8:]]
    assert all(float(r["mse"]) == 0 for r in rows[:8]) and all(float(r["vae_rec"]) == 0 for r in rows[8:])
    assert np.mean(rec[-3:]) < 0.8 * np.mean(rec[:3]), rec
    assert np.mean(mse[-4:]) < np.mean(mse[:3]), mse
    assert any(float(r["perc"]) > 0 for r in rows[8:])  # the MAE perceptual term is on
    assert (synth_run / "samples" / "step_00000013.png").is_file()
    assert (synth_run / "samples" / "step_00000018.png").is_file() and (synth_run / "samples.png").is_file()
    # plots.png marks the switch from the VAE (log rows 1..8) to the denoiser, read from the run's config.yaml
    from dermfast.eval.plots import training_figure
    assert (synth_run / "plots.png").is_file()
    fig = training_figure(synth_run / "log.csv")
    assert fig.panels[0].y_scale == "log" and [p.markers for p in fig.panels] == [[(8.5, "VAE | denoiser")]] * 2
    meta = json.loads((synth_run / "diffusers" / "dermfast_synth.json").read_text())
    assert meta["classes"] == CLASSES and meta["denoiser_steps"] == 10 and meta["img_size"] == 16
    assert meta["perceptual"].startswith("dermfast MAE encoder features")
    vae_cfg = json.loads((synth_run / "diffusers" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] > 0 and vae_cfg["scaling_factor"] != 0.18215  # learnt from the latents
    unet_cfg = json.loads((synth_run / "diffusers" / "unet" / "config.json").read_text())
    assert unet_cfg["num_class_embeds"] == len(CLASSES) + 1
    from safetensors.torch import load_file
    w = load_file(str(synth_run / "checkpoint.safetensors"))
    assert "ema_unet.conv_in.weight" in w and "unet.conv_in.weight" in w and "vae.encoder.conv_in.weight" in w


@pytest.mark.slow
def test_frozen_vae_phase_two(synth_run, tmp_path):
    """--vae: phase 1 skipped, the given VAE stays bit-identical, the denoiser trains from step 1."""
    out = tmp_path / "with_vae"
    assert train_main(["--stage", "synth", "--max-steps", "2", "--vae", str(synth_run / "diffusers"),
                       "--sample-every", "0", "--out", str(out), *SMALL]) == 0
    from safetensors.torch import load_file
    a = load_file(str(synth_run / "diffusers" / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "diffusers" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(float(r["mse"]) > 0 for r in log_rows(out))


def read_manifest(d):
    with open(d / "manifest.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_sample_and_read_back(synth_run, cache, tmp_path, sampler):
    out = tmp_path / sampler
    assert synth_main(["--checkpoint", str(synth_run), "--per-class", "2", "--out", str(out), "--sampler", sampler,
                       "--steps", "3", "--batch-size", "5", "--no-progress"]) == 0
    rows = read_manifest(out)
    assert len(rows) == 14 and {r["label"] for r in rows} == set(CLASSES)
    assert set(rows[0]) == {"image", "label", "sampler", "steps", "guidance", "seed", "precision", "checkpoint"}
    assert all(r["precision"] == "fp32" for r in rows)  # CPU
    assert all(r["sampler"] == sampler and r["steps"] == "3" for r in rows)
    assert len({r["seed"] for r in rows}) == 14 and (out / "grid.png").is_file()

    from dermfast.data.pipeline import prepare_data
    data = prepare_data(None, tmp_path / "prep", synthetic=str(out), toy_images=112, toy_image_size=32,
                        progress=False)
    train = data.part("train")
    synth = train.source == 1
    assert synth.sum() == 14
    got = sorted((train.paths[i].split("/")[-1], train.classes[train.labels[i]]) for i in np.flatnonzero(synth))
    assert got == sorted((r["image"], r["label"]) for r in rows)


def test_resume_interrupted_and_regenerate(synth_run, tmp_path, monkeypatch):
    import dermfast.synth.sample as sample_mod
    out = tmp_path / "resume"
    args = ["--checkpoint", str(synth_run), "--per-class", "2", "--out", str(out), "--sampler", "euler_a",
            "--steps", "2", "--batch-size", "4", "--no-progress"]
    real, calls = sample_mod.sample_images, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sample_mod, "sample_images", interrupted)
    assert synth_main(args) == 130
    first = {r["image"]: r for r in read_manifest(out)}
    assert len(first) == 8
    before = {k: (out / "images" / k).read_bytes() for k in first}
    monkeypatch.setattr(sample_mod, "sample_images", real)
    from dermfast.synthesize import parse_args, synthesize
    res = synthesize(parse_args(args))
    assert res["written"] == 6 and res["kept"] == 8
    rows = {r["image"]: r for r in read_manifest(out)}
    assert len(rows) == 14 and all((out / "images" / k).read_bytes() == v for k, v in before.items())

    # an image's manifest seed regenerates it, alone in its batch (euler_a draws noise at every step)
    from PIL import Image

    from dermfast.synth.models import latent_size, load_bundle
    b = load_bundle(synth_run)
    name = sorted(rows)[5]
    r = rows[name]
    img = real(b.unet, b.vae, b.scheduler_config, torch.tensor([CLASSES.index(r["label"])]), [int(r["seed"])],
               sampler="euler_a", steps=2, guidance=float(r["guidance"]), null_class=7,
               latent_size=latent_size(b.vae, 16), scale=b.scale)
    again = sample_mod.to_uint8(img)[0].numpy().astype(int)
    disk = np.asarray(Image.open(out / "images" / name)).astype(int)
    assert np.abs(again - disk).max() <= 1


def test_rerun_with_other_settings(synth_run, tmp_path, capsys):
    """The same settings resume (and extend); other settings are refused naming them (exit 2, nothing touched),
    or replace the folder's images with --overwrite. Old code kept the --steps 2 images for a --steps 3 rerun."""
    from dermfast.synthesize import parse_args, synthesize
    out = tmp_path / "rerun"
    base = ["--checkpoint", str(synth_run), "--out", str(out), "--sampler", "ddim", "--batch-size", "7",
            "--no-progress"]
    first = synthesize(parse_args([*base, "--per-class", "1", "--steps", "2"]))
    assert first["written"] == 7 and first["kept"] == 0
    settings = json.loads((out / "settings.json").read_text())
    assert {k: settings[k] for k in ("sampler", "steps", "guidance", "seed", "precision")} == \
        {"sampler": "ddim", "steps": 2, "guidance": 2.0, "seed": 0, "precision": "fp32"}
    assert len(settings["checkpoint_sha256"]) == 64
    before = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    manifest_before = (out / "manifest.csv").read_bytes()

    capsys.readouterr()
    line = one_line_error(capsys, synth_main([*base, "--per-class", "1", "--steps", "3"]))
    assert "7 image(s) made with other settings (steps 2 -> 3)" in line and "--overwrite" in line
    line = one_line_error(capsys, synth_main([*base, "--per-class", "1", "--steps", "2", "--seed", "1",
                                              "--guidance", "1.5"]))
    assert "guidance 2 -> 1.5" in line and "seed 0 -> 1" in line and "steps" not in line
    assert {p.name: p.read_bytes() for p in (out / "images").glob("*.png")} == before
    assert (out / "manifest.csv").read_bytes() == manifest_before

    # the same settings with a larger quota: the 7 are kept, 7 more written
    more = synthesize(parse_args([*base, "--per-class", "2", "--steps", "2"]))
    assert more["written"] == 7 and more["kept"] == 7
    assert all((out / "images" / k).read_bytes() == v for k, v in before.items())

    # --overwrite: every image made afresh with the new settings
    new = synthesize(parse_args([*base, "--per-class", "1", "--steps", "3", "--overwrite"]))
    assert new["written"] == 7 and new["kept"] == 0
    rows = read_manifest(out)
    assert len(rows) == 7 and all(r["steps"] == "3" for r in rows)
    assert sorted(p.name for p in (out / "images").glob("*.png")) == sorted(before)
    assert any((out / "images" / k).read_bytes() != v for k, v in before.items())
    assert json.loads((out / "settings.json").read_text())["steps"] == 3

    # a folder from before settings.json: judged by its manifest's columns
    (out / "settings.json").unlink()
    line = one_line_error(capsys, synth_main([*base, "--per-class", "1", "--steps", "3", "--sampler", "euler"]))
    assert "sampler ddim -> euler" in line
    again = synthesize(parse_args([*base, "--per-class", "1", "--steps", "3"]))
    assert again["written"] == 0 and again["kept"] == 7 and (out / "settings.json").is_file()


def test_settings_diff_checkpoint_by_digest():
    from dermfast.synth.manifest import settings_diff
    old = {"sampler": "ddim", "steps": 10, "guidance": 2.0, "seed": 0, "precision": "bf16",
           "checkpoint": "/runs/a", "checkpoint_sha256": "1" * 64}
    assert settings_diff(old, {**old, "checkpoint": "/moved/a"}) == []  # same weights, moved run
    assert settings_diff(old, {**old, "checkpoint_sha256": "2" * 64}) == ["checkpoint weights changed at the same path"]
    assert settings_diff(old, {**old, "precision": "fp32"}) == ["precision bf16 -> fp32"]
    legacy = {"sampler": "ddim", "steps": 10, "guidance": 2.0, "seed": 0, "checkpoint": "/runs/a"}
    assert settings_diff(legacy, {**old, "precision": "fp32"}) == []  # no precision column: not compared
    assert settings_diff({**legacy, "steps": {10, 25}}, old) == ["steps mixed 10/25 -> 10"]


def test_fid_with_mae_features(synth_run, mae_ckpt, cache, tmp_path, capsys):
    out = tmp_path / "fid"
    data = next(cache.rglob("labels.csv")).parent
    assert synth_main(["--checkpoint", str(synth_run), "--per-class", "3", "--out", str(out), "--steps", "2",
                       "--no-progress", "--fid-against", str(data), "--fid-features", f"mae:{mae_ckpt}"]) == 0
    printed = capsys.readouterr().out
    assert "features: dermfast MAE encoder features" in printed
    rep = json.loads((out / "fid.json").read_text())
    assert np.isfinite(rep["overall"]) and rep["overall"] > 0 and set(rep["per_class"]) == set(CLASSES)
    assert all(v is None or v >= -1e-6 for v in rep["per_class"].values())


def test_frechet_distance_reference():
    from dermfast.synth.fid import frechet_distance
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert abs(frechet_distance(a, a)) < 1e-6
    # two Gaussians, identity covariance, means 2 apart along one axis: FID = 4 (+ sampling error)
    b = rng.normal(size=(4000, 3)) + np.array([2.0, 0, 0])
    assert abs(frechet_distance(rng.normal(size=(4000, 3)), b) - 4.0) < 0.3


def one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "error" in err[0], err
    return err[0]


def test_bad_input(synth_run, tmp_path, capsys):
    base = ["--out", str(tmp_path / "o"), "--no-progress"]
    assert "not a dermfast synth run" in one_line_error(
        capsys, synth_main(["--checkpoint", str(tmp_path), "--per-class", "1", *base]))
    fake = tmp_path / "mae_run"
    fake.mkdir()
    (fake / "checkpoint.safetensors").write_bytes(b"x")
    assert "without a synth bundle" in one_line_error(
        capsys, synth_main(["--checkpoint", str(fake), "--per-class", "1", *base]))
    assert "unknown sampler 'heun'" in one_line_error(
        capsys, synth_main(["--checkpoint", str(synth_run), "--per-class", "1", "--sampler", "heun", *base]))
    assert "--per-class must be >= 1" in one_line_error(
        capsys, synth_main(["--checkpoint", str(synth_run), "--per-class", "0", *base]))
    assert not (tmp_path / "o" / "manifest.csv").exists()


def test_train_bad_input(cache, tmp_path, capsys):
    # a class whose only images are unreadable: nothing to learn from
    from PIL import Image
    d = tmp_path / "data"
    (d / "images").mkdir(parents=True)
    lines = ["image,label"]
    for i in range(12):
        Image.fromarray(np.full((16, 16, 3), i * 20, np.uint8)).save(d / "images" / f"a{i}.png")
        Image.fromarray(np.full((16, 16, 3), 255 - i * 20, np.uint8)).save(d / "images" / f"b{i}.png")
        lines += [f"a{i}.png,a", f"b{i}.png,b"]
    (d / "images" / "c0.png").write_bytes(b"not an image")
    lines.append("c0.png,c")
    (d / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    rc = train_main(["--stage", "synth", "--data", str(d), "--max-steps", "2", "--out", str(out), *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "class 'c' has no usable images" in err
    rc = train_main(["--stage", "synth", "--perceptual", f"mae:{tmp_path}", "--out", str(out), *SMALL])
    assert rc == 2 and "no checkpoint.safetensors" in capsys.readouterr().err
    assert train_main(["--stage", "synth", "--p-uncond", "1.5", "--out", str(out), *SMALL]) == 2


def test_balance_to_quotas(tmp_path):
    from PIL import Image

    from dermfast.synthesize import UsageError, parse_args, quotas
    d = tmp_path / "data"
    (d / "images").mkdir(parents=True)
    lines = ["image,label"]
    for cls, n in (("mel", 2), ("nv", 5), ("df", 1)):
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / "images" / f"{cls}{i}.png")
            lines.append(f"{cls}{i}.png,{cls}")
    (d / "labels.csv").write_text("\n".join(lines) + "\n")
    args = parse_args(["--checkpoint", "x", "--balance-to", str(d), "--out", "y"])
    assert quotas(args, ["df", "mel", "nv", "vasc"]) == [4, 3, 0, 5]  # every class up to nv's 5
    with pytest.raises(UsageError, match="class 'nv' of the data is not one the checkpoint generates"):
        quotas(args, ["df", "mel"])


@pytest.mark.slow
def test_resume_across_the_phase_boundary(cache, tmp_path):
    """Resumed from a denoiser-phase checkpoint, the run ends bit-identical (weights, EMA, latent scale)."""
    from safetensors.torch import load_file
    out = tmp_path / "rs"
    args = ["--stage", "synth", "--max-steps", "8", "--vae-steps", "4", "--checkpoint-every", "6",
            "--sample-every", "0", "--out", str(out), *SMALL]
    assert train_main(args) == 0
    first = load_file(str(out / "checkpoint.safetensors"))
    assert train_main([*args, "--resume", str(out / "checkpoints" / "step_00000006")]) == 0
    again = load_file(str(out / "checkpoint.safetensors"))
    assert first.keys() == again.keys() and "latent_scale" in first and "ema_unet.conv_in.weight" in first
    assert all(torch.equal(first[k], again[k]) for k in first)
