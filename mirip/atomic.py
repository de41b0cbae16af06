"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the whole new one, never half."""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable, Union


def write_atomic_with(path: Union[str, os.PathLike], write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: Union[str, os.PathLike], text: str) -> None:
    """Write UTF-8 text atomically."""
    write_atomic_with(path, lambda f: f.write(text.encode("utf-8")))
