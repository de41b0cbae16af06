"""The feature cache's errors, and the one-line messages for what HDF5 reports when it cannot open or read a file."""

from __future__ import annotations

import errno
from typing import List, Optional, Sequence


class CacheError(ValueError):
    """A cache file that is missing, unreadable, or inconsistent with what a run needs."""


class CacheInUse(CacheError):
    """Another process holds the cache open (HDF5's file lock)."""


class CacheDamaged(CacheError):
    """Rows whose stored bytes no longer match their checksums; ``rows`` lists them."""

    def __init__(self, message: str, rows: Sequence[int] = ()):
        super().__init__(message)
        self.rows = list(rows)


class CacheWriteError(CacheError):
    """Writing to the cache failed (a full disk, an I/O error); the committed rows are intact."""

    def __init__(self, message: str, committed: int = 0, cause: Optional[BaseException] = None):
        super().__init__(message)
        self.committed, self.cause = committed, cause


def rows_text(rows: Sequence[int], paths: Optional[Sequence[str]] = None, limit: int = 10) -> str:
    shown = [f"{r} ({paths[r]})" if paths is not None and r < len(paths) else str(r) for r in rows[:limit]]
    return ", ".join(shown) + (f" ... ({len(rows)} in all)" if len(rows) > limit else "")


def describe_os_error(path: str, exc: BaseException) -> CacheError:
    """One line for an HDF5 failure to open or read ``path``: in use (file lock) or damaged."""
    text = str(exc)
    if getattr(exc, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in text:
        return CacheInUse(f"feature cache {path} is in use by another process (HDF5 file lock held, e.g. by a "
                          "running extraction): wait for it to finish, or, to extract now, choose another --output")
    first = text.splitlines()[0] if text else type(exc).__name__
    return CacheError(f"cannot read feature cache {path}: the file is damaged or not a readable HDF5 file ({first}); "
                      "re-extract it (scripts/extract.py --overwrite), or restore it from a backup")


def list_text(items: List[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")
