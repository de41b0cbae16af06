"""Fitting what ``mirip.training.calibration`` reads: the ordinal calibration on the validation split's scores
(``fit_ordinal``), the training split's score reference (``make_score_reference``), and the calibration plot.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mirip.common.tiers import TIERS, TIER_COLOURS
from mirip.training.calibration import (CalibrationError, OrdinalCalibration, PRIOR_SD, RANK_ORDER, REFERENCE_LEVELS,
                                        ScoreReference, as_ranks, as_scores, names_sha256)
from mirip.training.calibration_metrics import DEFAULT_BINS, expected_calibration_error, reliability_bins, tier_metrics
from mirip.training.lbfgs import minimize_lbfgs


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
    minimize_lbfgs(lambda: _neg_log_posterior(params, z, yt, prior_sd) / s.size, params, max_iter=500)
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
