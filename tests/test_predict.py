"""`python -m dermfast.predict` and `load_predictor`: on a trained run and on its ONNX export, against
`python -m dermfast.evaluate` on the same images; Grad-CAM overlays against dermfast.eval.explain; the Python API
on paths, PIL images and tensors; corrupt images counted; the bad-input refusals (one line, exit 2)."""
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from dermfast.predict import PredictError, load_predictor, main  # noqa: E402

TRAIN = ["--stage", "finetune", "--preset", "demo", "--img-size", "32", "--max-steps", "1", "--toy-images", "96",
         "--toy-image-size", "40", "--batch-size", "16", "--loader", "torch", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    """A real finetune run folder (config.yaml, splits.csv, best.safetensors) from one step on the embedded data.
    One step leaves the probabilities within ~1e-3 of uniform, which would hide a preprocessing difference, so the
    trained weights are then moved by seeded noise (as tests/test_evaluate.py does) and written back with the
    checkpoint's own metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dermfast.train.cli import main as train_main
    out = tmp_path_factory.mktemp("runs") / "ft"
    assert train_main([*TRAIN, "--out", str(out)]) == 0
    best = out / "best.safetensors"
    with safe_open(str(best), framework="pt") as f:
        meta = f.metadata()
    gen = torch.Generator().manual_seed(0)
    weights = {k: (v + 0.2 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v).contiguous()
               for k, v in load_file(str(best)).items()}
    save_file(weights, str(best), metadata=meta)
    return out


@pytest.fixture(scope="module")
def onnx_file(run):
    pytest.importorskip("onnxruntime")
    from dermfast.export import main as export_main
    assert export_main(["--checkpoint", str(run), "--format", "onnx", "--exporter", "legacy", "--no-latency"]) == 0
    return run / "model.onnx"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """mel/ and nv/ (classes of the model) with odd sizes, a greyscale JPEG, an RGBA PNG, a palette PNG (which
    the data check converts) and a corrupt file (skipped, counted)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    for cls, sizes in {"mel": [(45, 37), (50, 61), (40, 40)], "nv": [(33, 70), (64, 48), (37, 37)]}.items():
        (root / cls).mkdir()
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{cls}{i}.jpg")
    Image.fromarray(rng.integers(0, 256, (41, 52), dtype=np.uint8)).save(root / "nv/grey.jpg")
    Image.fromarray(rng.integers(0, 256, (52, 41, 4), dtype=np.uint8)).save(root / "mel/rgba.png")
    Image.fromarray(rng.integers(0, 256, (44, 44, 3), dtype=np.uint8)).convert("P").save(root / "mel/palette.png")
    (root / "nv/broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def probs_of(rows, classes):
    return np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])


