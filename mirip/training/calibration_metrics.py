"""How good a calibration's tier predictions are, on labelled scores: top-label reliability and expected
calibration error, ranked probability score, confusion matrix, tier accuracy (``tier_metrics``).
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from mirip.common.tiers import TIERS
from mirip.training.calibration import as_ranks

ECE_NAME = "expected calibration error (top label, equal-width bins)"
DEFAULT_BINS = 10


# --- figures of a calibration on labelled scores -----------------------------------------------------
def reliability_bins(probabilities: Any, ranks: Any, bins: int = DEFAULT_BINS) -> List[Dict[str, float]]:
    """Top-label reliability: per equal-width bin of the predicted tier's probability, the mean probability
    (``confidence``), how often the predicted tier was right (``accuracy``) and the count. Empty bins are left out."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, 4)
    y = as_ranks(ranks, p.shape[0])
    pred_rank = 3 - np.argmax(p, axis=1)  # columns are S, A, B, C
    conf = p.max(axis=1)
    right = (pred_rank == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, int(bins) - 1)
    out = []
    for b in range(int(bins)):
        mask = which == b
        if mask.any():
            out.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(mask.sum()),
                        "confidence": float(conf[mask].mean()), "accuracy": float(right[mask].mean())})
    return out


def expected_calibration_error(probabilities: Any, ranks: Any, bins: int = DEFAULT_BINS) -> float:
    """Sum over bins of (bin share) x |accuracy - confidence|, top label (see ``reliability_bins``)."""
    table = reliability_bins(probabilities, ranks, bins)
    n = sum(b["count"] for b in table)
    if not n:
        return float("nan")
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table))


def ranked_probability_score(probabilities: Any, ranks: Any) -> float:
    """Mean over drawings of (1/3) sum_k (P(rank <= k) - [true rank <= k])^2, k = C, B, A; 0 is perfect."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, 4)
    y = as_ranks(ranks, p.shape[0])
    if not p.shape[0]:
        return float("nan")
    cum = np.cumsum(p[:, ::-1], axis=1)[:, :3]  # P(C), P(C or B), P(C, B or A)
    truth = (y[:, None] <= np.arange(3)[None, :]).astype(np.float64)
    return float(((cum - truth) ** 2).sum(axis=1).mean() / 3.0)


def confusion_matrix(true_ranks: Any, predicted_ranks: Any) -> List[List[int]]:
    """4x4 counts, rows = true tier, columns = predicted tier, both in S, A, B, C order."""
    t = np.asarray(true_ranks, dtype=np.int64).reshape(-1)
    p = np.asarray(predicted_ranks, dtype=np.int64).reshape(-1)
    m = np.zeros((4, 4), dtype=np.int64)
    np.add.at(m, (3 - t, 3 - p), 1)
    return m.tolist()


def tier_metrics(probabilities: Any, ranks: Any, bins: int = DEFAULT_BINS) -> Dict[str, Any]:
    """Tier accuracy, mean absolute tier error, confusion matrix and calibration error of predicted probabilities.

    ``majority_tier_accuracy`` is what always predicting the commonest tier *of these drawings* would score
    (a baseline that has seen the answers' distribution, so beating it is a fair bar).
    """
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, 4)
    y = as_ranks(ranks, p.shape[0])
    n = int(p.shape[0])
    if n == 0:
        return {"num_images": 0}
    pred = 3 - np.argmax(p, axis=1)
    counts = np.bincount(y, minlength=4)
    majority = int(np.argmax(counts[::-1]))  # ties go to the better tier
    return {
        "num_images": n,
        "tier_accuracy": float((pred == y).mean()),
        "tier_mae": float(np.abs(pred - y).mean()),
        "majority_tier": TIERS[majority],
        "majority_tier_accuracy": float(counts[3 - majority] / n),
        "confusion_matrix": {"tiers": list(TIERS), "rows": "true tier", "columns": "predicted tier",
                             "counts": confusion_matrix(y, pred)},
        "calibration_error": {"name": ECE_NAME, "bins": int(bins),
                              "value": expected_calibration_error(p, y, bins)},
        "ranked_probability_score": ranked_probability_score(p, y),
        "reliability": reliability_bins(p, y, bins),
    }
