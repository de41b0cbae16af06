"""DataSplitter: train / val / test splits of *images*, seeded, optionally stratified by tier.

Rows that name the same image (``group_column``, the filename by default) always
land in the same split, so no image - and hence no pair - is shared between splits.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd


def _split_counts(n: int, ratios: Tuple[float, float, float]) -> Tuple[int, int, int]:
    """Largest-remainder rounding: counts that add up to n and are as close to n * ratio as possible."""
    exact = np.array(ratios, dtype=np.float64) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return int(counts[0]), int(counts[1]), int(counts[2])


def _stratified_counts(sizes: List[int], ratios: Tuple[float, float, float]) -> List[Tuple[int, int, int]]:
    """Per-stratum split counts whose column totals equal the unstratified split of sum(sizes).

    Rounding each stratum on its own can starve a split: five images per tier at 80/10/10
    gives every tier (4, 1, 0) and an empty test split. Instead each stratum gets the floor
    of its share, and the leftover images go, largest fraction first, to splits still
    short of their overall target.
    """
    exact = np.outer(sizes, ratios)
    counts = np.floor(exact).astype(int)
    need = np.array(_split_counts(int(sum(sizes)), ratios)) - counts.sum(axis=0)
    spare = np.array(sizes) - counts.sum(axis=1)
    order = sorted(np.ndindex(*counts.shape), key=lambda si: -(exact[si] - counts[si]))
    for strict in (True, False):  # second pass: whatever is left goes where a split is still short, or anywhere
        for s, i in order:
            if spare[s] > 0 and (need[i] > 0 or not strict and need.max() <= 0):
                counts[s, i] += 1
                spare[s] -= 1
                need[i] -= 1
    return [tuple(int(c) for c in row) for row in counts]


class DataSplitter:
    """Split a metadata frame into (train_df, val_df, test_df); each keeps the original index and row order."""

    def __init__(
        self,
        train_ratio: float = 0.8,
        val_ratio: float = 0.1,
        test_ratio: float = 0.1,
        seed: int = 42,
        stratify_column: Optional[str] = None,
        group_column: Optional[str] = "filename",
    ):
        ratios = (train_ratio, val_ratio, test_ratio)
        assert abs(sum(ratios) - 1.0) < 1e-6, (
            f"Ratios must sum to 1.0 (train {train_ratio} + val {val_ratio} + test {test_ratio} = {sum(ratios)})"
        )
        assert min(ratios) >= 0, f"Ratios must be non-negative, got train {train_ratio}, val {val_ratio}, test {test_ratio}"
        self.train_ratio, self.val_ratio, self.test_ratio = float(train_ratio), float(val_ratio), float(test_ratio)
        self.seed = int(seed)
        self.stratify_column = stratify_column
        self.group_column = group_column
        self._sizes: Optional[Dict[str, int]] = None

    def _groups(self, data: pd.DataFrame) -> List[np.ndarray]:
        """Row positions per image; one group per row unless a group column says otherwise."""
        if self.group_column is None or self.group_column not in data.columns:
            return [np.array([i]) for i in range(len(data))]
        codes, _ = pd.factorize(data[self.group_column].astype(str), sort=False)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        return np.split(order, bounds)

    def split(self, data: pd.DataFrame) -> Tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        if self.stratify_column is not None and self.stratify_column not in data.columns:
            raise ValueError(
                f"stratify_column {self.stratify_column!r} is not a column of the data "
                f"(columns: {', '.join(map(str, data.columns))})"
            )
        groups = self._groups(data)
        if self.stratify_column is None:
            strata = {None: list(range(len(groups)))}
        else:
            # A group's stratum is its first row's value (rows of one image share a tier in valid data).
            values = data[self.stratify_column].astype(str).to_numpy()
            strata: Dict[Any, List[int]] = {}
            for g, rows in enumerate(groups):
                strata.setdefault(values[rows[0]], []).append(g)
        rng = np.random.default_rng(self.seed)
        parts: List[List[int]] = [[], [], []]
        keys = sorted(strata, key=str)
        counts = _stratified_counts([len(strata[k]) for k in keys], (self.train_ratio, self.val_ratio, self.test_ratio))
        for key, (n_train, n_val, _) in zip(keys, counts):
            members = np.array(strata[key])[rng.permutation(len(strata[key]))]
            for part, chosen in zip(parts, np.split(members, [n_train, n_train + n_val])):
                for g in chosen:
                    part.extend(groups[g].tolist())
        frames = tuple(data.iloc[np.sort(np.array(p, dtype=np.int64))] for p in parts)
        self._sizes = {name: len(f) for name, f in zip(("train_size", "val_size", "test_size"), frames)}
        return frames  # type: ignore[return-value]

    def get_split_info(self) -> Dict[str, Any]:
        info: Dict[str, Any] = {
            "train_ratio": self.train_ratio,
            "val_ratio": self.val_ratio,
            "test_ratio": self.test_ratio,
            "seed": self.seed,
            "stratify_column": self.stratify_column,
            "group_column": self.group_column,
        }
        if self._sizes is not None:
            info.update(self._sizes)
        return info
