"""FID between a synthesis output folder and a real dataset, overall and per class.

FID = |mu_r - mu_s|^2 + Tr(S_r + S_s - 2 (S_r S_s)^(1/2)) on features of a frozen net (dermfast.synth.features:
the dermfast MAE encoder's mean token, or Inception-v3 pool features from a local checkpoint; the report names
which, since MAE-feature FIDs are not comparable with published Inception FIDs). Real images are resized to the
generator's resolution first, so the score measures generation, not the resolution gap. Per-class FIDs on a
few images are dominated by the covariance estimate: read them as relative numbers between runs.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from dermfast.data.records import ImageRecords
from dermfast.synth.manifest import read_manifest


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """a [N, D], b [M, D] float features -> FID (float64; scipy sqrtm, the imaginary round-off dropped)."""
    from scipy import linalg
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product (few samples): offset the diagonals, as pytorch-fid does
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _load(data: bytes, size: int) -> torch.Tensor:
    from PIL import Image
    im = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1


@torch.no_grad()
def features(net, blobs, size: int, device, batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(blobs), batch):
        x = torch.stack([_load(b, size) for b in blobs[i:i + batch]]).to(device)
        out.append(net(x).float().flatten(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1))


def fid_report(synth_dir, real: ImageRecords, spec: str, device, img_size: int, classes: list[str]) -> dict:
    """FID of the synthesis output `synth_dir` (manifest.csv + images/) against the `real` records.

    Prints and returns {"features": ..., "overall": fid, "per_class": {class: fid}}; writes DIR/fid.json.
    """
    from dermfast.synth.features import describe, load_feature_net
    synth_dir = Path(synth_dir)
    net = load_feature_net(spec, pooled=True, device=device)
    real_labels = [real.classes[l] if l >= 0 else None for l in real.labels]
    f_real = features(net, [real.read_bytes(i) for i in range(len(real))], img_size, device)
    rows = list(read_manifest(synth_dir / "manifest.csv").values())
    f_syn = features(net, [(synth_dir / "images" / r["image"]).read_bytes() for r in rows], img_size, device)
    syn_labels = [r["label"] for r in rows]
    report = {"features": describe(spec), "real_images": len(real), "synthetic_images": len(rows),
              "overall": frechet_distance(f_real, f_syn), "per_class": {}}
    for c in classes:
        r = f_real[[i for i, l in enumerate(real_labels) if l == c]]
        s = f_syn[[i for i, l in enumerate(syn_labels) if l == c]]
        report["per_class"][c] = frechet_distance(r, s) if len(r) >= 2 and len(s) >= 2 else None
    (synth_dir / "fid.json").write_text(json.dumps(report, indent=1))
    per = ", ".join(f"{c} {v:.2f}" if v is not None else f"{c} n/a" for c, v in report["per_class"].items())
    print(f"fid: {report['overall']:.3f} overall ({len(rows)} synthetic vs {len(real)} real images; features: "
          f"{report['features']}); per class: {per}")
    return report
