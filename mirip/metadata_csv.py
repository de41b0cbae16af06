"""Reading a metadata CSV the way every script does: UTF-8 (BOM or not), else CP949 with a notice.

Korean Excel saves CSVs as CP949, so a file that is not UTF-8 is tried as CP949 before giving up; the
user is told which encoding was used, and ``--encoding`` chooses one outright. Every error names the file.
"""

from __future__ import annotations

import codecs
import os
import warnings
from typing import Optional, Union

import pandas as pd

FALLBACK_ENCODING = "cp949"


class MetadataError(ValueError):
    """A metadata file that cannot be used; the message names the file, row and column."""


class EncodingNotice(UserWarning):
    """A CSV was not UTF-8 and was read with the fallback encoding."""


def read_metadata_csv(path: Union[str, os.PathLike], encoding: Optional[str] = None, what: str = "metadata",
                      **read_csv_kwargs) -> pd.DataFrame:
    """``pd.read_csv`` with encoding detection and errors that say which file and what to do."""
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


def _read(name: str, encoding: str, what: str, kwargs: dict, detecting: bool = False) -> pd.DataFrame:
    try:
        return pd.read_csv(name, encoding=encoding, **kwargs)
    except UnicodeDecodeError as exc:
        if detecting:
            raise  # the caller tries the next encoding
        raise MetadataError(f"{what} file {name} is not valid {encoding} text ({exc}); "
                            "pass --encoding with the file's encoding") from None
    except pd.errors.EmptyDataError:
        raise MetadataError(f"{what} file {name} is empty: expected a CSV with a header row "
                            "(e.g. filename,tier) and one row per image") from None
    except pd.errors.ParserError as exc:
        raise MetadataError(f"{what} file {name} is not a readable CSV: {exc}") from None
