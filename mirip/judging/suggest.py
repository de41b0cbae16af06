"""The next pairs worth asking a teacher, chosen from the scores alone (no O(N^2) pair list).

A candidate pair's value is ``(uncertainty + disagreement) * need``:

- uncertainty ``1 - |2p - 1|``, p = P(a better) from the model (1 when the model cannot tell, 0 when sure);
- disagreement ``2 * sd`` of the ensemble members' P(a better) (0 for one model);
- need ``1 / (1 + (c_a + c_b) / 2)``, c the judgments a drawing already has: the least-judged come first;
- with an ``embedding`` (``spread_embedding``: the cached features' top principal components), times the
  pair's distance there over the candidates' mean distance. Drawings outside the judged set learn only
  through the features: of two pairs the model is equally unsure of, the one whose drawings differ more in
  the directions the features vary most says more about how to weigh those directions (the simulated
  teacher benchmark: held-out within-tier Spearman reached random pairs' final at 5 judgments per drawing
  instead of 8 without it; docs/benchmarks.md).

Uncertain pairs are pairs close in score, so the candidates are each drawing's ``window`` nearest neighbours
in the (mean) score order: O(N * window) pairs. Pairs already judged are never offered, nor one pair twice.
Spread: pairs are taken best first while no drawing appears more than ``ceil(2 * count / N)`` times in the
batch, so no drawing dominates; when the neighbours run out under the cap, the drawings still free are paired
with their neighbours among themselves, and the cap rises only when those run out too.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional, Set, Tuple

import numpy as np

Suggestion = Tuple[int, int, str, float]
DEFAULT_WINDOW = 8  # the judging desk's, per next pair: small keeps each answer's reply fast
SUGGEST_WINDOW = 32  # a batch of suggestions: wider, so the embedding's distance has pairs to choose among
SPREAD_COMPONENTS = 4
POWER_STEPS = 60  # block power iterations for the principal axes of wide features


def _logistic(d: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-d))


def spread_embedding(features: np.ndarray, components: int = SPREAD_COMPONENTS) -> Optional[np.ndarray]:
    """(N, k) coordinates of each drawing on the features' top ``components`` principal axes (None for 0).

    The axes come from the (D, D) scatter matrix by block power iteration on k + 8 vectors and a Rayleigh-Ritz
    step: a full eigendecomposition of a 768 x 768 matrix alone took 4.5 s on the busy 2-core CPU, this a
    fraction of the one matrix product that builds the scatter (10,000 drawings x 768 dims: about a second)."""
    if components <= 0:
        return None
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    d = x.shape[1]
    k = min(int(components), d)
    scatter = x.T @ x
    if d <= 64:
        _, vectors = np.linalg.eigh(scatter)
        return x @ vectors[:, ::-1][:, :k]
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(d, min(d, k + 8))))[0]
    for _ in range(POWER_STEPS):
        basis = np.linalg.qr(scatter @ basis)[0]
    _, small = np.linalg.eigh(basis.T @ scatter @ basis)
    return x @ (basis @ small[:, ::-1][:, :k])


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
                probability: Callable[[np.ndarray], np.ndarray],
                embedding: Optional[np.ndarray] = None) -> Tuple[np.ndarray, ...]:
    """(value, P(first better), uncertainty, disagreement) of each pair; ``scores`` is (members, N)."""
    p_members = probability(scores[:, first] - scores[:, second])
    p = p_members.mean(axis=0)
    uncertainty = 1.0 - np.abs(2.0 * p - 1.0)
    disagreement = 2.0 * p_members.std(axis=0) if scores.shape[0] > 1 else np.zeros_like(p)
    need = 1.0 / (1.0 + (counts[first] + counts[second]) / 2.0)
    value = (uncertainty + disagreement) * need
    if embedding is not None:
        dist = np.linalg.norm(embedding[first] - embedding[second], axis=1)
        value = value * dist / max(float(dist.mean()), 1e-12)
    return value, p, uncertainty, disagreement


def _reason(p: float, disagreement: float, ca: int, cb: int) -> str:
    parts = [f"model unsure of the order (P(a better) {p:.2f})" if abs(p - 0.5) < 0.15
             else f"closest remaining pair for these drawings (P(a better) {p:.2f})"]
    if disagreement > 0.05:
        parts.append(f"ensemble members disagree (2 sd {disagreement:.2f})")
    parts.append(f"judged {ca} and {cb} times so far")
    return "; ".join(parts)


def suggest_pairs(scores, counts, judged: Iterable[frozenset], count: int,
                  probability: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                  rng: Optional[np.random.Generator] = None, window: int = DEFAULT_WINDOW,
                  embedding: Optional[np.ndarray] = None) -> List[Suggestion]:
    """Up to ``count`` pairs (i, j, reason, P(i better)) of drawings worth a teacher's judgment, best first.

    ``scores``: (N,) or (members, N) for an ensemble; ``counts``: judgments per drawing; ``judged``: frozensets
    of index pairs already judged; ``probability``: score difference -> P(a better) (default: a logistic);
    ``rng``: breaks ties between equal values and picks which drawing of a pair is shown as ``a``;
    ``embedding``: (N, k) coordinates whose pair distances scale the value (``spread_embedding``)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    counts = np.asarray(counts, dtype=np.float64)
    n = scores.shape[1]
    if len(counts) != n:
        raise ValueError(f"{len(counts)} judgment counts for {n} drawings")
    if count <= 0 or n < 2:
        return []
    rng = rng if rng is not None else np.random.default_rng(0)
    probability = probability or _logistic
    mean = scores.mean(axis=0)
    if embedding is not None:
        embedding = np.asarray(embedding, dtype=np.float64)
        if embedding.ndim != 2 or len(embedding) != n:
            raise ValueError(f"embedding of shape {embedding.shape} for {n} drawings: expected ({n}, k)")
    done = {min(p) * n + max(p) for p in map(tuple, judged) if len(p) == 2}
    used = np.zeros(n, dtype=np.int64)
    out: List[Suggestion] = []
    cap = max(1, math.ceil(2 * count / n))
    pool = np.arange(n)
    while len(out) < count:
        # Candidates among the drawings still under the cap: first everyone's neighbours, then, when those
        # are spent, the free drawings' neighbours among themselves (so a cap of one pairs nearly everyone).
        first, second = candidate_pairs(mean[pool], max(1, int(window)))
        first, second = pool[first], pool[second]
        first, second = _fresh(first, second, n, done)
        if len(first):
            value, p, _, disagreement = pair_values(scores, counts, first, second, probability, embedding)
            order = np.lexsort((rng.random(len(value)), -value))
            added = _spread(order, first, second, p, disagreement, counts, count - len(out), used, cap, rng)
            for i, j, reason, p_a in added:
                done.add(min(i, j) * n + max(i, j))
            out += added
        if not len(first) and len(pool) == n:
            break  # no fresh pair among anyone's neighbours: a higher cap would find none either
        free = np.flatnonzero(used < cap)
        if len(out) < count and (not len(first) or not added or len(free) == len(pool)):
            if len(free) >= 2 and len(free) < len(pool):
                pool = free
                continue
            if cap >= n:
                break
            cap += 1
            pool = np.arange(n)
        else:
            pool = free if len(free) >= 2 else np.arange(n)
    return out


