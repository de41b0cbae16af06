"""A sweep over several caches of the same images (other backbones, other image sizes): one more grid axis.

    metadata.csv -> per seed: ONE split (train / val / test image names), made before any cache is read
    cache a.h5 ─┐
    cache b.h5 ─┼─> the same grid on each, on exactly those splits -> <output-dir>/<cache>/  (a full sweep each)
    ...        ─┘
      -> <output-dir>/results.csv, summary.md, best.json, heatmap.png: every cache side by side

Each cache's sub-sweep is an ordinary sweep directory (resumable, its own results and checkpoints); the
top-level files put them in one table with a ``cache`` column (a short label) and the backbone behind it.
A cache that lacks some of the metadata's images is refused before anything trains, naming them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import pandas as pd

from mirip.common.atomic import write_atomic
from mirip.common.plain import json_safe
from mirip.store.cache import open_cache
from mirip.store.cache_errors import CacheError
from mirip.store.fingerprint import RANDOM_WEIGHTS_NOTE, weights_summary
from mirip.sweep.grid import SweepGrid
from mirip.training.head_config import HeadConfig
from mirip.sweep.report import aggregate, best_record, choose_best, save_heatmap, summary_markdown
from mirip.sweep.runner import OUTPUT_FILES, SweepRunner, describe_best
from mirip.sweep.settings import SweepSettings
from mirip.training.run_data import exclusion_note, read_metadata, split_names, union_failed, write_excluded


def cache_labels(paths: Sequence[str]) -> List[str]:
    """Short, distinct, filesystem-safe names for the caches (their file stems; numbered where equal)."""
    stems = [re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(p))[0]) or "cache" for p in paths]
    out = []
    for i, stem in enumerate(stems):
        out.append(stem if stems.count(stem) == 1 else f"{stem}-{i + 1}")
    return out


def check_caches(paths: Sequence[str], names: Sequence[str]) -> List[Dict[str, Any]]:
    """Each cache's fingerprint facts; a cache missing (or holding stale rows of) metadata images is refused."""
    if len(set(os.path.abspath(p) for p in paths)) != len(paths):
        raise ValueError(f"--features lists the same cache twice: {', '.join(paths)}")
    facts, problems = [], []
    for path in paths:
        with open_cache(path) as cache:
            try:
                cache.rows_for(names)
            except CacheError as exc:
                problems.append(str(exc))
                continue
            fp = cache.fingerprint
        facts.append({"path": path, "backbone": fp.get("backbone"), "family": fp.get("backbone_family", "dinov2"),
                      "image_size": fp.get("image_size"), "weights": weights_summary(fp)["backbone_weights"]})
    if problems:
        raise CacheError("every cache of a multi-cache sweep must hold every image of the metadata (the same "
                         "splits for all): " + " | ".join(problems))
    return facts


def make_splits(settings: SweepSettings, grid: SweepGrid, excluded: Sequence[str] = ()
                ) -> Dict[int, Dict[str, List[str]]]:
    """seed -> {split: image names}: made once per seed from the metadata alone, as scripts/train.py splits
    (the whole metadata, then the ``excluded`` images left out)."""
    meta = read_metadata(settings.metadata, settings.filename_column, settings.tier_column, settings.encoding)
    return {int(seed): split_names(meta, settings.run_config(HeadConfig(1.0, 1, 1, 1.0, 0.0, 0.0, seed)).splitter(),
                                   settings.filename_column, excluded)
            for seed in grid.seed}


def _shared_splits(grid: SweepGrid, settings: SweepSettings, features: Sequence[str],
                   log: Optional[Callable[[str], None]]) -> tuple:
    """(image names, excluded images, cache facts, cache labels, splits per seed), the splits written to
    ``splits/seed*.json``: what every cache's sub-sweep shares."""
    meta = read_metadata(settings.metadata, settings.filename_column, settings.tier_column, settings.encoding)
    names = meta[settings.filename_column].astype(str).tolist()
    # An image unreadable in any cache is left out of every cache's sweep: all train and test on the same drawings.
    excluded = union_failed(list(features), names, settings.strict_images)
    names = [n for n in names if n not in excluded]
    facts = check_caches(list(features), names)  # before any training: a bad cache fails the sweep at once
    labels = cache_labels(features)
    splits = make_splits(settings, grid, excluded)
    out = settings.output_dir
    for seed, by_split in splits.items():
        write_atomic(os.path.join(out, "splits", f"seed{seed}.json"), json.dumps(by_split, indent=1))
    if excluded and log:
        log(exclusion_note(excluded, write_excluded(out, excluded)))
    return names, excluded, facts, labels, splits


