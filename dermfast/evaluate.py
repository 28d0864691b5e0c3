"""`python -m dermfast.evaluate --checkpoint RUN [RUN ...] [--data PATH] [--out DIR] [--positive CLASS] [--tta]`
`python -m dermfast.evaluate --checkpoint MAE_RUN --probe linear|knn [--data PATH]`: linear / k-NN probe of a
frozen MAE encoder (`dermfast.eval.probe`), the same metrics block in RUN/probe-KIND/metrics.json.

Evaluates a fine-tuned or distilled classifier (a run directory or a checkpoint file) on its own run's test split
(the run's splits.csv over the dataset its config.yaml names), or on any dataset `--data` names (any adapter
format, every image). Classes are matched by name: the dataset may hold a subset of the model's classes, never
a class the model does not know. Several checkpoints form an ensemble (mean of probabilities), reported beside
each member. `--tta` averages the probabilities over the four flips (none, horizontal, vertical, both), `--tta d4`
over the 8 dihedral views; without it, the mode the checkpoint records (finetune `--tta`), else none.

Writes OUT/metrics.json (accuracy, balanced_accuracy, macro_f1, auroc, pauc_80tpr, ece, per_class,
confusion_matrix, n, positive_class, checkpoint, data, and more), OUT/predictions.csv and OUT/report.html.
`ci` holds 95% percentile-bootstrap intervals over images (stratified by class, `--bootstrap` resamples, seed 0)
of accuracy, balanced_accuracy, macro_f1, auroc and pauc_80tpr; `small_test_set` a warning (also printed) when
the set is too small to compare models: < 30 images or < 10 of the positive class (dermfast.eval.metrics).
`baseline`: the run's trivial baseline (RUN/baseline/, colour histograms + logistic regression fitted on the
run's training split at the end of --stage finetune / distill; `dermfast.eval.baseline`) scored on the same
images with the same metrics (null for runs without one); `baseline_verdict`: a sentence (also printed, and at
the top of report.html) when the model does not beat it on balanced accuracy or AUROC, else null.
A cross-validation folder (`python -m dermfast.train --folds K`, OUT/cv.json): with --data, the fold ensemble
(mean of the K fold models' probabilities, beside each member; the baseline likewise the mean of the K fold
baselines) with `threshold` (the decision rule p_positive >= t chosen on the out-of-fold predictions: its
balanced accuracy, sensitivity and specificity); without --data, its cross-validation results (cv_metrics.json),
printed. A single run whose checkpoint records a validation threshold gets the same `threshold` block.
A `--stage segment` checkpoint: Dice, Jaccard (per image, then the mean) and HD95 (pixels of the original image),
the Otsu baseline on the same images, OUT/per_image.csv and overlays in report.html (`dermfast.eval.segment_eval`).
Bad input (a checkpoint of another stage, mismatched classes, an empty or single-class evaluation set) is one
line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dermfast.cliparse import OneLineParser
from dermfast.data.records import DatasetError, ImageRecords
from dermfast.eval.eval_set import EvalError, _run_dir_of, data_records, own_split  # noqa: F401 (re-exported)




@torch.no_grad()
def tta_mode(tta) -> str:
    """A test-time augmentation request -> a mode of dermfast.eval.tta: True = "flips" (the four flips, what
    `--tta` alone means), False / None = "none", or a mode name ("none", "flips", "d4")."""
    return {True: "flips", False: "none", None: "none"}.get(tta, tta)


def predict(model, loader, device: torch.device, tta=False, autocast=None) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, C] float64, labels [N] as the loader gives them) over one pass of an evaluation loader; `tta`:
    see `tta_mode` (the mean of the probabilities over the views, dermfast.eval.tta)."""
    from dermfast.eval.tta import predict_tta
    model.eval()
    return predict_tta(model, loader, device, tta_mode(tta), autocast)


