"""From a raw score to something people can act on: tier probabilities, a predicted tier, a percentile.

Two small objects, both stored in the checkpoint as plain dicts (``torch.load(weights_only=True)`` reads them):

``OrdinalCalibration`` (checkpoint key ``calibration``): a cumulative-logit (ordinal logistic) model
fitted on the **validation** split after training. With tier ranks C=0 < B=1 < A=2 < S=3,

    P(rank <= k | score s) = sigmoid(threshold_k - slope * s),   k = 0, 1, 2,  threshold_0 < threshold_1 < threshold_2

so each drawing has a latent quality ``slope * s + logistic noise`` and the three thresholds cut it into
tiers. One slope and three ordered thresholds: four numbers, fitted by maximum likelihood (with a weak
Gaussian prior on the standardised parameters, so a split whose tiers the scores separate perfectly, or
that lacks a tier, still gives finite numbers).

``ScoreReference`` (checkpoint key ``score_reference``): quantiles of the training split's scores, overall
and per tier, so a new score gets its percentile among the training drawings with no data at hand.

This module is what reading a checkpoint needs (the two objects, their checks, ``from_checkpoint``): the
scoring path stops here. Fitting them and the calibration plot are ``mirip.training.calibration_fit``; the
figures of a calibration on labelled scores (expected calibration error, ranked probability score, confusion
matrix) are ``mirip.training.calibration_metrics``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mirip.common.plain import plain

CALIBRATION_VERSION = 1  # of the stored calibration and score reference (their ``version`` key)
# Internal order: rank 0..3 = C, B, A, S. Everything returned to users is in TIERS order (S, A, B, C).
RANK_ORDER = ("C", "B", "A", "S")
METHOD = "cumulative_logit"
METHOD_TEXT = ("ordinal logistic (cumulative logit) model: P(tier <= k | score) = sigmoid(threshold_k - slope * score), "
               "one slope, three ordered thresholds, maximum likelihood")
PRIOR_SD = 5.0
NO_CALIBRATION = ("checkpoint {path} has no score-to-tier calibration (it was written before mirip stored one): "
                  "scores only, no tier columns; retrain with scripts/train.py to get tier predictions")


class CalibrationError(ValueError):
    """Scores and tiers from which no calibration can be fitted, or a malformed stored calibration."""


def as_scores(scores: Any, what: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr))[:5].tolist()
        raise CalibrationError(f"{what} must be finite numbers; positions {bad} are not")
    return arr


def as_ranks(ranks: Any, n: int) -> np.ndarray:
    arr = np.asarray(ranks).reshape(-1)
    if arr.size != n:
        raise CalibrationError(f"need one tier rank per score: {n} scores, {arr.size} ranks")
    if arr.size and (arr.min() < 0 or arr.max() > 3 or not np.all(arr == np.round(arr))):
        raise CalibrationError("tier ranks must be integers 0..3 (C=0, B=1, A=2, S=3)")
    return arr.astype(np.int64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Split by sign so exp never overflows.
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def logistic_difference_cdf(x: Any) -> np.ndarray:
    """P(e1 - e2 <= x) for two independent standard logistic variables: e^x (e^x - 1 - x) / (e^x - 1)^2."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    t = np.exp(-a)
    with np.errstate(invalid="ignore", divide="ignore"):
        upper = (1.0 - t * (1.0 + a)) / (1.0 - t) ** 2  # F(|x|), written in e^-|x| so it never overflows
    small = a < 1e-4
    upper = np.where(small, 0.5 + a / 6.0, upper)  # the density of the difference at 0 is 1/6
    return np.where(x >= 0, upper, 1.0 - upper)


