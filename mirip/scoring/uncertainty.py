"""How sure a score is: the members of an ensemble checkpoint, and per-drawing typicality and spread.

An ensemble checkpoint (``mirip.training.ensemble``) stores K heads trained on different seeds; its
``model_state_dict`` is the first member's, so a reader that knows nothing of ensembles still scores with one
head. Scoring runs the backbone once and every member's projector and score head on the same features:
the mean is the score, the standard deviation across members ``score_std``, and tier probabilities are the
members' probabilities averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from mirip.common.tiers import TIERS
from mirip.ml.ranking_model import RankingHead
from mirip.training.calibration import OrdinalCalibration
from mirip.training.typicality import TypicalityFit, flatten_unusual


@dataclass
class ScoreDetails:
    """Per drawing of a batch: mean score, spread across members (None for one head), typicality (None
    without a fit) and each member's score (K, B)."""

    scores: np.ndarray
    score_std: Optional[np.ndarray]
    typicality: Optional[np.ndarray]
    member_scores: np.ndarray


def ensemble_heads(ckpt: Dict[str, Any], head: Dict[str, Any], device) -> List[RankingHead]:
    """The checkpoint's further members as heads on ``device`` (empty for a single-head checkpoint)."""
    states = (ckpt.get("ensemble") or {}).get("member_states") or []
    heads = []
    for state in states[1:]:  # member 0 is model_state_dict, already in the scorer's model
        h = RankingHead(int(head["input_dim"]), int(head["projector_output_dim"]), float(head.get("margin", 1.0)),
                        int(head["hidden_dim"]), float(head.get("dropout", 0.1)))
        h.load_head_state_dict(state)
        heads.append(h.to(device).eval())
    return heads


@torch.inference_mode()
def score_features(heads, feats: torch.Tensor, fit: Optional[TypicalityFit]) -> ScoreDetails:
    """Every head's score of the same features, their mean and spread, and the features' typicality."""
    per = torch.stack([h.score_head(h.projector(feats)).reshape(-1).float().cpu() for h in heads]).double().numpy()
    std = per.std(axis=0, ddof=1) if len(heads) > 1 else None
    typ = fit.typicality(feats.double().cpu().numpy()) if fit is not None else None
    return ScoreDetails(per.mean(axis=0), std, typ, per)


def tier_probabilities(calibration: OrdinalCalibration, member_scores: np.ndarray) -> np.ndarray:
    """(B, 4) P(S)..P(C): each member's calibrated probabilities, averaged over members."""
    member_scores = np.atleast_2d(np.asarray(member_scores, dtype=np.float64))
    return np.mean([calibration.probabilities(row) for row in member_scores], axis=0)


def prior(calibration: OrdinalCalibration) -> np.ndarray:
    """P(S)..P(C) of the validation split the calibration was fitted on: what is known without looking."""
    counts = np.array([calibration.tier_counts.get(t, 0) for t in TIERS], dtype=np.float64)
    return counts / counts.sum() if counts.sum() > 0 else np.full(4, 0.25)


def flattened(calibration: OrdinalCalibration, probs: np.ndarray, typicality: Optional[np.ndarray],
              fit: Optional[TypicalityFit]) -> np.ndarray:
    """``probs`` with every unusual drawing's row pulled toward the prior (``flatten_unusual``)."""
    if fit is None or typicality is None:
        return probs
    out = np.array(probs, dtype=np.float64)
    p0 = prior(calibration)
    for i, t in enumerate(typicality):
        if t < fit.threshold:
            out[i] = flatten_unusual(out[i], p0, float(t), fit.threshold)
    return out