def require_sklearn(stage: str) -> None:
    """Classifier stages need scikit-learn for their validation metrics: a one-line ConfigError before any data."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        from dermfast.errors import ConfigError
        raise ConfigError(f"--stage {stage} needs scikit-learn for its validation metrics: "
                          "pip install 'dermfast[eval]'") from None


def validation_metrics(model, loader, device: torch.device, classes: list[str], positive: str | None,
                       autocast=None) -> dict:
    """The metrics a classifier stage logs and selects its best checkpoint by (finetune and distill alike):
    balanced_accuracy, accuracy, macro_f1, auroc, and pauc (above 80% TPR; None without a positive class)."""
    from dermfast.eval import metrics as M
    probs, y = predict(model, loader, device, autocast=autocast)
    pred = probs.argmax(1)
    out = {"balanced_accuracy": M.balanced_accuracy(y, pred), "accuracy": M.accuracy(y, pred),
           "macro_f1": M.macro_f1(y, pred), "auroc": M.auroc(y, probs), "pauc": None}
    if positive is not None:
        k = classes.index(positive)
        out["pauc"] = M.pauc_above_tpr(y == k, probs[:, k])
    return out


def eval_augment(meta: dict):
    from dermfast.data.augment import Augment
    return Augment(size=int(meta["img_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]))


def match_classes(records: ImageRecords, model_classes: list[str]) -> np.ndarray:
    """Dataset labels -> model class indices, by class name (exact, else case-insensitive)."""
    if len(records) and (not records.classes or (records.labels < 0).any()):
        raise EvalError(f"{records.root}: evaluation needs labelled images (class subfolders or a label csv)")
    exact = {c: i for i, c in enumerate(model_classes)}
    folded = {c.casefold(): i for i, c in enumerate(model_classes)}
    mapping, unknown = [], []
    for c in records.classes:
        i = exact.get(c, folded.get(c.casefold()))
        mapping.append(-1 if i is None else i)
        if i is None and (records.labels == len(mapping) - 1).any():
            unknown.append(c)
    if unknown:
        raise EvalError(f"the dataset holds class(es) {', '.join(map(repr, unknown))} the model does not know; "
                        f"model classes: {', '.join(model_classes)}")
    return np.asarray(mapping, dtype=np.int64)[records.labels] if len(records) else records.labels


def _load_members(paths: list[str], device):
    from dermfast.models.classifier import load_classifier
    members = [load_classifier(p, device) for p in paths]
    classes = members[0][1]["classes"]
    for _, meta in members[1:]:
        if meta["classes"] != classes:
            raise EvalError(f"ensemble members disagree on classes: {classes} vs {meta['classes']} "
                            f"({meta['checkpoint_path']})")
    return members, classes


def _denorm(x: torch.Tensor, meta: dict) -> np.ndarray:
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    out = (x.float().cpu() * std + mean).clamp(0, 1)
    return (out.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def _images(records: ImageRecords, idx, meta, args, device) -> torch.Tensor:
    from dermfast.data.loader import build_loader
    loader = build_loader(records.subset(list(idx)), eval_augment(meta), max(1, len(idx)), train=False,
                          loader=args.loader, device=device, workers=0)
    return torch.cat([b["image"] for b in loader])


def _report(out: Path, metrics, member_metrics, classes, y, probs, records, members, args, device, notes):
    from dermfast.eval import explain as ex
    from dermfast.eval import metrics as M
    from dermfast.eval import report as R
    figures = {"confusion matrix": R.confusion_png(metrics["confusion_matrix"], classes),
               "ROC and precision-recall": R.roc_pr_png(y, probs, classes, metrics["positive_class"]),
               "reliability diagram": R.reliability_png(M.reliability(y, probs))}
    model, meta = members[0]
    pred, conf = probs.argmax(1), probs.max(1)
    errors, picked = {}, []
    for k, name in enumerate(classes):
        wrong = np.flatnonzero((y == k) & (pred != k))
        top = wrong[np.argsort(-conf[wrong], kind="stable")][: args.errors]
        errors[name] = [(int(i), f"true {name}, predicted {classes[pred[i]]} ({conf[i]:.2f})") for i in top]
        picked += list(top)
    thumbs = {}
    if picked:
        imgs = _denorm(_images(records, picked, meta, args, device), meta)
        thumbs = {int(i): R.png_image(im) for i, im in zip(picked, imgs)}
    errors = {c: [(thumbs[i], cap) for i, cap in items] for c, items in errors.items()}
    explanations, method = [], None
    if args.explain > 0:
        idx = np.linspace(0, len(y) - 1, num=min(args.explain, len(y))).round().astype(int)
        x = _images(records, idx, meta, args, device)
        try:
            maps, method = ex.explain(model, x, torch.as_tensor(pred[idx], device=device))
            for i, im, hm in zip(idx, _denorm(x, meta), maps):
                pair = np.concatenate([im, ex.overlay(im, hm)], axis=1)
                explanations.append((R.png_image(pair), f"true {classes[y[i]]}, predicted {classes[pred[i]]}"))
        except ValueError as e:
            notes.append(f"explanations skipped: {e}")
        if len(members) > 1:
            notes.append(f"explanations are of the first member ({meta['checkpoint_path']})")
    R.write_report(out / "report.html", metrics, member_metrics, classes, figures, errors, explanations, method, notes)


def _load_baseline(folder: Path, classes, notes: list):
    """The trivial baseline saved in `folder`, checked against the model's classes; None (said in notes) when the
    run has none (runs from before it existed)."""
    from dermfast.eval import baseline as B
    try:
        base = B.load(folder)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if base is None:
        notes.append(f"no trivial baseline: {folder} does not exist (the run predates it)")
        return None
    if base.classes != list(classes):
        raise EvalError(f"{folder}: the baseline's classes {base.classes} are not the model's {list(classes)}")
    return base


def _baseline(first: Path, records, y, classes, positive, n_boot: int, metrics: dict, n_members: int,
              notes: list, fold_runs: list[Path] | None = None) -> tuple[dict | None, str | None]:
    """The run's trivial baseline (RUN/baseline/, `dermfast.eval.baseline`) scored on the same images with the
    same metrics, and the sentence saying the model does not beat it (None when it does). (None, None) when
    the run has no baseline (runs from before it existed): said in notes."""
    from dermfast.eval import baseline as B
    from dermfast.eval import metrics as M
    if fold_runs is not None:
        return _cv_baseline(fold_runs, records, y, classes, positive, n_boot, metrics, notes)
    folder = (_run_dir_of(first) or first.parent) / "baseline"
    base = _load_baseline(folder, classes, notes)
    if base is None:
        return None, None
    probs = base.predict_records(records)
    block = M.compute_all(y, probs, classes, positive)
    if n_boot > 0:
        block["ci"] = M.bootstrap_ci(y, probs, classes, positive, n_boot=n_boot, seed=0)
    block.update(name=B.NAME, path=str(folder), n_train=base.spec.get("n_train"),
                 recipe={k: base.spec.get(k) for k in ("size", "resize", "features", "classifier")})
    notes.append(f"baseline: {B.NAME} fitted on the run's {base.spec.get('n_train')} training images "
                 f"({folder})" + ("; of the first ensemble member's run" if n_members > 1 else ""))
    return block, B.verdict(metrics, block, "the ensemble" if n_members > 1 else "the model")


def _cv_baseline(runs: list[Path], records, y, classes, positive, n_boot: int, metrics: dict,
                 notes: list) -> tuple[dict | None, str | None]:
    """The fold baselines of a cross-validation as an ensemble (mean of their probabilities), as the model is."""
    from dermfast.eval import baseline as B
    from dermfast.eval import metrics as M
    bases = []
    for run in runs:
        base = _load_baseline(run / "baseline", classes, notes)
        if base is None:
            return None, None
        bases.append(base)
    probs = np.mean([b.predict_records(records) for b in bases], axis=0)
    block = M.compute_all(y, probs, classes, positive)
    if n_boot > 0:
        block["ci"] = M.bootstrap_ci(y, probs, classes, positive, n_boot=n_boot, seed=0)
    block.update(name=B.NAME, path=[str(r / "baseline") for r in runs],
                 n_train=[b.spec.get("n_train") for b in bases], _probs=probs,
                 recipe={k: bases[0].spec.get(k) for k in ("size", "resize", "features", "classifier")})
    notes.append(f"baseline: {B.NAME}, the mean of the {len(bases)} fold baselines (each fitted on its fold's "
                 "training images)")
    return block, B.verdict(metrics, block, "the fold ensemble")


def evaluate_probe(args, device) -> dict:
    """--probe linear|knn on an MAE run (`dermfast.eval.probe`): frozen-encoder features of the run's training
    split, a linear or k-NN classifier fitted on them, scored on the test split (or --data) with the metrics
    of a classifier. Writes OUT/metrics.json and OUT/predictions.csv (default OUT: RUN/probe-KIND)."""
    from dermfast.data.augment import Augment
    from dermfast.data.loader import build_loader
    from dermfast.eval import metrics as M
    from dermfast.eval import probe as P
    if len(args.checkpoint) != 1:
        raise EvalError("--probe takes one MAE run")
    try:
        model, meta, ckpt = P.load_mae(args.checkpoint[0], device)
    except ValueError as e:
        raise EvalError(str(e)) from None
    train, train_desc = own_split(ckpt, "train")
    if not train.classes or (train.labels < 0).any():
        raise EvalError(f"--probe needs labelled training images; {train_desc} has unlabelled ones")
    classes = list(train.classes)
    y_train = train.labels
    if len(np.unique(y_train)) < 2:
        raise EvalError(f"--probe needs two classes in the training split ({train_desc})")
    records, data_desc, y, present, positive = _evaluation_set(args, ckpt, classes, "a class of the run's data")
    aug = Augment(size=int(meta["preset"]["img_size"]))  # evaluation preprocessing, ImageNet mean / std
    feats = []
    for recs in (train, records):
        loader = build_loader(recs, aug, args.batch_size, train=False, loader=args.loader, device=device,
                              workers=args.workers)
        feats.append(P.encoder_features(model, loader, device)[0])
    probs, how = P.probe(args.probe, feats[0], y_train, feats[1], classes)
    metrics = M.compute_all(y, probs, classes, positive)
    if args.bootstrap > 0:
        metrics["ci"] = M.bootstrap_ci(y, probs, classes, positive, n_boot=args.bootstrap, seed=0)
    metrics["small_test_set"] = M.small_test_warning(y, classes, positive)
    metrics.update(checkpoint=str(ckpt), data=data_desc, probe=args.probe, probe_method=how,
                   features="frozen MAE encoder, no masking, mean of the normed patch tokens",
                   n_train=int(len(y_train)), train=train_desc, classes=classes,
                   present_classes=[classes[k] for k in present], tta=False)
    out = Path(args.out) if args.out else (_run_dir_of(ckpt) or ckpt.parent) / f"probe-{args.probe}"
    _write_results(out, metrics, records, y, probs, classes)
    metrics["out"] = str(out)
    return metrics


def _write_results(out: Path, metrics: dict, records, y, probs, classes: list[str]) -> None:
    """OUT/metrics.json and OUT/predictions.csv (image, label, predicted, p_<class>...)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "predicted", *[f"p_{c}" for c in classes]])
        names = getattr(records, "origins", None) or records.paths  # the user's path, never a converted copy
        for i in range(len(y)):
            w.writerow([names[i], classes[y[i]], classes[int(probs[i].argmax())], *[f"{v:.6f}" for v in probs[i]]])


