"""The trivial baseline every classification report carries: colour histograms + logistic regression.

A model that cannot beat this on held-out images has learnt nothing beyond the colour of the picture (issue 18:
on real dermoscopy the default recipes did not). The recipe, fixed so numbers compare across runs:

- image: decoded with PIL, converted to RGB, the WHOLE image (no crop) resized to 64 x 64 (`SIZE`) with PIL's
  bilinear filter (antialiased when shrinking; JPEGs are first decoded at a DCT-reduced scale of at least
  2 x 64 px via `Image.draft`, so a 6000 px photograph costs little). Independent of the model's
  preprocessing on purpose: the same baseline whatever the model, image size or normalisation.
- features (`colour_histogram`, 112 values per image, each a fraction of the pixels):
  the 16-bin histogram of each of R, G, B (bin = value * 16 // 256), then the joint 4 x 4 x 4 RGB histogram
  (bin = (r * 4 // 256) * 16 + (g * 4 // 256) * 4 + b * 4 // 256), the colour histogram of Swain & Ballard,
  "Color indexing" (IJCV 1991), coarsened.
- classifier: features standardised (scikit-learn `StandardScaler`: mean 0, variance 1; constant features keep
  scale 1), then scikit-learn `LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000)` (L2, lbfgs;
  two classes: one logit and a sigmoid; more: multinomial softmax). "balanced" weighs classes by inverse
  frequency, so the arg-max decision is not "always the majority class".
- training images: the run's training split (synthetic images included, as the model saw them), at most
  `MAX_TRAIN` of them (a larger split is subsampled per class, seeded, rare classes kept whole first).

Saved in RUN/baseline/ without pickle: baseline.safetensors (float64 mean, scale, coef, intercept) and
spec.json (the recipe above as data, class names, the training counts, the scikit-learn version).
`python -m dermfast.evaluate` scores it beside the model on whatever data it evaluates (`baseline` block of
metrics.json, a column of report.html) and says in plain words when the model does not beat it.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIZE = 64
CHANNEL_BINS = 16
JOINT_BINS = 4
C = 1.0
MAX_TRAIN = 20000
FORMAT = "dermfast-colour-histogram-logreg"
VERSION = 1
NAME = "colour histogram + logistic regression"


def load_image(data: bytes, size: int = SIZE) -> np.ndarray:
    """Encoded image -> [size, size, 3] uint8 RGB: the whole image resized (no crop), bilinear."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (2 * size, 2 * size))  # JPEG only: decode at a reduced DCT scale (>= 2 x size)
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def colour_histogram(imgs: np.ndarray, channel_bins: int = CHANNEL_BINS, joint_bins: int = JOINT_BINS) -> np.ndarray:
    """imgs [N, H, W, 3] uint8 RGB -> features [N, 3 * channel_bins + joint_bins ** 3] float64, each histogram a
    fraction of the H * W pixels: per-channel histograms of R, G, B, then the joint RGB histogram (r-major)."""
    imgs = np.asarray(imgs)
    if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != np.uint8:
        raise ValueError(f"colour_histogram: need [N, H, W, 3] uint8, got {imgs.shape} {imgs.dtype}")
    n = imgs.shape[0]
    px = imgs.reshape(n, -1, 3).astype(np.int64)
    npx = px.shape[1]
    off = np.arange(n)[:, None]
    feats = []
    for c in range(3):
        q = px[:, :, c] * channel_bins // 256
        feats.append(np.bincount((off * channel_bins + q).ravel(), minlength=n * channel_bins)
                     .reshape(n, channel_bins))
    qj = px * joint_bins // 256
    j = (qj[:, :, 0] * joint_bins + qj[:, :, 1]) * joint_bins + qj[:, :, 2]
    nj = joint_bins ** 3
    feats.append(np.bincount((off * nj + j).ravel(), minlength=n * nj).reshape(n, nj))
    return np.concatenate(feats, axis=1).astype(np.float64) / npx


def record_features(records, size: int = SIZE, idx=None) -> np.ndarray:
    """Colour-histogram features [N, F] of records (all, or those at idx), one image at a time."""
    idx = range(len(records)) if idx is None else idx
    out = [colour_histogram(load_image(records.read_bytes(int(i)), size)[None])[0] for i in idx]
    return np.stack(out) if out else np.zeros((0, 3 * CHANNEL_BINS + JOINT_BINS ** 3))


def subsample(labels: np.ndarray, cap: int, seed: int = 0) -> np.ndarray:
    """Indices of at most `cap` images, per class: the rarest classes whole first, the rest shared equally among
    the larger ones (seeded). All indices when len(labels) <= cap."""
    labels = np.asarray(labels)
    if len(labels) <= cap:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    order = np.argsort(counts, kind="stable")
    left, keep = cap, []
    for r, k in enumerate(order):
        take = min(int(counts[k]), left // (len(order) - r))
        keep.append(rng.choice(np.flatnonzero(labels == classes[k]), size=take, replace=False))
        left -= take
    return np.sort(np.concatenate(keep))


@dataclass
class Baseline:
    """Standardise, then a linear map: probs = sigmoid / softmax(((x - mean) / scale) @ coef.T + intercept)."""
    mean: np.ndarray            # [F]
    scale: np.ndarray           # [F]
    coef: np.ndarray            # [1, F] (two fitted classes) or [K, F]
    intercept: np.ndarray       # [1] or [K]
    classes: list[str]          # the model's class names (output columns of predict_proba)
    fitted: list[int]           # indices into classes of the classes the training split held (sklearn's classes_)
    spec: dict = field(default_factory=dict)

    def decision(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """features [N, F] -> probabilities [N, len(classes)] (0 for a class the training split lacked)."""
        z = self.decision(x)
        if self.coef.shape[0] == 1:  # sklearn's binary case: one logit, for fitted[1]
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            p = np.stack([1.0 - p1, p1], axis=1)
        else:
            z = z - z.max(1, keepdims=True)
            e = np.exp(z)
            p = e / e.sum(1, keepdims=True)
        out = np.zeros((len(p), len(self.classes)))
        out[:, self.fitted] = p
        return out

    def predict_records(self, records) -> np.ndarray:
        return self.predict_proba(record_features(records, int(self.spec.get("size", SIZE))))

    def save(self, folder: Path) -> list[Path]:
        from safetensors.numpy import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept}
        st, js = folder / "baseline.safetensors", folder / "spec.json"
        tmp = folder / "baseline.safetensors.tmp"
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(tmp))
        tmp.replace(st)
        spec = {**self.spec, "classes": self.classes, "fitted_classes": [self.classes[k] for k in self.fitted]}
        tmp = folder / "spec.json.tmp"
        tmp.write_text(json.dumps(spec, indent=1))
        tmp.replace(js)
        return [st, js]


