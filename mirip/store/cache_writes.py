"""Durable writes to a feature cache: fsync before commit, a reserve for a full disk, crash-safe string slots.

Rows are committed by ``num_rows``: data and checksums are written, flushed and fsync'ed first, the counter
last, so a process killed (or a disk that fills) mid-write leaves every committed row intact and the
uncommitted tail is simply overwritten by the next append. While a writer has the file open it holds a
*reserve* file beside it (``<cache>.tmp-<host>-<pid>-reserve``): when the disk fills, the reserve is deleted so
HDF5 can still close the file cleanly, and the error says how many rows are committed. Every write goes
through ``guarded_write``, which turns HDF5's and the OS's errors into one ``CacheWriteError``.
"""

from __future__ import annotations

import errno
import os

import h5py
import numpy as np

from mirip.common.atomic import remove_stale_temps, temp_prefix
from mirip.store.cache_errors import CacheWriteError


class DurableWrites:
    """The write discipline of a ``FeatureCache`` (over ``self.h5``, ``self.path`` and ``self.num_rows``)."""

    def _hold(self) -> None:
        """Keep every dataset of a writable file open while it is open.

        HDF5 writes a dataset's cached chunks when its last handle closes; ``h5["x"][...] = v`` opens and closes a
        handle, and an error at that close (a full disk) is only printed by h5py, never raised, so the row counter
        would then commit rows whose bytes never reached the disk. Held open, chunks are written by our own
        ``flush`` (whose errors are raised) or at ``close``."""
        self._held = []
        if self.h5.mode == "r+":
            self.h5.visititems(lambda _, obj: self._held.append(obj) if isinstance(obj, h5py.Dataset) else None)

    def _durable_flush(self) -> None:
        self.h5.flush()
        # HDF5's flush hands the bytes to the OS only; fsync makes them survive a crash of the machine too.
        os.fsync(self.h5.id.get_vfd_handle())

    def _commit(self, **counters: int) -> None:
        self._durable_flush()  # data and checksums first ...
        for k, v in counters.items():
            self.h5.attrs[k] = int(v)
        self._durable_flush()  # ... then the counter that makes them visible

    def _reserve_bytes(self) -> int:
        """Room HDF5 needs to close the file after a failed write: its dirty chunks and metadata (~2x the
        chunks a batch touches, plus 1 MiB), at most 64 MiB."""
        total = 0
        for name, ds in self.h5.items():
            if isinstance(ds, h5py.Dataset) and ds.chunks:
                columns = -(-ds.shape[-1] // ds.chunks[-1]) if ds.ndim > 1 else 1
                total += int(np.prod(ds.chunks)) * max(ds.dtype.itemsize, 16) * columns
        return min(64 << 20, 2 * total + (1 << 20))

    def _ensure_reserve(self) -> None:
        """Hold a reserve file beside the cache while writing (see the module docstring)."""
        if getattr(self, "_reserve", None) or self.h5.mode != "r+":
            return
        remove_stale_temps(self.path)
        reserve = os.path.join(os.path.dirname(os.path.abspath(self.path)), temp_prefix(self.path, hidden=False) + "reserve")
        size = self._reserve_bytes()
        try:
            fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                        raise
                    os.write(fd, b"\0" * size)  # a filesystem without fallocate: really write the blocks
            finally:
                os.close(fd)
        except OSError as exc:
            if os.path.exists(reserve):
                os.remove(reserve)
            raise CacheWriteError(f"cannot write to feature cache {self.path}: {exc.strerror or exc} while setting "
                                  f"aside {size / 2**20:.1f} MiB to close the file safely; free space on "
                                  f"{os.path.dirname(os.path.abspath(self.path))} and rerun to continue "
                                  f"({self.num_rows} rows committed)", self.num_rows, exc) from None
        self._reserve = reserve
        self._rows_at_open = getattr(self, "_rows_at_open", self.num_rows)

    def _drop_reserve(self) -> None:
        reserve, self._reserve = getattr(self, "_reserve", None), None
        if reserve and os.path.exists(reserve):
            os.remove(reserve)

    def _write_failed(self, exc: BaseException) -> CacheWriteError:
        """Close the file after a failed write (freeing the reserve so HDF5 can) and describe what happened."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            st = os.statvfs(directory)  # before the reserve goes: what the user has to work with
            free = f" ({st.f_bavail * st.f_frsize / 2**20:.1f} MiB free)"
        except OSError:
            free = ""
        self._drop_reserve()
        committed = int(self.h5.attrs["num_rows"]) if self.h5.id.valid else self.num_rows
        self._held = []
        try:
            self.h5.close()
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        added = committed - getattr(self, "_rows_at_open", committed)
        full = getattr(exc, "errno", None) == errno.ENOSPC or "errno = 28" in str(exc) or "No space left" in str(exc)
        if full:
            what = (f"the disk holding it is full: No space left on device{free}. {committed} rows are committed "
                    f"and intact ({added} added by this run); free space on {directory} and rerun the same command "
                    f"to continue where it stopped")
        else:
            what = (f"{text}. {committed} rows are committed and intact ({added} added by this run); fix the cause "
                    "and rerun the same command to continue where it stopped")
        return CacheWriteError(f"writing feature cache {self.path} failed: {what}", committed, exc)

    def guarded_write(self, write) -> None:
        """Run ``write()`` (any change to the open file) with the reserve in place; an OSError or HDF5 error
        closes the file and comes back as one ``CacheWriteError`` that says how many rows are committed."""
        self._ensure_reserve()
        try:
            write()
        except (OSError, RuntimeError) as exc:
            raise self._write_failed(exc) from None

    def set_attribute(self, name: str, value) -> None:
        """Store a file attribute (e.g. extraction's ``extract_config``) under ``guarded_write``: a disk already
        full says so in one line, with the reserve in place."""
        self.guarded_write(lambda: self.h5.attrs.__setitem__(name, value))

    def _clear_dangling(self, name: str, keep: int) -> None:
        """Make rows ``keep:`` of a string dataset safe to overwrite.

        A process killed mid-flush can leave string slots past the committed rows pointing into heap space that
        never reached the disk; overwriting such a slot fails inside HDF5 ("bad heap index"). Reading the slots
        first tells: when they cannot be read, the dataset is rebuilt from its first ``keep`` (committed, hence
        intact) rows under a new name and moved into place."""
        ds = self.h5[name]
        try:
            ds[keep:]
            return
        except (OSError, RuntimeError):
            pass
        kept = ds[:keep]
        group, base = name.rpartition("/")[0], name.rpartition("/")[2]
        parent = self.h5[group] if group else self.h5
        staged = base + ".rebuilt"
        if staged in parent:
            del parent[staged]
        new = parent.create_dataset(staged, ds.shape, dtype=ds.dtype, maxshape=ds.maxshape, chunks=ds.chunks)
        new[:keep] = kept
        self._durable_flush()
        self._held = [d for d in self._held if d.name != ds.name]
        del parent[base]
        parent.move(staged, base)  # a kill between these two lines is finished by ``_finish_rebuilds``
        self._hold()

    def _finish_rebuilds(self) -> None:
        for group in (self.h5, self.h5.get("failed")):
            for name in list(group or []):
                if name.endswith(".rebuilt"):
                    base = name[: -len(".rebuilt")]
                    if base in group:
                        del group[name]  # the rebuild did not get as far as deleting the original
                    else:
                        group.move(name, base)

