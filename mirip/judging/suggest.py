"""The next pairs worth asking a teacher, chosen from the scores alone (no O(N^2) pair list).

A candidate pair's value is ``(uncertainty + disagreement) * need``:

- uncertainty ``1 - |2p - 1|``, p = P(a better) from the model (1 when the model cannot tell, 0 when sure);
- disagreement ``2 * sd`` of the ensemble members' P(a better) (0 for one model);
- need ``1 / (1 + (c_a + c_b) / 2)``, c the judgments a drawing already has: the least-judged come first.

Uncertain pairs are pairs close in score, so the candidates are each drawing's ``window`` nearest neighbours
in the (mean) score order: O(N * window) pairs. Pairs already judged are never offered, nor one pair twice.
Spread: pairs are taken best first while no drawing appears more than ``ceil(2 * count / N)`` times in the
batch, so no drawing dominates; the cap rises only when the candidates run out under it.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional, Set, Tuple

import numpy as np

Suggestion = Tuple[int, int, str, float]
DEFAULT_WINDOW = 8


def _logistic(d: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-d))


def candidate_pairs(mean_scores: np.ndarray, window: int) -> Tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j: each drawing with its ``window`` neighbours on either side in score order."""
    order = np.argsort(mean_scores, kind="stable")
    n = len(order)
    first, second = [], []
    for offset in range(1, min(window, n - 1) + 1):
        a, b = order[:-offset], order[offset:]
        first.append(np.minimum(a, b))
        second.append(np.maximum(a, b))
    if not first:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(first).astype(np.int64), np.concatenate(second).astype(np.int64)


def pair_values(scores: np.ndarray, counts: np.ndarray, first: np.ndarray, second: np.ndarray,
                probability: Callable[[np.ndarray], np.ndarray]) -> Tuple[np.ndarray, ...]:
    """(value, P(first better), uncertainty, disagreement) of each pair; ``scores`` is (members, N)."""
    p_members = probability(scores[:, first] - scores[:, second])
    p = p_members.mean(axis=0)
    uncertainty = 1.0 - np.abs(2.0 * p - 1.0)
    disagreement = 2.0 * p_members.std(axis=0) if scores.shape[0] > 1 else np.zeros_like(p)
    need = 1.0 / (1.0 + (counts[first] + counts[second]) / 2.0)
    return (uncertainty + disagreement) * need, p, uncertainty, disagreement


def _reason(p: float, disagreement: float, ca: int, cb: int) -> str:
    parts = [f"model unsure of the order (P(a better) {p:.2f})" if abs(p - 0.5) < 0.15
             else f"closest remaining pair for these drawings (P(a better) {p:.2f})"]
    if disagreement > 0.05:
        parts.append(f"ensemble members disagree (2 sd {disagreement:.2f})")
    parts.append(f"judged {ca} and {cb} times so far")
    return "; ".join(parts)


def suggest_pairs(scores, counts, judged: Iterable[frozenset], count: int,
                  probability: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                  rng: Optional[np.random.Generator] = None, window: int = DEFAULT_WINDOW) -> List[Suggestion]:
    """Up to ``count`` pairs (i, j, reason, P(i better)) of drawings worth a teacher's judgment, best first.

    ``scores``: (N,) or (members, N) for an ensemble; ``counts``: judgments per drawing; ``judged``: frozensets
    of index pairs already judged; ``probability``: score difference -> P(a better) (default: a logistic);
    ``rng``: breaks ties between equal values and picks which drawing of a pair is shown as ``a``."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    counts = np.asarray(counts, dtype=np.float64)
    n = scores.shape[1]
    if len(counts) != n:
        raise ValueError(f"{len(counts)} judgment counts for {n} drawings")
    if count <= 0 or n < 2:
        return []
    rng = rng if rng is not None else np.random.default_rng(0)
    probability = probability or _logistic
    first, second = candidate_pairs(scores.mean(axis=0), max(1, int(window)))
    codes = first * n + second
    done = np.array([min(p) * n + max(p) for p in map(tuple, judged) if len(p) == 2], dtype=np.int64)
    codes, keep = np.unique(codes, return_index=True)
    first, second = first[keep], second[keep]
    fresh = ~np.isin(codes, done)
    first, second = first[fresh], second[fresh]
    value, p, _, disagreement = pair_values(scores, counts, first, second, probability)
    order = np.lexsort((rng.random(len(value)), -value))
    return _spread(order, first, second, p, disagreement, counts, count, n, rng)


def _spread(order, first, second, p, disagreement, counts, count: int, n: int, rng) -> List[Suggestion]:
    """Take pairs in ``order`` with each drawing at most ``cap`` times, raising the cap only when stuck."""
    used = np.zeros(n, dtype=np.int64)
    taken = np.zeros(len(order), dtype=bool)
    out: List[Suggestion] = []
    cap = max(1, math.ceil(2 * count / n))
    while len(out) < count and not taken.all():
        before = len(out)
        for k in order:
            if len(out) >= count:
                break
            i, j = int(first[k]), int(second[k])
            if taken[k] or used[i] >= cap or used[j] >= cap:
                continue
            taken[k] = True
            used[i] += 1
            used[j] += 1
            p_a = float(p[k])
            if rng.random() < 0.5:  # which drawing shows on the left is chance, not score order
                i, j, p_a = j, i, 1.0 - p_a
            out.append((i, j, _reason(p_a, float(disagreement[k]), int(counts[i]), int(counts[j])), p_a))
        if len(out) == before:
            cap += 1
    return out
