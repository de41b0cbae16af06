"""The HDF5 feature cache: the contract between stage one (extract) and stage two (train, sweep, score).

``FeatureCache`` is the one class over an open cache file. The file's layout (datasets, attributes, formats
1-3) is described in ``mirip.store.cache_layout``, which also builds the empty file; the CRC-32 functions are
``mirip.store.checksums``; the errors and their one-line messages ``mirip.store.cache_errors``. The class's
sections: opening and creating; the operations that change rows (``append``, ``replace``, ``rewrite_paths``,
``set_failures``), each an ordered sequence of writes run by ``guarded_write``; reading; integrity; durable
writes.

Integrity: CRC-32 checksums per row and entry, per path and per view (format 3). Every read of features verifies the rows' checksums (and the path list's) and refuses a damaged
cache with ``CacheDamaged``, naming the rows; ``damaged_rows()`` scans the whole file, and
``scripts/extract.py`` re-extracts such rows (the plan's "repaired"). Rows whose path entry fails its checksum
(``damaged_path_rows``) get their path back from the images an extraction lists (``rewrite_paths``) and are
re-extracted like damaged feature rows. A file whose HDF5 structure itself is
damaged (object header, path heap) is refused with a one-line ``CacheError`` naming the file; format-3 files
are written in HDF5 1.8's newer file format (``libver="v108"``), whose superblock and object headers carry
HDF5's own checksums.

Durable writes: fsync before commit, a reserve for a full disk, crash-safe string slots. Rows are committed by ``num_rows``: data and checksums are written, flushed and fsync'ed first, the counter
last, so a process killed (or a disk that fills) mid-write leaves every committed row intact and the
uncommitted tail is simply overwritten by the next append. While a writer has the file open it holds a
*reserve* file beside it (``<cache>.tmp-<host>-<pid>-reserve``): when the disk fills, the reserve is deleted so
HDF5 can still close the file cleanly, and the error says how many rows are committed. Every write goes
through ``guarded_write``, which turns HDF5's and the OS's errors into one ``CacheWriteError``.
"""

from __future__ import annotations

import errno
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

from mirip.common.atomic import remove_stale_temps, temp_prefix
from mirip.common.feature_spec import FeatureSpec, default_spec, match_entries
from mirip.store.cache_errors import (CacheDamaged, CacheError, CacheInUse, CacheWriteError, describe_os_error,
                                      list_text, rows_text)
from mirip.store.cache_layout import FAILED_FIELDS, ROW_FIELDS, build_empty
from mirip.store.checksums import crc_paths, crc_rows, entry_bounds_of
from mirip.store.fingerprint import ENVIRONMENT_FIELDS, bank_layout, check_fingerprint, from_attrs

__all__ = ["FeatureCache", "open_cache", "write_cache"]


