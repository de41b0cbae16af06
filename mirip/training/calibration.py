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

The figures of a calibration on labelled scores are in ``mirip.training.calibration_metrics``, the score reference in
``mirip.training.calibration_reference``; this module fits and reads the calibration.

Calibration error is reported as the **expected calibration error** (top label: the predicted tier's
probability against how often the predicted tier is right, in equal-width bins) and, beside it, the
ranked probability score (a proper score for ordered classes; lower is better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

# The shared basics and the metrics (calibration_metrics) and the score reference (calibration_reference) live
# in modules of their own; every name, the private ones the contract tests use too, is imported from here.
from mirip.common.plain import plain
from mirip.common.tiers import TIERS, TIER_COLOURS
from mirip.training.calibration_metrics import (CALIBRATION_VERSION, CalibrationError, DEFAULT_BINS, RANK_ORDER,
                                                as_ranks, as_scores, expected_calibration_error, reliability_bins,
                                                tier_metrics)
from mirip.training.calibration_reference import ScoreReference

METHOD = "cumulative_logit"
METHOD_TEXT = ("ordinal logistic (cumulative logit) model: P(tier <= k | score) = sigmoid(threshold_k - slope * score), "
               "one slope, three ordered thresholds, maximum likelihood")
PRIOR_SD = 5.0
NO_CALIBRATION = ("checkpoint {path} has no score-to-tier calibration (it was written before mirip stored one): "
                  "scores only, no tier columns; retrain with scripts/train.py to get tier predictions")


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
    s = as_scores(scores)
    y = as_ranks(ranks, s.size)
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
    from mirip.common.atomic import write_atomic_with

    fig, (ax_rel, ax_p) = plt.subplots(1, 2, figsize=(11, 5.5))
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
    # Below the axes: a badly calibrated split's points can lie anywhere in the square, under any corner.
    ax_rel.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
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
    ax_p.legend(fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(TIERS), frameon=False)
    ax_p.grid(alpha=0.3)
    if title:
        fig.suptitle(title, color="#a00000" if "RANDOM" in title else "black")
    fig.tight_layout()
    write_atomic_with(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return True


__all__ = ["OrdinalCalibration", "fit_ordinal", "logistic_difference_cdf", "from_checkpoint", "save_calibration_plot", "NO_CALIBRATION"]
