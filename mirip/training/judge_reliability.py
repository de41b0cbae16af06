"""How far to trust each teacher: a noisy Bradley-Terry fit of the judges' reliabilities, and the weight of
each judged pair that follows from it (``train.py --judge-reliability``).

The model (crowd-kit's NoisyBT idea): judge j follows the true order with probability ``2 q_j - 1`` and
answers at random otherwise, so

    P(a beats b | judge j) = q_j * sigmoid(s_a - s_b) + (1 - q_j) * sigmoid(s_b - s_a)

``q_j`` is the chance the judge picks the better of two clearly different drawings: 1 always, 0.5 a coin
flip, below 0.5 a judge who answers against the order (the same formula with ``2 q_j - 1`` written as the
probability of answering by the order, extended below zero so a contradicting judge is recognised rather
than merged with a coin flipper). Item scores ``s`` and all ``q_j`` are fitted together by maximum
likelihood (L-BFGS; ties count half a win each way), with each drawing's score under a
N(tier rank - mean, TIER_PRIOR_SD^2) prior: it keeps scores finite when the judgments are perfectly
consistent, and it fixes which way the scale runs - the likelihood alone cannot tell an accurate judge from
one who always contradicts when both judged as much, since (q, s) and (1 - q, -s) fit equally well.

Few judgments say little about a judge: the fitted q is shrunk toward the pooled value (the pair-weighted
mean q of all judges) as if the pool had added PRIOR_JUDGMENTS judgments,
``q = (n q_fit + k q_pool) / (n + k)``. The pair weight is then ``w = clip(2 q - 1, 0, 1)``: the share of the
judge's answers that follow the order - the expected label of a judge's answer is ``2 q - 1`` times the true
one, so this scales each judge's pull on the head to the signal it carries. A coin flipper's pairs (w 0)
carry none; a contradicting judge's are dropped too rather than reversed (a judge the data call adversarial
is not one to learn from, in either direction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mirip.training.lbfgs import minimize_lbfgs

TIER_PRIOR_SD = 1.0  # score units (a logit) per drawing around its tier's rank
PRIOR_JUDGMENTS = 10  # judgments' worth of the pooled q added to each judge's own
Q_START = 0.75  # judges start as mostly right: the fit begins on the side of the majority's order
_LOGIT_BOUND = 12.0  # q within sigmoid(+-12): a judge's answers never become certain


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-300, None))


def noisy_bt_loglik(scores: np.ndarray, q: np.ndarray, first: np.ndarray, second: np.ndarray,
                    outcome: np.ndarray, judge: np.ndarray) -> float:
    """Log-likelihood of the judged outcomes (1: first won, 0: second, 0.5: tie) under scores and each judge's q."""
    sig = _sigmoid(scores[first] - scores[second])
    p = q[judge] * sig + (1 - q[judge]) * (1 - sig)
    return float(np.sum(outcome * _log(p) + (1 - outcome) * _log(1 - p)))


def _neg_log_posterior(s: torch.Tensor, v: torch.Tensor, first, second, outcome, judge, prior_mean,
                       with_prior: bool) -> torch.Tensor:
    """Negative log-posterior in (scores, v); ``q = sigmoid(B tanh(v / B))`` keeps each q within sigmoid(+-B)."""
    q = torch.sigmoid(_LOGIT_BOUND * torch.tanh(v / _LOGIT_BOUND))
    sig = torch.sigmoid(s[first] - s[second])
    qj = q[judge]
    p = (qj * sig + (1 - qj) * (1 - sig)).clamp(1e-12, 1 - 1e-12)
    value = -(outcome * torch.log(p) + (1 - outcome) * torch.log1p(-p)).sum()
    if with_prior:
        value = value + 0.5 * ((s - prior_mean) ** 2).sum() / TIER_PRIOR_SD ** 2
    return value


