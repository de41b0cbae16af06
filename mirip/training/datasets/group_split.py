"""Splits by group (a student, a scene, a class): every drawing of a group lands in one part, tiers kept as
close to the requested shares as whole groups allow.

A group is a unit of the split, not a row: with several drawings by one student, putting some in train and
some in test lets the head recognise the student rather than judge the drawing, and flatters every metric.
Groups are placed largest first (ties in a seeded order), each into the part whose tier counts it brings
closest to their targets (least squares, per unit of ratio), so mixed-tier groups and uneven sizes are
handled alike.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


class GroupSplitError(ValueError):
    """The groups cannot fill the requested parts (too few, or one too large)."""


def tier_counts(groups: Sequence[np.ndarray], strata: np.ndarray, n_strata: int) -> np.ndarray:
    """(groups, strata) counts: how many rows of each stratum every group holds."""
    counts = np.zeros((len(groups), n_strata), dtype=np.int64)
    for g, rows in enumerate(groups):
        np.add.at(counts[g], strata[rows], 1)
    return counts


def assign_groups(counts: np.ndarray, ratios: Sequence[float], seed: int, names: Sequence[str],
                  what: str = "group column") -> np.ndarray:
    """The part (index into ``ratios``) of each group, given its per-stratum row ``counts``.

    Refuses, naming the part and the groups, when a part with a positive ratio would stay empty."""
    ratios = np.asarray(ratios, dtype=np.float64)
    active = np.flatnonzero(ratios > 0)
    if len(counts) < len(active):
        raise GroupSplitError(
            f"{what}: {len(counts)} group(s) cannot fill {len(active)} parts ("
            + ", ".join(f"{names[i]} {ratios[i]:g}" for i in active) + "); every group goes whole into one part. "
            "Use fewer parts (a ratio of 0) or more groups")
    # The part sizes are a target too (the last column): otherwise every tier would round the same way.
    counts = np.concatenate([counts, counts.sum(axis=1, keepdims=True)], axis=1)
    target = ratios[:, None] * counts.sum(axis=0)[None, :]
    have = np.zeros_like(target)
    order = np.random.default_rng(seed).permutation(len(counts))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    part = np.empty(len(counts), dtype=np.int64)
    for placed, g in enumerate(order):
        empty = [i for i in active if have[i, -1] == 0]
        # Once the groups left are only just enough for the parts still empty, each must open one of them.
        candidates = empty if empty and len(order) - placed <= len(empty) else list(active)
        # The part where adding the group shrinks the squared shortfall of its tier counts the most, the
        # shortfall weighted by 1 / ratio so small parts (val, test) count as much as train per image.
        c = counts[g].astype(np.float64)
        cost = [(0.5 * float(c @ c) - float(c @ (target[i] - have[i]))) / ratios[i] for i in candidates]
        best = candidates[int(np.argmin(cost))]
        part[g] = best
        have[best] += counts[g]
    for i in active:
        if have[i, -1] == 0:
            raise GroupSplitError(f"{what}: no group left for the {names[i]} part (ratio {ratios[i]:g})")
    return part


def share_gap(counts: np.ndarray, part: np.ndarray, ratios: Sequence[float], strata_names: Sequence[str],
              names: Sequence[str]) -> Dict[str, object]:
    """How far the split is from the request: per part its share of the rows against the ratio, and the largest
    gap between a part's tier shares and the whole data's (in percentage points)."""
    total = counts.sum(axis=0)
    whole = total / max(total.sum(), 1)
    out: Dict[str, object] = {"parts": {}, "max_tier_share_gap": 0.0, "max_size_gap": 0.0}
    for i, name in enumerate(names):
        rows = counts[part == i].sum(axis=0)
        n = int(rows.sum())
        shares = rows / n if n else np.zeros_like(whole)
        tier_gap = float(np.abs(shares - whole).max()) if n else 0.0
        size_gap = abs(n / max(total.sum(), 1) - float(ratios[i]))
        out["parts"][name] = {"rows": n, "groups": int((part == i).sum()), "share": n / max(total.sum(), 1),
                              "tier_shares": {str(s): float(v) for s, v in zip(strata_names, shares)}}
        out["max_tier_share_gap"] = max(out["max_tier_share_gap"], tier_gap)
        out["max_size_gap"] = max(out["max_size_gap"], size_gap)
    return out


def describe_gap(gap: Dict[str, object], column: str) -> str:
    """One line for a run's summary: the groups per part and how far the shares landed from the request."""
    parts = "; ".join(f"{name} {p['rows']} images in {p['groups']} groups" for name, p in gap["parts"].items())
    return (f"split by {column!r}: {parts}; part sizes within {100 * gap['max_size_gap']:.1f} points of the "
            f"ratios, tier shares within {100 * gap['max_tier_share_gap']:.1f} points of the whole data's")


def group_folds(counts: np.ndarray, k: int, seed: int, what: str = "group column") -> List[np.ndarray]:
    """``k`` folds of groups (group indices per fold), tier-balanced as whole groups allow."""
    part = assign_groups(counts, [1.0 / k] * k, seed, [f"fold {i + 1}" for i in range(k)], what)
    return [np.flatnonzero(part == i) for i in range(k)]
