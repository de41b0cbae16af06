"""Integrity of a feature cache: CRC-32 checksums per row and entry, per path and per view (format 3).

Every read of features verifies the rows' checksums (and the path list's) and refuses a damaged
cache with ``CacheDamaged``, naming the rows; ``damaged_rows()`` scans the whole file, and
``scripts/extract.py`` re-extracts such rows (the plan's "repaired"). Rows whose path entry fails its checksum
(``damaged_path_rows``) get their path back from the images an extraction lists (``rewrite_paths``) and are
re-extracted like damaged feature rows. A file whose HDF5 structure itself is
damaged (object header, path heap) is refused with a one-line ``CacheError`` naming the file; format-3 files
are written in HDF5 1.8's newer file format (``libver="v108"``), whose superblock and object headers carry
HDF5's own checksums.

``CacheIntegrity`` is the part of ``FeatureCache`` that computes, writes and checks the checksums; it reads
through the reading half's ``_read`` / ``paths`` / ``fingerprint`` (``mirip.store.cache_layout``).
"""

from __future__ import annotations

import zlib
from typing import List, Mapping, Optional, Sequence

import numpy as np

from mirip.store.cache_errors import CacheDamaged, CacheError, rows_text
from mirip.store.fingerprint import bank_layout


def crc_rows(block: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's bytes (rows of a C-contiguous copy; any dtype)."""
    block = np.ascontiguousarray(block)
    flat = block.reshape(len(block), -1)
    return np.fromiter((zlib.crc32(r) for r in flat), dtype=np.uint32, count=len(flat))


def crc_paths(paths: Sequence[str]) -> np.ndarray:
    return np.fromiter((zlib.crc32(p.encode("utf-8")) for p in paths), dtype=np.uint32, count=len(paths))


def entry_bounds_of(fingerprint: Mapping, dim: int) -> np.ndarray:
    """Column bounds of the bank's entries, one checksum each (one span when the fingerprint's dims do not add up)."""
    dims = bank_layout(fingerprint)[2]
    return np.concatenate([[0], np.cumsum(dims)]).astype(int) if sum(dims) == dim else np.array([0, dim])


class CacheIntegrity:
    """Checksums of a ``FeatureCache``: which rows are damaged, and the sums written beside new rows."""

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