@dataclass(frozen=True)
class OrdinalCalibration:
    """Score -> P(S), P(A), P(B), P(C) through one slope and three ordered thresholds (rank order C|B, B|A, A|S)."""

    slope: float
    thresholds: Tuple[float, float, float]
    fitted_on: str = "val"
    num_images: int = 0
    tier_counts: Dict[str, int] = field(default_factory=dict)
    log_likelihood: float = float("nan")
    prior_sd: float = PRIOR_SD
    metrics: Dict[str, Any] = field(default_factory=dict)  # the fit's own figures, on the split it was fitted on

    def __post_init__(self):
        th = tuple(float(t) for t in self.thresholds)
        if len(th) != 3 or not all(math.isfinite(t) for t in th) or not math.isfinite(float(self.slope)):
            raise CalibrationError(f"calibration needs a finite slope and three finite thresholds, got "
                                   f"slope {self.slope!r}, thresholds {self.thresholds!r}")
        if not th[0] <= th[1] <= th[2]:
            raise CalibrationError(f"calibration thresholds must be ordered, got {th}")
        object.__setattr__(self, "thresholds", th)
        object.__setattr__(self, "slope", float(self.slope))

    # --- the model ----------------------------------------------------------------------------
    def cumulative(self, scores: Any) -> np.ndarray:
        """(N, 3): P(rank <= k) for k = 0 (C), 1 (B or worse), 2 (A or worse)."""
        s = as_scores(scores)
        return _sigmoid(np.asarray(self.thresholds)[None, :] - self.slope * s[:, None])

    def probabilities_by_rank(self, scores: Any) -> np.ndarray:
        """(N, 4): P(C), P(B), P(A), P(S) (rank order)."""
        cum = self.cumulative(scores)
        n = cum.shape[0]
        full = np.concatenate([np.zeros((n, 1)), cum, np.ones((n, 1))], axis=1)
        return np.clip(np.diff(full, axis=1), 0.0, 1.0)

    def probabilities(self, scores: Any) -> np.ndarray:
        """(N, 4): P(S), P(A), P(B), P(C), each row summing to 1."""
        return self.probabilities_by_rank(scores)[:, ::-1].copy()

    def predict_ranks(self, scores: Any) -> np.ndarray:
        """The most probable tier's rank (C=0 ... S=3) per score."""
        return np.argmax(self.probabilities_by_rank(scores), axis=1)

    def predict(self, scores: Any) -> List[str]:
        """The most probable tier per score ("S", "A", "B" or "C")."""
        return [RANK_ORDER[r] for r in self.predict_ranks(scores)]

    def boundaries(self) -> Tuple[float, float, float]:
        """Scores where P(rank <= k) = 1/2: the C|B, B|A and A|S boundaries on the score axis."""
        if self.slope == 0:
            return (float("nan"),) * 3
        return tuple(t / self.slope for t in self.thresholds)

    def prob_first_better(self, score_a: float, score_b: float) -> float:
        """P(drawing a's latent quality exceeds b's) under the model: latent = slope * score + logistic noise."""
        return float(logistic_difference_cdf(self.slope * (float(score_a) - float(score_b))))

    # --- storage ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "version": CALIBRATION_VERSION, "method": METHOD, "description": METHOD_TEXT,
            "tier_order": list(RANK_ORDER), "slope": self.slope, "thresholds": list(self.thresholds),
            "boundaries": [float(b) for b in self.boundaries()], "fitted_on": self.fitted_on,
            "num_images": int(self.num_images), "tier_counts": {k: int(v) for k, v in self.tier_counts.items()},
            "log_likelihood": float(self.log_likelihood), "prior_sd": float(self.prior_sd),
            "metrics": plain(self.metrics),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OrdinalCalibration":
        if not isinstance(d, Mapping):
            raise CalibrationError(f"stored calibration must be a dict, got {type(d).__name__}")
        if d.get("method", METHOD) != METHOD:
            raise CalibrationError(f"unknown calibration method {d.get('method')!r}; this mirip reads {METHOD!r}")
        if list(d.get("tier_order", RANK_ORDER)) != list(RANK_ORDER):
            raise CalibrationError(f"stored calibration has tier order {d.get('tier_order')!r}, expected "
                                   f"{list(RANK_ORDER)!r}")
        try:
            return cls(slope=float(d["slope"]), thresholds=tuple(d["thresholds"]),
                       fitted_on=str(d.get("fitted_on", "val")), num_images=int(d.get("num_images", 0)),
                       tier_counts=dict(d.get("tier_counts") or {}),
                       log_likelihood=float(d.get("log_likelihood", float("nan"))),
                       prior_sd=float(d.get("prior_sd", PRIOR_SD)), metrics=dict(d.get("metrics") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"stored calibration is malformed ({exc!r})") from None


# --- the percentile reference ------------------------------------------------------------------
REFERENCE_LEVELS = tuple(float(p) for p in range(101))  # percent


@dataclass(frozen=True)
class ScoreReference:
    """Quantiles of the training split's scores at ``levels`` percent, overall and per tier."""

    levels: Tuple[float, ...]
    overall: Tuple[float, ...]
    per_tier: Dict[str, Optional[Tuple[float, ...]]]
    counts: Dict[str, int]
    split: str = "train"
    images_sha256: Optional[str] = None  # of the sorted image names, so a rebuilt split can be checked

    def percentile(self, scores: Any, tier: Optional[str] = None) -> np.ndarray:
        """Percent of the reference drawings (all, or those of ``tier``) scoring at or below each score, 0..100.

        Linear between stored quantiles; 0 below the lowest and 100 above the highest; NaN for a tier absent
        from the reference. Equal stored quantiles (ties) count as the middle of their levels.
        """
        s = as_scores(scores)
        q = self.overall if tier is None else self.per_tier.get(tier)
        if q is None:
            return np.full(s.shape, np.nan)
        values, levels = _strictly_increasing(np.asarray(q, dtype=np.float64), np.asarray(self.levels))
        if values.size == 1:
            return np.where(s < values[0], 0.0, np.where(s > values[0], 100.0, 50.0))
        return np.interp(s, values, levels, left=0.0, right=100.0)

    def to_dict(self) -> Dict[str, Any]:
        return {"version": CALIBRATION_VERSION, "split": self.split, "levels": list(self.levels),
                "overall": list(self.overall),
                "per_tier": {t: (list(v) if v is not None else None) for t, v in self.per_tier.items()},
                "counts": dict(self.counts), "images_sha256": self.images_sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScoreReference":
        try:
            levels = tuple(float(x) for x in d["levels"])
            overall = tuple(float(x) for x in d["overall"])
            per_tier = {t: (tuple(float(x) for x in v) if v is not None else None)
                        for t, v in (d.get("per_tier") or {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"stored score reference is malformed ({exc!r})") from None
        if len(levels) != len(overall) or any(v is not None and len(v) != len(levels) for v in per_tier.values()):
            raise CalibrationError("stored score reference: quantile lists and levels differ in length")
        return cls(levels, overall, per_tier, {k: int(v) for k, v in (d.get("counts") or {}).items()},
                   str(d.get("split", "train")), d.get("images_sha256"))


def _strictly_increasing(values: np.ndarray, levels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Collapse runs of equal quantiles into one point at the mean of their levels (np.interp needs increasing x)."""
    uniq, start = np.unique(values, return_index=True)
    if uniq.size == values.size:
        return values, levels
    ends = np.append(start[1:], values.size)
    return uniq, np.array([levels[a:b].mean() for a, b in zip(start, ends)])


def names_sha256(names: Sequence[str]) -> str:
    """A fingerprint of a set of image names (sorted, newline-joined, UTF-8)."""
    return hashlib.sha256("\n".join(sorted(str(n) for n in names)).encode("utf-8")).hexdigest()


# --- reading a checkpoint ----------------------------------------------------------------------
def from_checkpoint(ckpt: Mapping[str, Any], path: str = "checkpoint"
                    ) -> Tuple[Optional[OrdinalCalibration], Optional[ScoreReference], Optional[str]]:
    """(calibration, score reference, None) or (None, None, the reason in one line) for a checkpoint dict."""
    raw_cal, raw_ref = ckpt.get("calibration"), ckpt.get("score_reference")
    if raw_cal is None:
        if "calibration" in ckpt:  # written by a mirip that calibrates, but the run could not (e.g. no val split)
            why = ckpt.get("calibration_note") or "the run could not fit one"
            return None, None, f"checkpoint {path} has no score-to-tier calibration ({why}): scores only, no tier columns"
        return None, None, NO_CALIBRATION.format(path=path)
    try:
        cal = OrdinalCalibration.from_dict(raw_cal)
        ref = ScoreReference.from_dict(raw_ref) if raw_ref is not None else None
    except CalibrationError as exc:
        return None, None, f"checkpoint {path}: {exc}; scores only, no tier columns"
    return cal, ref, None
