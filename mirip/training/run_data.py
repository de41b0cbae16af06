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
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from mirip.common.atomic import write_atomic
from mirip.common.feature_spec import apply_entry_scales, canonical_spec, entry_scales, resolve_feature_norm
from mirip.common.metadata_csv import csv_lines, read_metadata_csv
from mirip.common.paths import normalize_relpath
from mirip.common.tiers import tier_ranks
from mirip.store.cache import open_cache
from mirip.store.cache_errors import CacheError
from mirip.store.fingerprint import ENVIRONMENT_FIELDS, LAYOUT_FIELDS
from mirip.training.config import TrainingConfig
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.run_config import RunConfig

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


def read_metadata(path: str, filename_column: str = "filename", tier_column: str = "tier",
                  encoding: Optional[str] = None) -> pd.DataFrame:
    """The metadata CSV, checked: columns present, tiers valid, each image named once.

    Image paths are normalised exactly as extraction normalises them (``./a.png`` -> ``a.png``), so every
    name finds its cached row.
    """
    meta = read_metadata_csv(path, encoding, dtype={filename_column: str})
    for col in (filename_column, tier_column):
        if col not in meta.columns:
            raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, meta.columns))})")
    if meta.empty:
        raise ValueError(f"{path}: no rows")
    lines = csv_lines(meta) or {}

    def at(rows) -> str:  # file lines (header = line 1), as an editor shows them
        return ", ".join(f"line {lines[r]}" if r in lines else f"data row {r} (0-based)" for r in rows)

    blank = meta.index[meta[filename_column].isna()].tolist()
    if blank:
        raise ValueError(f"{path}: empty {filename_column!r} on {at(blank[:20])}"
                         + (f" ... ({len(blank)} in all)" if len(blank) > 20 else ""))
    meta[filename_column] = [normalize_relpath(name, f"{path}, {at([row])}, column {filename_column!r}")
                             for row, name in meta[filename_column].items()]
    try:
        tier_ranks(meta, tier_column, lines=csv_lines(meta))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    dup = meta[meta[filename_column].duplicated(keep=False)]
    if len(dup):
        shown = "; ".join(f"{name} on {at(g.index)}" for name, g in list(dup.groupby(filename_column))[:5])
        raise ValueError(f"{path}: images listed more than once ({shown}); each image needs exactly one row")
    return meta


@dataclass
class RunData:
    """The metadata, the features of its rows (loaded once, in metadata order) and the split."""

    metadata: pd.DataFrame
    features: torch.Tensor  # (N, D) on the CPU, the cache's dtype
    ranks: np.ndarray
    names: list
    fingerprint: Dict[str, Any]
    splits: Dict[str, np.ndarray]  # split -> row positions into metadata / features
    spec: str = "cls@-1"  # the canonical feature spec the columns of ``features`` follow
    entry_dims: List[int] = field(default_factory=list)  # width of each spec entry, in order
    feature_norm: str = "none"  # resolved: entry or none
    feature_scales: Optional[List[float]] = None  # per spec entry, applied to ``features`` (None: unscaled)
    excluded: Dict[str, str] = field(default_factory=dict)  # name -> reason: rows left out, unreadable images
    split_info: Dict[str, Any] = field(default_factory=dict)  # DataSplitter.get_split_info(): sizes, group balance


def resolve_spec(cache_path: str, spec: Optional[str] = None) -> str:
    """The canonical spec a run on ``cache_path`` uses (``None``: the cache's default); refuses an entry the
    cache lacks, listing the entries it holds, before any training."""
    with open_cache(cache_path) as cache:
        spec = canonical_spec(spec) if spec else cache.default_spec
        cache.entry_slices(spec)
        return spec


