"""Confidence intervals for a split's metrics: a percentile bootstrap over images, or over groups.

A test split of a few dozen drawings gives a pairwise accuracy that would move by several points on another
draw of drawings; the interval says how far. Each resample draws the units (images, or whole groups such as
students when the run has a group column, since drawings of one student are not independent evidence) with
replacement, and every metric is recomputed on the drawn copies: a sampled pair (a, b) counts
``copies(a) * copies(b)`` times, the correlations and tier figures see each drawn copy once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from mirip.common.tiers import rank_to_tier
from mirip.training.calibration_metrics import expected_calibration_error
from mirip.training.metrics import kendall_tau_b, pair_correct, spearman


@dataclass
class BootstrapConfig:
    """How the intervals are drawn: ``resamples`` (0: none), the two-sided ``level``, the seed of the draws."""

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.resamples < 0:
            raise ValueError(f"bootstrap resamples must be 0 (no intervals) or more, got {self.resamples}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"the interval level must be between 0 and 1, got {self.level}")


def resample_counts(units: Sequence[Any], resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, images) copies of each image per resample: the units drawn with replacement, every image
    taking its unit's count. ``units`` names each image's unit (its own index, or its group)."""
    codes = np.unique(np.asarray(units).astype(str), return_inverse=True)[1].reshape(-1)
    n_units = int(codes.max()) + 1 if codes.size else 0
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, max(n_units, 1), size=(resamples, n_units))
    unit_counts = np.stack([np.bincount(row, minlength=n_units) for row in drawn]) if resamples else np.zeros((0, n_units))
    return unit_counts[:, codes].astype(np.float64)


def percentile_interval(values: np.ndarray, level: float) -> List[float]:
    """[low, high] of the finite values at the two tails of ``level``; NaNs when none is finite."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return [float("nan"), float("nan")]
    tail = (1.0 - level) / 2.0 * 100.0
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))]


def pair_accuracies(counts: np.ndarray, first: np.ndarray, second: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Pairwise accuracy per resample: a pair counts once per drawn copy of each of its two images."""
    out = np.empty(len(counts))
    for lo in range(0, len(counts), 256):  # blocks keep the (resamples, pairs) weights small
        w = counts[lo:lo + 256][:, first] * counts[lo:lo + 256][:, second]
        total = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo:lo + 256] = np.where(total > 0, (w @ correct) / total, np.nan)
    return out


def _per_resample(counts: np.ndarray, fn) -> np.ndarray:
    """``fn(indices)`` on each resample's drawn copies (an image drawn k times appears k times)."""
    base = np.arange(counts.shape[1])
    return np.array([fn(np.repeat(base, row.astype(np.int64))) for row in counts])


def metric_intervals(counts: np.ndarray, scores, ranks, first, second, labels,
                     probabilities: Optional[np.ndarray] = None, level: float = 0.95) -> Dict[str, Any]:
    """Intervals of every figure ``score_metrics`` and ``tier_metrics`` report, from given resample ``counts``
    (``resample_counts``): accuracy, tier_pair_accuracy per pair, spearman, kendall, and with tier
    ``probabilities`` (columns S, A, B, C) tier_accuracy and calibration_error."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    ranks = np.asarray(ranks).reshape(-1)
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    correct = pair_correct(scores[first], scores[second], labels).astype(np.float64)
    out: Dict[str, Any] = {
        "accuracy": percentile_interval(pair_accuracies(counts, first, second, correct), level)}
    hi, lo = np.maximum(ranks[first], ranks[second]), np.minimum(ranks[first], ranks[second])
    pairs: Dict[str, List[float]] = {}
    for h in range(3, -1, -1):
        for low in range(h - 1, -1, -1):
            mask = (hi == h) & (lo == low)
            if mask.any():
                pairs[f"{rank_to_tier(h)}-{rank_to_tier(low)}"] = percentile_interval(
                    pair_accuracies(counts, first[mask], second[mask], correct[mask]), level)
    out["tier_pair_accuracy"] = pairs
    out["spearman"] = percentile_interval(_per_resample(counts, lambda i: spearman(scores[i], ranks[i])), level)
    out["kendall"] = percentile_interval(_per_resample(counts, lambda i: kendall_tau_b(scores[i], ranks[i])), level)
    if probabilities is not None:
        p = np.asarray(probabilities, dtype=np.float64).reshape(-1, 4)
        right = ((3 - np.argmax(p, axis=1)) == ranks).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["tier_accuracy"] = percentile_interval((counts @ right) / counts.sum(axis=1), level)
        out["calibration_error"] = percentile_interval(
            _per_resample(counts, lambda i: expected_calibration_error(p[i], ranks[i]) if i.size else np.nan), level)
    return out


def add_intervals(metrics: Optional[Dict[str, Any]], cfg: BootstrapConfig, scores, ranks, pairs,
                  units: Optional[Sequence[Any]] = None, probabilities: Optional[np.ndarray] = None,
                  unit_name: str = "image") -> Optional[Dict[str, Any]]:
    """``metrics`` with an ``intervals`` entry ({"level", "resamples", "unit", "units", and one [low, high] per
    figure}); unchanged when ``cfg.resamples`` is 0. ``units``: each image's group (None: the image itself)."""
    if not metrics or cfg.resamples == 0:
        return metrics
    n = len(np.asarray(scores).reshape(-1))
    units = np.arange(n) if units is None else np.asarray(units)
    counts = resample_counts(units, cfg.resamples, cfg.seed)
    figures = metric_intervals(counts, scores, ranks, *pairs, probabilities=probabilities, level=cfg.level)
    metrics["intervals"] = {"level": cfg.level, "resamples": cfg.resamples, "unit": unit_name,
                            "units": int(len(np.unique(units.astype(str)))), **figures}
    return metrics


def format_interval(interval: Sequence[float]) -> str:
    """``[0.64, 0.78]`` (two decimals: the interval is not more exact than that)."""
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def with_interval(value: Any, interval: Optional[Sequence[float]], digits: int = 4) -> str:
    """``0.7100 [0.64, 0.78]``: the figure, then its interval (two decimals: the interval is not more exact)."""
    if not isinstance(value, (int, float)) or value != value:
        return "nan" if isinstance(value, float) else str(value)
    text = f"{value:.{digits}f}"
    if interval and all(v == v for v in interval):
        text += " " + format_interval(interval)
    return text
