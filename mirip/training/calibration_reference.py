"""``ScoreReference``: quantiles of the training split's scores, overall and per tier, stored in the
checkpoint (key ``score_reference``) so that a new score gets its percentile among the training drawings
with no data at hand. ``mirip.training.calibration`` is the import path for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from mirip.common.tiers import TIERS
from mirip.training.calibration_metrics import CALIBRATION_VERSION, CalibrationError, RANK_ORDER, as_ranks, as_scores


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


def make_score_reference(scores: Any, ranks: Any, *, split: str = "train",
                         levels: Sequence[float] = REFERENCE_LEVELS,
                         names: Optional[Sequence[str]] = None) -> ScoreReference:
    """Quantiles (numpy's linear interpolation) of the scores, overall and per tier present."""
    s = as_scores(scores)
    y = as_ranks(ranks, s.size)
    if s.size == 0:
        raise CalibrationError(f"cannot make a score reference from an empty {split} split")
    lv = np.asarray(levels, dtype=np.float64)
    per_tier: Dict[str, Optional[Tuple[float, ...]]] = {}
    counts = {"all": int(s.size)}
    for t in TIERS:
        mask = y == RANK_ORDER.index(t)
        counts[t] = int(mask.sum())
        per_tier[t] = tuple(np.quantile(s[mask], lv / 100.0).tolist()) if mask.any() else None
    return ScoreReference(tuple(lv.tolist()), tuple(np.quantile(s, lv / 100.0).tolist()), per_tier, counts, split,
                          names_sha256(names) if names is not None else None)
