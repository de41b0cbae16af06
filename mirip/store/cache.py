"""The HDF5 feature cache: the contract between stage one (extract) and stage two (train, sweep, score).

``FeatureCache`` is one face over the cache's roles, each in a module of its own:

    cache_layout.py     the file's layout (datasets, attributes, formats 1-3) and everything that reads it
    cache_integrity.py  CRC-32 checksums per row and entry, per path and per view; finding damaged rows
    cache_writes.py     durable writes: fsync before the commit, the full-disk reserve, crash-left string slots
    cache_errors.py     CacheError and its kinds (in use, damaged, a failed write), one line each

This module opens and creates caches and holds the operations that change rows (``append``, ``replace``,
``rewrite_paths``, ``set_failures``): each an ordered sequence of writes run by ``guarded_write``.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np

from mirip.common.atomic import remove_stale_temps, temp_prefix
from mirip.store.cache_errors import CacheError, CacheInUse, describe_os_error
from mirip.store.cache_integrity import CacheIntegrity, crc_paths, crc_rows
from mirip.store.cache_layout import FAILED_FIELDS, ROW_FIELDS, CacheReading, build_empty
from mirip.store.cache_writes import DurableWrites

__all__ = ["FeatureCache", "open_cache", "write_cache"]


class FeatureCache(CacheReading, CacheIntegrity, DurableWrites):
    """An open feature cache. Use ``FeatureCache.create`` to start one and ``open_cache`` to read one."""

    def __init__(self, h5: h5py.File, path: str):
        self.h5, self.path = h5, path
        self._paths: Optional[List[str]] = None
        self._index: Optional[Dict[str, int]] = None
        self._hold()

    # --- opening -------------------------------------------------------------------------------
    # The empty file's layout (cache_layout); a class attribute, so a test can make the build fail.
    _build = staticmethod(build_empty)

    @classmethod
    def create(cls, path: str, fingerprint: Mapping, overwrite: bool = False) -> "FeatureCache":
        """A new, empty, writable cache; refuses to replace an existing file unless ``overwrite``."""
        if os.path.exists(path) and not overwrite:
            raise CacheError(f"cache {path} already exists; open it to append, or pass overwrite=True to start over")
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        if os.path.exists(path):
            # Replacing a file another process is writing would pull it from under that process.
            try:
                h5py.File(path, "r").close()
            except OSError as exc:
                if isinstance(describe_os_error(path, exc), CacheInUse):
                    raise describe_os_error(path, exc) from None
        remove_stale_temps(path)
        # Built under a temporary name and renamed: a kill mid-create never leaves a half-made cache behind
        # (and a later run removes such a leftover once its process is gone).
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), temp_prefix(path, hidden=False) + "h5")
        try:
            cls._build(tmp, fingerprint)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return cls(h5py.File(path, "a"), path)

    @classmethod
    def open(cls, path: str, mode: str = "r") -> "FeatureCache":
        if not os.path.isfile(path):
            raise CacheError(f"feature cache not found: {path} (make one with `python scripts/extract.py`)")
        try:
            h5 = h5py.File(path, mode)
        except OSError as exc:
            raise describe_os_error(path, exc) from None
        if mode != "r":
            remove_stale_temps(path)
        try:
            if mode != "r":
                cls(h5, path)._finish_rebuilds()
            ok = "features" in h5 and "num_rows" in h5.attrs and "fingerprint_keys" in h5.attrs
            if ok:  # touch what every run reads first, so a damaged object header is caught here, in one line
                h5["features"].shape, h5["paths"].shape, h5.attrs["num_rows"], h5.attrs["fingerprint_keys"]
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            h5.close()
            raise describe_os_error(path, exc) from None
        if not ok:
            h5.close()
            raise CacheError(f"{path} is an HDF5 file but not a mirip feature cache (no features / fingerprint)")
        return cls(h5, path)

    def close(self) -> None:
        self._held = []
        if self.h5.id.valid:
            try:
                self.h5.close()
            except (OSError, RuntimeError) as exc:
                raise self._write_failed(exc) from None
        self._drop_reserve()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- changing rows (each an ordered sequence of writes, run by guarded_write) ---------------------
    def _check_views(self, views: Optional[np.ndarray], k: int) -> Optional[np.ndarray]:
        if self.num_views == 0:
            if views is not None:
                raise ValueError(f"{self.path} was created without augmented views; cannot store views")
            return None
        if views is None:
            raise ValueError(f"{self.path} stores {self.num_views} augmented views per image; pass views=")
        views = np.asarray(views)
        if views.shape != (k, self.num_views, self.dim):
            raise ValueError(f"expected views of shape ({k}, {self.num_views}, {self.dim}), got {views.shape}")
        return views

    def append(self, paths: Sequence[str], features: np.ndarray, sizes: Sequence[int], mtimes: Sequence[int],
               views: Optional[np.ndarray] = None) -> range:
        """Add rows for new images and commit them; returns the new rows."""
        features = np.asarray(features)
        n, k = self.num_rows, len(paths)
        if features.shape != (k, self.dim):
            raise ValueError(f"expected features of shape ({k}, {self.dim}), got {features.shape}")
        views = self._check_views(views, k)
        self.row_of("")  # builds the index once
        known = self._index
        dup = [p for p in paths if p in known]
        if dup or len(set(paths)) != k:
            raise CacheError(f"paths already cached (use replace): {dup[:5] or 'duplicates within the batch'}")
        features = features.astype(self.dtype, copy=False)
        views = None if views is None else views.astype(self.dtype, copy=False)

        def write() -> None:
            names = ("features",) + ROW_FIELDS + ("checksums", "path_checksums") * self.has_checksums
            for name in names + ("views",) * (views is not None) + ("view_checksums",) * (views is not None and self.has_checksums):
                self.h5[name].resize(n + k, axis=0)
            self.h5["features"][n:n + k] = features
            if views is not None:
                self.h5["views"][n:n + k] = views
            self._clear_dangling("paths", n)
            self.h5["paths"][n:n + k] = list(paths)
            self.h5["source_size"][n:n + k] = np.asarray(sizes, dtype=np.int64)
            self.h5["source_mtime_ns"][n:n + k] = np.asarray(mtimes, dtype=np.int64)
            self._write_checksums(slice(n, n + k), features, views, paths)
            self._commit(num_rows=n + k)  # rows become visible only once all of the above is on disk

        self.guarded_write(write)
        self.paths.extend(paths)
        self._index.update((p, n + i) for i, p in enumerate(paths))
        return range(n, n + k)

    def replace(self, rows: Sequence[int], features: np.ndarray, sizes: Sequence[int], mtimes: Sequence[int],
                views: Optional[np.ndarray] = None) -> None:
        """Overwrite rows of changed images. Features go first: a kill before the facts leaves them stale, so
        the next run re-extracts again rather than trusting a half-written row."""
        rows = np.asarray(rows, dtype=np.int64)
        views = self._check_views(views, len(rows))
        features = np.asarray(features)[: len(rows)].astype(self.dtype, copy=False)
        views = None if views is None else views.astype(self.dtype, copy=False)
        paths = self.paths

        def write() -> None:
            for i, r in enumerate(rows):
                self.h5["features"][r] = features[i]
                if views is not None:
                    self.h5["views"][r] = views[i]
                # A kill between a row's features and its checksum leaves it "damaged": repaired next run.
                self._write_checksums(int(r), features[i:i + 1], None if views is None else views[i:i + 1],
                                      [paths[int(r)]])
            self._durable_flush()
            for i, r in enumerate(rows):
                self.h5["source_size"][r] = int(sizes[i])
                self.h5["source_mtime_ns"][r] = int(mtimes[i])
            self._commit()

        self.guarded_write(write)

    def rewrite_paths(self, rows: Sequence[int], paths: Sequence[str]) -> None:
        """Give rows whose path entry is damaged a path again, and mark them for re-extraction.

        Their features are not trusted to belong to the new path: each row's source facts are set to -1 (no
        file matches them) and its feature checksums are made not to match, so the row reads as damaged (refused
        by training, re-extracted by ``scripts/extract.py``) until ``replace`` writes fresh features. Facts and
        checksums go to disk first, the paths second: a kill in between leaves rows still damaged, never a
        valid-looking path beside another image's features."""
        rows, paths = [int(r) for r in rows], list(paths)
        if len(rows) != len(paths) or len(set(paths)) != len(paths) or len(set(rows)) != len(rows):
            raise ValueError("rewrite_paths needs distinct rows and distinct paths, one path per row")
        if not rows:
            return
        n = self.num_rows
        if min(rows) < 0 or max(rows) >= n:
            raise IndexError(f"row out of range for cache with {n} rows")
        bounds = self._entry_bounds()

        def write() -> None:
            for r in rows:
                self.h5["source_size"][r] = -1
                self.h5["source_mtime_ns"][r] = -1
                feats = self.h5["features"][r:r + 1]
                sums = np.stack([crc_rows(feats[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)[0]
                self.h5["checksums"][r] = sums ^ np.uint32(1)
            self._durable_flush()
            for r, p in zip(rows, paths):
                self.h5["paths"][r] = p
                self.h5["path_checksums"][r] = crc_paths([p])[0]
            self._commit()

        self.guarded_write(write)
        self._paths, self._index = None, None

    def set_failures(self, failures: Mapping[str, Tuple[str, int, int]]) -> None:
        """Replace the failure list with {path: (reason, size, mtime_ns)}."""
        g, items = self.h5["failed"], list(failures.items())

        def write() -> None:
            for name in FAILED_FIELDS:
                g[name].resize(len(items), axis=0)
            for name in ("paths", "reasons"):
                self._clear_dangling(f"failed/{name}", 0)
            if items:
                g["paths"][:] = [p for p, _ in items]
                g["reasons"][:] = [r for _, (r, _, _) in items]
                g["source_size"][:] = np.array([s for _, (_, s, _) in items], dtype=np.int64)
                g["source_mtime_ns"][:] = np.array([m for _, (_, _, m) in items], dtype=np.int64)
            self._commit(num_failed=len(items))

        self.guarded_write(write)


def open_cache(path: str, mode: str = "r") -> FeatureCache:
    """Open an existing cache (read-only by default)."""
    return FeatureCache.open(path, mode)


def write_cache(path: str, fingerprint: Mapping, paths: Sequence[str], features: np.ndarray,
                sizes: Optional[Sequence[int]] = None, mtimes: Optional[Sequence[int]] = None,
                overwrite: bool = False) -> str:
    """Write a complete cache in one go (tests, synthetic features, merges)."""
    zeros = [0] * len(paths)
    with FeatureCache.create(path, fingerprint, overwrite=overwrite) as cache:
        cache.append(list(paths), features, sizes if sizes is not None else zeros, mtimes if mtimes is not None else zeros)
    return path
