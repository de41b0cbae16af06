"""The linear probe every report is measured against: closed-form ridge regression from features to tier rank.

If the MLP head cannot beat a linear map fitted in one solve, the head is not
earning its keep. The ridge strength is chosen on the validation split (pairwise
accuracy) from a grid scaled to the features, all from one eigendecomposition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from mirip.training.metrics import pairwise_accuracy

# Ridge strengths relative to the mean eigenvalue of the centred Gram matrix.
RELATIVE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class RidgeBaseline:
    """score = features @ weight + bias, fitted to tier ranks (S=3 ... C=0)."""

    weight: np.ndarray
    bias: float
    alpha: float

    @classmethod
    def fit(cls, features, ranks, alpha: Optional[float] = None, val_features=None, val_pairs=None,
            relative_alphas: Sequence[float] = RELATIVE_ALPHAS, chunk: int = 65_536) -> "RidgeBaseline":
        """Solve (X'X + alpha I) w = X'y on centred data. With ``alpha=None`` pick it on
        ``val_features`` + ``val_pairs`` ((first, second, labels)), or use the middle of the grid."""
        y = _as_numpy(ranks).reshape(-1)
        n = len(y)
        if n < 2:
            raise ValueError(f"the ridge baseline needs at least 2 training images, got {n}")
        # Gram matrix in float64, accumulated in chunks so a huge fp16 matrix is never copied whole.
        mean = np.zeros(features.shape[1])
        for s in range(0, n, chunk):
            mean += _as_numpy(features[s:s + chunk]).sum(axis=0)
        mean /= n
        gram = np.zeros((features.shape[1], features.shape[1]))
        xty = np.zeros(features.shape[1])
        y_mean = y.mean()
        for s in range(0, n, chunk):
            xc = _as_numpy(features[s:s + chunk]) - mean
            gram += xc.T @ xc
            xty += xc.T @ (y[s:s + chunk] - y_mean)
        evals, evecs = np.linalg.eigh(gram)
        evals = np.clip(evals, 0.0, None)
        proj = evecs.T @ xty
        scale = max(float(evals.mean()), 1e-12)

        def solve(a: float) -> "RidgeBaseline":
            w = evecs @ (proj / (evals + a))
            return cls(weight=w, bias=float(y_mean - mean @ w), alpha=float(a))

        if alpha is not None:
            return solve(float(alpha))
        candidates = [solve(r * scale) for r in relative_alphas]
        if val_features is None or val_pairs is None:
            return candidates[len(candidates) // 2]
        first, second, labels = val_pairs
        accs = []
        for c in candidates:
            s = c.predict(val_features)
            accs.append(pairwise_accuracy(s[first], s[second], labels))
        return candidates[int(np.nanargmax(accs))]

    def predict(self, features) -> np.ndarray:
        return _as_numpy(features) @ self.weight + self.bias
