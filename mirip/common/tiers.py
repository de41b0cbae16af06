"""Tiers S > A > B > C and their validation."""

from __future__ import annotations

from typing import Hashable, Mapping, Optional

import numpy as np
import pandas as pd

TIERS = ("S", "A", "B", "C")
# Higher rank = better drawing.
TIER_RANK = {"S": 3, "A": 2, "B": 1, "C": 0}
# One colour per tier in every plot and report, four hues apart (not two greens) so S and A are told apart
# at a glance: blue, green, orange, red from best to worst.
TIER_COLOURS = {"S": "#2166ac", "A": "#4dac26", "B": "#f1a340", "C": "#b2182b"}
SHOWN_BAD_ROWS = 20  # a file with thousands of bad tiers lists this many, then the count


def tier_ranks(metadata: pd.DataFrame, tier_column: str = "tier",
               lines: Optional[Mapping[Hashable, int]] = None) -> np.ndarray:
    """Rank per row (S=3 ... C=0); lower case and surrounding spaces are accepted (`` a `` is A).

    Every bad value is found before raising ``ValueError: Invalid tier value ...``, which lists the first
    ``SHOWN_BAD_ROWS`` of them and the count. ``lines`` (index label -> file line, ``metadata_csv.csv_lines``)
    names rows by the line of the CSV they are on; without it, by the DataFrame's index label."""
    if tier_column not in metadata.columns:
        raise ValueError(f"metadata has no tier column {tier_column!r} (columns: {', '.join(map(str, metadata.columns))})")
    ranks = np.empty(len(metadata), dtype=np.int64)
    bad = []
    for pos, (row, value) in enumerate(metadata[tier_column].items()):
        key = value.strip().upper() if isinstance(value, str) else value
        if key in TIER_RANK:
            ranks[pos] = TIER_RANK[key]
        else:
            bad.append((row, value))
    if bad:
        raise ValueError(_invalid_tiers_message(bad, len(metadata), tier_column, lines))
    return ranks


def _invalid_tiers_message(bad: list, rows: int, tier_column: str, lines: Optional[Mapping[Hashable, int]]) -> str:
    def where(row: Hashable) -> str:
        return f"line {lines[row]}" if lines is not None and row in lines else f"row {row!r} (index label)"

    def shown(value) -> str:
        if value is None or (isinstance(value, float) and value != value) or value == "":
            return "empty"  # pandas reads an empty cell as NaN, or "" with keep_default_na=False
        return f"empty ({value!r})" if isinstance(value, str) and not value.strip() else repr(value)

    listed = "; ".join(f"{where(row)}: {shown(value)}" for row, value in bad[:SHOWN_BAD_ROWS])
    more = f"; ... and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
    return (f"Invalid tier value in {len(bad)} of {rows} row(s), column {tier_column!r}: {listed}{more}. "
            "Use one of S/A/B/C (lower case and surrounding spaces are accepted)")


def rank_to_tier(rank: int) -> str:
    return TIERS[3 - int(rank)]