def default_spec() -> dict:
    import sklearn
    return {"format": FORMAT, "version": VERSION, "name": NAME, "size": SIZE,
            "resize": "whole image (no crop), PIL bilinear, RGB", "channel_bins": CHANNEL_BINS,
            "joint_bins": JOINT_BINS,
            "features": f"R, G, B histograms ({CHANNEL_BINS} bins each) + joint RGB histogram ({JOINT_BINS}^3), "
                        "fractions of pixels",
            "classifier": f"StandardScaler + LogisticRegression(C={C}, class_weight='balanced', lbfgs, L2)",
            "sklearn": sklearn.__version__, "max_train": MAX_TRAIN}


def fit(x: np.ndarray, y: np.ndarray, classes: list[str], spec: dict | None = None) -> Baseline:
    """Fit on features x [N, F] and labels y [N] (indices into classes). Needs two classes in y."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    y = np.asarray(y, dtype=np.int64)
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"the baseline needs two classes in its training images, got {len(present)}")
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=C, class_weight="balanced", max_iter=5000).fit(scaler.transform(x), y)
    spec = {**(spec or default_spec()), "n_train": int(len(y)),
            "train_counts": {classes[k]: int((y == k).sum()) for k in present}}
    return Baseline(scaler.mean_.copy(), scaler.scale_.copy(), lr.coef_.copy(), lr.intercept_.copy(),
                    list(classes), [int(k) for k in lr.classes_], spec)


def load(folder: Path) -> Baseline | None:
    """The baseline saved in a run folder's baseline/ (None when there is none); refuses another format."""
    from safetensors.numpy import load_file
    folder = Path(folder)
    st, js = folder / "baseline.safetensors", folder / "spec.json"
    if not (st.is_file() and js.is_file()):
        return None
    spec = json.loads(js.read_text())
    if spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise ValueError(f"{js}: not a {FORMAT} version {VERSION} baseline")
    t = load_file(str(st))
    classes = list(spec["classes"])
    return Baseline(t["mean"], t["scale"], t["coef"], t["intercept"], classes,
                    [classes.index(c) for c in spec["fitted_classes"]], spec)


def fit_records(train, classes: list[str], seed: int = 0) -> Baseline:
    """Fit on an ImageRecords training split (labels index `classes`), at most MAX_TRAIN images."""
    idx = subsample(train.labels, MAX_TRAIN, seed)
    spec = default_spec()
    spec["subsampled_from"] = int(len(train)) if len(idx) < len(train) else None
    return fit(record_features(train, SIZE, idx), train.labels[idx], classes, spec)


def run_baseline(run, train, val, classes: list[str], positive: str | None, stage: str) -> list[Path]:
    """The finetune / distill `finish` helper: fit on the run's training split, save RUN/baseline/, log its
    validation metrics. Rank 0 only; a failure is one logged line (the trained model stays), never silent."""
    if not run.is_main:
        return []
    try:
        base = fit_records(train, classes, seed=int(getattr(run.cfg, "seed", 0)))
        if len(val) and len(np.unique(val.labels)) > 1:
            from dermfast.eval.metrics import compute_all
            m = compute_all(val.labels, base.predict_records(val), classes, positive)
            base.spec["val"] = {k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "auroc", "pauc_80tpr")}
            fmt = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
            run.log(f"{stage}: trivial baseline ({NAME}, {len(train)} train images) on the val split: balanced "
                    f"accuracy {fmt(m['balanced_accuracy'])}, AUROC {fmt(m['auroc'])}")
        paths = base.save(Path(run.run_dir) / "baseline")
    except (ValueError, OSError) as e:
        run.log(f"{stage}: warning: no trivial baseline in this run ({e})")
        return []
    for p in paths:
        run.wrote(p)
    return paths


def verdict(model: dict, base: dict, what: str = "the model") -> str | None:
    """A plain sentence when `model` does not beat `base` (metrics dicts) on balanced accuracy or AUROC; else None."""
    lost = []
    for key, label in (("balanced_accuracy", "balanced accuracy"), ("auroc", "AUROC")):
        a, b = model.get(key), base.get(key)
        if a is None or b is None:
            continue
        if not a > b:
            lost.append(f"{label} {a:.4f} vs {b:.4f}")
    if not lost:
        return None
    return (f"{what} does not beat the trivial baseline ({NAME}) on this data: " + "; ".join(lost) +
            " (model vs baseline)")
