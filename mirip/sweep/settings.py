"""What a sweep holds fixed across its heads (``SweepSettings``), and ``sweep.json``, the record of it that a
restart is checked against: a sweep directory continues only with the data and fixed settings it was run with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from mirip.common.feature_spec import FEATURE_NORMS
from mirip.sweep.grid import SweepConfigError
from mirip.training.head_config import HeadConfig
from mirip.training.config import TrainingConfig
from mirip.training.run_config import DataSettings, RunConfig
from mirip.training.trainer import check_config

# TrainingConfig fields a sweep varies per head (grid axes), and those that do not change any number.
GRID_FIELDS = ("learning_rate", "weight_decay", "seed")
INERT_FIELDS = ("checkpoint_dir", "save_every_n_epochs", "wandb_enabled", "wandb_project", "wandb_run_name",
                "device", "num_workers")
DATA_FIELDS = ("filename_column", "tier_column", "train_ratio", "val_ratio", "test_ratio", "stratify")

@dataclass
class SweepSettings(DataSettings):
    """Everything a sweep holds fixed across heads: the data, the split, and the non-grid training settings."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: Optional[str] = None  # fused / batched / plain AdamW (mirip.training.stacked_heads); None: by device
    feature_norm: str = "auto"  # per-entry scaling of each spec (mirip.training.run.RunConfig.feature_norm)
    # > 1: every configuration is trained K times, validated on each fold of the non-test images in turn
    # (mirip.training.folds), and ranked by the mean over folds and seeds; 0: one train/val split per seed.
    folds: int = 0
    # Teachers' judged pairs (mirip.training.judged_pairs), trained beside the tier pairs at each of the grid's
    # judgment weights; None: tier pairs only.
    judgments: Optional[str] = None
    # Each judged pair also weighted by its judge's reliability, fitted on each split's train judged pairs
    # (train.py --judge-reliability).
    judge_reliability: bool = False

    def run_config(self, cfg: HeadConfig, feature: Optional[str] = None) -> RunConfig:
        """The ``scripts/train.py`` run this head is equal to (same split, pairs, init and step)."""
        tc = dataclasses.replace(self.training, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 seed=cfg.seed, checkpoint_dir=self.output_dir)
        return RunConfig(features=self.features, metadata=self.metadata, output_dir=self.output_dir,
                         filename_column=self.filename_column, tier_column=self.tier_column,
                         train_ratio=self.train_ratio, val_ratio=self.val_ratio, test_ratio=self.test_ratio,
                         stratify=self.stratify, group_column=self.group_column, encoding=self.encoding, strict_images=self.strict_images,
                         margin=cfg.margin, hidden_dim=cfg.hidden_dim,
                         projector_dim=cfg.projector_dim, dropout=cfg.dropout, training=tc,
                         feature=feature or cfg.feature, feature_norm=self.feature_norm,
                         judgments=self.judgments if cfg.judgment_weight is not None else None,
                         judgment_weight=1.0 if cfg.judgment_weight is None else cfg.judgment_weight,
                         judge_reliability=self.judge_reliability and cfg.judgment_weight is not None)

    def fixed(self) -> Dict[str, Any]:
        """The settings results depend on (apart from the grid): a restart must match them."""
        out = {k: getattr(self, k) for k in DATA_FIELDS}
        out.update({k: v for k, v in self.training.to_dict().items() if k not in GRID_FIELDS + INERT_FIELDS})
        if self.group_column:  # recorded only when set, so sweeps split by image continue
            out["group_column"] = self.group_column
        if self.folds:  # recorded only when set, so sweeps without folds continue
            out["folds"] = self.folds
        if self.feature_norm != "auto":  # recorded only when set, so sweeps from before feature specs continue
            out["feature_norm"] = self.feature_norm
        if self.judgments:  # recorded only when set, so sweeps without judgments continue
            out["judgments"] = self.judgments
        if self.judge_reliability:  # recorded only when set, so sweeps without it continue
            out["judge_reliability"] = True
        return out

    def check_grid(self, weights: Tuple[Optional[float], ...]) -> None:
        """Judgment weights are an axis only with a judgments file, and a judgments file needs weights."""
        if self.judge_reliability and self.judgments is None:
            raise SweepConfigError("--judge-reliability weighs judged pairs by their judge: it needs --judgments")
        if self.judgments is None and weights != (None,):
            raise SweepConfigError("--judgment-weight needs --judgments (the judged pairs the weight applies to)")
        if self.judgments is not None and None in weights:
            raise SweepConfigError("--judgments needs numeric --judgment-weight values (0: report agreement with "
                                   "the judged pairs without training on them)")
        if self.judgments is not None and not os.path.isfile(self.judgments):
            raise SweepConfigError(f"--judgments: no such file: {self.judgments}")

    def check(self) -> None:
        check_config(self.training)
        if self.feature_norm not in FEATURE_NORMS:
            raise SweepConfigError(f"--feature-norm must be one of {', '.join(FEATURE_NORMS)}, got {self.feature_norm!r}")
        if self.folds < 0 or self.folds == 1:
            raise SweepConfigError(f"--folds must be 0 (no cross-validation) or at least 2, got {self.folds}")
        ratios = (self.train_ratio, self.val_ratio, self.test_ratio)
        if min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6:
            raise SweepConfigError(f"split ratios must be non-negative and sum to 1.0, got {ratios}")
        if self.val_ratio <= 0:
            raise SweepConfigError("--val-ratio must be positive: a sweep chooses its winner on validation accuracy")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_diffs(path: str, manifest: Dict[str, Any]) -> List[str]:
    """What differs between the sweep recorded in ``path`` and ``manifest`` (versions aside); [] if none."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    diffs = []
    for section in ("fixed", "fingerprint"):
        a, b = old.get(section) or {}, manifest.get(section) or {}
        for k in sorted(set(a) | set(b)):
            if section == "fingerprint" and k in ("mirip_version", "torch_version", "transformers_version"):
                continue
            if json.dumps(a.get(k)) != json.dumps(b.get(k)):
                diffs.append(f"{section}.{k}: was {a.get(k)!r}, now {b.get(k)!r}")
    if old.get("metadata_sha256") != manifest.get("metadata_sha256"):
        diffs.append("the metadata file's contents changed")
    if old.get("judgments_sha256") != manifest.get("judgments_sha256"):
        diffs.append("the judgments file's contents changed")
    return diffs


def check_manifest(path: str, manifest: Dict[str, Any], finished: int = 0, overwrite: bool = False
                    ) -> Optional[str]:
    """Refuse to continue a sweep in ``path``'s directory that finished configurations on other data or other
    fixed settings (its results would not be comparable). Returns a note when the directory starts over instead:
    nothing had finished there (an interrupted first try), or ``overwrite`` was asked for; None otherwise."""
    diffs = _manifest_diffs(path, manifest)
    if not diffs:
        return None
    what = "; ".join(diffs[:6])
    if finished == 0:
        return f"starting afresh: the sweep begun here with other settings ({what}) had finished no configuration"
    if overwrite:
        return f"--overwrite: removing {finished} finished configuration(s) run with other settings ({what})"
    raise SweepConfigError(
        f"{os.path.dirname(path)} holds {finished} finished configuration(s) run with other settings ({what}); "
        "its results would not be comparable. Use another --output-dir, the original settings, or --overwrite "
        "to delete them and start over."
    )
