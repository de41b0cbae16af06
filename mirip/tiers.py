"""Tiers S > A > B > C and their validation."""

from __future__ import annotations

import numpy as np
import pandas as pd

TIERS = ("S", "A", "B", "C")
# Higher rank = better drawing.
TIER_RANK = {"S": 3, "A": 2, "B": 1, "C": 0}


def tier_ranks(metadata: pd.DataFrame, tier_column: str = "tier") -> np.ndarray:
    """Rank per row (S=3 ... C=0); ``ValueError: Invalid tier value`` names the first bad row and value."""
    if tier_column not in metadata.columns:
        raise ValueError(f"metadata has no tier column {tier_column!r} (columns: {', '.join(map(str, metadata.columns))})")
    ranks = np.empty(len(metadata), dtype=np.int64)
    for pos, (row, value) in enumerate(metadata[tier_column].items()):
        key = value.strip().upper() if isinstance(value, str) else value
        if key not in TIER_RANK:
            raise ValueError(
                f"Invalid tier value {value!r} in row {row} (column {tier_column!r}); use one of S/A/B/C"
            )
        ranks[pos] = TIER_RANK[key]
    return ranks


def rank_to_tier(rank: int) -> str:
    return TIERS[3 - int(rank)]
