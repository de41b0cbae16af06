"""Sampling cross-tier pairs without ever building all O(N^2) of them.

A pair is (first, second, label): label 1 when ``first`` is the better drawing,
-1 otherwise. Same-tier pairs are never drawn. Sampling is a pure function of
(seed, epoch), so a run is reproducible and every epoch sees fresh pairs.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from mirip.common.tiers import rank_to_tier

BALANCES = ("tier_pair", "uniform")


def tier_groups(ranks: np.ndarray) -> dict:
    """{rank: indices of the images with that rank}, best rank first."""
    ranks = np.asarray(ranks)
    return {int(r): np.flatnonzero(ranks == r) for r in sorted(np.unique(ranks), reverse=True)}


def tier_combinations(ranks: np.ndarray) -> List[Tuple[int, int]]:
    """Every (better, worse) pair of tiers present, e.g. (3, 2) for S-A."""
    present = sorted(tier_groups(ranks), reverse=True)
    return [(hi, lo) for i, hi in enumerate(present) for lo in present[i + 1:]]


def count_cross_tier_pairs(ranks: np.ndarray) -> int:
    """How many unordered cross-tier pairs exist (computed from tier counts, not enumerated)."""
    sizes = [len(g) for g in tier_groups(ranks).values()]
    return int((sum(sizes) ** 2 - sum(s * s for s in sizes)) // 2)


def sample_pairs(
    ranks: np.ndarray, num_pairs: int, seed: int = 42, epoch: int = 0, balance: str = "tier_pair"
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``num_pairs`` cross-tier pairs; returns (first, second, labels) as int64 arrays.

    ``tier_pair`` spreads pairs evenly over the tier combinations present (S-A, S-B, ..., B-C),
    so rare tiers are not drowned out; ``uniform`` draws uniformly over all cross-tier pairs.
    Labels are exactly balanced (+1 for half the pairs, rounded down, -1 for the rest).
    """
    if balance not in BALANCES:
        raise ValueError(f"unknown pair balance {balance!r}; use one of {', '.join(BALANCES)}")
    if num_pairs <= 0:
        raise ValueError(f"num_pairs must be positive, got {num_pairs}")
    groups = tier_groups(ranks)
    combos = tier_combinations(ranks)
    if not combos:
        only = ", ".join(rank_to_tier(r) for r in groups) or "none"
        raise ValueError(f"cannot form pairs: need images of at least two different tiers, found only: {only}")
    rng = np.random.default_rng([int(seed), int(epoch)])
    if balance == "tier_pair":
        # Round-robin then shuffle: each combination gets num_pairs // len(combos) pairs or one more.
        combo_idx = rng.permutation(np.arange(num_pairs) % len(combos))
    else:
        weights = np.array([len(groups[hi]) * len(groups[lo]) for hi, lo in combos], dtype=np.float64)
        combo_idx = rng.choice(len(combos), size=num_pairs, p=weights / weights.sum())
    better = np.empty(num_pairs, dtype=np.int64)
    worse = np.empty(num_pairs, dtype=np.int64)
    for c, (hi, lo) in enumerate(combos):
        mask = combo_idx == c
        n = int(mask.sum())
        better[mask] = groups[hi][rng.integers(len(groups[hi]), size=n)]
        worse[mask] = groups[lo][rng.integers(len(groups[lo]), size=n)]
    labels = np.where(rng.permutation(num_pairs) < num_pairs // 2, 1, -1).astype(np.int64)
    first = np.where(labels == 1, better, worse)
    second = np.where(labels == 1, worse, better)
    return first, second, labels


def all_cross_tier_pairs(ranks: np.ndarray, seed: int = 42, epoch: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every cross-tier pair exactly once, in an order and orientation drawn from (seed, epoch).

    For sets whose cross-tier pairs are no more than the pairs asked for: sampling with replacement
    would repeat some pairs and miss others. Labels are balanced as in ``sample_pairs``. Only call it
    for small sets: it enumerates the pairs.
    """
    groups = tier_groups(ranks)
    combos = tier_combinations(ranks)
    if not combos:
        only = ", ".join(rank_to_tier(r) for r in groups) or "none"
        raise ValueError(f"cannot form pairs: need images of at least two different tiers, found only: {only}")
    better = np.concatenate([np.repeat(groups[hi], len(groups[lo])) for hi, lo in combos])
    worse = np.concatenate([np.tile(groups[lo], len(groups[hi])) for hi, lo in combos])
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(len(better))
    better, worse = better[order].astype(np.int64), worse[order].astype(np.int64)
    n = len(better)
    labels = np.where(rng.permutation(n) < n // 2, 1, -1).astype(np.int64)
    return np.where(labels == 1, better, worse), np.where(labels == 1, worse, better), labels