@pytest.mark.parametrize("tta", [False, True])
def test_cli_matches_evaluate_on_the_same_images(run, images, tmp_path, capsys, tta):
    from dermfast.evaluate import main as eval_main
    flag = ["--tta"] if tta else []
    assert eval_main(["--checkpoint", str(run), "--data", str(images), "--out", str(tmp_path / "ev"),
                      "--no-report", *flag]) == 0
    capsys.readouterr()
    assert main(["--checkpoint", str(run), "--data", str(images), "--out", str(tmp_path / "p.csv"),
                 "--no-progress", *flag]) == 0
    out = capsys.readouterr()
    classes = load_predictor(run, "cpu").classes
    assert classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["image", "predicted", *[f"p_{c}" for c in classes]]
    assert len(rows) == 9 and not any("broken" in r["image"] for r in rows)
    # the palette PNG is predicted from the data check's converted copy and named by the user's file
    assert {r["image"] for r in rows} >= {str(images / "mel/palette.png"), str(images / "nv/grey.jpg")}
    assert "1 of 10 images skipped (not usable): broken.jpg" in out.err
    assert f"predict: 9 images, checkpoint {run / 'best.safetensors'}" in out.out and "akiec, bcc" in out.out

    ev = {r["image"]: r for r in read_csv(tmp_path / "ev/predictions.csv")}
    assert len(ev) == 9
    # evaluate names every image as predict does, by the user's file (the palette PNG too, never its converted
    # copy in the cache: issue 19)
    assert set(ev) == {r["image"] for r in rows}
    want = [ev[r["image"]] for r in rows]
    got = probs_of(rows, classes)
    np.testing.assert_allclose(got, probs_of(want, classes), atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert [r["predicted"] for r in rows] == [classes[k] for k in got.argmax(1)]
    assert got.std(0).max() > 1e-2  # the images get different probabilities: the comparison means something


def test_onnx_export_agrees_with_the_run(run, onnx_file, images, tmp_path, capsys):
    for name, ck in (("run", run), ("onnx", onnx_file)):
        for tta in ([], ["--tta"]):
            assert main(["--checkpoint", str(ck), "--data", str(images), "--out", str(tmp_path / f"{name}{tta}.csv"),
                         "--no-progress", *tta]) == 0, capsys.readouterr().err
    assert "predict: 9 images, onnx" in capsys.readouterr().out
    classes = load_predictor(onnx_file).classes
    for tta in ([], ["--tta"]):
        a, b = read_csv(tmp_path / f"run{tta}.csv"), read_csv(tmp_path / f"onnx{tta}.csv")
        assert [r["image"] for r in a] == [r["image"] for r in b]
        np.testing.assert_allclose(probs_of(a, classes), probs_of(b, classes), atol=1e-5)
    plain, flipped = (probs_of(read_csv(tmp_path / f"onnx{t}.csv"), classes) for t in ([], ["--tta"]))
    assert np.abs(plain - flipped).max() > 1e-3  # TTA ran on the ONNX path too


def test_python_api_on_paths_pil_images_and_tensors(run, onnx_file, images, tmp_path):
    from PIL import Image
    files = [str(images / "mel/mel0.jpg"), str(images / "nv/nv1.jpg"), str(images / "nv/grey.jpg")]
    for source in (run, onnx_file):
        p = load_predictor(source, "cpu")
        by_path = p(files)
        assert by_path.probs.shape == (3, 7) and by_path.names == files and by_path.classes == p.classes
        assert by_path.predicted == [p.classes[k] for k in by_path.probs.argmax(1)]
        pils = [Image.open(f) for f in files]
        np.testing.assert_allclose(p(pils).probs, by_path.probs, atol=1e-6)
        x = torch.stack([p.preprocess(im) for im in pils])
        assert x.shape == (3, 3, 32, 32)
        np.testing.assert_allclose(p(x).probs, by_path.probs, atol=1e-6)
        mixed = p([pils[0], files[1], pils[2]])  # kept in input order
        np.testing.assert_allclose(mixed.probs, by_path.probs, atol=1e-6)
        assert mixed.names == ["<PIL image 0>", files[1], "<PIL image 2>"]
        np.testing.assert_allclose(p(files[0], tta=True).probs, p([files[0]], tta=True).probs)
        with pytest.raises(PredictError, match="not usable images: broken.jpg"):
            p([files[0], str(images / "nv/broken.jpg")])
        with pytest.raises(PredictError, match=r"preprocessed images \[N, 3, 32, 32\]"):
            p(torch.zeros(2, 3, 64, 64))
    torch_p, onnx_p = load_predictor(run, "cpu", tta=True), load_predictor(onnx_file, tta=True)
    np.testing.assert_allclose(torch_p(files).probs, onnx_p(files).probs, atol=1e-5)


def test_gradcam_overlays_are_explain_gradcam_of_the_predicted_class(run, onnx_file, images, tmp_path, capsys):
    from dermfast.eval import explain as ex
    cams = tmp_path / "cams"
    assert main(["--checkpoint", str(run), "--data", str(images / "nv"), "--out", str(tmp_path / "p.csv"),
                 "--gradcam", str(cams), "--no-progress"]) == 0
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows) == 4 and sorted(p.name for p in cams.iterdir()) == sorted(
        f"{i:05d}_{r['image'].rsplit('/', 1)[1].rsplit('.', 1)[0]}.png" for i, r in enumerate(rows))
    from PIL import Image
    p = load_predictor(run, "cpu")
    for r in rows:
        pair = np.asarray(Image.open(r["gradcam"]))
        assert pair.shape == (32, 64, 3)
        x = p.preprocess(Image.open(r["image"]))[None]
        mean, std = torch.tensor(p.aug.mean).view(3, 1, 1), torch.tensor(p.aug.std).view(3, 1, 1)
        img = ((x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        heat = ex.gradcam(p.model, x, torch.tensor([p.classes.index(r["predicted"])]))[0]
        np.testing.assert_array_equal(pair[:, :32], img)
        np.testing.assert_array_equal(pair[:, 32:], ex.overlay(img, heat))
    assert main(["--checkpoint", str(onnx_file), "--data", str(images), "--gradcam", str(cams),
                 "--out", str(tmp_path / "o.csv")]) == 2
    assert "--gradcam needs the torch checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("case,expected", [
    ("missing_data", "--data 'nowhere.jpg' does not exist"),
    ("not_an_image", "notes.txt is not an image"),
    ("corrupt_only", "no usable images in"),
    ("empty_folder", "holds no images"),
    ("mae", "is a 'mae' checkpoint; this needs a classifier"),
    ("missing_checkpoint", "does not exist"),
    ("onnx_no_sidecar", "no sidecar lonely.json beside it"),
    ("sidecar_bilinear", "does not implement: interpolation 'bilinear'"),
])
def test_bad_input_is_one_line_exit_2(run, onnx_file, images, tmp_path, capsys, case, expected):
    argv = ["--checkpoint", str(run), "--data", str(images), "--out", str(tmp_path / "p.csv"), "--no-progress"]
    if case == "missing_data":
        argv[3] = "nowhere.jpg"
    elif case == "not_an_image":
        (tmp_path / "notes.txt").write_text("hello")
        argv[3] = str(tmp_path / "notes.txt")
    elif case == "corrupt_only":
        argv[3] = str(images / "nv/broken.jpg")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        argv[3] = str(tmp_path / "empty")
    elif case == "mae":
        from dermfast.models.mae import MAEPreset, MaskedAutoencoderViT
        from safetensors.torch import save_file
        tiny = MAEPreset(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                         decoder_depth=1, decoder_num_heads=2)
        (tmp_path / "mae").mkdir()
        save_file(MaskedAutoencoderViT(tiny).state_dict(), str(tmp_path / "mae/checkpoint.safetensors"),
                  metadata={"stage": json.dumps("mae")})
        argv[1] = str(tmp_path / "mae")
    elif case == "missing_checkpoint":
        argv[1] = str(tmp_path / "nope.safetensors")
    elif case == "onnx_no_sidecar":
        (tmp_path / "lonely.onnx").write_bytes(onnx_file.read_bytes())
        argv[1] = str(tmp_path / "lonely.onnx")
    elif case == "sidecar_bilinear":
        (tmp_path / "m.onnx").write_bytes(onnx_file.read_bytes())
        side = json.loads(onnx_file.with_suffix(".json").read_text())
        side["preprocess"]["resize"]["interpolation"] = "bilinear"
        (tmp_path / "m.json").write_text(json.dumps(side))
        argv[1] = str(tmp_path / "m.onnx")
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "p.csv").exists()


def test_a_sidecar_from_before_the_preprocess_block_still_runs(onnx_file, images, tmp_path):
    """Sidecars written before the preprocess block state input size, mean and std only; their export was made for
    evaluate's transform (shorter side round(size / 0.875), bicubic, centre crop), which the fallback rebuilds."""
    side = json.loads(onnx_file.with_suffix(".json").read_text())
    del side["preprocess"]
    (tmp_path / "old.onnx").write_bytes(onnx_file.read_bytes())
    (tmp_path / "old.json").write_text(json.dumps(side))
    files = [str(images / "mel/mel1.jpg"), str(images / "nv/nv2.jpg")]
    old, new = load_predictor(tmp_path / "old.onnx"), load_predictor(onnx_file)
    assert repr(old._transform) == repr(new._transform)  # Resize(37, bicubic), CenterCrop(32), Normalize(...)
    assert "Resize(size=37, interpolation=bicubic" in repr(old._transform)
    np.testing.assert_array_equal(old(files).probs, new(files).probs)
