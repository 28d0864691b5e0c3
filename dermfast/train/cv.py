"""K-fold cross-validation: `python -m dermfast.train --stage finetune|distill --folds K [options]`.

On a few hundred images one 80/10/10 split tests on a dozen of them, too few to tell a good recipe from a bad
one; ISIC solutions report K-fold cross-validation instead. The driver runs the stage once per fold, each an
ordinary run folder OUT/fold-1 .. OUT/fold-K (its own lock, config.yaml, checkpoints, resume), with the fold
attached to its config (`dermfast.train.context.set_fold`): fold k tests on the images of fold k
(`dermfast.data.splits.assign_folds`: stratified, grouped, seeded) and trains on the others, of which an inner
validation split (`fold_splits`, 15%) picks the checkpoint and the decision threshold. The test fold selects
nothing. Each fold also fits the trivial baseline (`dermfast.eval.baseline`) on its training images.

At the end (OUT/):
  cv.json              the driver's status (running / finished), K, stage and resolved config of fold 1
  oof_predictions.csv  every image exactly once: image (the path the user gave), fold, label, predicted (at its
                       fold's validation threshold), p_<class> of the model, baseline_p_<class>
  cv_metrics.json      per fold (model and baseline: accuracy, balanced accuracy at argmax and at the fold's
                       validation threshold, macro F1, AUROC, pAUC), mean and standard deviation over folds, the
                       pooled out-of-fold metrics, paired per-fold differences model - baseline (mean, standard
                       error) of balanced accuracy and AUROC, a plain-words verdict, the small-fold warning, and
                       the threshold chosen on the pooled out-of-fold predictions (source "oof") for new data
  report.html          the per-fold table beside the baseline (`dermfast.eval.report.write_cv_report`)
`python -m dermfast.evaluate --checkpoint OUT --data D` scores the fold ensemble (mean of the K models'
probabilities) at the OOF threshold; `dermfast.predict.load_predictor(OUT)` predicts with it.

Re-runs behave as single runs do: an OUT that holds a cross-validation is refused unless --resume auto (finished
folds are not retrained, an interrupted fold continues from its checkpoint, missing folds start) or --overwrite.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dermfast.train.config import ConfigError, config_dict

from dermfast.eval.cv_results import (CV_FILE, METRICS_FILE, OOF_FILE, REPORT_FILE, fold_dir, is_cv_dir,
                                      print_summary, read_cv)

CV_STAGES = ("finetune", "distill")
FOLD_KEYS = ("accuracy", "balanced_accuracy", "balanced_accuracy_val_threshold", "macro_f1", "auroc", "pauc_80tpr")
PAIRED_KEYS = ("balanced_accuracy", "balanced_accuracy_val_threshold", "auroc")
# options that may differ between a cross-validation and its --resume auto (as for one run; dermfast.train.preflight)
_FREE = {"out", "resume", "overwrite", "progress", "device", "workers", "threads", "checkpoint_every",
         "epoch_checkpoints", "keep_checkpoints", "log_every", "eval_every", "max_bad_steps", "compile", "epochs", "max_steps"}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------- driver
def run_cv(stage_cls, cfg, argv: list[str] | None = None) -> Path:
    """Train every fold (skipping finished ones under --resume auto), then write OUT's files. Raises
    ConfigError for a stage other than finetune / distill and for anything a single run would refuse."""
    from dermfast.train.distributed import world_from_env
    from dermfast.train.runlock import RunLock, RunLocked
    k_folds, name = int(cfg.folds), stage_cls.name
    if name not in CV_STAGES:
        raise ConfigError(f"--folds works with --stage {' or '.join(CV_STAGES)}, not {name}")
    if cfg.resume not in (None, "auto"):
        raise ConfigError("--folds: resume a cross-validation with --resume auto (each fold continues from its "
                          "own checkpoint), not a checkpoint path")
    if name == "distill" and getattr(cfg, "teacher", None) is not None:
        raise ConfigError("--folds with --stage distill fine-tunes a teacher on each fold's training images; a "
                          "--teacher given has seen some test folds: leave it out")
    if world_from_env().world_size > 1:
        raise ConfigError("--folds runs its folds one after another in one process: launch it without torchrun")
    out = Path(cfg.out).expanduser()
    from dermfast.train.preflight import check_out_path
    check_out_path(out)
    created = not out.exists()
    lock = RunLock(out)
    try:
        lock.acquire()
    except RunLocked as e:
        raise ConfigError(str(e)) from None
    try:
        _check_existing(out, cfg, name)
        return _run_locked(stage_cls, cfg, argv, out, k_folds)
    except BaseException:
        if created and out.is_dir() and not any(fold_dir(out, k).is_dir() for k in range(1, k_folds + 1)):
            shutil.rmtree(out, ignore_errors=True)  # a refused start leaves nothing behind
        raise
    finally:
        lock.release()


def _check_existing(out: Path, cfg, stage: str) -> None:
    if not is_cv_dir(out):
        if out.is_dir() and (out / "run.json").is_file():
            raise ConfigError(f"--out {str(out)!r} holds a single run, not a cross-validation; give another --out")
        return
    info = read_cv(out)
    if cfg.overwrite:
        for p in out.iterdir():
            if p.name.startswith("fold-") or p.name in (CV_FILE, OOF_FILE, METRICS_FILE, REPORT_FILE):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    if cfg.resume is None:
        what = "a finished" if info.get("status") == "finished" else "an unfinished"
        raise ConfigError(f"--out {str(out)!r} already holds {what} {info.get('folds')}-fold cross-validation "
                          f"({info.get('stage')}); pass --resume auto to continue it (finished folds are kept), "
                          "--overwrite to replace it, or another --out")
    if info.get("stage") != stage:
        raise ConfigError(f"--out {str(out)!r} holds a {info.get('stage')} cross-validation, not {stage}")
    saved, now = info.get("config", {}), config_dict(cfg)
    diff = sorted(k for k in set(saved) | set(now) if k not in _FREE and saved.get(k) != now.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"--resume auto: options differ from the cross-validation's in {out} ({shown}); its "
                          "folds must share one recipe (--overwrite starts it again)")


def _fold_cfg(cfg, out: Path, k: int):
    from dermfast.train.context import set_fold
    fcfg = replace(cfg, out=str(fold_dir(out, k)), resume="auto" if cfg.resume else None)
    explicit = getattr(cfg, "_explicit", None)
    if explicit is not None:  # what the user set stays theirs in every fold (defaults may be filled per stage)
        object.__setattr__(fcfg, "_explicit", explicit)
    set_fold(fcfg, k)
    return fcfg


def _fold_finished(d: Path) -> bool:
    try:
        return json.loads((d / "run.json").read_text()).get("status") == "finished" and \
            (d / "checkpoint.safetensors").is_file()
    except (OSError, ValueError):
        return False


def _run_locked(stage_cls, cfg, argv, out: Path, k_folds: int) -> Path:
    from dermfast.train.engine import train
    from dermfast.train.preflight import NothingToDo
    out.mkdir(parents=True, exist_ok=True)
    info = {"stage": stage_cls.name, "folds": k_folds, "status": "running", "seed": cfg.seed,
            "folders": [fold_dir(out, k).name for k in range(1, k_folds + 1)],
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": config_dict(cfg)}
    _write_json(out / CV_FILE, info)
    _log(f"cv: {k_folds}-fold cross-validation of --stage {stage_cls.name} into {out} (stratified, grouped, "
         f"seed {cfg.seed}); each fold trains on the other folds, picks its checkpoint and threshold on a "
         "validation split of them, and is tested on its own images")
    for k in range(1, k_folds + 1):
        d = fold_dir(out, k)
        if cfg.resume and _fold_finished(d) and _same_schedule(d, cfg):
            _log(f"cv: fold {k}/{k_folds} finished earlier ({d}): not retrained")
            continue
        _log(f"cv: fold {k}/{k_folds} -> {d}")
        try:
            train(stage_cls, _fold_cfg(cfg, out, k), argv=argv)
        except NothingToDo as e:
            _log(f"cv: fold {k}/{k_folds}: {e}")
        _log(f"cv: fold {k}/{k_folds} trained")
    result = collect(out, cfg)
    info.update(status="finished", updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    _write_json(out / CV_FILE, info)
    print_summary(result, out)
    return out


def _same_schedule(d: Path, cfg) -> bool:
    """A finished fold whose --epochs / --max-steps match: skipped without building anything (else the engine
    decides: --resume auto trains it longer)."""
    import yaml
    try:
        saved = yaml.safe_load((d / "config.yaml").read_text()) or {}
    except (OSError, ValueError):
        return False
    return saved.get("epochs") == cfg.epochs and saved.get("max_steps") == cfg.max_steps


# -------------------------------------------------------------------------------------------- collecting
def _open_records(cfg):
    """The real dataset as every fold saw it (opened and validated as `dermfast.evaluate.own_split` does)."""
    from dermfast.data.pipeline import open_records
    from dermfast.data.toy import default_cache_dir
    from dermfast.data.validate import validate_records
    records = open_records(cfg.data, toy_images=cfg.toy_images, toy_image_size=cfg.toy_image_size, progress=False)
    records, _ = validate_records(records, cache_dir=default_cache_dir() / "validate", progress=False)
    return records


def _probs(model, meta, records, device) -> np.ndarray:
    from dermfast.data.loader import build_loader
    from dermfast.evaluate import eval_augment, predict
    if len(records) == 0:
        return np.zeros((0, len(meta["classes"])))
    loader = build_loader(records, eval_augment(meta), 64, train=False, loader="torch", device=device, workers=0)
    return predict(model, loader, device, tta=meta.get("tta") or "none")[0]  # the views the model was trained for


def _threshold(y: np.ndarray, probs: np.ndarray, pos: int | None) -> float | None:
    """The balanced-accuracy-best threshold of the positive class's probability (binary tasks with both classes
    present), else None (the arg-max rule)."""
    from dermfast.eval.threshold import threshold_if_estimable
    if pos is None or probs.shape[1] != 2 or len(np.unique(y)) < 2:
        return None
    return threshold_if_estimable((y == pos).astype(np.int64), probs[:, pos])  # None: too few of a class


def decide(probs: np.ndarray, pos: int | None, t: float | None) -> np.ndarray:
    """Predicted class indices: `p[pos] >= t` for a binary task with a threshold, else the arg-max."""
    if t is None or pos is None or probs.shape[1] != 2:
        return probs.argmax(1)
    return np.where(probs[:, pos] >= t, pos, 1 - pos)


def _block(y, probs, classes, positive, pos, t) -> dict:
    from dermfast.eval import metrics as M
    m = M.compute_all(y, probs, classes, positive)
    out = {key: m.get(key) for key in FOLD_KEYS if key in m}
    out["balanced_accuracy_val_threshold"] = M.balanced_accuracy(y, decide(probs, pos, t))
    out["n"] = int(len(y))
    return out


def _spread(values: list) -> dict:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n_folds": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n_folds": int(len(v))}


def paired(model: list, base: list) -> dict:
    """Per-fold differences model - baseline (folds where both are defined): mean and standard error
    (sample standard deviation / sqrt(folds))."""
    d = np.array([a - b for a, b in zip(model, base) if a is not None and b is not None], dtype=np.float64)
    if not len(d):
        return {"mean": None, "se": None, "n_folds": 0, "per_fold": []}
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
    return {"mean": float(d.mean()), "se": se, "n_folds": int(len(d)), "per_fold": [float(x) for x in d]}


def verdict(diffs: dict, key_ba: str) -> str:
    """A plain sentence: does the model beat the baseline on both balanced accuracy and AUROC?"""
    parts, means, clear = [], [], []
    for key, label in ((key_ba, "balanced accuracy"), ("auroc", "AUROC")):
        d = diffs.get(key) or {}
        if d.get("mean") is None:
            continue
        se = d.get("se")
        parts.append(f"{label} {d['mean']:+.3f}" + (f" ± {se:.3f}" if se is not None else ""))
        means.append(d["mean"])
        clear.append(se is not None and d["mean"] > 2 * se)
    if not parts:
        return "no comparison with the trivial baseline (it is missing or its metrics are undefined)"
    said = "; ".join(parts) + " (model - baseline, mean paired per-fold difference ± standard error over folds)"
    if not all(m > 0 for m in means):
        return f"the model does NOT beat the trivial baseline on the same folds: {said}"
    if all(clear):
        return f"the model beats the trivial baseline on the same folds: {said}"
    return (f"the model is above the trivial baseline on average, but not by two standard errors, so the "
            f"folds do not show a clear win: {said}")


def collect(out: Path, cfg) -> dict:
    """Per-fold, pooled and paired metrics of a trained cross-validation; writes oof_predictions.csv,
    cv_metrics.json and report.html into `out`, returns the cv_metrics dict."""
    from dermfast.data.splits import load_splits
    from dermfast.device import resolve_device
    from dermfast.eval import baseline as B
    from dermfast.eval import metrics as M
    from dermfast.eval.report import write_cv_report
    from dermfast.models.classifier import load_classifier
    k_folds = int(cfg.folds)
    records = _open_records(cfg)
    device = resolve_device(cfg.device)
    classes = positive = None
    fold_of = np.zeros(len(records), dtype=np.int64)
    probs_all = base_all = None
    per_fold, rows_t = [], {}
    for k in range(1, k_folds + 1):
        d = fold_dir(out, k)
        model, meta = load_classifier(d, device)
        if classes is None:
            classes = list(meta["classes"])
            positive = meta.get("positive") or M.default_positive(classes)
            probs_all = np.full((len(records), len(classes)), np.nan)
            base_all = np.full((len(records), len(classes)), np.nan)
        elif list(meta["classes"]) != classes:
            raise ConfigError(f"{d}: classes {meta['classes']} differ from fold 1's {classes}")
        pos = classes.index(positive) if positive in classes else None
        splits = load_splits(d / "splits.csv", records, strict=False)
        test, val = splits["test"], splits["val"]
        if (fold_of[test] != 0).any():
            raise ConfigError(f"{d}: its test images overlap another fold's: the dataset changed between folds; "
                              "--overwrite runs the cross-validation again")
        fold_of[test] = k
        y_test, y_val = records.labels[test], records.labels[val]
        p_test = _probs(model, meta, records.subset(test), device)
        t = _threshold(y_val, _probs(model, meta, records.subset(val), device), pos)
        probs_all[test] = p_test
        rows_t[k] = t
        entry = {"fold": k, "folder": str(d), "checkpoint": str(meta["checkpoint_path"]),
                 "n_train": int(len(splits["train"])), "n_val": int(len(val)), "n_test": int(len(test)),
                 "threshold": t, "model": _block(y_test, p_test, classes, positive, pos, t),
                 "small_test_set": M.small_test_warning(y_test, classes, positive)}
        base = B.load(d / "baseline")
        if base is not None:
            b_test = base.predict_records(records.subset(test))
            bt = _threshold(y_val, base.predict_records(records.subset(val)), pos)
            base_all[test] = b_test
            entry["baseline_threshold"] = bt
            entry["baseline"] = _block(y_test, b_test, classes, positive, pos, bt)
        else:
            entry["baseline"] = None
        per_fold.append(entry)
        _log(f"cv: fold {k}/{k_folds}: {len(test)} test images: " + _fold_line(entry))
    if (fold_of == 0).any():
        raise ConfigError(f"{int((fold_of == 0).sum())} images of the dataset are in no test fold: the dataset "
                          "changed since the folds were made; --overwrite runs the cross-validation again")
    has_base = all(e["baseline"] is not None for e in per_fold)
    pos = classes.index(positive) if positive in classes else None
    y = records.labels
    thr_each = np.array([rows_t[f] if rows_t[f] is not None else np.nan for f in fold_of])
    pred = np.array([decide(probs_all[i:i + 1], pos, None if np.isnan(thr_each[i]) else thr_each[i])[0]
                     for i in range(len(y))], dtype=np.int64)
    pooled = {**{k: v for k, v in M.compute_all(y, probs_all, classes, positive).items() if k in FOLD_KEYS},
              "balanced_accuracy_val_threshold": M.balanced_accuracy(y, pred), "n": int(len(y))}
    result = {"stage": read_cv(out).get("stage"), "folds": k_folds, "seed": cfg.seed, "classes": classes,
              "positive_class": positive, "n_images": int(len(y)), "per_fold": per_fold,
              "model": {"mean_std": {key: _spread([e["model"].get(key) for e in per_fold]) for key in FOLD_KEYS},
                        "pooled_oof": pooled},
              "threshold": None, "baseline": None, "paired_difference": None, "verdict": None}
    t_oof = _threshold(y, probs_all, pos) if pos is not None and len(classes) == 2 else None
    if t_oof is not None:  # None: fewer than MIN_PER_CLASS images of a class in the whole data: the arg-max rule
        result["threshold"] = {"value": t_oof, "source": "oof", "positive_class": positive,
                               "note": "chosen on the pooled out-of-fold predictions, for new data; the fold "
                                       "metrics use each fold's validation threshold where that split holds >= "
                                       "10 images of each class, else the arg-max"}
    if has_base:
        bpred = np.array([decide(base_all[i:i + 1], pos, per_fold[fold_of[i] - 1]["baseline_threshold"])[0]
                          for i in range(len(y))], dtype=np.int64)
        result["baseline"] = {
            "name": B.NAME, "fitted_on": "each fold's training images (RUN/fold-K/baseline)",
            "mean_std": {key: _spread([e["baseline"].get(key) for e in per_fold]) for key in FOLD_KEYS},
            "pooled_oof": {**{k: v for k, v in M.compute_all(y, base_all, classes, positive).items()
                              if k in FOLD_KEYS},
                           "balanced_accuracy_val_threshold": M.balanced_accuracy(y, bpred), "n": int(len(y))},
            "threshold": ({"value": _threshold(y, base_all, pos), "source": "oof"}
                          if result["threshold"] else None)}
        diffs = {key: paired([e["model"].get(key) for e in per_fold], [e["baseline"].get(key) for e in per_fold])
                 for key in PAIRED_KEYS}
        result["paired_difference"] = diffs
        result["verdict"] = verdict(diffs, "balanced_accuracy_val_threshold" if result["threshold"]
                                    else "balanced_accuracy")
    else:
        result["verdict"] = "no comparison with the trivial baseline: a fold has no baseline/ folder"
    sizes = [e["n_test"] for e in per_fold]
    small = [e for e in per_fold if e["small_test_set"]]
    result["warning"] = (f"with about {np.mean(sizes):.0f} images per fold a single fold's numbers are noisy "
                         "(their spread over folds says how much): compare recipes by the paired per-fold "
                         "differences and their standard errors, not by one fold" if small else None)
    _write_oof(out / OOF_FILE, records, fold_of, y, pred, probs_all, base_all if has_base else None, classes)
    _write_json(out / METRICS_FILE, result)
    write_cv_report(out / REPORT_FILE, result)
    return result


def _fold_line(e: dict) -> str:
    f = lambda v: "undefined" if v is None else f"{v:.3f}"  # noqa: E731
    m, b = e["model"], e["baseline"] or {}
    key = "balanced_accuracy_val_threshold" if e["threshold"] is not None else "balanced_accuracy"
    return (f"balanced accuracy {f(m.get(key))} (baseline {f(b.get(key))}), AUROC {f(m.get('auroc'))} "
            f"(baseline {f(b.get('auroc'))})" + (f", threshold {e['threshold']:.3f} (val)" if e["threshold"]
                                                  is not None else ""))


def _write_oof(path: Path, records, fold, y, pred, probs, base, classes) -> None:
    names = getattr(records, "origins", None) or records.paths
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "fold", "label", "predicted", *[f"p_{c}" for c in classes],
                    *([f"baseline_p_{c}" for c in classes] if base is not None else [])])
        for i in range(len(y)):
            w.writerow([names[i], int(fold[i]), classes[y[i]], classes[int(pred[i])],
                        *[f"{v:.6f}" for v in probs[i]], *([f"{v:.6f}" for v in base[i]] if base is not None else [])])
    tmp.replace(path)


__all__ = ["run_cv", "collect", "paired", "verdict", "decide"]
