"""The run-data layer of stage two: which metadata rows a run uses, where each lands in the split, and the
per-entry scaling of their features.

Extraction records the images it could not read (empty, truncated, not an image, missing) with their reason,
instead of a feature. A run on that cache leaves those rows out, says how many and where to see them, and
keeps every other row where it would be with the images fixed: the split is made on the whole metadata and
the unreadable rows are dropped from it afterwards, so re-extracting a repaired image puts it back into its
own split without reshuffling the others (a test image never turns into a training image). An image the
cache has never seen (neither a row nor a failure) stays an error: extraction has not run on it.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from mirip.atomic import write_atomic
from mirip.features.cache import CacheError, open_cache
from mirip.feature_spec import apply_entry_scales, entry_scales, resolve_feature_norm

SPLITS = ("train", "val", "test")

EXCLUDED_FILE = "excluded_images.json"


def _shown(items: Sequence[str], limit: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def failed_images(cache_path: str, names: Sequence[str], strict: bool = False) -> Dict[str, str]:
    """name -> reason for the metadata images extraction recorded as unreadable in ``cache_path``.

    ``strict``: refuse instead (CacheError naming them and what to do), for runs that must use every row.
    """
    with open_cache(cache_path) as cache:
        failures = cache.failures()
    failed = {n: failures[n] for n in names if n in failures}
    if failed and strict:
        raise CacheError(
            f"{len(failed)} image(s) of the metadata could not be read when {cache_path} was extracted: "
            f"{_shown([f'{n} ({r})' for n, r in failed.items()])}. Fix or replace them and rerun "
            "scripts/extract.py (it retries them), remove their rows from the metadata, or run without "
            "--strict-images to leave them out")
    return failed


def union_failed(cache_paths: Sequence[str], names: Sequence[str], strict: bool = False) -> Dict[str, str]:
    """``failed_images`` over several caches: an image unreadable in any of them is left out of all (the
    caches of a multi-cache sweep train and test on the same drawings)."""
    out: Dict[str, str] = {}
    for path in cache_paths:
        for name, reason in failed_images(path, names, strict).items():
            out.setdefault(name, reason)
    return out


def split_names(meta: pd.DataFrame, splitter, filename_column: str,
                excluded: Iterable[str] = ()) -> Dict[str, List[str]]:
    """split -> image names, in split order: ``splitter`` (a DataSplitter) on the whole metadata, then the
    excluded names dropped. The one way a run's split is made: by train, evaluate, sweeps over one or several
    caches, and scoring's split membership."""
    excluded = set(excluded)
    return {name: [n for n in frame[filename_column].astype(str) if n not in excluded]
            for name, frame in zip(SPLITS, splitter.split(meta))}


def split_positions(by_split: Mapping[str, Sequence[str]], names: Sequence[str]) -> Dict[str, np.ndarray]:
    """The splits' names as row positions into ``names`` (the run's rows, in metadata order)."""
    at = {n: i for i, n in enumerate(names)}
    return {split: np.array([at[n] for n in chosen], dtype=np.int64) for split, chosen in by_split.items()}


def scaled_features(features, dims: Sequence[int], spec: str, mode: str, train_rows,
                    scales: Optional[Sequence[float]] = None, fit: bool = True):
    """(features with per-entry scales applied, the scales or None): fitted on ``train_rows`` when ``mode``
    resolves to ``entry`` for ``spec`` (``fit``), else ``scales`` as given (a checkpoint's)."""
    if fit:
        scales = entry_scales(features, dims, train_rows) if resolve_feature_norm(mode, spec) == "entry" else None
    return apply_entry_scales(features, dims, scales), (list(scales) if scales else None)


def exclusion_note(excluded: Dict[str, str], where: str) -> str:
    """The one summary line a run prints about the rows it left out."""
    return (f"left out {len(excluded)} image(s) that extraction could not read: "
            f"{_shown([f'{n} ({r})' for n, r in excluded.items()], 3)}; all listed in {where} "
            "(--strict-images refuses such a run instead)")


def write_excluded(out_dir: str, excluded: Dict[str, str]) -> str:
    """``<out_dir>/excluded_images.json`` ({name: reason}); written only when rows were left out."""
    path = os.path.join(out_dir, EXCLUDED_FILE)
    write_atomic(path, json.dumps(dict(sorted(excluded.items())), indent=1))
    return path


__all__ = ["SPLITS", "EXCLUDED_FILE", "failed_images", "union_failed", "split_names", "split_positions",
           "scaled_features", "exclusion_note", "write_excluded"]
