"""`python -m dermfast.export --checkpoint RUN --format onnx|torchscript [--out FILE]`

Exports a fine-tuned or distilled classifier (the distilled student is the main case) as a module that maps
`image` [N, 3, S, S] float32 (normalised with the sidecar's mean / std) to `probs` [N, C] (softmax over the
sidecar's class names), with a dynamic batch dimension. Beside the model file, FILE.json records the input
size, layout, mean / std, class names, the parity result, the CPU latency and, under "preprocess", every step
that turns an image file into the input exactly as `python -m dermfast.evaluate` does (decode, resize with
its interpolation and rounding, centre crop, scaling, channel order, normalisation, layout), so another runtime
reproduces evaluate's probabilities from the sidecar alone. `python -m dermfast.predict --checkpoint FILE.onnx`
runs the export through that preprocessing.

Parity: a seeded batch of random inputs goes through the eager model and the exported one (onnxruntime for
ONNX when installed, else the ONNX checker only; torch.jit.load for TorchScript); the max abs difference of the
probabilities must stay within --atol (exit 1 otherwise). Latency: the exported model on the CPU at batch 1 and
32 (median of a few runs, per image). ONNX goes through torch.onnx's dynamo exporter when onnxscript is
installed, else its TorchScript-based one (`--exporter` to choose). An operator the format cannot express is a
one-line refusal naming it (exit 2).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from dermfast.cliparse import OneLineParser


class ExportError(ValueError):
    """The model cannot be exported in this format (one line, exit 2)."""


class ProbsModel(nn.Module):
    """classifier logits -> softmax probabilities (what a deployed model returns)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image).float().softmax(-1)


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _op_name(err: BaseException) -> str | None:
    """The operator an exporter could not convert, from its error message (legacy and dynamo exporters)."""
    text = "".join(str(e) for e in (err, err.__cause__, err.__context__) if e is not None)
    for pat in (r"operator '([^']+)'", r"Unsupported FX nodes: \{'call_function': \[([^\]]+)\]",
                r"No decompositions registered for[^']*'([^']+)'", r"aten::\w+|[a-z_]+::\w+"):
        m = re.search(pat, text)
        if m:
            return (m.group(1) if m.groups() else m.group(0)).strip(" '\"")
    return None


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = 18,
                exporter: str = "auto") -> str:
    """Write `model` (image -> probs) as ONNX with a dynamic batch; returns the exporter used.
    Raises ExportError naming the operator ONNX cannot express."""
    use_dynamo = exporter == "dynamo" or (exporter == "auto" and _has("onnxscript"))
    if exporter == "dynamo" and not _has("onnxscript"):
        raise ExportError("--exporter dynamo needs onnxscript (pip install onnxscript); or use --exporter legacy")
    if not _has("onnx"):
        raise ExportError("ONNX export needs the onnx package: pip install 'dermfast[eval]'")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
            if use_dynamo:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["image"],
                                  output_names=["probs"], dynamic_shapes=({0: batch},), opset_version=opset,
                                  external_data=False, verbose=False)
            else:
                torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["image"],
                                  output_names=["probs"], dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}},
                                  opset_version=min(opset, 17))
    except Exception as e:  # the exporters raise many unrelated types; each becomes one line naming the op
        op = _op_name(e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot export to ONNX: operator {op} is not supported ({first[:200]})" if op else
                          f"cannot export to ONNX: {type(e).__name__}: {first[:300]}") from None
    import onnx
    onnx.checker.check_model(str(path))
    return "dynamo" if use_dynamo else "torchscript-based (legacy)"


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (example,), check_trace=False)
            traced.save(str(path))
    except Exception as e:  # tracing failures come in many types; one line naming the op when there is one
        op = _op_name(e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot export to TorchScript: operator {op} ({first[:200]})" if op else
                          f"cannot export to TorchScript: {type(e).__name__}: {first[:300]}") from None
    return "torch.jit.trace"


def runner(fmt: str, path: Path):
    """A callable numpy [N, 3, S, S] -> probs numpy for the exported file, and its name; (None, reason) when
    the runtime is missing."""
    if fmt == "onnx":
        if not _has("onnxruntime"):
            return None, "onnxruntime not installed (pip install onnxruntime): parity and latency not measured"
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return (lambda x: sess.run(["probs"], {"image": x})[0]), f"onnxruntime {ort.__version__} (CPU)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x):
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()
    return run, "torch.jit.load (CPU)"


