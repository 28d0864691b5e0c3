"""`python -m dermfast.predict --checkpoint RUN|MODEL.onnx --data FOLDER_OR_FILE [--tta] [--out CSV] [--gradcam DIR]`

Class probabilities for unlabelled images, from a fine-tuned or distilled classifier (a run directory or a
checkpoint file) or from its ONNX export (`python -m dermfast.export`). `--data` is one image, a folder of images
(flat, or in class subfolders: the labels are then ignored) or any dataset `python -m dermfast.evaluate --data`
reads. Writes a CSV with one row per image: image, predicted (class name), p_<class> for each of the model's
classes (and gradcam, the overlay's file, with `--gradcam DIR`, which writes the image beside its Grad-CAM
heat map for the predicted class; a checkpoint only).

A cross-validation folder (`python -m dermfast.train --folds K`) predicts with its fold ensemble: the mean of the K
fold models' probabilities; its decision threshold (chosen on the out-of-fold predictions) decides the predicted
class of a binary task, as a checkpoint's recorded validation threshold does (`Predictions.threshold`).

Preprocessing is evaluate's, by the same code: the data check (`validate_records`: unreadable images skipped and
reported, odd formats converted), the torch loader's evaluation transform (`eval_augment` of the checkpoint:
shorter side resized with PIL bicubic, centre crop, normalised) and `dermfast.evaluate.predict` (fp32, `--tta`
the mean over four flips). An ONNX export runs on onnxruntime with the preprocessing its sidecar (FILE.json)
states, mapped back onto that same transform; a sidecar stating anything else is refused.

Bad input (a missing file, a file that is not an image, a folder with no usable image, a checkpoint that is not
a classifier, an ONNX file without its sidecar) is one line on stderr and exit code 2; corrupt images inside a
folder are skipped, counted and named on stderr.

Python API (the same path)::

    from dermfast.predict import load_predictor
    p = load_predictor("runs/finetune")            # or "runs/finetune/model.onnx"
    out = p(["a.jpg", "b.png"], tta=True)          # file paths, PIL images, or a preprocessed tensor batch
    out.probs                                      # [N, C] float64
    out.classes, out.predicted                     # class names; the predicted class of each image
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dermfast.cliparse import OneLineParser
from dermfast.data.records import IMAGE_EXTENSIONS, DatasetError, ImageRecords


class PredictError(ValueError):
    """Prediction cannot proceed on this input (one line, exit 2)."""


@dataclass
class Predictions:
    """probs: [N, C] float64, rows in input order; classes: the model's C class names; names: what each row is
    (the file, or `<PIL image i>` / `<tensor i>`); skipped: (name, reason) of inputs left out (folders only)."""
    probs: np.ndarray
    classes: list[str]
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    records: ImageRecords | None = field(default=None, repr=False)  # the usable images, for files / folders
    threshold: tuple[int, float] | None = None  # (positive class index, t): a binary model predicts it iff p >= t

    def __len__(self) -> int:
        return len(self.names)

    @property
    def index(self) -> np.ndarray:
        """[N] int64: the predicted class index of each row (arg-max, or the threshold rule when set)."""
        if not len(self.probs):
            return np.zeros(0, dtype=np.int64)
        if self.threshold is not None and self.probs.shape[1] == 2:
            pos, t = self.threshold
            return np.where(self.probs[:, pos] >= t, pos, 1 - pos).astype(np.int64)
        return self.probs.argmax(1)

    @property
    def predicted(self) -> list[str]:
        """The predicted class name of each row."""
        return [self.classes[int(k)] for k in self.index]


class OnnxClassifier(nn.Module):
    """An ONNX export (`image` [N, 3, S, S] float32 -> `probs` [N, C]) on onnxruntime's CPU provider, as a module
    whose forward returns log-probabilities: `dermfast.evaluate.predict` applies softmax (and averages its TTA
    flips) to what a model returns, and softmax(log p) = p, so the export's own probabilities come back."""

    def __init__(self, path: Path):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise PredictError("running an ONNX export needs onnxruntime: pip install onnxruntime") from None
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PredictError(f"{path}: onnxruntime cannot load it ({first[:200]})") from None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(["probs"], {"image": x})[0]).log()


