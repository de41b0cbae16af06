"""Cross-validation of a run's recipe: K heads, each trained on all non-test images but one fold and scored on
that fold, so every non-test drawing is validation data exactly once.

One val split of 15 drawings says little; K folds say how much the figures move with the drawings chosen
(mean +- std over folds, and the fold table). Folds are made of whole groups when the run has a group
column, tier-balanced as whole groups allow. The test split stays out of every fold: the run's final head
(trained as without --folds) is tested on it once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from mirip.training.config import TrainingConfig
from mirip.training.datasets.group_split import group_folds
from mirip.training.evaluator import Evaluator
from mirip.training.head_fit import HeadFit
from mirip.training.run_config import RunConfig
from mirip.training.run_data import RunData, split_dataset
from mirip.training.run_outputs import write_json

FOLDS_FILE = "folds.json"
FOLD_FIGURES = ("accuracy", "spearman", "kendall")


def fold_rows(data: RunData, k: int, group_column: Optional[str], seed: int) -> List[np.ndarray]:
    """``k`` disjoint sets of row positions covering the run's non-test rows (train and val), whole groups."""
    pool = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    if group_column:
        labels = data.metadata[group_column].astype(str).to_numpy()[pool]
    else:
        labels = np.array([data.names[i] for i in pool])
    codes = np.unique(labels, return_inverse=True)[1].reshape(-1)
    counts = np.zeros((int(codes.max()) + 1, 4), dtype=np.int64)
    np.add.at(counts, (codes, data.ranks[pool]), 1)
    what = f"--folds {k} by {group_column!r}" if group_column else f"--folds {k}"
    return [pool[np.isin(codes, members)] for members in group_folds(counts, k, seed, what)]


def _fold_run(cfg: RunConfig, data: RunData, features, val_rows: np.ndarray, fold: int,
              progress: bool) -> Dict[str, Any]:
    """Train one head on every non-test row outside ``val_rows``, pick its epoch there, score it there."""
    train_rows = np.setdiff1d(np.concatenate([data.splits["train"], data.splits["val"]]), val_rows)
    fold_data = dataclasses.replace(data, splits={"train": train_rows, "val": val_rows,
                                                  "test": np.array([], dtype=np.int64)})
    out = os.path.join(cfg.output_dir, f"fold_{fold}")
    tc: TrainingConfig = dataclasses.replace(cfg.training, checkpoint_dir=out)
    os.makedirs(out, exist_ok=True)
    train_ds, val_ds = (split_dataset(fold_data, s, features, tc, train=(s == "train")) for s in ("train", "val"))
    trainer = HeadFit(cfg.head_config(), features.shape[1], tc, fingerprint=data.fingerprint,
                      extra={"run_config": cfg.to_dict(), "fold": fold}, progress=progress)
    trainer.fit(train_ds, val_ds)
    trainer.restore_best()
    metrics = Evaluator(trainer.model, tc.device).evaluate_detailed(val_ds)
    return {"fold": fold, "train_images": int(len(train_rows)), "val_images": int(len(val_rows)),
            "val_names": [data.names[i] for i in val_rows], "best_epoch": trainer.best_epoch,
            "distinct_pairs": metrics["distinct_pairs"], **{f: metrics[f] for f in FOLD_FIGURES},
            "checkpoint": os.path.join(out, "best.pt")}


def summarize_folds(table: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """{figure: {"mean", "std"}} over folds (std with ddof 1: the folds are a sample of possible splits)."""
    out = {}
    for f in FOLD_FIGURES + ("best_epoch",):
        values = np.array([row[f] for row in table], dtype=np.float64)
        out[f] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0}
    return out


def format_folds(report: Dict[str, Any]) -> str:
    """The fold table and the mean +- std line, as printed."""
    lines = [f"cross-validation, {report['folds']} folds" + (f" by {report['group_column']!r}" if report["group_column"]
                                                            else "") + f" over {report['images']} non-test images:",
             "  fold  train  val  best epoch  accuracy  Spearman  Kendall"]
    for row in report["table"]:
        lines.append(f"  {row['fold']:>4}  {row['train_images']:>5}  {row['val_images']:>3}  {row['best_epoch']:>10}  "
                     f"{row['accuracy']:>8.4f}  {row['spearman']:>8.4f}  {row['kendall']:>7.4f}")
    s = report["summary"]
    lines.append("  mean +- std: " + ", ".join(f"{f} {s[f]['mean']:.4f} +- {s[f]['std']:.4f}" for f in FOLD_FIGURES)
                 + f", best epoch {s['best_epoch']['mean']:.1f} +- {s['best_epoch']['std']:.1f}")
    return "\n".join(lines)


def cross_validate(cfg: RunConfig, data: RunData, features, *, progress: bool = False,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """K fold heads on the run's non-test rows; the report (also written to ``folds.json``)."""
    k = int(cfg.folds)
    folds = fold_rows(data, k, cfg.group_column, cfg.training.seed)
    table = []
    for i, rows in enumerate(folds, start=1):
        log(f"fold {i} of {k}: validating on {len(rows)} images, training on the other "
            f"{sum(len(r) for r in folds) - len(rows)}")
        table.append(_fold_run(cfg, data, features, rows, i, progress))
    report = {"folds": k, "group_column": cfg.group_column, "images": int(sum(len(r) for r in folds)),
              "summary": summarize_folds(table), "table": table}
    write_json(os.path.join(cfg.output_dir, FOLDS_FILE), report)
    log(format_folds(report))
    return report
