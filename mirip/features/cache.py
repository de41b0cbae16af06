"""The HDF5 feature cache: the contract between stage one (extract) and stage two (train, sweep, score).

Layout (format 2)::

    /features          (N, D) float32 | float16   one row per image: the bank's entries side by side
                                                  (attrs feature_entries / feature_entry_dims give the
                                                  columns; chunks are one entry wide, so reading some
                                                  entries reads only their chunks)
    /paths             (N,)   UTF-8               image path relative to the image directory
    /source_size       (N,)   int64               file size when extracted  } detect a changed file
    /source_mtime_ns   (N,)   int64               file mtime when extracted }
    /views             (N, K, D)                  K augmented views per image (only when fingerprint views > 0)
    /failed/{paths,reasons,source_size,source_mtime_ns}   images that could not be read, and why
    attrs: the feature fingerprint (mirip.fingerprint) + num_rows + num_failed

Format 1 (no feature_entries) reads as a bank of one entry, ``<pooling>@-1``; it is never rewritten:
appending to it is refused by the fingerprint check (format_version differs).

Rows are committed by ``num_rows``: data is written and flushed first, the
counter last, so a process killed mid-write leaves every committed row intact
and the uncommitted tail is simply overwritten by the next append.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

from mirip.features.spec import FeatureSpec, default_spec, match_entries
from mirip.fingerprint import ENVIRONMENT_FIELDS, bank_layout, check_fingerprint, from_attrs, to_attrs

_STR = h5py.string_dtype("utf-8")
_ROW_FIELDS = ("paths", "source_size", "source_mtime_ns")
_FAILED_FIELDS = ("paths", "reasons", "source_size", "source_mtime_ns")
_COUNTERS = ("num_rows", "num_failed")


class CacheError(ValueError):
    """A cache file that is missing, unreadable, or inconsistent with what a run needs."""


def _shown(items: List[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


class FeatureCache:
    """An open feature cache. Use ``FeatureCache.create`` to start one and ``open_cache`` to read one."""

    def __init__(self, h5: h5py.File, path: str):
        self.h5, self.path = h5, path
        self._paths: Optional[List[str]] = None
        self._index: Optional[Dict[str, int]] = None

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, fingerprint: Mapping, overwrite: bool = False) -> "FeatureCache":
        """A new, empty, writable cache; refuses to replace an existing file unless ``overwrite``."""
        if os.path.exists(path) and not overwrite:
            raise CacheError(f"cache {path} already exists; open it to append, or pass overwrite=True to start over")
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        # Built under a temporary name and renamed: a kill mid-create never leaves a half-made cache behind.
        tmp = f"{path}.tmp-{os.getpid()}"
        h5 = h5py.File(tmp, "w")
        dim, dtype = int(fingerprint["feature_dim"]), np.dtype(fingerprint.get("feature_dtype", "float32"))
        dims = fingerprint.get("feature_entry_dims") or [dim]
        # One entry per chunk column (when entries are equal in width): reading a few entries of a big bank
        # touches only their chunks. ~1 MiB chunks.
        width = dims[0] if len(set(dims)) == 1 and sum(dims) == dim else dim
        rows = max(1, min(256, (1 << 20) // (width * dtype.itemsize)))
        h5.create_dataset("features", (0, dim), dtype=dtype, maxshape=(None, dim), chunks=(rows, width))
        views = int(fingerprint.get("views", 0) or 0)
        if views > 0:
            vrows = max(1, rows // views)
            h5.create_dataset("views", (0, views, dim), dtype=dtype, maxshape=(None, views, dim),
                              chunks=(vrows, views, dim))
        for name in _ROW_FIELDS:
            h5.create_dataset(name, (0,), dtype=_STR if name == "paths" else np.int64, maxshape=(None,), chunks=(4096,))
        failed = h5.create_group("failed")
        for name in _FAILED_FIELDS:
            dt = _STR if name in ("paths", "reasons") else np.int64
            failed.create_dataset(name, (0,), dtype=dt, maxshape=(None,), chunks=(1024,))
        h5.attrs.update(to_attrs(fingerprint))
        h5.attrs["fingerprint_keys"] = list(fingerprint)
        h5.attrs["num_rows"], h5.attrs["num_failed"] = 0, 0
        h5.close()
        os.replace(tmp, path)
        return cls(h5py.File(path, "a"), path)

    @classmethod
    def open(cls, path: str, mode: str = "r") -> "FeatureCache":
        if not os.path.isfile(path):
            raise CacheError(f"feature cache not found: {path} (make one with `python scripts/extract.py`)")
        try:
            h5 = h5py.File(path, mode)
        except OSError as exc:
            raise CacheError(f"cannot open feature cache {path}: not a readable HDF5 file ({exc})") from exc
        if "features" not in h5 or "num_rows" not in h5.attrs or "fingerprint_keys" not in h5.attrs:
            h5.close()
            raise CacheError(f"{path} is an HDF5 file but not a mirip feature cache (no features / fingerprint)")
        return cls(h5, path)

    def close(self) -> None:
        if self.h5.id.valid:
            self.h5.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading -------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> dict:
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in self.h5.attrs["fingerprint_keys"]]
        return from_attrs(self.h5.attrs, keys)

    @property
    def num_rows(self) -> int:
        return int(self.h5.attrs["num_rows"])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def dim(self) -> int:
        return int(self.h5["features"].shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.h5["features"].dtype

    @property
    def paths(self) -> List[str]:
        if self._paths is None:
            self._paths = [p.decode() if isinstance(p, bytes) else p for p in self.h5["paths"][: self.num_rows]]
        return self._paths

    @property
    def index(self) -> Dict[str, int]:
        """Relative path -> row (kept up to date by ``append``, so appending stays O(batch), not O(N))."""
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self.paths)}
        return dict(self._index)

    def row_of(self, path: str) -> Optional[int]:
        """The row of one relative path, or None (no copy of the whole index)."""
        if self._index is None:
            self.index
        return self._index.get(path)

    # --- the bank ------------------------------------------------------------------------------
    @property
    def format_version(self) -> int:
        return int(self.fingerprint.get("format_version", 1))

    @property
    def entries(self) -> List[str]:
        """The bank's entry names in column order (``cls@-1``, ``mean@-4``, ...); one for a format-1 cache."""
        return bank_layout(self.fingerprint)[0]

    @property
    def entry_dims(self) -> Dict[str, int]:
        names, _, dims, _ = bank_layout(self.fingerprint)
        return dict(zip(names, dims))

    @property
    def default_spec(self) -> str:
        """The spec a run uses without ``--feature``: the only entry, else ``cls@-1``."""
        return default_spec(self.entries)

    def entry_slices(self, spec) -> List[slice]:
        """Column ranges of a spec's entries (a spec string, FeatureSpec or entry names), in spec order.

        Refuses (FeatureSpecError, a ValueError) an entry the cache lacks, listing what it holds.
        """
        names, blocks, dims, num_layers = bank_layout(self.fingerprint)
        if not isinstance(spec, (str, FeatureSpec)):
            spec = FeatureSpec.from_entries(spec)
        starts = np.concatenate([[0], np.cumsum(dims)]).astype(int)
        picked = match_entries(spec, names, blocks, num_layers, where=f"feature cache {self.path}")
        return [slice(int(starts[i]), int(starts[i + 1])) for i in picked]

    def spec_dim(self, spec) -> int:
        return sum(s.stop - s.start for s in self.entry_slices(spec))

    def features(self, rows: Optional[Sequence[int]] = None, spec=None) -> np.ndarray:
        """The committed feature rows (all, or the given ones in the given order); with ``spec``, only its
        entries' columns, concatenated in spec order (``None``: every column)."""
        data = self.h5["features"]
        slices = None if spec is None else self.entry_slices(spec)
        n = self.num_rows
        if rows is None:
            if slices is None:
                return data[:n]
            return np.concatenate([data[:n, s] for s in slices], axis=1)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row out of range for cache with {n} rows")
        # h5py fancy indexing needs increasing indices; read sorted, then restore the order.
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        if slices is None:
            out = data[uniq][inverse]
        elif not uniq.size:
            out = np.empty((0, sum(s.stop - s.start for s in slices)), dtype=data.dtype)
        else:
            out = np.concatenate([data[uniq, s] for s in slices], axis=1)[inverse]
        result = np.empty_like(out)
        result[order] = out
        return result

    def load_features(self, device: str = "cpu", dtype: Optional[torch.dtype] = None, spec=None) -> torch.Tensor:
        """The whole matrix (or a spec's columns) as one tensor (stage two indexes it in memory or on the GPU)."""
        tensor = torch.from_numpy(self.features(spec=spec))
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    @property
    def num_views(self) -> int:
        """K augmented views stored per image (0 when the cache has none)."""
        return int(self.h5["views"].shape[1]) if "views" in self.h5 else 0

    def views(self, rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """(rows, K, D) augmented-view features; row order as in ``features``."""
        if "views" not in self.h5:
            raise CacheError(f"{self.path} holds no augmented views (extract with --views K)")
        data = self.h5["views"]
        if rows is None:
            return data[: self.num_rows]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row out of range for cache with {self.num_rows} rows")
        uniq, inverse = np.unique(rows, return_inverse=True)
        return data[uniq][inverse]

    def load_views(self, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        tensor = torch.from_numpy(self.views())
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def source_facts(self) -> Tuple[np.ndarray, np.ndarray]:
        n = self.num_rows
        return self.h5["source_size"][:n], self.h5["source_mtime_ns"][:n]

    def rows_for(self, paths: Iterable[str]) -> np.ndarray:
        """Rows of the given relative paths; CacheError lists every path without a valid feature.

        A path that has a row but is also recorded as failed changed on disk and could not be read
        again: its row holds the old file's feature, so it is refused rather than trained on.
        """
        index, failed = self.index, self.failures()
        paths = list(paths)
        missing = [p for p in paths if p not in index]
        stale = [p for p in paths if p in index and p in failed]
        problems = []
        if missing:
            problems.append(f"{len(missing)} image(s) have no cached feature in {self.path}: {_shown(missing)}")
        if stale:
            problems.append(f"{len(stale)} image(s) changed since extraction and could not be read again "
                            f"({_shown([f'{p} ({failed[p]})' for p in stale])})")
        if problems:
            raise CacheError("; ".join(problems) + ". Run scripts/extract.py on them first.")
        return np.array([index[p] for p in paths], dtype=np.int64)

    def failures(self) -> Dict[str, str]:
        """Relative path -> reason, for every image extraction could not read."""
        g, n = self.h5["failed"], int(self.h5.attrs["num_failed"])
        dec = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        return {dec(p): dec(r) for p, r in zip(g["paths"][:n], g["reasons"][:n])}

    def failure_records(self) -> Dict[str, Tuple[str, int, int]]:
        """Relative path -> (reason, size, mtime_ns): the form ``set_failures`` takes."""
        g, n = self.h5["failed"], int(self.h5.attrs["num_failed"])
        dec = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        sizes, mtimes = g["source_size"][:n], g["source_mtime_ns"][:n]
        return {dec(p): (dec(r), int(s), int(m)) for p, r, s, m in zip(g["paths"][:n], g["reasons"][:n], sizes, mtimes)}

    def check_fingerprint(self, expected: Mapping, ignore: Iterable[str] = ENVIRONMENT_FIELDS, only=None) -> None:
        check_fingerprint(expected, self.fingerprint, what=f"feature cache {self.path}", ignore=ignore, only=only)

    # --- writing -------------------------------------------------------------------------------
    def _commit(self, **counters: int) -> None:
        self.h5.flush()  # data first ...
        for k, v in counters.items():
            self.h5.attrs[k] = int(v)
        self.h5.flush()  # ... then the counter that makes it visible

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
        for name in ("features",) + _ROW_FIELDS:
            self.h5[name].resize(n + k, axis=0)
        self.h5["features"][n:n + k] = features.astype(self.dtype, copy=False)
        if views is not None:
            self.h5["views"].resize(n + k, axis=0)
            self.h5["views"][n:n + k] = views.astype(self.dtype, copy=False)
        self.h5["paths"][n:n + k] = list(paths)
        self.h5["source_size"][n:n + k] = np.asarray(sizes, dtype=np.int64)
        self.h5["source_mtime_ns"][n:n + k] = np.asarray(mtimes, dtype=np.int64)
        self._commit(num_rows=n + k)
        self.paths.extend(paths)
        self._index.update((p, n + i) for i, p in enumerate(paths))
        return range(n, n + k)

    def replace(self, rows: Sequence[int], features: np.ndarray, sizes: Sequence[int], mtimes: Sequence[int],
                views: Optional[np.ndarray] = None) -> None:
        """Overwrite rows of changed images. Features go first: a kill before the facts leaves them stale, so
        the next run re-extracts again rather than trusting a half-written row."""
        rows = np.asarray(rows, dtype=np.int64)
        views = self._check_views(views, len(rows))
        for i, r in enumerate(rows):
            self.h5["features"][r] = np.asarray(features[i]).astype(self.dtype, copy=False)
            if views is not None:
                self.h5["views"][r] = views[i].astype(self.dtype, copy=False)
        self.h5.flush()
        for i, r in enumerate(rows):
            self.h5["source_size"][r] = int(sizes[i])
            self.h5["source_mtime_ns"][r] = int(mtimes[i])
        self._commit()

    def set_failures(self, failures: Mapping[str, Tuple[str, int, int]]) -> None:
        """Replace the failure list with {path: (reason, size, mtime_ns)}."""
        g, items = self.h5["failed"], list(failures.items())
        for name in _FAILED_FIELDS:
            g[name].resize(len(items), axis=0)
        if items:
            g["paths"][:] = [p for p, _ in items]
            g["reasons"][:] = [r for _, (r, _, _) in items]
            g["source_size"][:] = np.array([s for _, (_, s, _) in items], dtype=np.int64)
            g["source_mtime_ns"][:] = np.array([m for _, (_, _, m) in items], dtype=np.int64)
        self._commit(num_failed=len(items))


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