def fit_noisy_bt(first: np.ndarray, second: np.ndarray, outcome: np.ndarray, judge: np.ndarray, num_items: int,
                 num_judges: int, anchor: Optional[np.ndarray] = None,
                 scores: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(item scores, q per judge) maximising the noisy Bradley-Terry posterior. ``anchor``: each item's tier rank
    (the prior's centre, after subtracting its mean; None: 0). ``scores`` given: only the q are fitted.

    L-BFGS as the tier calibration is fitted (``mirip.training.lbfgs``): torch is already a dependency, a
    general optimiser library is not."""
    first, second, judge = (torch.from_numpy(np.asarray(x, dtype=np.int64)) for x in (first, second, judge))
    outcome_t = torch.from_numpy(np.asarray(outcome, dtype=np.float64))
    prior = np.zeros(num_items) if anchor is None else np.asarray(anchor, np.float64) - np.mean(anchor)
    prior_t = torch.from_numpy(prior)
    v0 = _LOGIT_BOUND * math.atanh(math.log(Q_START / (1 - Q_START)) / _LOGIT_BOUND)
    fixed = None if scores is None else torch.from_numpy(np.asarray(scores, dtype=np.float64))
    start = np.full(num_judges, v0) if fixed is not None else np.concatenate([prior, np.full(num_judges, v0)])
    params = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    def loss():
        s, v = (fixed, params) if fixed is not None else (params[:num_items], params[num_items:])
        return _neg_log_posterior(s, v, first, second, outcome_t, judge, prior_t, fixed is None)

    minimize_lbfgs(loss, params, max_iter=2000)
    with torch.no_grad():
        v = params if fixed is not None else params[num_items:]
        q = torch.sigmoid(_LOGIT_BOUND * torch.tanh(v / _LOGIT_BOUND)).numpy().copy()
        s = fixed.numpy() if fixed is not None else params[:num_items].numpy().copy()
    return s, q


def shrunk_q(q: np.ndarray, counts: np.ndarray, prior_judgments: float = PRIOR_JUDGMENTS) -> np.ndarray:
    """Each judge's q pulled toward the pooled (pair-weighted mean) q as if ``prior_judgments`` pooled judgments
    were added to the judge's own ``counts``."""
    q, counts = np.asarray(q, np.float64), np.asarray(counts, np.float64)
    pooled = float(np.sum(q * counts) / np.sum(counts)) if counts.sum() else 0.5
    return (counts * q + prior_judgments * pooled) / (counts + prior_judgments)


def reliability_weight(q: np.ndarray) -> np.ndarray:
    """The pair weight of a judge of reliability q: the share of answers that follow the order, 0 at or below a
    coin flip."""
    return np.clip(2 * np.asarray(q, np.float64) - 1, 0.0, 1.0)


@dataclass
class JudgeReliability:
    """Per judge (as named in the file; '' for unnamed): judgments fitted on, fitted q, shrunk q and weight."""

    judges: List[str]
    pairs: np.ndarray
    q_fitted: np.ndarray
    q: np.ndarray
    weight: np.ndarray
    items: int

    def pair_weights(self, judges: Sequence[str]) -> np.ndarray:
        """The weight of each judged pair by its judge (1 for a judge the fit never saw)."""
        at = {j: w for j, w in zip(self.judges, self.weight)}
        return np.array([at.get(j, 1.0) for j in judges], dtype=np.float64)

    def report(self) -> Dict[str, Dict[str, float]]:
        return {(j or "(unnamed)"): {"fit_pairs": int(n), "q_fitted": float(qf), "q": float(q), "weight": float(w)}
                for j, n, qf, q, w in zip(self.judges, self.pairs, self.q_fitted, self.q, self.weight)}

    def summary(self) -> str:
        return (f"judge reliability (noisy Bradley-Terry on {int(self.pairs.sum())} train-split judged pairs of "
                f"{self.items} drawings; q shrunk toward the pool by {PRIOR_JUDGMENTS} judgments; weight "
                "clip(2q-1, 0, 1)): " + " | ".join(
                    f"{j or '(unnamed)'} q {q:.3f} weight {w:.3f} ({n} pairs)"
                    for j, q, w, n in zip(self.judges, self.q, self.weight, self.pairs)))


def estimate_reliability(first: np.ndarray, second: np.ndarray, outcome: np.ndarray, judges: Sequence[str],
                         ranks: Optional[np.ndarray] = None) -> JudgeReliability:
    """Fit the judges of these pairs (positions into ``ranks``' drawings; only the drawings judged enter the fit)."""
    first, second = np.asarray(first, np.int64), np.asarray(second, np.int64)
    names = sorted(set(judges))
    if len(first) == 0:
        return JudgeReliability([], np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0), 0)
    items, local = np.unique(np.concatenate([first, second]), return_inverse=True)
    judge = np.array([names.index(j) for j in judges], dtype=np.int64)
    anchor = None if ranks is None else np.asarray(ranks, np.float64)[items]
    _, q_fit = fit_noisy_bt(local[:len(first)], local[len(first):], outcome, judge, len(items), len(names), anchor)
    counts = np.bincount(judge, minlength=len(names))
    q = shrunk_q(q_fit, counts)
    return JudgeReliability(names, counts, q_fit, q, reliability_weight(q), len(items))