class Predictor:
    """A classifier and its preprocessing: call it on file paths, PIL images, or a tensor batch (see __call__).

    model: the torch classifier (logits) or an `OnnxClassifier`; classes: its class names; aug: the `Augment`
    whose evaluation transform is the preprocessing; source: the checkpoint or export it came from; kind:
    "checkpoint", "cv-ensemble" (a cross-validation's fold models) or "onnx"; meta: the checkpoint's metadata, or the export's sidecar."""

    def __init__(self, model: nn.Module, classes: list[str], aug, device: torch.device, source: str, kind: str,
                 meta: dict, tta=None, batch_size: int = 64):
        from dermfast.data.torch_loader import eval_transform
        from dermfast.evaluate import tta_mode
        self.model, self.classes, self.aug, self.device = model.eval(), list(classes), aug, device
        # test-time views (dermfast.eval.tta): as asked (True = the four flips), else the mode the model records
        tta = tta_mode(tta) if tta is not None else (meta.get("tta") or "none")
        self.source, self.kind, self.meta, self.tta, self.batch_size = source, kind, meta, tta, int(batch_size)
        self._transform = eval_transform(aug)

    def __repr__(self) -> str:
        return (f"Predictor({self.source!r}, {self.kind}, {len(self.classes)} classes, {self.aug.size} px, "
                f"device {self.device})")

    @property
    def threshold(self) -> tuple[int, float] | None:
        """(positive class index, t) of the decision threshold in meta["threshold"] (binary models), else None."""
        thr = self.meta.get("threshold") if isinstance(self.meta, dict) else None
        if not isinstance(thr, dict) or thr.get("value") is None or len(self.classes) != 2:
            return None
        from dermfast.eval.metrics import default_positive
        name = thr.get("positive_class") or self.meta.get("positive") or default_positive(self.classes)
        return (self.classes.index(name) if name in self.classes else 1), float(thr["value"])

    @property
    def size(self) -> int:
        return int(self.aug.size)

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image -> [3, S, S] float32, exactly as the evaluation loader prepares a decoded file."""
        return self._transform(image.convert("RGB"))

    # -- running the model ---------------------------------------------------------------------------------------
    def _run(self, loader, tta, progress: bool = False, total: int | None = None) -> np.ndarray:
        from dermfast.evaluate import predict
        if progress:
            from tqdm import tqdm
            loader = tqdm(loader, total=total, desc="predicting", unit="batch", mininterval=1.0)
        probs, _ = predict(self.model, loader, self.device, tta=tta)
        return probs

    def _tensor_batches(self, x: torch.Tensor):
        for lo in range(0, len(x), self.batch_size):
            chunk = x[lo:lo + self.batch_size].to(self.device)
            yield {"image": chunk, "label": torch.zeros(len(chunk), dtype=torch.int64)}

    def _loader(self, records: ImageRecords):
        from dermfast.data.loader import build_loader
        return build_loader(records, self.aug, self.batch_size, train=False, loader="torch", device=self.device,
                            workers=0)

    def predict_tensor(self, x: torch.Tensor, tta: bool | str | None = None) -> np.ndarray:
        """x: [N, 3, S, S] (or [3, S, S]) float, already preprocessed -> probs [N, C] float64."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise PredictError(f"a tensor input must be a float tensor, got {getattr(x, 'dtype', type(x))}")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.size, self.size):
            raise PredictError(f"a tensor input must be preprocessed images [N, 3, {self.size}, {self.size}], got "
                               f"{list(x.shape)}; pass PIL images or file paths to have them preprocessed")
        if len(x) == 0:
            return np.zeros((0, len(self.classes)))
        return self._run(self._tensor_batches(x), self.tta if tta is None else tta)

    def predict_records(self, records: ImageRecords, tta: bool | str | None = None, progress: bool = False,
                        skip_bad: bool = True) -> Predictions:
        """Every image of `records` through evaluate's data check and loader. Images the check rejects are
        left out and listed in `skipped` (skip_bad), or raise PredictError naming them."""
        from dermfast.data.toy import default_cache_dir
        from dermfast.data.validate import validate_records
        usable, report = validate_records(records, cache_dir=default_cache_dir() / "validate", progress=progress)
        skipped = list(report.skipped) + list(report.missing)
        if skipped and not skip_bad:
            raise PredictError(f"{len(skipped)} input(s) are not usable images: {_names(skipped)}")
        if len(usable) == 0:
            raise PredictError(f"no usable images in {records.root or 'the input'}"
                               + (f": {len(skipped)} skipped: {_names(skipped)}" if skipped else ""))
        original = {conv: key for key, conv, _ in report.converted}  # converted copies -> the user's file
        names = [original.get(p, p) for p in usable.paths]
        loader = self._loader(usable)
        probs = self._run(loader, self.tta if tta is None else tta, progress, total=len(loader))
        return Predictions(probs, self.classes, names, skipped, usable, self.threshold)

    def predict_data(self, path, tta: bool | str | None = None, progress: bool = False) -> Predictions:
        """The CLI's --data: one image file, a folder of images, or any dataset evaluate reads; corrupt images
        are skipped and listed in `skipped`."""
        return self.predict_records(read_inputs(path), tta, progress)

    def __call__(self, inputs, tta: bool | str | None = None) -> Predictions:
        """inputs: a file path, a PIL image, a list of those (mixed is fine), or a tensor [N, 3, S, S] already
        preprocessed (`preprocess` gives one image). Returns `Predictions` in input order; a path that is not a
        usable image raises PredictError (one line)."""
        tta = self.tta if tta is None else tta
        if isinstance(inputs, torch.Tensor):
            probs = self.predict_tensor(inputs, tta)
            return Predictions(probs, self.classes, [f"<tensor {i}>" for i in range(len(probs))],
                               threshold=self.threshold)
        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        from PIL import Image
        paths = [i for i, v in enumerate(items) if isinstance(v, (str, Path))]
        pils = [i for i, v in enumerate(items) if isinstance(v, Image.Image)]
        bad = [type(items[i]).__name__ for i in range(len(items)) if i not in set(paths) | set(pils)]
        if bad:
            raise PredictError(f"cannot predict on {bad[0]}: pass file paths, PIL images, or a tensor batch")
        probs = np.zeros((len(items), len(self.classes)))
        names = [""] * len(items)
        if paths:
            files = [str(items[i]) for i in paths]
            for f in files:
                if Path(f).is_dir():
                    raise PredictError(f"{f} is a folder: use predict_data(folder) for a folder of images")
            probs[paths] = self.predict_records(image_records(files), tta, skip_bad=False).probs
            for i, f in zip(paths, files):
                names[i] = f
        if pils:
            x = torch.stack([self.preprocess(items[i]) for i in pils])
            probs[pils] = self.predict_tensor(x, tta)
            for i in pils:
                names[i] = f"<PIL image {i}>"
        return Predictions(probs, self.classes, names, threshold=self.threshold)

    # -- explanations --------------------------------------------------------------------------------------------
    def gradcam(self, x: torch.Tensor, target: torch.Tensor | None = None) -> np.ndarray:
        """Grad-CAM maps [N, S, S] in [0, 1] (`dermfast.eval.explain.gradcam`) of preprocessed images x for
        `target` (default: the predicted class). A checkpoint only: an ONNX export has no gradients."""
        if self.kind != "checkpoint":
            raise PredictError("Grad-CAM needs the torch checkpoint (an ONNX export has no gradients); "
                               "pass the run directory instead of the .onnx file")
        from dermfast.eval.explain import gradcam
        try:
            return gradcam(self.model, x.to(self.device), target)
        except ValueError as e:
            raise PredictError(f"Grad-CAM: {e}") from None

    def write_gradcam(self, records: ImageRecords, index: np.ndarray, names: list[str], out_dir: Path,
                      progress: bool = False) -> list[str]:
        """For each image of `records`: OUT/<row>_<stem>.png, the preprocessed image beside its Grad-CAM overlay
        for class index[i]. Returns the files written, in row order."""
        from types import SimpleNamespace

        from PIL import Image

        from dermfast.eval.explain import overlay
        from dermfast.evaluate import _denorm, _images
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"img_size": self.aug.size, "mean": self.aug.mean, "std": self.aug.std}
        written = []
        starts = range(0, len(records), self.batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="Grad-CAM", unit="batch", mininterval=1.0)
        for lo in starts:
            idx = list(range(lo, min(lo + self.batch_size, len(records))))
            x = _images(records, idx, meta, SimpleNamespace(loader="torch"), self.device)
            maps = self.gradcam(x, torch.as_tensor(index[idx], device=self.device))
            for i, im, hm in zip(idx, _denorm(x, meta), maps):
                path = out_dir / f"{i:05d}_{Path(names[i]).stem}.png"
                Image.fromarray(np.concatenate([im, overlay(im, hm)], axis=1)).save(path)
                written.append(str(path))
        return written


