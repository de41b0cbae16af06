"""Ranking metrics in plain numpy: pairwise accuracy (overall and per tier pair), Spearman, Kendall tau-b.

scipy is not a dependency; these match ``scipy.stats.spearmanr`` and
``scipy.stats.kendalltau`` (variant "b") and are tested against naive loops.
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np

from mirip.common.tiers import rank_to_tier


def pair_correct(score1: np.ndarray, score2: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Boolean per pair: sign(score1 - score2) == label. A tie is never correct."""
    diff = np.asarray(score1, dtype=np.float64).reshape(-1) - np.asarray(score2, dtype=np.float64).reshape(-1)
    return np.sign(diff) == np.asarray(labels).reshape(-1)


def pairwise_accuracy(score1: np.ndarray, score2: np.ndarray, labels: np.ndarray) -> float:
    correct = pair_correct(score1, score2, labels)
    return float(correct.mean()) if correct.size else float("nan")


def distinct_pairs(first: np.ndarray, second: np.ndarray) -> int:
    """How many different image pairs (unordered) the sampled pairs cover: the evidence behind a pair metric,
    which sampling with repeats overstates (10000 pairs drawn from 20 images hold at most 190 distinct ones)."""
    first, second = np.asarray(first, dtype=np.int64).reshape(-1), np.asarray(second, dtype=np.int64).reshape(-1)
    if not first.size:
        return 0
    return int(len(np.unique(np.stack([np.minimum(first, second), np.maximum(first, second)], axis=1), axis=0)))


def tier_pair_accuracy(
    scores: np.ndarray, ranks: np.ndarray, first: np.ndarray, second: np.ndarray, labels: np.ndarray
) -> Dict[str, Dict[str, float]]:
    """{"S-A": {"accuracy", "pairs", "distinct_pairs"}, ...} over the tier combinations present, better tier first."""
    scores, ranks = np.asarray(scores).reshape(-1), np.asarray(ranks)
    correct = pair_correct(scores[first], scores[second], labels)
    hi = np.maximum(ranks[first], ranks[second])
    lo = np.minimum(ranks[first], ranks[second])
    out: Dict[str, Dict[str, float]] = {}
    for h in range(3, -1, -1):
        for lw in range(h - 1, -1, -1):
            mask = (hi == h) & (lo == lw)
            n = int(mask.sum())
            if n:
                out[f"{rank_to_tier(h)}-{rank_to_tier(lw)}"] = {
                    "accuracy": float(correct[mask].mean()), "pairs": n,
                    "distinct_pairs": distinct_pairs(np.asarray(first)[mask], np.asarray(second)[mask])}
    return out


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy's 'average' method)."""
    x = np.asarray(x).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start of each run of equal values; its average rank is the mean of the run's positions.
    new = np.concatenate([[True], xs[1:] != xs[:-1]])
    run_id = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(xs))
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of average ranks; NaN when either side is constant or n < 2."""
    x, y = np.asarray(x).reshape(-1), np.asarray(y).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.size} and {y.size}")
    if x.size < 2:
        return float("nan")
    rx, ry = rankdata(x) - (x.size + 1) / 2.0, rankdata(y) - (y.size + 1) / 2.0
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / denom) if denom > 0 else float("nan")


def _tied_pairs(values: np.ndarray) -> int:
    _, counts = np.unique(values, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def _inversions(codes: np.ndarray, k: int) -> int:
    """Pairs i < j with codes[i] > codes[j], for integer codes in [0, k)."""
    if k <= 64:
        # Few distinct values (tiers): for each value, how many larger values came before it. O(n k) in numpy.
        total, seen_greater = 0, np.zeros(len(codes), dtype=np.int64)
        for c in range(k - 1, -1, -1):
            is_c = codes == c
            total += int(seen_greater[is_c].sum())
            seen_greater += np.cumsum(is_c) - is_c  # count of earlier elements equal to c ...
            # ... added after using it, so only values strictly greater than the current c are counted.
        return total
    # Many distinct values: a Fenwick tree, O(n log k) Python steps.
    tree, total = np.zeros(k + 1, dtype=np.int64), 0
    for i, c in enumerate(codes.tolist()):
        j, le = c + 1, 0
        while j > 0:
            le += tree[j]
            j -= j & -j
        total += i - le  # earlier elements greater than c
        j = c + 1
        while j <= k:
            tree[j] += 1
            j += j & -j
    return int(total)


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b (ties adjusted), O(n log n); NaN when either side is constant or n < 2."""
    x, y = np.asarray(x).reshape(-1), np.asarray(y).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau_b needs equal lengths, got {x.size} and {y.size}")
    n = x.size
    if n < 2:
        return float("nan")
    # Kendall is symmetric: count inversions in whichever variable has fewer distinct values.
    ux, uy = np.unique(x), np.unique(y)
    if len(ux) < len(uy):
        x, y, uy = y, x, ux
    order = np.lexsort((y, x))  # by x, ties in x by y, so x-ties never count as discordant
    codes = np.searchsorted(uy, y[order])
    discordant = _inversions(codes, len(uy))
    total = n * (n - 1) // 2
    x_ties, y_ties = _tied_pairs(x), _tied_pairs(y)
    _, joint_counts = np.unique(np.stack([x, y], axis=1), axis=0, return_counts=True)
    both_ties = int((joint_counts * (joint_counts - 1) // 2).sum())
    concordant_minus_discordant = total - x_ties - y_ties + both_ties - 2 * discordant
    denom = math.sqrt(float(total - x_ties) * float(total - y_ties))
    return float(concordant_minus_discordant / denom) if denom > 0 else float("nan")


def score_metrics(scores: np.ndarray, ranks: np.ndarray, first: np.ndarray, second: np.ndarray,
                  labels: np.ndarray) -> dict:
    """Every metric of a scored split: the seed's three keys, per-tier-pair accuracy, correlations, counts.

    ``total_pairs`` counts the pairs as sampled (repeats included); ``distinct_pairs`` how many different image
    pairs they are, and ``num_images`` the images scored: what a reader should weigh the figures by."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    correct = pair_correct(scores[first], scores[second], labels)
    total = int(correct.size)
    return {
        "accuracy": float(correct.mean()) if total else float("nan"),
        "total_pairs": total,
        "distinct_pairs": distinct_pairs(first, second),
        "correct_predictions": int(correct.sum()),
        "tier_pair_accuracy": tier_pair_accuracy(scores, ranks, first, second, labels),
        "spearman": spearman(scores, ranks),
        "kendall": kendall_tau_b(scores, ranks),
        "num_images": int(scores.size),
    }