def _fresh(first: np.ndarray, second: np.ndarray, n: int, done: Set[int]) -> Tuple[np.ndarray, np.ndarray]:
    """The distinct pairs among (first, second) not judged or offered yet."""
    codes = np.minimum(first, second) * n + np.maximum(first, second)
    codes, keep = np.unique(codes, return_index=True)
    fresh = ~np.isin(codes, np.fromiter(done, dtype=np.int64, count=len(done)))
    keep = keep[fresh]
    return np.minimum(first, second)[keep], np.maximum(first, second)[keep]


def _spread(order, first, second, p, disagreement, counts, count: int, used: np.ndarray, cap: int,
            rng) -> List[Suggestion]:
    """Take pairs in ``order``, best first, while neither drawing is at ``cap`` yet (``used`` is updated)."""
    out: List[Suggestion] = []
    for k in order:
        if len(out) >= count:
            break
        i, j = int(first[k]), int(second[k])
        if used[i] >= cap or used[j] >= cap:
            continue
        used[i] += 1
        used[j] += 1
        p_a = float(p[k])
        if rng.random() < 0.5:  # which drawing shows on the left is chance, not score order
            i, j, p_a = j, i, 1.0 - p_a
        out.append((i, j, _reason(p_a, float(disagreement[k]), int(counts[i]), int(counts[j])), p_a))
    return out