def _names(items: list[tuple[str, str]], k: int = 3) -> str:
    shown = "; ".join(f"{Path(n).name} ({r})" for n, r in items[:k])
    return shown + (f"; and {len(items) - k} more" if len(items) > k else "")


def image_records(files: list[str]) -> ImageRecords:
    """Unlabelled records of image files (labels -1, no classes)."""
    return ImageRecords([str(f) for f in files], np.full(len(files), -1), [],
                        root=str(Path(files[0]).parent) if files else "")


def read_inputs(path) -> ImageRecords:
    """--data: an image file, a folder of images (flat or class subfolders), or a dataset evaluate reads."""
    from dermfast.data.adapters import open_any
    p = Path(path).expanduser()
    if not p.exists():
        raise PredictError(f"--data {str(path)!r} does not exist")
    if p.is_file():
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            return image_records([str(p)])
        try:
            return open_any(p)
        except DatasetError:
            raise PredictError(f"{p} is not an image ({', '.join(IMAGE_EXTENSIONS)}) nor a dataset file "
                               "dermfast reads") from None
    return open_any(p)


# -- loading -----------------------------------------------------------------------------------------------------

def load_predictor(path, device: str | torch.device = "auto", tta=None,
                   batch_size: int = 64) -> Predictor:
    """A run directory or checkpoint file (fine-tune / distill), or an ONNX export (FILE.onnx with its sidecar
    FILE.json), as a `Predictor`. `tta`: None = the test-time views the checkpoint records (none if it records
    none), True = the four flips, or a mode ("none", "flips", "d4"). Raises CheckpointError / PredictError (one
    line) for anything else."""
    from dermfast.device import resolve_device
    p = Path(path).expanduser()
    if p.suffix.lower() == ".onnx":
        return _load_onnx(p, tta, batch_size)
    from dermfast.evaluate import eval_augment
    from dermfast.models.classifier import load_classifier
    from dermfast.eval.cv_results import is_cv_dir
    try:
        dev = resolve_device(device)
    except (ValueError, RuntimeError) as e:
        raise PredictError(f"bad device {device!r}: {e}") from None
    if is_cv_dir(p):
        return _load_cv(p, dev, tta, batch_size)
    model, meta = load_classifier(p, dev)
    return Predictor(model, meta["classes"], eval_augment(meta), dev, str(meta["checkpoint_path"]), "checkpoint",
                     meta, tta, batch_size)


