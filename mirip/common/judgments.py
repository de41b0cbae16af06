"""Teachers' judged pairs on disk: ``a,b,winner`` (winner ``a``, ``b`` or ``tie``) or ``winner,loser``, with
optional ``judge`` and ``time`` columns.

Read with the metadata CSV's rules (``mirip.common.metadata_csv``: UTF-8 or CP949, line-numbered errors) and
the metadata's path normalisation (``./x.png`` and ``x.png`` are one image). Every bad row is reported at once
- a self-pair, a bad winner, an empty or escaping path, an image outside the run - so a teacher fixes the file
in one pass. A pair judged twice is kept twice: repeated evidence, counted in ``frame.attrs["repeats"]``.
"""

from __future__ import annotations

import csv
import os
from typing import Dict, Iterable, List, Mapping, Optional, Set, Union

import pandas as pd

from mirip.common.metadata_csv import MetadataError, csv_lines, read_metadata_csv
from mirip.common.paths import normalize_relpath

JUDGMENT_COLUMNS = ("a", "b", "winner", "judge", "time")
WINNERS = ("a", "b", "tie")
SHOWN_PROBLEMS = 20


class JudgmentsError(MetadataError):
    """A judgments file that cannot be used; the message lists every bad row with its line."""


def _layout(columns: List[str], name: str) -> str:
    """``pair`` (a,b,winner) or ``winner_loser``; refuses a header that is neither."""
    cols = set(columns)
    if {"a", "b", "winner"} <= cols:
        return "pair"
    if {"winner", "loser"} <= cols:
        return "winner_loser"
    raise JudgmentsError(f"judgments file {name}: columns {', '.join(columns) or '(none)'}; expected a,b,winner "
                         "(winner is a, b or tie) or winner,loser, each optionally with judge and time")


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value).strip()


def _row(record: Mapping, layout: str) -> Dict[str, str]:
    if layout == "pair":
        return {"a": _cell(record.get("a")), "b": _cell(record.get("b")), "winner": _cell(record.get("winner")).lower()}
    return {"a": _cell(record.get("winner")), "b": _cell(record.get("loser")), "winner": "a"}


def _check_row(row: Dict[str, str], where: str, known: Optional[Set[str]], problems: List[str]) -> bool:
    """Normalises the row's paths in place; appends what is wrong with it to ``problems``."""
    before = len(problems)
    for key in ("a", "b"):
        if not row[key]:
            problems.append(f"{where}: empty image path in column {key!r}")
            continue
        try:
            row[key] = normalize_relpath(row[key])
        except ValueError as exc:  # MetadataError and PathEscapeError alike
            problems.append(f"{where}: {exc}")
            continue
        if known is not None and row[key] not in known:
            problems.append(f"{where}: image {row[key]!r} is not in the metadata or the feature cache")
    if row["winner"] not in WINNERS:
        problems.append(f"{where}: winner {row['winner']!r} is not a, b or tie")
    if row["a"] and row["a"] == row["b"]:
        problems.append(f"{where}: {row['a']!r} is judged against itself")
    return len(problems) == before


def read_judgments(path: Union[str, os.PathLike], *, encoding: Optional[str] = None,
                   known: Optional[Iterable[str]] = None) -> pd.DataFrame:
    """The judged pairs as a frame with ``JUDGMENT_COLUMNS`` (paths normalised, winner in a/b/tie; judge and
    time empty strings where the file has none), in file order.

    ``known``: the image names a pair may use (the run's metadata and cache); any other is refused.
    ``frame.attrs["repeats"]`` counts rows repeating an earlier row's pair (either order)."""
    name = os.fspath(path)
    raw = read_metadata_csv(name, encoding, what="judgments", dtype=str, keep_default_na=False)
    layout = _layout([str(c).strip() for c in raw.columns], name)
    raw.columns = [str(c).strip() for c in raw.columns]
    lines = csv_lines(raw) or {}
    known_set = set(known) if known is not None else None
    rows, problems = [], []
    for label, record in raw.iterrows():
        where = f"line {lines[label]}" if label in lines else f"data row {label} (0-based)"
        row = _row(record, layout)
        if _check_row(row, where, known_set, problems):
            row.update(judge=_cell(record.get("judge")), time=_cell(record.get("time")))
            rows.append(row)
    if problems:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = f"\n  ... ({len(problems)} problems in all)" if len(problems) > SHOWN_PROBLEMS else ""
        raise JudgmentsError(f"judgments file {name} has {len(problems)} problem(s):\n  {shown}{more}")
    if not rows:
        raise JudgmentsError(f"judgments file {name} holds no judged pairs")
    frame = pd.DataFrame(rows, columns=list(JUDGMENT_COLUMNS))
    keys = [frozenset((a, b)) for a, b in zip(frame["a"], frame["b"])]
    frame.attrs["repeats"] = len(keys) - len(set(keys))
    return frame


def write_judgments_csv(path: Union[str, os.PathLike], rows: Iterable[Mapping]) -> int:
    """Write ``rows`` (dicts with ``JUDGMENT_COLUMNS`` keys; judge and time may be missing) as a judgments CSV
    that ``read_judgments`` reads back; returns how many rows were written."""
    count = 0
    with open(os.fspath(path), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(JUDGMENT_COLUMNS)
        for row in rows:
            if row.get("winner") not in WINNERS:
                raise ValueError(f"judgment {dict(row)!r}: winner must be one of {', '.join(WINNERS)}")
            writer.writerow(["" if row.get(k) is None else row.get(k) for k in JUDGMENT_COLUMNS])
            count += 1
    return count
