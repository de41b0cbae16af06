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

Calibration error is reported as the **expected calibration error** (top label: the predicted tier's
probability against how often the predicted tier is right, in equal-width bins) and, beside it, the
ranked probability score (a proper score for ordered classes; lower is better).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mirip.plain import plain
from mirip.tiers import TIER_COLOURS, TIERS

CALIBRATION_VERSION = 1
# Internal order: rank 0..3 = C, B, A, S. Everything returned to users is in TIERS order (S, A, B, C).
RANK_ORDER = ("C", "B", "A", "S")
METHOD = "cumulative_logit"
METHOD_TEXT = ("ordinal logistic (cumulative logit) model: P(tier <= k | score) = sigmoid(threshold_k - slope * score), "
               "one slope, three ordered thresholds, maximum likelihood")
ECE_NAME = "expected calibration error (top label, equal-width bins)"
DEFAULT_BINS = 10
PRIOR_SD = 5.0
REFERENCE_LEVELS = tuple(float(p) for p in range(101))  # percent
NO_CALIBRATION = ("checkpoint {path} has no score-to-tier calibration (it was written before mirip stored one): "
                  "scores only, no tier columns; retrain with scripts/train.py to get tier predictions")


class CalibrationError(ValueError):
    """Scores and tiers from which no calibration can be fitted, or a malformed stored calibration."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Split by sign so exp never overflows.
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _as_scores(scores: Any, what: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr))[:5].tolist()
        raise CalibrationError(f"{what} must be finite numbers; positions {bad} are not")
    return arr


def _as_ranks(ranks: Any, n: int) -> np.ndarray:
    arr = np.asarray(ranks).reshape(-1)
    if arr.size != n:
        raise CalibrationError(f"need one tier rank per score: {n} scores, {arr.size} ranks")
    if arr.size and (arr.min() < 0 or arr.max() > 3 or not np.all(arr == np.round(arr))):
        raise CalibrationError("tier ranks must be integers 0..3 (C=0, B=1, A=2, S=3)")
    return arr.astype(np.int64)


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
        s = _as_scores(scores)
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


def _initial_params(z: np.ndarray, y: np.ndarray) -> List[float]:
    """Thresholds from the cumulative tier frequencies, slope from the sign of the score-tier correlation."""
    cum = np.array([(y <= k).mean() for k in range(3)])
    cum = np.clip(cum, 0.02, 0.98)
    th = np.log(cum / (1 - cum))
    th = np.maximum.accumulate(th)
    gaps = np.maximum(np.diff(th), 0.1)
    corr = np.corrcoef(z, y)[0, 1] if np.std(y) > 0 else 1.0
    slope = 1.0 if not np.isfinite(corr) or corr >= 0 else -1.0
    return [float(th[0]), float(np.log(gaps[0])), float(np.log(gaps[1])), slope]


def _neg_log_posterior(params: torch.Tensor, z: torch.Tensor, y: torch.Tensor, prior_sd: float) -> torch.Tensor:
    a0, d1, d2, b = params[0], params[1], params[2], params[3]
    t1 = a0 + torch.exp(d1)
    t2 = t1 + torch.exp(d2)
    big = torch.tensor(1e4, dtype=z.dtype)  # stands in for -inf / +inf at the outer ends
    cuts = torch.stack([-big, a0, t1, t2, big])
    upper = cuts[y + 1] - b * z
    lower = cuts[y] - b * z
    # log(sigmoid(u) - sigmoid(l)) = log sigmoid(u) + log(1 - e^(l - u)) - softplus(l), stable at both ends.
    logp = torch.nn.functional.logsigmoid(upper) + torch.log(-torch.expm1(lower - upper)) \
        - torch.nn.functional.softplus(lower)
    prior = (a0 ** 2 + t1 ** 2 + t2 ** 2 + b ** 2) / (2 * prior_sd ** 2)
    return -(logp.sum()) + prior


def fit_ordinal(scores: Any, ranks: Any, *, fitted_on: str = "val", prior_sd: float = PRIOR_SD,
                bins: int = DEFAULT_BINS) -> OrdinalCalibration:
    """Fit the cumulative-logit model to (score, tier rank) pairs; ranks C=0, B=1, A=2, S=3.

    Scores are standardised for the fit (the prior and the optimiser see unit-scale numbers) and the
    slope and thresholds converted back to the raw score scale. Needs at least two drawings of two
    different tiers and scores that are not all equal.
    """
    s = _as_scores(scores)
    y = _as_ranks(ranks, s.size)
    present = sorted(set(y.tolist()))
    if s.size < 2 or len(present) < 2:
        raise CalibrationError(f"cannot calibrate on the {fitted_on} split: it needs drawings of at least two tiers, "
                               f"found {s.size} drawing(s) of {len(present)} tier(s)")
    mean, sd = float(s.mean()), float(s.std())
    if not sd > 1e-12:
        raise CalibrationError(f"cannot calibrate on the {fitted_on} split: every drawing has the same score")
    z = torch.from_numpy((s - mean) / sd)
    yt = torch.from_numpy(y)
    params = torch.tensor(_initial_params(z.numpy(), y), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _neg_log_posterior(params, z, yt, prior_sd) / s.size
        loss.backward()
        return loss

    previous = float("inf")
    for _ in range(5):  # LBFGS stops at max_iter; a restart from where it stopped finishes hard fits
        loss = float(opt.step(closure).detach())
        if previous - loss < 1e-12:
            break
        previous = loss
    with torch.no_grad():
        a0, d1, d2, b = params.tolist()
        th_std = np.array([a0, a0 + math.exp(d1), a0 + math.exp(d1) + math.exp(d2)])
        nll = float(_neg_log_posterior(params, z, yt, float("inf")))
    slope = b / sd
    # threshold - b * (s - mean) / sd = (threshold + slope * mean) - slope * s
    thresholds = tuple(float(t + slope * mean) for t in th_std)
    counts = {t: int((y == RANK_ORDER.index(t)).sum()) for t in TIERS}
    cal = OrdinalCalibration(slope=slope, thresholds=thresholds, fitted_on=fitted_on, num_images=int(s.size),
                             tier_counts=counts, log_likelihood=-nll, prior_sd=prior_sd)
    metrics = tier_metrics(cal.probabilities(s), y, bins=bins)
    metrics.pop("reliability", None)
    return OrdinalCalibration(**{**cal.__dict__, "metrics": metrics})


# --- figures of a calibration on labelled scores -----------------------------------------------------
def reliability_bins(probabilities: Any, ranks: Any, bins: int = DEFAULT_BINS) -> List[Dict[str, float]]:
    """Top-label reliability: per equal-width bin of the predicted tier's probability, the mean probability
    (``confidence``), how often the predicted tier was right (``accuracy``) and the count. Empty bins are left out."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, 4)
    y = _as_ranks(ranks, p.shape[0])
    pred_rank = 3 - np.argmax(p, axis=1)  # columns are S, A, B, C
    conf = p.max(axis=1)
    right = (pred_rank == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, int(bins) - 1)
    out = []
    for b in range(int(bins)):
        mask = which == b
        if mask.any():
            out.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(mask.sum()),
                        "confidence": float(conf[mask].mean()), "accuracy": float(right[mask].mean())})
    return out


