"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the whole new one, never half."""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import tempfile
import time
from typing import BinaryIO, Callable, Iterator, List, Union

# A temporary file is named ``<target>.tmp-<host>-<pid>-<random>`` (hidden, beside its target): a later run can
# tell whose it is, and removes it only when that process is gone (same host, pid no longer running). A temp
# file of another host (a shared filesystem) is left alone unless it is older than STALE_FOREIGN_SECONDS.
STALE_FOREIGN_SECONDS = 7 * 24 * 3600


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def temp_prefix(path: Union[str, os.PathLike], hidden: bool = True) -> str:
    """The name prefix of this process's temporary files for ``path`` (``.best.pt.tmp-host-1234-``)."""
    name = os.path.basename(os.fspath(path))
    return f"{'.' if hidden else ''}{name}.tmp-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_stale(tmp: str, now: float) -> bool:
    """Whether a ``*.tmp-<host>-<pid>-*`` file was left by a process that no longer runs."""
    tail = tmp.rsplit(".tmp-", 1)[-1].split("-")
    if len(tail) == 1 and tail[0].isdigit():  # ``<cache>.tmp-<pid>``, the name before hosts were recorded
        tail = [_host(), tail[0]]
    if len(tail) < 2 or not tail[1].isdigit():
        return False  # not named by this module: not ours to judge
    host, pid = tail[0], int(tail[1])
    if host != _host():
        try:
            return now - os.path.getmtime(tmp) > STALE_FOREIGN_SECONDS
        except OSError:
            return False
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale_temps(path: Union[str, os.PathLike]) -> List[str]:
    """Remove temporary files of ``path`` (``.<name>.tmp-*`` and ``<name>.tmp-*`` beside it) left by an
    interrupted write whose process is gone; a live writer's temp file is never touched. Returns the removed."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    removed, now = [], time.time()
    for pattern in (f".{glob.escape(name)}.tmp-*", f"{glob.escape(name)}.tmp-*"):
        for tmp in glob.glob(os.path.join(glob.escape(directory), pattern)):
            if _is_stale(tmp, now):
                try:
                    os.remove(tmp)
                    removed.append(tmp)
                except FileNotFoundError:
                    pass  # another run cleaned it first
    return removed


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
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A failed write removes its temporary file; temporary files of ``path`` left by killed processes are
    removed first (``remove_stale_temps``), so interrupted runs do not pile them up."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=directory)
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