class EnsembleClassifier(nn.Module):
    """Members' mean probability, returned as its log: `dermfast.evaluate.predict` applies softmax to what a
    model returns (and averages its TTA flips), and softmax(log p) = p."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        p = torch.stack([m(image).float().softmax(-1) for m in self.members]).mean(0)
        return p.clamp_min(1e-30).log()


def _load_cv(folder: Path, device: torch.device, tta, batch_size: int) -> Predictor:
    """A finished cross-validation folder: its K fold models as one ensemble, with its out-of-fold threshold."""
    from dermfast.evaluate import eval_augment
    from dermfast.models.classifier import load_classifier
    from dermfast.eval.cv_results import METRICS_FILE, fold_dir, read_cv
    info = read_cv(folder)
    if info.get("status") != "finished" or not (folder / METRICS_FILE).is_file():
        raise PredictError(f"{folder}: the cross-validation is not finished; continue it with --resume auto")
    loaded = [load_classifier(fold_dir(folder, k), device) for k in range(1, int(info["folds"]) + 1)]
    meta0 = loaded[0][1]
    for _, meta in loaded[1:]:
        for key in ("classes", "img_size", "mean", "std"):
            if meta.get(key) != meta0.get(key):
                raise PredictError(f"{folder}: fold models disagree on {key} ({meta0.get(key)} vs {meta.get(key)})")
    cv = json.loads((folder / METRICS_FILE).read_text())
    meta = {**meta0, "threshold": cv.get("threshold"), "cross_validation": str(folder),
            "members": [m["checkpoint_path"] for _, m in loaded]}
    return Predictor(EnsembleClassifier([m for m, _ in loaded]), meta0["classes"], eval_augment(meta0), device,
                     str(folder), "cv-ensemble", meta, tta, batch_size)


def _load_onnx(path: Path, tta, batch_size: int) -> Predictor:
    from dermfast.export import ExportError, augment_from_spec
    if not path.is_file():
        raise PredictError(f"ONNX file {str(path)!r} does not exist")
    side_path = path.with_suffix(".json")
    if not side_path.is_file():
        raise PredictError(f"{path}: no sidecar {side_path.name} beside it (python -m dermfast.export writes one); "
                           "it states the classes and the preprocessing")
    try:
        side = json.loads(side_path.read_text())
        classes = [str(c) for c in side["class_names"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PredictError(f"{side_path}: not an export sidecar ({type(e).__name__}: {e})") from None
    spec = side.get("preprocess")
    if spec is None:  # a sidecar written before the preprocess block: its size, mean and std, evaluate's crop
        from dermfast.data.augment import Augment
        try:
            aug = Augment(size=int(side["input"]["size"]), mean=tuple(side["mean"]), std=tuple(side["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise PredictError(f"{side_path}: states no preprocessing ({type(e).__name__}: {e})") from None
    else:
        try:
            aug = augment_from_spec(spec)
        except ExportError as e:
            raise PredictError(f"{side_path}: {e}") from None
    return Predictor(OnnxClassifier(path), classes, aug, torch.device("cpu"), str(path), "onnx", side, tta,
                     batch_size)


# -- CLI ---------------------------------------------------------------------------------------------------------

def run(args) -> dict:
    pred = load_predictor(args.checkpoint, args.device, tta=args.tta, batch_size=args.batch_size)
    if args.gradcam and pred.kind != "checkpoint":
        raise PredictError("--gradcam needs the torch checkpoint (an ONNX export has no gradients); "
                           "pass the run directory instead of the .onnx file")
    out = pred.predict_data(args.data, progress=args.progress)
    cams = pred.write_gradcam(out.records, out.index, out.names, Path(args.gradcam), args.progress) if args.gradcam \
        else None
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "predicted", *[f"p_{c}" for c in out.classes], *(["gradcam"] if cams else [])])
        for i, (name, k) in enumerate(zip(out.names, out.index)):
            w.writerow([name, out.classes[int(k)], *[f"{v:.6f}" for v in out.probs[i]], *([cams[i]] if cams else [])])
    return {"predictions": out, "out": str(dest), "predictor": pred, "gradcam": cams}


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dermfast.predict", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="a fine-tune / distill run directory or checkpoint file, "
                                                        "or an ONNX export (FILE.onnx beside its FILE.json)")
    p.add_argument("--data", required=True, help="an image file, a folder of images, or a dataset")
    p.add_argument("--out", default="predictions.csv", help="the CSV to write (default ./predictions.csv)")
    p.add_argument("--tta", nargs="?", const="flips", default=None, choices=("none", "flips", "d4"),
                   help="test-time views: flips (4, what --tta alone means) or d4 (8); default: the mode the "
                        "checkpoint records, else none")
    p.add_argument("--gradcam", metavar="DIR", help="write each image beside its Grad-CAM overlay into DIR")
    p.add_argument("--batch-size", type=int, default=64, dest="batch_size")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N (ONNX: CPU)")
    p.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dermfast.data.loader import LoaderUnavailable
    from dermfast.models.classifier import CheckpointError
    try:
        if args.batch_size < 1:
            raise PredictError(f"--batch-size must be >= 1, got {args.batch_size}")
        r = run(args)
    except (CheckpointError, DatasetError, PredictError, LoaderUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e} (pip install 'dermfast[eval]')", file=sys.stderr)
        return 2
    out = r["predictions"]
    if out.skipped:
        print(f"predict: {len(out.skipped)} of {len(out) + len(out.skipped)} images skipped (not usable): "
              f"{_names(out.skipped, 5)}", file=sys.stderr)
    counts = np.bincount(out.index, minlength=len(out.classes))
    print(f"predict: {len(out)} images, {r['predictor'].kind} {r['predictor'].source}"
          f"{', tta ' + r['predictor'].tta if r['predictor'].tta != 'none' else ''}"
          + (f", threshold p_{out.classes[out.threshold[0]]} >= {out.threshold[1]:.4f}" if out.threshold else "")
          + f"; classes {', '.join(out.classes)}; predicted "
          + ", ".join(f"{c} {n}" for c, n in zip(out.classes, counts) if n) + f" -> {r['out']}"
          + (f"; Grad-CAM overlays in {args.gradcam}" if r["gradcam"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
