"""How typical a drawing is of the ones a head was trained on, so that scoring can say when not to answer.

The description is a Gaussian with a shrunk covariance (Ledoit-Wolf) fitted on the training split's features
as the head reads them (its input, after the feature spec's scales), and a drawing's distance is its
Mahalanobis distance to that Gaussian. Why this and not k nearest neighbours among projected embeddings:
its size is the feature width squared whatever the number of training drawings (a kNN reference grows with
the training set and would have to be subsampled), and the projector, trained only to rank, is free to
discard exactly the directions in which a photograph or a flat page differs from a drawing; the head's input
keeps them. The shrinkage keeps the fit well-posed when there are fewer drawings than feature dimensions.

The threshold comes from the validation split, which the fit never saw. ``typicality`` is the estimated share
of drawings like the training ones that lie farther from the training set than the drawing: the log squared
distances of the validation drawings are taken as a normal sample, and a new drawing's log squared distance is
read off that sample's predictive Student-t (n - 1 degrees of freedom, scale widened by sqrt(1 + 1/n) for the
estimated mean and spread). A drawing is ``unusual`` when its typicality is below ``threshold`` (0.01 by
default). Why not the share of validation drawings itself: with the usual 24 or so validation drawings that
share moves in steps of 1/24, its 1st percentile is "farther than every validation drawing", and which drawings
get flagged depends on how far the single farthest validation drawing happened to be (one run flagged 6 of 24
held-out drawings). The predictive t is continuous and, when the log squared distances are normal, flags
exactly ``threshold`` of in-distribution drawings on average whatever the validation size; on the demo
drawings the gamma tail one would expect of squared distances was too thin (about 3% flagged at a nominal 1%),
the log-normal one close (see docs/benchmarks.md). Old checkpoints store the validation distances, so they
get the same tail when loaded.
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
TAIL = "student-t predictive on the validation's log squared distances"


def student_t_sf(t: np.ndarray, dof: int) -> np.ndarray:
    """P(T > t) for Student's t with a whole number of degrees of freedom, by the finite series of Abramowitz
    and Stegun 26.7.3-4 (exact for whole ``dof``; numpy has no t distribution and scipy is only a test need)."""
    t = np.asarray(t, dtype=np.float64)
    theta = np.arctan(np.abs(t) / np.sqrt(dof))
    c2, term = np.cos(theta) ** 2, np.ones_like(t)
    total = np.ones_like(t)
    if dof % 2:
        for k in range(1, (dof - 1) // 2):  # 1 + 2/3 c^2 + (2*4)/(3*5) c^4 + ...
            term = term * c2 * (2 * k) / (2 * k + 1)
            total = total + term
        inside = (2 / np.pi) * (theta + (np.sin(theta) * np.cos(theta) * total if dof > 1 else 0.0))
    else:
        for k in range(1, dof // 2):  # 1 + 1/2 c^2 + (1*3)/(2*4) c^4 + ...
            term = term * c2 * (2 * k - 1) / (2 * k)
            total = total + term
        inside = np.sin(theta) * total
    upper = np.clip((1 - inside) / 2, 0.0, 0.5)  # P(T > |t|)
    return np.where(t >= 0, upper, 1 - upper)


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

    def tail(self) -> Tuple[float, float, int]:
        """Mean and spread of the validation's log squared distances, and their number."""
        logs = log_squared(self.val_distances)
        return float(logs.mean()), float(max(logs.std(ddof=1), 1e-12)), len(logs)

    def typicality_of_distances(self, distances) -> np.ndarray:
        mean, sd, n = self.tail()
        return student_t_sf((log_squared(distances) - mean) / (sd * np.sqrt(1 + 1 / n)), n - 1)

    def typicality(self, features) -> np.ndarray:
        """Estimated share of drawings like the training ones farther from the training set than each row of
        ``features``, in [0, 1] (the validation distances' predictive tail, see the module's docstring)."""
        return self.typicality_of_distances(self.distances(features))

    def distance_at_threshold(self) -> float:
        """The distance whose typicality is the threshold (bisection: typicality falls with distance)."""
        lo, hi = 0.0, float(self.val_distances.max()) * 2 + 1.0
        while self.typicality_of_distances([hi])[0] > self.threshold:
            hi *= 2
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.typicality_of_distances([mid])[0] > self.threshold else (lo, mid)
        return hi

    def unusual(self, typicality: Sequence[float]) -> np.ndarray:
        return np.asarray(typicality, dtype=np.float64) < self.threshold

    def summary(self) -> Dict[str, Any]:
        """What the fit knows about its training set, for ``/info`` and the console."""
        v = self.val_distances
        return {"method": METHOD, "space": SPACE, "feature_dim": int(self.mean.shape[0]),
                "train_images": self.num_train, "val_images": int(len(v)), "shrinkage": self.shrinkage,
                "threshold": self.threshold, "tail": TAIL, "val_distance_median": float(np.median(v)),
                "val_distance_max": float(v.max()), "distance_at_threshold": self.distance_at_threshold()}

    def to_dict(self) -> Dict[str, Any]:
        return {"method": METHOD, "space": SPACE, "tail": TAIL, "mean": torch.from_numpy(self.mean.astype(np.float32)),
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

        # No tail parameters are stored: the tail comes from the validation distances, so a fit saved before
        # the tail existed reads the same as a new one.
        fit = cls(arr("mean"), arr("precision"), np.sort(arr("val_distances")), float(d["threshold"]),
                  float(d["shrinkage"]), int(d["num_train"]))
        if len(fit.val_distances) < 2:
            raise ValueError(f"the tail needs >= 2 validation distances, the fit has {len(fit.val_distances)}")
        return fit


def fit_typicality(train: np.ndarray, val: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> TypicalityFit:
    """Fit on the training features, place the threshold on the validation features' distances."""
    train = np.asarray(train, dtype=np.float64)
    if len(train) < 2 or len(val) < 2:
        raise ValueError(f"a typicality fit needs >= 2 training and >= 2 validation drawings, "
                         f"got {len(train)} and {len(val)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    mean = train.mean(axis=0)
    cov, shrink = ledoit_wolf(train - mean)
    fit = TypicalityFit(mean, np.linalg.pinv(cov, hermitian=True), np.empty(0), threshold, shrink, len(train))
    fit.val_distances = np.sort(fit.distances(val))
    return fit


def log_squared(distances) -> np.ndarray:
    # Floored so that a drawing sitting exactly on the training mean has a finite log.
    return np.log(np.maximum(np.asarray(distances, dtype=np.float64) ** 2, 1e-300))


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
    typicality 0 the prior itself (linearly in between)."""
    w = min(max(typicality / threshold, 0.0), 1.0)
    return w * np.asarray(probs, dtype=np.float64) + (1 - w) * np.asarray(prior, dtype=np.float64)
