"""Linear and k-NN probes of a frozen MAE encoder: representation quality without the noise of fine-tuning.

    python -m dermfast.evaluate --checkpoint MAE_RUN --probe linear|knn [--data OTHER]

Features (`encoder_features`): the MAE run's encoder, frozen, on every patch (mask ratio 0: no masking), its
final LayerNorm applied, the patch tokens mean-pooled (the class token left out) -> one [D] vector per image.
Images go through the evaluation preprocessing at the preset's size (resize, centre crop 0.875, ImageNet mean /
std: `dermfast.data.augment.Augment`, as fine-tuning evaluates), fitted on the run's training split
(its splits.csv), scored on its test split or on --data.

- linear: features standardised (the affine-free BatchNorm the MAE paper puts before its linear probe, He et al.
  2022, appendix A.2), then scikit-learn logistic regression (C=1, class_weight="balanced", lbfgs, L2) in place
  of the paper's LARS-trained linear layer: the same model as `dermfast.eval.baseline`'s classifier.
- knn: the weighted k-NN of DINO (Caron et al. 2021; facebookresearch/dino eval_knn.py `knn_classifier`),
  which MAE-style papers report too: features L2-normalised, cosine similarity to every training image, the
  k = 20 most similar vote for their class with weight exp(similarity / 0.07); the votes, divided by their sum,
  are the class probabilities.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

KNN_K = 20
KNN_T = 0.07


def load_mae(path, device) -> tuple["torch.nn.Module", dict, Path]:
    """(MaskedAutoencoderViT in eval mode, metadata, checkpoint file) of an MAE run or checkpoint file.
    ValueError (one line) for a checkpoint of another stage or weights that do not fit its preset."""
    from dermfast.models.classifier import read_checkpoint, resolve_checkpoint
    from dermfast.models.mae import MAEPreset, MaskedAutoencoderViT
    p = resolve_checkpoint(path)
    state, meta = read_checkpoint(p)
    if meta.get("stage") != "mae" or not isinstance(meta.get("preset"), dict):
        raise ValueError(f"{p} is a {meta.get('stage')!r} checkpoint; --probe needs an MAE run (--stage mae)")
    model = MaskedAutoencoderViT(MAEPreset(**meta["preset"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{p}: weights do not fit the preset they carry ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), meta, p


@torch.no_grad()
def encoder_features(model, loader, device) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float64, labels [N]): mean of the normed patch tokens of the unmasked encoder."""
    feats, labels = [], []
    for batch in loader:
        latent, _, _ = model.forward_encoder(batch["image"].to(device), seed=0, step=0, mask_ratio=0.0)
        feats.append(latent[:, 1:].float().mean(1).double().cpu())
        labels.append(batch["label"].cpu())
    if not feats:
        return np.zeros((0, model.cfg.embed_dim)), np.zeros(0, dtype=np.int64)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


def knn_proba(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, num_classes: int, k: int = KNN_K,
              t: float = KNN_T) -> np.ndarray:
    """DINO's weighted k-NN: probabilities [N, num_classes] (vote weights exp(cos / t) of the k nearest,
    normalised to sum 1). k is capped at the number of training images."""
    a = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    b = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = b @ a.T                                             # [N, Ntrain]
    k = min(k, len(train_x))
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]     # [N, k]
    w = np.exp(np.take_along_axis(sim, top, 1) / t)
    votes = np.zeros((len(x), num_classes))
    np.add.at(votes, (np.repeat(np.arange(len(x)), k), train_y[top].ravel()), w.ravel())
    return votes / votes.sum(1, keepdims=True)


def probe(kind: str, train_x, train_y, x, classes: list[str]) -> tuple[np.ndarray, str]:
    """Fit on (train_x, train_y), return (probabilities of x [N, len(classes)], a description)."""
    if kind == "linear":
        from dermfast.eval.baseline import fit
        return fit(train_x, train_y, classes).predict_proba(x), \
            "standardised features + logistic regression (C=1, class_weight=balanced)"
    if kind == "knn":
        return knn_proba(train_x, train_y, x, len(classes)), \
            f"weighted k-NN (DINO): k={min(KNN_K, len(train_x))}, cosine similarity, weights exp(sim / {KNN_T})"
    raise ValueError(f"unknown probe {kind!r}: linear or knn")