class FeatureCache:
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

    # --- reading ---------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> dict:
        try:
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in self.h5.attrs["fingerprint_keys"]]
            return from_attrs(self.h5.attrs, keys)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise describe_os_error(self.path, exc) from None

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
        """Relative paths of the committed rows; CacheError (one line) when the path list is damaged."""
        if self._paths is None:
            paths = self.stored_paths()
            bad = self.damaged_path_rows(paths)
            if bad:
                raise CacheDamaged(f"the path list of feature cache {self.path} is damaged at row(s) "
                                   f"{rows_text(bad)}: these rows cannot be matched to images; rerun "
                                   f"scripts/extract.py with the same settings and --output {self.path} (it gives "
                                   "these rows their paths back from the images it lists and re-extracts them), "
                                   "or restore the cache from a backup", bad)
            self._paths = paths
        return self._paths

    def stored_paths(self) -> List[str]:
        """The committed rows' paths as stored, unverified (``paths`` verifies them); CacheError (one line)
        when HDF5 cannot read the path list at all."""
        try:
            raw = self.h5["paths"][: self.num_rows]
            return [p.decode() if isinstance(p, bytes) else p for p in raw]
        except (OSError, RuntimeError, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise CacheError(f"the path list of feature cache {self.path} is damaged and cannot be read "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}), so no row can be "
                             "matched to its image; re-extract it (scripts/extract.py --overwrite) or restore it "
                             "from a backup") from None

    def _read(self, name: str, selection):
        try:
            return self.h5[name][selection]
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise describe_os_error(self.path, exc) from None

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

    def features(self, rows: Optional[Sequence[int]] = None, spec=None) -> np.ndarray:
        """The committed feature rows (all, or the given ones in the given order); with ``spec``, only its
        entries' columns, concatenated in spec order (``None``: every column)."""
        data = self.h5["features"]
        slices = None if spec is None else self.entry_slices(spec)
        n = self.num_rows
        bounds = self._entry_bounds()
        all_spans = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        # Each checksum covers one entry's span; a spec's slices are such spans (caches made by extract always).
        entries = list(range(len(all_spans))) if slices is None else [
            next((i for i, sp in enumerate(all_spans) if (sp.start, sp.stop) == (s.start, s.stop)), None) for s in slices]
        if None in entries:  # a hand-made cache whose fingerprint's entry dims do not add up: not verifiable per entry
            entries, all_spans = [], []
        spans = all_spans if slices is None else [s for s, e in zip(slices, entries) if e is not None]
        if rows is None:
            if slices is None:
                out = self._read("features", slice(0, n))
            else:
                out = np.concatenate([self._read("features", np.s_[:n, s]) for s in slices], axis=1)
            self._verify(np.arange(n), out, entries, spans)
            return out
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row out of range for cache with {n} rows")
        # h5py fancy indexing needs increasing indices; read sorted, then restore the order.
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        if slices is None:
            picked = self._read("features", uniq)
        elif not uniq.size:
            picked = np.empty((0, sum(s.stop - s.start for s in slices)), dtype=data.dtype)
        else:
            picked = np.concatenate([self._read("features", np.s_[uniq, s]) for s in slices], axis=1)
        self._verify(uniq, picked, entries, spans)
        out = picked[inverse]
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
        rows = np.arange(self.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row out of range for cache with {self.num_rows} rows")
        uniq, inverse = np.unique(rows, return_inverse=True)
        picked = self._read("views", uniq)
        if "view_checksums" in self.h5 and uniq.size:
            sums = self._read("view_checksums", uniq)
            bad = np.zeros(len(uniq), dtype=bool)
            for k in range(picked.shape[1]):
                bad |= crc_rows(picked[:, k]) != sums[:, k]
            if bad.any():
                raise CacheDamaged(self._damage_message(uniq[bad].tolist()), uniq[bad].tolist())
        return picked[inverse]

    def load_views(self, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        tensor = torch.from_numpy(self.views())
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def source_facts(self) -> Tuple[np.ndarray, np.ndarray]:
        n = self.num_rows
        return self._read("source_size", slice(0, n)), self._read("source_mtime_ns", slice(0, n))

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
            problems.append(f"{len(missing)} image(s) have no cached feature in {self.path}: {list_text(missing)}")
        if stale:
            problems.append(f"{len(stale)} image(s) changed since extraction and could not be read again "
                            f"({list_text([f'{p} ({failed[p]})' for p in stale])})")
        if problems:
            raise CacheError("; ".join(problems) + ". Run scripts/extract.py on them first.")
        return np.array([index[p] for p in paths], dtype=np.int64)

    def failures(self) -> Dict[str, str]:
        """Relative path -> reason, for every image extraction could not read."""
        return {p: r for p, (r, _, _) in self.failure_records().items()}

    def failure_records(self) -> Dict[str, Tuple[str, int, int]]:
        """Relative path -> (reason, size, mtime_ns): the form ``set_failures`` takes."""
        n = int(self.h5.attrs["num_failed"])
        dec = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        paths, reasons = self._read("failed/paths", slice(0, n)), self._read("failed/reasons", slice(0, n))
        sizes, mtimes = self._read("failed/source_size", slice(0, n)), self._read("failed/source_mtime_ns", slice(0, n))
        try:
            return {dec(p): (dec(r), int(s), int(m)) for p, r, s, m in zip(paths, reasons, sizes, mtimes)}
        except UnicodeDecodeError as exc:
            raise describe_os_error(self.path, exc) from None

    def check_fingerprint(self, expected: Mapping, ignore: Iterable[str] = ENVIRONMENT_FIELDS, only=None) -> None:
        check_fingerprint(expected, self.fingerprint, what=f"feature cache {self.path}", ignore=ignore, only=only)

    # --- integrity: checksums and damaged rows ---------------------------------------------------------------
    @property
    def has_checksums(self) -> bool:
        """Whether rows carry checksums (format 3); a format-1/2 cache has none and is not verified."""
        return "checksums" in self.h5

    def damaged_path_rows(self, paths: Optional[Sequence[str]] = None) -> List[int]:
        """Rows whose stored path fails its checksum ([] when the cache has no checksums)."""
        if not self.has_checksums:
            return []
        paths = self.stored_paths() if paths is None else paths
        return np.flatnonzero(crc_paths(paths) != self._read("path_checksums", slice(0, len(paths)))).tolist()

    def stored_path_checksums(self, rows: Sequence[int]) -> np.ndarray:
        """The stored CRC-32 of the given rows' paths (what the path was when it was written)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not rows.size:
            return np.empty(0, dtype=np.uint32)
        return self._read("path_checksums", slice(0, self.num_rows))[rows]

    def _entry_bounds(self) -> np.ndarray:
        return entry_bounds_of(self.fingerprint, self.dim)

    def _verify(self, rows: np.ndarray, block: np.ndarray, entries: Sequence[int], spans: Sequence[slice]) -> None:
        """Compare ``block`` (the given rows; columns = the given entries' spans, side by side) with stored sums."""
        if not self.has_checksums or not len(rows):
            return
        stored = self._read("checksums", np.s_[int(rows.min()):int(rows.max()) + 1])[rows - rows.min()]
        bad, col = np.zeros(len(rows), dtype=bool), 0
        for e, span in zip(entries, spans):
            width = span.stop - span.start
            bad |= crc_rows(block[:, col:col + width]) != stored[:, e]
            col += width
        if bad.any():
            damaged = sorted(set(rows[bad].tolist()))
            raise CacheDamaged(self._damage_message(damaged), damaged)

    def _damage_message(self, rows: Sequence[int]) -> str:
        try:
            paths = self.paths
        except CacheError:
            paths = None
        return (f"feature cache {self.path} is damaged: {len(rows)} row(s) do not match their checksums: "
                f"{rows_text(list(rows), paths)}. Rerun scripts/extract.py with the same settings and "
                f"--output {self.path} to re-extract them")

    def damaged_rows(self, block: int = 4096) -> List[int]:
        """Every committed row whose features (any entry), views or path fail their checksums ([] when the cache
        has no checksums). Reads the whole file; raises CacheError when HDF5 itself cannot read part of it."""
        if not self.has_checksums:
            return []
        n, bounds = self.num_rows, self._entry_bounds()
        spans = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        bad = set()
        self.paths  # a damaged path entry is refused here (extraction gives it its path back first)
        for start in range(0, n, block):
            sel = slice(start, min(n, start + block))
            feats, sums = self._read("features", sel), self._read("checksums", sel)
            for e, span in enumerate(spans):
                bad.update((start + np.flatnonzero(crc_rows(feats[:, span]) != sums[:, e])).tolist())
            if "view_checksums" in self.h5:
                views, vsums = self._read("views", sel), self._read("view_checksums", sel)
                for k in range(views.shape[1]):
                    bad.update((start + np.flatnonzero(crc_rows(views[:, k]) != vsums[:, k])).tolist())
        return sorted(bad)

    def _write_checksums(self, where, features: np.ndarray, views: Optional[np.ndarray], paths: Sequence[str]) -> None:
        """Checksums of rows ``where`` (a slice, or one row) computed from the bytes as stored (cast dtype)."""
        if not self.has_checksums:
            return
        bounds = self._entry_bounds()
        sums = np.stack([crc_rows(features[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
        self.h5["checksums"][where] = sums if isinstance(where, slice) else sums[0]
        self.h5["path_checksums"][where] = crc_paths(paths) if isinstance(where, slice) else crc_paths(paths)[0]
        if views is not None and "view_checksums" in self.h5:
            vsums = np.stack([crc_rows(views[:, j]) for j in range(views.shape[1])], axis=1)
            self.h5["view_checksums"][where] = vsums if isinstance(where, slice) else vsums[0]

    # --- durable writes --------------------------------------------------------------------------------------
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
