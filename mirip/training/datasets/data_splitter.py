"""DataSplitter: train / val / test splits of *images*, seeded, optionally stratified by tier.

Rows that share a value of ``group_column`` always land in the same split: by default the filename (rows
naming the same image), or a column such as ``student`` or ``scene`` so that no student's drawings are split
between train and test. Groups of several rows are placed by ``group_split`` (tiers kept as close to the
requested shares as whole groups allow; ``get_split_info`` says how close); one row per group keeps the
seed's per-stratum split exactly.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from mirip.training.datasets.group_split import assign_groups, share_gap, tier_counts

SPLIT_NAMES = ("train", "val", "test")

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
        self._gap: Optional[Dict[str, Any]] = None

    def _groups(self, data: pd.DataFrame) -> List[np.ndarray]:
        """Row positions per image; one group per row unless a group column says otherwise."""
        if self.group_column is not None and self.group_column not in data.columns and self.group_column != "filename":
            raise ValueError(f"group column {self.group_column!r} is not a column of the metadata "
                             f"(columns: {', '.join(map(str, data.columns))})")
        if self.group_column is None or self.group_column not in data.columns:
            return [np.array([i]) for i in range(len(data))]
        blank = np.flatnonzero(data[self.group_column].isna().to_numpy())
        if len(blank):
            raise ValueError(f"group column {self.group_column!r} is empty on {len(blank)} row(s) (data rows "
                             f"{', '.join(map(str, blank[:10].tolist()))}, 0-based): every drawing needs its group")
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
        if any(len(rows) > 1 for rows in groups):
            return self._finish(data, self._grouped_parts(data, groups))
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
        return self._finish(data, parts)

    def _grouped_parts(self, data: pd.DataFrame, groups: List[np.ndarray]) -> List[List[int]]:
        """Row positions per split when groups hold several rows: whole groups, tiers balanced by counts."""
        if self.stratify_column is None:
            codes, names = np.zeros(len(data), dtype=np.int64), np.array(["all"])
        else:
            codes, names = pd.factorize(data[self.stratify_column].astype(str), sort=True)
        counts = tier_counts(groups, codes, len(names))
        ratios = (self.train_ratio, self.val_ratio, self.test_ratio)
        part = assign_groups(counts, ratios, self.seed, SPLIT_NAMES,
                             what=f"group column {self.group_column!r} ({len(groups)} groups, {len(data)} rows)")
        self._gap = share_gap(counts, part, ratios, list(names), SPLIT_NAMES)
        return [[r for g in np.flatnonzero(part == i) for r in groups[g].tolist()] for i in range(3)]

    def _finish(self, data: pd.DataFrame, parts: List[List[int]]) -> Tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
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
        if self._gap is not None:
            info["group_balance"] = self._gap
        return info