def expected_calibration_error(probabilities: Any, ranks: Any, bins: int = DEFAULT_BINS) -> float:
    """Sum over bins of (bin share) x |accuracy - confidence|, top label (see ``reliability_bins``)."""
    table = reliability_bins(probabilities, ranks, bins)
    n = sum(b["count"] for b in table)
    if not n:
        return float("nan")
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table))


def ranked_probability_score(probabilities: Any, ranks: Any) -> float:
    """Mean over drawings of (1/3) sum_k (P(rank <= k) - [true rank <= k])^2, k = C, B, A; 0 is perfect."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, 4)
    y = _as_ranks(ranks, p.shape[0])
    if not p.shape[0]:
        return float("nan")
    cum = np.cumsum(p[:, ::-1], axis=1)[:, :3]  # P(C), P(C or B), P(C, B or A)
    truth = (y[:, None] <= np.arange(3)[None, :]).astype(np.float64)
    return float(((cum - truth) ** 2).sum(axis=1).mean() / 3.0)


def confusion_matrix(true_ranks: Any, predicted_ranks: Any) -> List[List[int]]:
    """4x4 counts, rows = true tier, columns = predicted tier, both in S, A, B, C order."""
    t = np.asarray(true_ranks, dtype=np.int64).reshape(-1)
    p = np.asarray(predicted_ranks, dtype=np.int64).reshape(-1)
    m = np.zeros((4, 4), dtype=np.int64)
    np.add.at(m, (3 - t, 3 - p), 1)
    return m.tolist()


def tier_metrics(probabilities: Any, ranks: Any, bins: int = DEFAULT_BINS) -> Dict[str, Any]:
    """Tier accuracy, mean absolute tier error, confusion matrix and calibration error of predicted probabilities.

    ``majority_tier_accuracy`` is what always predicting the commonest tier *of these drawings* would score
    (a baseline that has seen the answers' distribution, so beating it is a fair bar).
    """
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, 4)
    y = _as_ranks(ranks, p.shape[0])
    n = int(p.shape[0])
    if n == 0:
        return {"num_images": 0}
    pred = 3 - np.argmax(p, axis=1)
    counts = np.bincount(y, minlength=4)
    majority = int(np.argmax(counts[::-1]))  # ties go to the better tier
    return {
        "num_images": n,
        "tier_accuracy": float((pred == y).mean()),
        "tier_mae": float(np.abs(pred - y).mean()),
        "majority_tier": TIERS[majority],
        "majority_tier_accuracy": float(counts[3 - majority] / n),
        "confusion_matrix": {"tiers": list(TIERS), "rows": "true tier", "columns": "predicted tier",
                             "counts": confusion_matrix(y, pred)},
        "calibration_error": {"name": ECE_NAME, "bins": int(bins),
                              "value": expected_calibration_error(p, y, bins)},
        "ranked_probability_score": ranked_probability_score(p, y),
        "reliability": reliability_bins(p, y, bins),
    }


# --- the training split's score distribution ----------------------------------------------------
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
        s = _as_scores(scores)
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
    s = _as_scores(scores)
    y = _as_ranks(ranks, s.size)
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


# --- the picture -------------------------------------------------------------------------------
def save_calibration_plot(path: str, calibration: OrdinalCalibration,
                          splits: Mapping[str, Tuple[Any, Any]], title: Optional[str] = None,
                          bins: int = DEFAULT_BINS) -> bool:
    """A reliability diagram (per split given: name -> (scores, ranks)) beside P(tier | score) with the
    scores per tier; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from mirip.atomic import write_atomic_with

    fig, (ax_rel, ax_p) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax_rel.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfectly calibrated")
    for (name, (scores, ranks)), style in zip(splits.items(), ("o-", "s--", "^:")):
        probs = calibration.probabilities(scores)
        table = reliability_bins(probs, ranks, bins)
        ece = expected_calibration_error(probs, ranks, bins)
        fitted = " (fitted here: in-sample)" if name == calibration.fitted_on else ""
        ax_rel.plot([b["confidence"] for b in table], [b["accuracy"] for b in table], style,
                    label=f"{name} split, {len(np.asarray(ranks))} drawings, ECE {ece:.3f}{fitted}")
    ax_rel.set_xlim(0, 1)
    ax_rel.set_ylim(0, 1.02)
    ax_rel.set_xlabel("probability of the predicted tier")
    ax_rel.set_ylabel("how often the predicted tier is right")
    ax_rel.set_title("reliability (top label)")
    ax_rel.legend(fontsize=9, loc="lower right", framealpha=0.9)
    ax_rel.grid(alpha=0.3)

    all_scores = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s, _ in splits.values()])
    lo, hi = float(all_scores.min()), float(all_scores.max())
    pad = 0.1 * (hi - lo or 1.0)
    grid = np.linspace(lo - pad, hi + pad, 300)
    probs = calibration.probabilities(grid)
    colours = TIER_COLOURS
    for j, t in enumerate(TIERS):
        ax_p.plot(grid, probs[:, j], color=colours[t], lw=2, ls=("-", "--", "-.", ":")[j], label=f"P({t})")
    name = calibration.fitted_on if calibration.fitted_on in splits else next(iter(splits))
    scores, ranks = splits[name]
    ranks = np.asarray(ranks).reshape(-1)
    for t in TIERS:
        sel = np.asarray(scores, dtype=np.float64).reshape(-1)[ranks == RANK_ORDER.index(t)]
        ax_p.plot(sel, np.full(sel.shape, -0.04 - 0.03 * TIERS.index(t)), "|", color=colours[t], ms=8)
    ax_p.set_ylim(-0.16, 1.02)
    ax_p.set_xlabel("score")
    ax_p.set_ylabel("probability")
    ax_p.set_title(f"P(tier | score); ticks: {name} split drawings by tier")
    ax_p.legend(fontsize=10, loc="center right", framealpha=0.9)
    ax_p.grid(alpha=0.3)
    if title:
        fig.suptitle(title, color="#a00000" if "RANDOM" in title else "black")
    fig.tight_layout()
    write_atomic_with(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


__all__ = ["OrdinalCalibration", "ScoreReference", "CalibrationError", "fit_ordinal", "make_score_reference",
           "tier_metrics", "reliability_bins", "expected_calibration_error", "ranked_probability_score",
           "confusion_matrix", "logistic_difference_cdf", "names_sha256", "from_checkpoint", "save_calibration_plot",
           "NO_CALIBRATION", "ECE_NAME", "RANK_ORDER"]
