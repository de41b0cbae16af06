"""How typical a drawing is of the ones a head was trained on, so that scoring can say when not to answer.

The description is a Gaussian with a shrunk covariance (Ledoit-Wolf) fitted on the training split's features
as the head reads them (its input, after the feature spec's scales), and a drawing's distance is its
Mahalanobis distance to that Gaussian. Why this and not k nearest neighbours among projected embeddings:
its size is the feature width squared whatever the number of training drawings (a kNN reference grows with
the training set and would have to be subsampled), and the projector, trained only to rank, is free to
discard exactly the directions in which a photograph or a flat page differs from a drawing; the head's input
keeps them. The shrinkage keeps the fit well-posed when there are fewer drawings than feature dimensions.

The threshold comes from the validation split, which the fit never saw: ``typicality`` is the share of
validation drawings farther from the training set than the drawing, and a drawing is ``unusual`` when its
typicality is below ``threshold`` (the validation's 1st percentile by default, so about 1 drawing in 100 of
the training distribution is flagged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from mirip.store.checkpoint import load_checkpoint_file, save_checkpoint_file

METHOD = "mahalanobis-ledoit-wolf"
SPACE = "head input features"
DEFAULT_THRESHOLD = 0.01


def ledoit_wolf(x: np.ndarray) -> Tuple[np.ndarray, float]:
    """Shrunk covariance of centred rows ``x`` (n, d) and its shrinkage toward a scaled identity."""
    n, d = x.shape
    s = x.T @ x / n
    mu = float(np.trace(s)) / d
    d2 = float(((s - mu * np.eye(d)) ** 2).sum())
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - n ||S||_F^2
    b2 = (float((np.einsum("ij,ij->i", x, x) ** 2).sum()) - n * float((s ** 2).sum())) / n ** 2
    shrink = 1.0 if d2 <= 0 else min(max(b2, 0.0), d2) / d2
    return shrink * mu * np.eye(d) + (1 - shrink) * s, shrink


@dataclass
class TypicalityFit:
    mean: np.ndarray            # (d,)
    precision: np.ndarray       # (d, d): inverse of the shrunk covariance
    val_distances: np.ndarray   # sorted Mahalanobis distances of the validation drawings
    threshold: float
    shrinkage: float
    num_train: int

    def distances(self, features) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64).reshape(len(features), -1) - self.mean
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"typicality fit expects features of width {self.mean.shape[0]}, got {x.shape[1]}")
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, self.precision, x), 0.0))

    def typicality(self, features) -> np.ndarray:
        """Share of validation drawings farther from the training set than each row of ``features``, in [0, 1]."""
        d = self.distances(features)
        n = len(self.val_distances)
        return (n - np.searchsorted(self.val_distances, d, side="right")) / n

    def unusual(self, typicality: Sequence[float]) -> np.ndarray:
        return np.asarray(typicality, dtype=np.float64) < self.threshold

    def summary(self) -> Dict[str, Any]:
        """What the fit knows about its training set, for ``/info`` and the console."""
        v = self.val_distances
        return {"method": METHOD, "space": SPACE, "feature_dim": int(self.mean.shape[0]),
                "train_images": self.num_train, "val_images": int(len(v)), "shrinkage": self.shrinkage,
                "threshold": self.threshold, "val_distance_median": float(np.median(v)),
                "val_distance_at_threshold": float(np.quantile(v, 1 - self.threshold))}

    def to_dict(self) -> Dict[str, Any]:
        return {"method": METHOD, "space": SPACE, "mean": torch.from_numpy(self.mean.astype(np.float32)),
                "precision": torch.from_numpy(self.precision.astype(np.float32)),
                "val_distances": torch.from_numpy(self.val_distances.astype(np.float64)),
                "threshold": float(self.threshold), "shrinkage": float(self.shrinkage),
                "num_train": int(self.num_train)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TypicalityFit":
        if d.get("method") != METHOD:
            raise ValueError(f"unknown typicality method {d.get('method')!r} (this mirip knows {METHOD!r})")
        def arr(key: str) -> np.ndarray:
            value = d[key]
            return np.asarray(value.numpy() if torch.is_tensor(value) else value, dtype=np.float64)

        return cls(arr("mean"), arr("precision"), np.sort(arr("val_distances")), float(d["threshold"]),
                   float(d["shrinkage"]), int(d["num_train"]))


def fit_typicality(train: np.ndarray, val: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> TypicalityFit:
    """Fit on the training features, place the threshold on the validation features' distances."""
    train = np.asarray(train, dtype=np.float64)
    if len(train) < 2 or len(val) < 1:
        raise ValueError(f"a typicality fit needs >= 2 training and >= 1 validation drawings, "
                         f"got {len(train)} and {len(val)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    mean = train.mean(axis=0)
    cov, shrink = ledoit_wolf(train - mean)
    fit = TypicalityFit(mean, np.linalg.pinv(cov, hermitian=True), np.empty(0), threshold, shrink, len(train))
    fit.val_distances = np.sort(fit.distances(val))
    return fit


def dataset_features(dataset, batch_size: int = 256) -> np.ndarray:
    """Every image's features of a feature dataset, in its image order."""
    parts = [inputs.double().cpu().numpy().reshape(len(idx), -1) for idx, inputs in dataset.image_batches(batch_size)]
    return np.concatenate(parts) if parts else np.empty((0, 0))


def typicality_for_datasets(datasets: Dict[str, Any]) -> Tuple[Optional[TypicalityFit], Optional[str]]:
    """The fit of a run's train and val splits, or why there is none."""
    if datasets.get("train") is None or datasets.get("val") is None:
        return None, "no validation split, so no typicality threshold (needs val_ratio > 0)"
    try:
        return fit_typicality(dataset_features(datasets["train"]), dataset_features(datasets["val"])), None
    except ValueError as exc:
        return None, f"no typicality fit: {exc}"


def typicality_keys(fit: Optional[TypicalityFit], note: Optional[str]) -> Dict[str, Any]:
    return {"typicality": fit.to_dict() if fit is not None else None, "typicality_note": note}


def attach_typicality(path: str, fit: Optional[TypicalityFit], note: Optional[str]) -> None:
    """Add the typicality keys to a checkpoint file (atomically; everything else is kept)."""
    ckpt = load_checkpoint_file(path)
    ckpt.update(typicality_keys(fit, note))
    save_checkpoint_file(path, ckpt)


def typicality_from_checkpoint(ckpt: Dict[str, Any], path: str) -> Tuple[Optional[TypicalityFit], Optional[str]]:
    """The checkpoint's fit, or None and what it lacks (an older checkpoint, a run without a val split)."""
    if "typicality" not in ckpt:
        return None, (f"checkpoint {path} predates typicality fits: no typicality or unusual flag "
                      "(retrain to get them)")
    if ckpt["typicality"] is None:
        return None, ckpt.get("typicality_note") or "the run stored no typicality fit"
    try:
        return TypicalityFit.from_dict(ckpt["typicality"]), None
    except (KeyError, ValueError, TypeError) as exc:
        return None, f"checkpoint {path}: unreadable typicality fit ({exc})"


def flatten_unusual(probs: Sequence[float], prior: Sequence[float], typicality: float, threshold: float
                    ) -> np.ndarray:
    """Tier probabilities of an unusual drawing pulled toward the prior: at the threshold unchanged, at
    typicality 0 (farther out than every validation drawing) the prior itself."""
    w = min(max(typicality / threshold, 0.0), 1.0)
    return w * np.asarray(probs, dtype=np.float64) + (1 - w) * np.asarray(prior, dtype=np.float64)
