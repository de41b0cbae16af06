"""What scoring returns: scores with the files that failed, a comparison of two drawings, tier predictions.

Plain result types of ``mirip.scoring.scorer.Scorer`` (importable from there too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from mirip.common.tiers import TIERS
from mirip.training.calibration_metrics import CalibrationError


@dataclass
class ScoreResult:
    """Scores of the images that could be read, and (path, reason) for those that could not."""

    paths: List[str]
    scores: List[float]
    failures: List[Tuple[str, str]] = field(default_factory=list)
    # Aligned with ``paths``: spread across an ensemble's members (None for one head), typicality in [0, 1]
    # and whether it is below the checkpoint's threshold (None without a typicality fit).
    score_std: Optional[List[float]] = None
    typicality: Optional[List[float]] = None
    unusual: Optional[List[bool]] = None
    member_scores: Optional[List[List[float]]] = None

    def extras(self) -> Dict[str, Dict[str, object]]:
        """path -> the per-drawing fields beside the score that this checkpoint can give."""
        cols = {"score_std": self.score_std, "typicality": self.typicality, "unusual": self.unusual}
        return {p: {k: v[i] for k, v in cols.items() if v is not None} for i, p in enumerate(self.paths)}

    def ranked(self) -> List[Tuple[int, str, float]]:
        """(rank, path, score), best first; rank 1 is the highest score, ties keep input order."""
        order = sorted(range(len(self.scores)), key=lambda i: -self.scores[i])
        return [(r + 1, self.paths[i], self.scores[i]) for r, i in enumerate(order)]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Comparison:
    path_a: str
    path_b: str
    score_a: float
    score_b: float
    # P(a is the better drawing) under the calibrated model (averaged over an ensemble's members); None
    # without a calibration.
    prob_a_better: Optional[float] = None
    score_std_a: Optional[float] = None
    score_std_b: Optional[float] = None
    typicality_a: Optional[float] = None
    typicality_b: Optional[float] = None

    @property
    def margin(self) -> float:
        return abs(self.score_a - self.score_b)

    @property
    def prediction(self) -> int:
        """1 if A is better, -1 if B is better, 0 for a tie (the seed's ``predict_pair`` convention)."""
        return 1 if self.score_a > self.score_b else -1 if self.score_a < self.score_b else 0

    @property
    def better(self) -> Optional[str]:
        return {1: self.path_a, -1: self.path_b}.get(self.prediction)


class CalibrationUnavailable(CalibrationError):
    """Tier predictions asked of a checkpoint that holds no score-to-tier calibration."""


@dataclass(frozen=True)
class TierPrediction:
    """One drawing: its score, most probable tier, P(tier) for S, A, B, C, and percentile among training drawings."""

    path: str
    score: float
    tier: str
    probabilities: Dict[str, float]
    percentile: Optional[float]
    # An unusual drawing's probabilities are pulled toward the validation split's tier shares (how far:
    # ``mirip.training.typicality.flatten_unusual``); None when the checkpoint has no typicality fit.
    typicality: Optional[float] = None
    unusual: Optional[bool] = None

    def as_row(self) -> Dict[str, object]:
        """The scores.csv columns: predicted_tier, p_S, p_A, p_B, p_C, percentile."""
        row: Dict[str, object] = {"predicted_tier": self.tier}
        row.update({f"p_{t}": self.probabilities[t] for t in TIERS})
        row["percentile"] = self.percentile
        return row


@dataclass
class TierPredictions:
    """Predictions of the images that could be read, and (path, reason) for those that could not."""

    predictions: List[TierPrediction]
    failures: List[Tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.predictions)

    def __iter__(self):
        return iter(self.predictions)
