"""The intervals a run reports on a split: which units the bootstrap resamples (images, or the run's groups),
and the head's figures with their intervals (see ``mirip.training.bootstrap``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from mirip.training.bootstrap import (BootstrapConfig, add_intervals, pair_accuracies, percentile_interval,
                                      resample_counts)
from mirip.training.evaluator import score_images
from mirip.training.judged_pairs import judged_hits
from mirip.training.metrics import pair_correct
from mirip.training.run_data import RunData


def split_units(data: RunData, split: str, group_column: Optional[str]) -> Tuple[Optional[np.ndarray], str]:
    """(each image's group in ``split``, "group:<column>"), or (None, "image") without a group column."""
    if not group_column:
        return None, "image"
    if group_column not in data.metadata.columns:
        raise ValueError(f"group column {group_column!r} is not a column of the metadata "
                         f"(columns: {', '.join(map(str, data.metadata.columns))})")
    values = data.metadata[group_column].astype(str).to_numpy()
    return values[data.splits[split]], f"group:{group_column}"


def bootstrap_config(cfg: Any) -> BootstrapConfig:
    """The run's interval settings (a RunConfig's, or defaults for one from before intervals)."""
    return BootstrapConfig(resamples=int(getattr(cfg, "bootstrap_resamples", 1000)),
                           level=float(getattr(cfg, "interval_level", 0.95)), seed=int(cfg.training.seed))


def head_intervals(metrics: Optional[Dict[str, Any]], model, dataset, device, calibration, units, unit_name: str,
                   boot: BootstrapConfig) -> Optional[Dict[str, Any]]:
    """The head's ``metrics`` on ``dataset`` with their intervals (tier figures too, given a calibration)."""
    if not metrics or boot.resamples == 0:
        return metrics
    scores = score_images(model, dataset, device)
    probabilities = calibration.probabilities(scores) if calibration is not None else None
    return add_intervals(metrics, boot, scores, dataset.ranks, dataset.pair_arrays(), units, probabilities, unit_name)


def accuracy_interval(model, dataset, device, boot: BootstrapConfig, units=None) -> List[float]:
    """The pairwise accuracy's interval alone (a sweep's val split per head: cheaper than every figure's)."""
    if dataset is None or boot.resamples == 0:
        return [float("nan"), float("nan")]
    scores = score_images(model, dataset, device)
    first, second, labels = dataset.pair_arrays()
    correct = pair_correct(scores[first], scores[second], labels).astype(np.float64)
    counts = resample_counts(np.arange(len(scores)) if units is None else np.asarray(units), boot.resamples, boot.seed)
    return percentile_interval(pair_accuracies(counts, first, second, correct), boot.level)


def add_judged_intervals(report: Dict[str, Any], judged, scores: np.ndarray, data: RunData, boot: BootstrapConfig,
                         group_column: Optional[str]) -> None:
    """Each held-out split's agreement with the judged pairs (``report["val_agreement"]``, ``["test_agreement"]``)
    gains its bootstrap interval: the split's drawings (or groups) resampled as for the other figures, a judged
    pair counting once per drawn copy of each of its drawings."""
    if boot.resamples == 0:
        return
    for split in ("val", "test"):
        agreement = report.get(f"{split}_agreement")
        if not agreement or agreement.get("agreement") is None:
            continue
        rows = data.splits[split]
        units, unit_name = split_units(data, split, group_column)
        counts = resample_counts(np.arange(len(rows)) if units is None else units, boot.resamples, boot.seed)
        first, second, hits = judged_hits(scores[rows], judged.by_split[split])
        agreement["interval"] = percentile_interval(pair_accuracies(counts, first, second, hits), boot.level)
        agreement.update(interval_level=boot.level, interval_unit=unit_name)
