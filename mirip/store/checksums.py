"""CRC-32 checksums of a feature cache's rows, entries, paths and views (format 3), as plain functions.

``FeatureCache`` writes them beside the data and verifies them on every read (``mirip.store.cache``).
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import numpy as np

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


