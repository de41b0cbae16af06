"""The feature cache's layout on disk, and the empty file every cache starts from.

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

from typing import Mapping

import h5py
import numpy as np

from mirip.store.checksums import entry_bounds_of
from mirip.store.fingerprint import to_attrs

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


