"""The typed config of a stage-two run: the data it trains on (``DataSettings``, shared with sweeps) and
the head and training choices (``RunConfig``), saved as ``config.json`` beside the run and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


from mirip.common.feature_spec import FEATURE_NORMS, canonical_spec
from mirip.training.config import TrainingConfig
from mirip.training.datasets.data_splitter import DataSplitter
from mirip.training.head_config import HeadConfig


@dataclass
class DataSettings:
    """What a run or a sweep trains on: the cache, the metadata and its columns, the split, the output."""

    features: str
    metadata: str
    output_dir: str
    filename_column: str = "filename"
    tier_column: str = "tier"
    train_ratio: float = 0.8
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    stratify: bool = True
    # Rows sharing this column's value (a student, a scene) land in one split; None: split image by image.
    group_column: Optional[str] = None
    encoding: Optional[str] = None  # of the metadata CSV; None: UTF-8, else CP949 with a notice
    # Rows whose images extraction recorded as unreadable are left out (mirip.training.run_data); True refuses.
    strict_images: bool = False


@dataclass
class RunConfig(DataSettings):
    """Everything that defines a run; ``training.checkpoint_dir`` is the output directory."""

    margin: float = 1.0
    hidden_dim: int = 512
    projector_dim: int = 256
    dropout: float = 0.1
    ridge_alpha: Optional[float] = None  # None: chosen on the val split
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # The feature spec (mirip.common.feature_spec): which cached entries the head sees, in order. None: the cache's
    # default (its only entry, else cls@-1); a run resolves it and saves the canonical spec in config.json.
    feature: Optional[str] = None
    feature_norm: str = "auto"  # per-entry scaling: auto (entry when the spec has several entries), entry, none
    # Teachers' judged pairs trained beside the tier pairs (mirip.training.judged_pairs); None: tiers only.
    judgments: Optional[str] = None
    judgment_weight: float = 1.0  # what one judged pair counts against one tier pair
    # Each judged pair also weighted by its judge's reliability, fitted on the train split's judged pairs
    # (mirip.training.judge_reliability).
    judge_reliability: bool = False
    # Confidence intervals of the test figures: bootstrap resamples (0: none) and their two-sided level.
    bootstrap_resamples: int = 1000
    interval_level: float = 0.95
    folds: int = 0  # > 1: cross-validate the recipe over K folds of the non-test images before the final run

    def __post_init__(self):
        if isinstance(self.training, dict):
            self.training = TrainingConfig.from_dict(self.training)
        if self.feature is not None:
            self.feature = canonical_spec(self.feature)
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {', '.join(FEATURE_NORMS)}, got {self.feature_norm!r}")
        for name in ("hidden_dim", "projector_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.judge_reliability and not self.judgments:
            raise ValueError("--judge-reliability weighs judged pairs by their judge: it needs --judgments")
        if not self.judgment_weight >= 0:
            raise ValueError(f"judgment_weight must be non-negative, got {self.judgment_weight}")
        if self.margin < 0:
            raise ValueError(f"margin must be non-negative, got {self.margin}")
        if self.bootstrap_resamples < 0 or not 0.0 < self.interval_level < 1.0:
            raise ValueError(f"bootstrap_resamples must be >= 0 and interval_level in (0, 1), got "
                             f"{self.bootstrap_resamples} and {self.interval_level}")
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"folds must be 0 (no cross-validation) or at least 2, got {self.folds}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        try:
            self.splitter()
        except AssertionError as exc:  # the seed's DataSplitter asserts; a run reports it as bad input
            raise ValueError(str(exc)) from None

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["training"] = self.training.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "RunConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def splitter(self) -> DataSplitter:
        return DataSplitter(self.train_ratio, self.val_ratio, self.test_ratio, seed=self.training.seed,
                            stratify_column=self.tier_column if self.stratify else None,
                            group_column=self.group_column or self.filename_column)

    def head_config(self) -> HeadConfig:
        """The run's head: its dims, margin, dropout, lr, weight decay and seed (initialised from that seed)."""
        tc = self.training
        return HeadConfig(self.margin, self.hidden_dim, self.projector_dim, tc.learning_rate, self.dropout,
                          tc.weight_decay, tc.seed)