def latency_ms(fn, size: int, batch: int, repeats: int = 5, warmup: int = 3) -> float:
    """Median wall time per image in ms of fn on a [batch, 3, size, size] input, after `warmup` runs (TorchScript
    optimises during its first calls)."""
    x = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32)
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / batch * 1e3


PREPROCESS_VERSION = 1


def preprocessing_spec(aug) -> dict:
    """The sidecar's "preprocess" block: the evaluation transform of `aug` (an `Augment`, as
    `dermfast.evaluate.eval_augment` builds it from a checkpoint) written out step by step, so that it can be
    reproduced without dermfast. It states what `dermfast.data.torch_loader.eval_transform` does on a PIL image
    (torchvision's Resize / CenterCrop / ToTensor / Normalize) after the data check that evaluate runs first."""
    size = int(aug.size)
    short = int(round(aug.size / aug.crop_fraction))
    return {
        "version": PREPROCESS_VERSION,
        "decode": {"library": "PIL", "how": "PIL.Image.open(file).convert('RGB')", "mode": "RGB", "bits": 8,
                   "exif_orientation": "not applied (pixels as stored)",
                   "note": "images that are not 8-bit RGB / L / RGBA (16-bit PNG, CMYK JPEG, palette, TIFF, ...) "
                           "are first converted to 8-bit RGB (16-bit as round(v / 257)); alpha is dropped"},
        "resize": {"shorter_side": short, "longer_side": f"floor({short} * longer / shorter)",
                   "interpolation": "bicubic",
                   "implementation": "PIL Image.resize((w, h), Image.BICUBIC): Pillow's bicubic (a = -0.5), "
                                     "antialiased when downscaling (torchvision Resize on a PIL image); "
                                     "an image whose shorter side is already the target is left as is"},
        "crop": {"size": [size, size], "position": "centre",
                 "top": f"round((height - {size}) / 2)", "left": f"round((width - {size}) / 2)",
                 "rounding": "half to even (Python round), on the resized image"},
        "scale": "uint8 / 255 -> float32", "input_range": [0.0, 1.0], "channel_order": "RGB",
        "normalize": {"mean": [float(v) for v in aug.mean], "std": [float(v) for v in aug.std],
                      "formula": "(x - mean[c]) / std[c] per channel, float32"},
        "layout": "NCHW", "dtype": "float32",
        "tta": "optional (--tta in evaluate / predict): mean of the output probabilities over the input and its "
               "flips along W, along H, and along both",
    }


def augment_from_spec(spec: dict):
    """The `Augment` whose evaluation transform is the sidecar's "preprocess" block; ExportError (one line) for a
    block that states anything else (another interpolation, crop, channel order, layout or range), so nothing
    runs an export through preprocessing its sidecar does not describe."""
    from dermfast.data.augment import Augment
    want = preprocessing_spec(Augment())  # the fixed parts of every block this version writes
    try:
        size = [int(v) for v in spec["crop"]["size"]]
        short = int(spec["resize"]["shorter_side"])
        mean = tuple(float(v) for v in spec["normalize"]["mean"])
        std = tuple(float(v) for v in spec["normalize"]["std"])
        fixed = {"interpolation": spec["resize"]["interpolation"], "crop position": spec["crop"]["position"],
                 **{k: spec[k] for k in ("channel_order", "layout", "input_range", "dtype")}}
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"the sidecar's preprocess block is incomplete ({type(e).__name__}: {e})") from None
    expected = {"interpolation": "bicubic", "crop position": "centre", "channel_order": want["channel_order"],
                "layout": want["layout"], "input_range": want["input_range"], "dtype": want["dtype"]}
    odd = [f"{k} {fixed[k]!r} (supported: {expected[k]!r})" for k in expected if fixed[k] != expected[k]]
    if size[0] != size[1]:
        odd.append(f"crop {size} (supported: square)")
    if len(mean) != 3 or len(std) != 3:
        odd.append("mean / std need 3 channels")
    if odd:
        raise ExportError(f"the sidecar states preprocessing dermfast does not implement: {'; '.join(odd)}")
    aug = Augment(size=size[0], mean=mean, std=std, crop_fraction=size[0] / short)
    if int(round(aug.size / aug.crop_fraction)) != short:  # the float round trip must give the stated size
        raise ExportError(f"the sidecar's resize {short} px cannot be reproduced for a {size[0]} px crop")
    return aug