def _sweep_caches(grid: SweepGrid, settings: SweepSettings, labels: Sequence[str], facts: Sequence[Dict[str, Any]],
                  splits, excluded, progress: bool, log: Optional[Callable[[str], None]], overwrite: bool = False
                  ) -> tuple:
    """One sub-sweep per cache, in ``<output-dir>/<label>``; (their tables combined, heads trained, skipped)."""
    tables, trained, skipped = [], 0, 0
    for label, fact in zip(labels, facts):
        sub = dataclasses.replace(settings, features=fact["path"], output_dir=os.path.join(settings.output_dir, label))
        if log:
            log(f"cache {label}: {fact['backbone']} ({fact['family']}, {fact['image_size']} px, {fact['weights']})")
        result = SweepRunner(grid, sub, progress=progress, log=log, splits=splits, excluded=excluded,
                             overwrite=overwrite).run()
        trained, skipped = trained + result["trained"], skipped + result["skipped"]
        table = result["results"].copy()
        table.insert(0, "cache", label)
        table.insert(1, "backbone", fact["backbone"])
        table.insert(2, "image_size", fact["image_size"])
        table["checkpoint"] = [os.path.join(label, c) for c in table["checkpoint"]]
        tables.append(table)
    return pd.concat(tables, ignore_index=True), trained, skipped


def _summary_notes(combined: pd.DataFrame, summary: pd.DataFrame, labels: Sequence[str],
                   facts: Sequence[Dict[str, Any]], num_images: int, weights: Sequence[str]) -> List[str]:
    """summary.md's preamble: the caches compared, and the random-weights warning where it applies."""
    notes = [f"{len(combined)} runs of {len(summary)} configurations on {len(facts)} caches of the same "
             f"{num_images} images, with the same splits per seed (splits/seed*.json):", ""]
    notes += [f"- `{label}`: {f['path']} — backbone {f['backbone']} ({f['family']}), {f['image_size']} px, "
              f"{f['weights']} weights" for label, f in zip(labels, facts)]
    if "random" in weights:
        notes += ["", f"**{RANDOM_WEIGHTS_NOTE[0].upper() + RANDOM_WEIGHTS_NOTE[1:]}.**"]
    return notes


def run_multi_sweep(grid: SweepGrid, settings: SweepSettings, features: Sequence[str], *, progress: bool = True,
                    log: Optional[Callable[[str], None]] = None, overwrite: bool = False) -> Dict[str, Any]:
    """The grid on every cache in ``features`` over shared splits; returns the combined table and the winner."""
    settings.check()
    t_start = time.perf_counter()
    names, excluded, facts, labels, splits = _shared_splits(grid, settings, features, log)
    out = settings.output_dir
    combined, trained, skipped = _sweep_caches(grid, settings, labels, facts, splits, excluded, progress, log,
                                              overwrite)
    write_atomic(os.path.join(out, "results.csv"), combined.to_csv(index=False))
    summary = aggregate(combined, extra_keys=("cache",))
    weights = sorted({f["weights"] for f in facts})
    notes = _summary_notes(combined, summary, labels, facts, len(names), weights)
    write_atomic(os.path.join(out, "summary.md"), summary_markdown(summary, notes=notes))
    best = choose_best(summary)
    winner = facts[labels.index(best["cache"])]
    best_json = best_record(best, settings, winner["path"], weights, out,
                            extra={"cache": best["cache"], "features": winner["path"], "backbone": winner["backbone"]})
    write_atomic(os.path.join(out, "best.json"), json.dumps(json_safe(best_json), indent=2))
    save_heatmap(summary, os.path.join(out, "heatmap.png"),
                 title="RANDOM backbone weights (pipeline check, not a trained model)" if "random" in weights else "")
    if log:
        log(f"best on validation: cache {best['cache']} ({winner['backbone']}), {describe_best(best)} "
            f"(val {best['val_acc_mean']:.4f}, test "
            f"{best['test_acc_mean']:.4f}); outputs in {out}: "
            + ", ".join(f for f in OUTPUT_FILES if os.path.exists(os.path.join(out, f))))
    return {"results": combined, "summary": summary, "best": best_json, "output_dir": out, "trained": trained,
            "skipped": skipped, "wall_time_s": time.perf_counter() - t_start, "caches": dict(zip(labels, facts))}
