"""Reading a metadata CSV the way every script does: UTF-8 (BOM or not), else CP949 with a notice.

Korean Excel saves CSVs as CP949, so a file that is not UTF-8 is tried as CP949 before giving up; the
user is told which encoding was used, and ``--encoding`` chooses one outright. Every error names the file.
"""

from __future__ import annotations

import codecs
import csv
import os
import warnings
from typing import Dict, Hashable, List, Optional, Union

import pandas as pd

FALLBACK_ENCODING = "cp949"


class MetadataError(ValueError):
    """A metadata file that cannot be used; the message names the file, row and column."""


class EncodingNotice(UserWarning):
    """A CSV was not UTF-8 and was read with the fallback encoding."""


# What an empty file should have held, by the ``what`` a reader names its file with.
EXPECTED_LAYOUT = {"metadata": "(e.g. filename,tier) and one row per image",
                   "judgments": "(a,b,winner or winner,loser) and one row per judged pair"}


def read_metadata_csv(path: Union[str, os.PathLike], encoding: Optional[str] = None, what: str = "metadata",
                      **read_csv_kwargs) -> pd.DataFrame:
    """``pd.read_csv`` with encoding detection and errors that say which file and what to do.

    ``frame.attrs["csv_lines"]`` maps each row's index label to the file line it starts on (see ``csv_lines``)."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{what} file not found: {name}")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise MetadataError(f"unknown encoding {encoding!r} for {name} (try utf-8, cp949, euc-kr, latin-1)") from None
        return _read(name, encoding, what, read_csv_kwargs)
    try:
        return _read(name, "utf-8-sig", what, read_csv_kwargs, detecting=True)
    except UnicodeDecodeError as first:
        try:
            frame = _read(name, FALLBACK_ENCODING, what, read_csv_kwargs, detecting=True)
        except UnicodeDecodeError:
            raise MetadataError(f"{what} file {name} is neither UTF-8 nor CP949 text ({first}); "
                                "pass --encoding with the file's encoding (e.g. euc-kr, latin-1)") from None
        warnings.warn(f"{what} file {name} is not UTF-8; read it as CP949 (Korean Windows/Excel). "
                      "Pass --encoding to choose another encoding.", EncodingNotice, stacklevel=2)
        return frame


def csv_lines(frame: pd.DataFrame) -> Optional[Dict[Hashable, int]]:
    """Index label -> the 1-based line of the file its record starts on (the header is line 1), for messages a
    user can find in an editor; None for a frame not read by ``read_metadata_csv`` (or whose lines are unknown)."""
    return frame.attrs.get("csv_lines")


def record_lines(name: str, encoding: str) -> List[int]:
    """The line each data record starts on, counted as pandas' default reader counts records: blank and
    whitespace-only lines are skipped, a quoted cell may span lines."""
    starts, previous = [], 0
    with open(name, newline="", encoding=encoding) as handle:
        reader = csv.reader(handle)
        for row in reader:
            start, previous = previous + 1, reader.line_num
            if len(row) > 1 or (row and row[0].strip()):
                starts.append(start)
    return starts[1:]  # the first record is the header


def _read(name: str, encoding: str, what: str, kwargs: dict, detecting: bool = False) -> pd.DataFrame:
    try:
        frame = pd.read_csv(name, encoding=encoding, **kwargs)
        try:
            lines = record_lines(name, encoding)
        except (csv.Error, UnicodeDecodeError):
            lines = []
        # Only when both readers agree on the records; otherwise messages fall back to row positions.
        if len(lines) == len(frame) and not kwargs.keys() & {"sep", "delimiter", "skiprows", "header", "comment"}:
            frame.attrs["csv_lines"] = dict(zip(frame.index, lines))
        return frame
    except UnicodeDecodeError as exc:
        if detecting:
            raise  # the caller tries the next encoding
        raise MetadataError(f"{what} file {name} is not valid {encoding} text ({exc}); "
                            "pass --encoding with the file's encoding") from None
    except pd.errors.EmptyDataError:
        raise MetadataError(f"{what} file {name} is empty: expected a CSV with a header row "
                            f"{EXPECTED_LAYOUT.get(what, EXPECTED_LAYOUT['metadata'])}") from None
    except pd.errors.ParserError as exc:
        raise MetadataError(f"{what} file {name} is not a readable CSV: {exc}") from None
