"""The feature cache's layout on disk, and the reading half of ``FeatureCache``.

Layout (format 3)::

    /features          (N, D) float32 | float16   one row per image: the bank's entries side by side
                                                  (attrs feature_entries / feature_entry_dims give the
                                                  columns; chunks are one entry wide, so reading some
                                                  entries reads only their chunks)
    /paths             (N,)   UTF-8               image path relative to the image directory
    /source_size       (N,)   int64               file size when extracted  } detect a changed file
    /source_mtime_ns   (N,)   int64               file mtime when extracted }
    /views             (N, K, D)                  K augmented views per image (only when fingerprint views > 0)
    /checksums         (N, E) uint32              CRC-32 of each row's bytes of each bank entry (column order)
    /path_checksums    (N,)   uint32              CRC-32 of each row's UTF-8 path
    /view_checksums    (N, K) uint32              CRC-32 of each row's bytes of each view (with /views)
    /failed/{paths,reasons,source_size,source_mtime_ns}   images that could not be read, and why
    attrs: the feature fingerprint (mirip.store.fingerprint) + num_rows + num_failed

Format 1 (no feature_entries) reads as a bank of one entry, ``<pooling>@-1`` (``mirip.common.feature_spec.format1_entry``);
it is never rewritten: appending to it is refused by the fingerprint check (format_version differs).
Format 2 is format 3 without the checksum datasets: it reads as before, but damage inside its feature data
cannot be detected (nothing is verified); appending to it is refused likewise (re-extract with
``--overwrite`` to get checksums).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

from mirip.common.feature_spec import FeatureSpec, default_spec, match_entries
from mirip.store.cache_errors import CacheDamaged, CacheError, describe_os_error, list_text, rows_text
from mirip.store.cache_integrity import crc_rows, entry_bounds_of
from mirip.store.fingerprint import ENVIRONMENT_FIELDS, bank_layout, check_fingerprint, from_attrs, to_attrs

STR = h5py.string_dtype("utf-8")
ROW_FIELDS = ("paths", "source_size", "source_mtime_ns")
FAILED_FIELDS = ("paths", "reasons", "source_size", "source_mtime_ns")


def build_empty(tmp: str, fingerprint: Mapping) -> None:
    """Write an empty cache of ``fingerprint``'s layout at ``tmp`` (``FeatureCache.create`` renames it)."""
    # HDF5 1.8's newer file format: superblock and object headers carry checksums, so a damaged header is
    # refused by HDF5 itself (the oldest format reads some damage as other values). Not 1.10's: its
    # superblock marks a file open for writing, and after a kill -9 the file would refuse every open.
    h5 = h5py.File(tmp, "w", libver=("v108", "v108"))
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
    for name in ROW_FIELDS:
        h5.create_dataset(name, (0,), dtype=STR if name == "paths" else np.int64, maxshape=(None,), chunks=(4096,))
    entries = len(entry_bounds_of(fingerprint, dim)) - 1
    h5.create_dataset("checksums", (0, entries), dtype=np.uint32, maxshape=(None, entries), chunks=(4096, entries))
    h5.create_dataset("path_checksums", (0,), dtype=np.uint32, maxshape=(None,), chunks=(4096,))
    if views > 0:
        h5.create_dataset("view_checksums", (0, views), dtype=np.uint32, maxshape=(None, views),
                          chunks=(4096, views))
    failed = h5.create_group("failed")
    for name in FAILED_FIELDS:
        dt = STR if name in ("paths", "reasons") else np.int64
        failed.create_dataset(name, (0,), dtype=dt, maxshape=(None,), chunks=(1024,))
    h5.attrs.update(to_attrs(fingerprint))
    h5.attrs["fingerprint_keys"] = list(fingerprint)
    h5.attrs["num_rows"], h5.attrs["num_failed"] = 0, 0
    h5.close()


class CacheReading:
    """The reading half of a ``FeatureCache`` (over ``self.h5``, an open h5py file, and ``self.path``)."""

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

    def spec_dim(self, spec) -> int:
        return sum(s.stop - s.start for s in self.entry_slices(spec))

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