def _evaluation_set(args, ckpt: Path, classes: list[str], whose: str):
    """(records, description, labels, present class ids, positive class) of --data, else of the run's own split;
    refuses an empty or single-class set and a --positive outside `classes`."""
    from dermfast.eval import metrics as M
    records, data_desc = data_records(args.data) if args.data is not None else own_split(ckpt, args.split)
    if len(records) == 0:
        raise EvalError(f"the evaluation set is empty ({data_desc})")
    y = match_classes(records, classes)
    present = np.unique(y)
    if len(present) < 2:
        raise EvalError(f"the evaluation set holds a single class ({classes[present[0]]!r}, {len(y)} images): "
                        "balanced accuracy and AUROC are undefined; evaluate on data with at least two classes")
    positive = args.positive
    if positive is not None and positive not in classes:
        raise EvalError(f"--positive {positive!r} is not {whose}; accepted: {', '.join(classes)}")
    return records, data_desc, y, present, positive or M.default_positive(classes)


def threshold_block(y: np.ndarray, probs: np.ndarray, classes: list[str], threshold: dict | None) -> dict | None:
    """The decision rule p_positive >= t of a binary model (`threshold`: {"value", "source", ...} from a
    checkpoint's metadata or a cross-validation) scored on y: balanced accuracy, sensitivity, specificity.
    None without a threshold, for more than two classes, or when a class is missing from y."""
    if not threshold or threshold.get("value") is None or probs.shape[1] != 2:
        return None
    from dermfast.eval import metrics as M
    pos_name = threshold.get("positive_class") or M.default_positive(classes)
    pos = classes.index(pos_name) if pos_name in classes else 1
    t = float(threshold["value"])
    called = probs[:, pos] >= t
    if len(np.unique(y)) < 2:
        return None
    sens, spec = float(called[y == pos].mean()), float((~called[y != pos]).mean())
    return {"value": t, "source": threshold.get("source"), "positive_class": classes[pos],
            "balanced_accuracy": (sens + spec) / 2, "sensitivity": sens, "specificity": spec}