def load_bank_features(cache_path: str, names: list, spec: Optional[str] = None,
                       expected_fingerprint: Optional[Dict[str, Any]] = None, ignore_layout: bool = False
                       ) -> Tuple[torch.Tensor, Dict[str, Any], str, List[int]]:
    """(features of ``names`` in that order with the spec's columns, the cache's fingerprint, the canonical spec,
    the spec's entry dims). Refuses a fingerprint mismatch (``ignore_layout``: only fields that change what an
    entry means, for a head read from another cache), an entry the cache lacks, and lists missing images."""
    with open_cache(cache_path) as cache:
        if expected_fingerprint is not None:
            ignore = ENVIRONMENT_FIELDS + (LAYOUT_FIELDS if ignore_layout else ())
            cache.check_fingerprint(expected_fingerprint, ignore=ignore)
        spec = canonical_spec(spec) if spec else cache.default_spec
        dims = [s.stop - s.start for s in cache.entry_slices(spec)]
        rows = cache.rows_for(names)
        return torch.from_numpy(cache.features(rows, spec=spec)), cache.fingerprint, spec, dims


def load_features(cache_path: str, names: list, expected_fingerprint: Optional[Dict[str, Any]] = None,
                  spec: Optional[str] = None) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The cached features of ``names`` in that order (the spec's columns; default: the cache's default spec);
    refuses a fingerprint mismatch and lists missing images."""
    features, fingerprint, _, _ = load_bank_features(cache_path, names, spec, expected_fingerprint)
    return features, fingerprint


def load_run_data(cfg: RunConfig, expected_fingerprint: Optional[Dict[str, Any]] = None,
                  scales: Optional[List[float]] = None, fit_scales: bool = True, ignore_layout: bool = False) -> RunData:
    """Metadata, the spec's features and the split. Per-entry scales are fitted on the train split when the
    resolved ``feature_norm`` is ``entry`` (or taken from ``scales``, e.g. a checkpoint's, with ``fit_scales=False``)."""
    meta = read_metadata(cfg.metadata, cfg.filename_column, cfg.tier_column, cfg.encoding)
    excluded = failed_images(cfg.features, meta[cfg.filename_column].astype(str).tolist(), cfg.strict_images)
    splitter = cfg.splitter()
    by_split = split_names(meta, splitter, cfg.filename_column, excluded)
    meta = meta[~meta[cfg.filename_column].astype(str).isin(excluded)]
    names = meta[cfg.filename_column].astype(str).tolist()
    features, fingerprint, spec, dims = load_bank_features(cfg.features, names, cfg.feature, expected_fingerprint,
                                                           ignore_layout=ignore_layout)
    splits = split_positions(by_split, names)
    features, scales = scaled_features(features, dims, spec, cfg.feature_norm, splits["train"], scales, fit_scales)
    return RunData(meta, features, tier_ranks(meta, cfg.tier_column), names, fingerprint, splits,
                   spec=spec, entry_dims=dims,
                   feature_norm="entry" if scales else "none", feature_scales=scales, excluded=excluded,
                   split_info=splitter.get_split_info())


def feature_keys(data: RunData) -> Dict[str, Any]:
    """What a checkpoint records about its features beyond the fingerprint: spec, normalisation, scales."""
    return {"feature_spec": data.spec, "feature_norm": data.feature_norm, "feature_scales": data.feature_scales,
            "feature_entry_dims": list(data.entry_dims), "excluded_images": sorted(data.excluded)}


def split_dataset(data: RunData, split: str, features: torch.Tensor, tc: TrainingConfig, *, train: bool
                  ) -> Optional[FeaturePairDataset]:
    """The pairs of one split: fresh per epoch for training, fixed (epoch 0) for val/test; None if empty."""
    rows = data.splits[split]
    if len(rows) == 0:
        return None
    return FeaturePairDataset(
        features, data.ranks[rows], rows=rows, names=[data.names[i] for i in rows],
        num_pairs=tc.pairs_per_epoch if train else tc.eval_pairs, batch_size=tc.batch_size,
        seed=tc.seed, epoch=0, balance=tc.pair_balance, what=f"{split} split",
    )


__all__ = ["SPLITS", "EXCLUDED_FILE", "failed_images", "union_failed", "split_names", "split_positions", "scaled_features", "exclusion_note", "write_excluded"]