def export(args) -> dict:
    from dermfast.models.classifier import load_classifier
    model, meta = load_classifier(args.checkpoint, "cpu")
    wrapped = ProbsModel(model).eval()
    size = int(meta["img_size"])
    ckpt = Path(meta["checkpoint_path"])
    suffix = ".onnx" if args.format == "onnx" else ".pt"
    out = Path(args.out) if args.out else ckpt.parent / f"model{suffix}"
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen)
    opset = None
    if args.format == "onnx":
        how = export_onnx(wrapped, example, out, args.opset, args.exporter)
        import onnx
        opset = max((o.version for o in onnx.load(str(out), load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx")), default=None)
    else:
        how = export_torchscript(wrapped, example, out)

    parity_x = torch.randn(args.parity_batch, 3, size, size, generator=gen)
    with torch.no_grad():
        ref = wrapped(parity_x).numpy()
    fn, rt = runner(args.format, out)
    parity, latency = None, {}
    if fn is not None:
        got = fn(parity_x.numpy())
        parity = float(np.abs(got - ref).max())
        if not args.no_latency:
            latency = {str(b): round(latency_ms(fn, size, b), 3) for b in (1, 32)}
    from dermfast.evaluate import eval_augment
    pre = preprocessing_spec(eval_augment(meta))  # what evaluate feeds the model, stated in full
    sidecar = {
        "format": args.format, "file": out.name, "exporter": how, "opset": opset,
        "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW",
                  "size": size, "range": "RGB in [0, 1], then (x - mean) / std",
                  "preprocess": f"resize the shorter side to {pre['resize']['shorter_side']} px (PIL bicubic), "
                                f"centre crop {size} px; see the preprocess block"},
        "preprocess": pre,
        "mean": list(meta["mean"]), "std": list(meta["std"]),
        "output": {"name": "probs", "shape": ["batch", len(meta["classes"])], "meaning": "softmax over class_names"},
        "class_names": list(meta["classes"]), "arch": meta["model"]["arch"], "stage": meta["stage"],
        "checkpoint": str(ckpt),
        "parity": {"max_abs_diff_probs": parity, "batch": args.parity_batch, "atol": args.atol, "runtime": rt,
                   "input": "seeded standard-normal batch"},
        "cpu_latency_ms_per_image": latency or None, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
    }
    side = out.with_suffix(".json")
    side.write_text(json.dumps(sidecar, indent=2))
    sidecar["sidecar"] = str(side)
    sidecar["path"] = str(out)
    return sidecar


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dermfast.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a fine-tune / distill run directory or checkpoint file")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--out", help="output file (default: RUN/model.onnx or RUN/model.pt; sidecar beside it as .json)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18; the legacy exporter caps at 17)")
    p.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "legacy"),
                   help="ONNX exporter: auto (dynamo when onnxscript is installed, else legacy)")
    p.add_argument("--parity-batch", type=int, default=8, dest="parity_batch", help="images in the parity batch")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed probability difference (default 1e-4)")
    p.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dermfast.models.classifier import CheckpointError
    try:
        s = export(args)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    par = s["parity"]
    lat = s["cpu_latency_ms_per_image"]
    print(f"export: {s['path']} ({s['format']}, {s['exporter']}), sidecar {s['sidecar']}")
    if par["max_abs_diff_probs"] is None:
        print(f"export: parity not checked: {par['runtime']}")
    else:
        print(f"export: parity on {par['batch']} images via {par['runtime']}: max |probs diff| "
              f"{par['max_abs_diff_probs']:.2e} (atol {par['atol']:.0e})")
    if lat:
        print(f"export: CPU latency per image: {lat['1']:.2f} ms at batch 1, {lat['32']:.2f} ms at batch 32")
    if par["max_abs_diff_probs"] is not None and par["max_abs_diff_probs"] > args.atol:
        print(f"error: parity check failed: max |probs diff| {par['max_abs_diff_probs']:.2e} > atol {args.atol:.0e}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