def _cv_results(folder: Path) -> dict:
    """--checkpoint CV_FOLDER without --data: its cv_metrics.json (refused while the folds are unfinished)."""
    from dermfast.eval.cv_results import METRICS_FILE, read_cv
    info = read_cv(folder)
    if info.get("status") != "finished" or not (folder / METRICS_FILE).is_file():
        raise EvalError(f"{folder}: the {info.get('folds')}-fold cross-validation is not finished; continue it with "
                        "`python -m dermfast.train ... --folds K --resume auto`, or give --data")
    out = json.loads((folder / METRICS_FILE).read_text())
    return {**out, "cv": True, "out": str(folder)}


def evaluate(args) -> dict:
    from dermfast.data.loader import build_loader
    from dermfast.device import resolve_device
    from dermfast.eval import metrics as M
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise EvalError(f"bad --device {args.device!r}: {e}") from None
    if getattr(args, "probe", None):
        return evaluate_probe(args, device)
    from dermfast.models.segmenter import is_segmentation_checkpoint
    if len(args.checkpoint) == 1 and is_segmentation_checkpoint(args.checkpoint[0]):
        from dermfast.eval.segment_eval import evaluate_segmentation  # Dice / Jaccard / HD95 + the Otsu baseline
        return evaluate_segmentation(args)
    cv = None
    if len(args.checkpoint) == 1:
        from dermfast.eval.cv_results import fold_dir, is_cv_dir, read_cv
        if is_cv_dir(args.checkpoint[0]):  # a cross-validation: its results, or its fold ensemble on --data
            folder = Path(args.checkpoint[0]).expanduser()
            if args.data is None:
                return _cv_results(folder)
            cv = _cv_results(folder)
            args.checkpoint = [str(fold_dir(folder, k)) for k in range(1, int(read_cv(folder)["folds"]) + 1)]
    members, classes = _load_members(args.checkpoint, device)
    first = Path(members[0][1]["checkpoint_path"])
    records, data_desc, y, present, positive = _evaluation_set(args, first, classes, "a model class")

    member_probs, modes = [], []
    for model, meta in members:
        loader = build_loader(records, eval_augment(meta), args.batch_size, train=False, loader=args.loader,
                              device=device, workers=args.workers)
        mode = args.tta or meta.get("tta") or "none"  # given, else the mode the model was trained for
        modes.append(mode)
        probs, _ = predict(model, loader, device, tta=mode)
        member_probs.append(probs)
    probs = np.mean(member_probs, axis=0)
    metrics = M.compute_all(y, probs, classes, positive)
    n_boot = getattr(args, "bootstrap", 1000)  # intervals: on a set of a few images a point value says little
    if n_boot > 0:
        metrics["ci"] = M.bootstrap_ci(y, probs, classes, positive, n_boot=n_boot, seed=0)
    metrics["small_test_set"] = M.small_test_warning(y, classes, positive)
    ckpts = [m["checkpoint_path"] for _, m in members]
    metrics.update(checkpoint=ckpts[0] if len(ckpts) == 1 else ckpts, data=data_desc, tta=modes[0] if len(set(modes)) == 1 else modes,
                   classes=classes, present_classes=[classes[k] for k in present])
    member_metrics = []
    if len(members) > 1:
        for path, p in zip(ckpts, member_probs):
            member_metrics.append({"checkpoint": path, **M.compute_all(y, p, classes, positive)})
        metrics["members"] = member_metrics

    notes = []
    threshold = cv["threshold"] if cv is not None else (members[0][1].get("threshold") if len(members) == 1 else None)
    metrics["threshold"] = threshold_block(y, probs, classes, threshold)
    runs = [(_run_dir_of(Path(m["checkpoint_path"])) or Path(m["checkpoint_path"]).parent) for _, m in members]
    metrics["baseline"], metrics["baseline_verdict"] = _baseline(first, records, y, classes, positive, n_boot,
                                                                 metrics, len(members), notes,
                                                                 runs if cv is not None else None)
    if cv is not None:
        metrics["cross_validation"] = {"folder": cv["out"], "folds": cv["folds"], "verdict": cv.get("verdict")}
        b_thr = (cv.get("baseline") or {}).get("threshold")
        if metrics["baseline"] is not None:
            metrics["baseline"]["threshold"] = threshold_block(y, metrics["baseline"].pop("_probs"), classes, b_thr)
        notes.append(f"the ensemble of the {cv['folds']} fold models of the cross-validation {cv['out']}")
    if metrics["baseline"] is not None:
        metrics["baseline"].pop("_probs", None)
    default_out = Path(cv["out"]) / "eval" if cv is not None else (_run_dir_of(first) or first.parent) / "eval"
    out = Path(args.out) if args.out else default_out
    _write_results(out, metrics, records, y, probs, classes)
    if metrics["threshold"] is not None:
        t = metrics["threshold"]
        notes.append(f"decision threshold p_{t['positive_class']} >= {t['value']:.4f} ({t['source']}): balanced "
                     f"accuracy {t['balanced_accuracy']:.4f}, sensitivity {t['sensitivity']:.4f}, specificity "
                     f"{t['specificity']:.4f} (the table's values are at the arg-max, p >= 0.5)")
    notes.insert(0, f"{len(y)} images; classes present: {', '.join(metrics['present_classes'])}")
    if "ci" in metrics:
        notes.append(f"[low, high]: {metrics['ci']['level']:.0%} interval, {metrics['ci']['method']}")
    from dermfast.eval.tta import tta_views
    for mode in sorted(set(modes) - {"none"}):
        notes.append(f"test-time augmentation: mean over {len(tta_views(mode))} views ({mode})")
    if not args.no_report:
        _report(out, metrics, member_metrics, classes, y, probs, records, members, args, device, notes)
    metrics["out"] = str(out)
    return metrics


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dermfast.evaluate", description=__doc__.splitlines()[0],
                                allow_abbrev=False)  # no prefix matching: --tt is not --tta
    p.add_argument("--checkpoint", nargs="+", required=True, help="run directories or checkpoint files; several = an ensemble")
    p.add_argument("--data", help="dataset to evaluate on, every image (default: the run's own test split)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="without --data: which split of the run's splits.csv (default test)")
    p.add_argument("--out", help="output directory (default: RUN/eval)")
    p.add_argument("--positive", help="the malignant class for pAUC and sensitivity (default: melanoma / mel / "
                                      "malignant when present)")
    p.add_argument("--tta", nargs="?", const="flips", default=None, choices=("none", "flips", "d4"),
                   help="test-time views: flips (4, what --tta alone means) or d4 (8); default: the mode the "
                        "checkpoint records (finetune --tta), else none")
    p.add_argument("--batch-size", type=int, default=64, dest="batch_size")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--loader", default="torch", help="data loader backend (default torch)")
    p.add_argument("--workers", type=int, default=0, help="loader workers (default 0)")
    p.add_argument("--errors", type=int, default=4, help="most confident errors shown per class (default 4)")
    p.add_argument("--explain", type=int, default=4, help="images with Grad-CAM / attention rollout (default 4)")
    p.add_argument("--no-report", action="store_true", help="metrics.json only, no report.html")
    p.add_argument("--probe", choices=("linear", "knn"), help="on an MAE run: frozen-encoder features of its training "
                   "split, logistic regression (linear) or DINO's weighted k-NN (k=20, cosine), scored on its test "
                   "split or --data (dermfast.eval.probe); writes RUN/probe-KIND/metrics.json")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% confidence intervals "
                   "(percentile bootstrap over images, stratified by class, seed 0; 0 = none; default 1000)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dermfast.data.loader import LoaderUnavailable
    from dermfast.models.classifier import CheckpointError
    try:
        m = evaluate(args)
    except (CheckpointError, DatasetError, EvalError, LoaderUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e} (pip install 'dermfast[eval]')", file=sys.stderr)
        return 2
    if m.get("task") == "segmentation":
        from dermfast.eval.segment_eval import summary_line
        print(summary_line(m))
        return 0
    if m.get("cv"):
        from dermfast.eval.cv_results import print_summary
        print_summary(m, Path(m["out"]))
        return 0
    fmt = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
    ci = m.get("ci") or {}
    iv_of = lambda d, k: (f" [{d['ci'][k][0]:.2f}, {d['ci'][k][1]:.2f}]"  # noqa: E731
                          if (d.get("ci") or {}).get(k) else "")
    iv = lambda k: iv_of(m, k)  # noqa: E731
    print(f"evaluate: n {m['n']}, accuracy {fmt(m['accuracy'])}, balanced accuracy {fmt(m['balanced_accuracy'])}"
          f"{iv('balanced_accuracy')}, macro F1 {fmt(m['macro_f1'])}, AUROC {fmt(m['auroc'])}{iv('auroc')}, "
          f"pAUC>80%TPR {fmt(m['pauc_80tpr'])} (positive {m['positive_class']}), ECE {fmt(m['ece'])} "
          f"-> {m['out']}/metrics.json" + ("" if m.get("probe") else ", report.html")
          + (" ([low, high]: 95% bootstrap intervals)" if ci else ""))
    if m.get("probe"):
        print(f"evaluate: --probe {m['probe']}: {m['probe_method']} on {m['features']}, fitted on "
              f"{m['n_train']} training images ({m['train']})")
    t = m.get("threshold")
    if t:
        print(f"evaluate: at the decision threshold p_{t['positive_class']} >= {t['value']:.4f} ({t['source']}): "
              f"balanced accuracy {fmt(t['balanced_accuracy'])}, sensitivity {fmt(t['sensitivity'])}, specificity "
              f"{fmt(t['specificity'])}")
    b = m.get("baseline")
    if b:
        print(f"evaluate: trivial baseline ({b['name']}): balanced accuracy {fmt(b['balanced_accuracy'])}"
              f"{iv_of(b, 'balanced_accuracy')}, AUROC {fmt(b['auroc'])}{iv_of(b, 'auroc')}")
    if m.get("baseline_verdict"):
        print(f"evaluate: warning: {m['baseline_verdict']}", file=sys.stderr)
    if m.get("small_test_set"):
        print(f"evaluate: warning: {m['small_test_set']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
