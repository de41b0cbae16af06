"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the whole new one, never half."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Callable, Iterator, Union


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic_with(path: Union[str, os.PathLike], write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        # mkstemp makes the file 0600; the result should have the mode open() would give it (0644 at umask 022).
        os.fchmod(fd, 0o666 & ~current_umask())
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


@contextlib.contextmanager
def output_directory(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Create ``path`` (and missing parents) for a run's outputs; if the run fails, remove what this created
    and left empty, so a failed run leaves no empty output directory behind. Existing directories are kept."""
    path = os.path.abspath(os.fspath(path))
    created = []
    probe = path
    while not os.path.exists(probe):
        created.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    except BaseException:
        for d in created:  # deepest first
            try:
                os.rmdir(d)  # only succeeds when empty
            except OSError:
                break
        raise
