"""The calibration's contract, function by function (mirip/training/calibration.py; mutation-tested, docs/testing.md).

Fast unit tests: reference values are written out by hand or computed naively (Python loops, ``decimal``),
never with mirip.training.calibration's own helpers. The fits here are small (tens of drawings).
"""

from __future__ import annotations

import hashlib
import math
import re
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

from mirip.training import calibration as cm, calibration_fit
from mirip.training.calibration import OrdinalCalibration, from_checkpoint, logistic_difference_cdf
from mirip.training.calibration_fit import fit_ordinal
from mirip.training.calibration import CalibrationError
from mirip.training.calibration_metrics import (confusion_matrix, expected_calibration_error,
                                                ranked_probability_score, reliability_bins, tier_metrics)
from mirip.training.calibration import ScoreReference, names_sha256
from mirip.training.calibration_fit import make_score_reference


def _exactly(message: str):
    return pytest.raises(CalibrationError, match="^" + re.escape(message) + "$")


def _sig(x: float) -> float:
    d = Decimal(x)
    return float(1 / (1 + (-d).exp()))


# --- numeric helpers ------------------------------------------------------------------------------
def test_sigmoid_matches_a_high_precision_reference_without_overflow():
    getcontext().prec = 50
    xs = np.array([-800.0, -40.0, -3.5, -1e-3, 0.0, 1e-3, 2.25, 37.0, 800.0])
    with np.errstate(over="raise", invalid="raise"):
        got = cm._sigmoid(xs)
    np.testing.assert_allclose(got, [_sig(x) for x in xs], rtol=1e-14, atol=0)
    assert got.dtype == np.float64 and got[4] == 0.5
    ints = cm._sigmoid(np.array([[1, -1]]))  # integers in: shape kept, float64 out
    assert ints.shape == (1, 2) and ints.dtype == np.float64
    np.testing.assert_allclose(ints, [[_sig(1.0), _sig(-1.0)]], rtol=1e-14)
    np.testing.assert_allclose(cm._sigmoid(np.array([0.1], dtype=np.float32)), [_sig(float(np.float32(0.1)))],
                               rtol=1e-14)


def test_logistic_difference_cdf_matches_its_formula_in_high_precision():
    getcontext().prec = 60

    def naive(x):  # e^x (e^x - 1 - x) / (e^x - 1)^2, evaluated with 60 digits
        if x == 0:
            return 0.5
        e = Decimal(x).exp()
        return float(e * (e - 1 - Decimal(x)) / (e - 1) ** 2)

    xs = [-30.0, -5.0, -1.0, -0.3, -2e-4, -5e-5, 0.0, 5e-5, 1.5e-4, 0.01, 0.5, 1.0, 3.0, 12.0, 30.0]
    got = logistic_difference_cdf(np.array(xs))
    for x, g in zip(xs, got):
        assert g == pytest.approx(naive(x), rel=1e-9, abs=1e-8), x  # float64 cancels near |x| = 1e-4
    assert logistic_difference_cdf(0.0) == 0.5 and logistic_difference_cdf(-0.0) == 0.5
    # Computed in float64 whatever comes in (float32 scores, integers), and 0/0 at x = 0 warns nothing.
    x32 = np.array([0.3, -2.7, 0.05], dtype=np.float32)
    got32 = logistic_difference_cdf(x32)
    for x, g in zip(x32.astype(np.float64), got32):
        assert g == pytest.approx(naive(float(x)), rel=1e-12)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(logistic_difference_cdf(np.array([0, 2, -2])), [0.5, naive(2.0), naive(-2.0)],
                                   rtol=1e-12)
    assert float(logistic_difference_cdf(1e-5)) == pytest.approx(0.5 + 1e-5 / 6, rel=1e-14)


def test_scores_and_ranks_are_checked_with_positions():
    np.testing.assert_array_equal(cm.as_scores([[1, 2], [3, 4]]), [1.0, 2.0, 3.0, 4.0])
    assert cm.as_scores([1, 2]).dtype == np.float64
    bad = [0.0, float("nan"), 1.0, float("inf"), -float("inf"), 2.0, float("nan"), float("nan"), float("nan")]
    with _exactly("scores must be finite numbers; positions [1, 3, 4, 6, 7] are not"):
        cm.as_scores(bad)
    with _exactly("val scores must be finite numbers; positions [0] are not"):
        cm.as_scores([float("nan")], "val scores")
    ranks = cm.as_ranks(np.array([[0.0, 3.0], [1.0, 2.0]]), 4)
    assert ranks.dtype == np.int64 and ranks.tolist() == [0, 3, 1, 2]
    assert cm.as_ranks([], 0).tolist() == []
    with _exactly("need one tier rank per score: 3 scores, 2 ranks"):
        cm.as_ranks([0, 1], 3)
    for bad in ([0, -1], [4, 0], [0, 1.5], [3, 3.25]):
        with _exactly("tier ranks must be integers 0..3 (C=0, B=1, A=2, S=3)"):
            cm.as_ranks(bad, 2)


# --- the model ------------------------------------------------------------------------------------
def test_a_calibration_needs_a_finite_slope_and_three_ordered_finite_thresholds():
    cal = OrdinalCalibration(slope=2, thresholds=[-1, 0, 0])  # equal thresholds are allowed
    assert cal.thresholds == (-1.0, 0.0, 0.0) and isinstance(cal.thresholds, tuple)
    assert type(cal.slope) is float and all(type(t) is float for t in cal.thresholds)
    assert cal.fitted_on == "val" and cal.num_images == 0 and cal.tier_counts == {} and cal.metrics == {}
    assert math.isnan(cal.log_likelihood) and cal.prior_sd == 5.0
    for slope, th in ((1.0, (0.0, 1.0)), (1.0, (0.0, 1.0, 2.0, 3.0)), (1.0, (0.0, float("nan"), 1.0)),
                      (1.0, (0.0, 1.0, float("inf"))), (float("nan"), (0.0, 1.0, 2.0)), (float("inf"), (0, 1, 2))):
        with _exactly(f"calibration needs a finite slope and three finite thresholds, got slope {slope!r}, "
                      f"thresholds {th!r}"):
            OrdinalCalibration(slope=slope, thresholds=th)
    for th in ((1.0, 0.0, 2.0), (0.0, 2.0, 1.0)):
        with _exactly(f"calibration thresholds must be ordered, got {th}"):
            OrdinalCalibration(slope=1.0, thresholds=th)


def test_probabilities_predictions_and_boundaries_written_out():
    cal = OrdinalCalibration(slope=0.5, thresholds=(-1.0, 0.5, 2.0))
    scores = [-6.0, -1.0, 0.0, 2.0, 3.5, 9.0]
    cum = cal.cumulative(scores)
    assert cum.shape == (6, 3)
    for i, s in enumerate(scores):
        c = [1 / (1 + math.exp(-(t - 0.5 * s))) for t in (-1.0, 0.5, 2.0)]
        np.testing.assert_allclose(cum[i], c, rtol=1e-13)
        by_rank = [c[0], c[1] - c[0], c[2] - c[1], 1 - c[2]]
        np.testing.assert_allclose(cal.probabilities_by_rank([s])[0], by_rank, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(cal.probabilities([s])[0], by_rank[::-1], rtol=1e-12, atol=1e-15)
        assert cal.predict_ranks([s])[0] == int(np.argmax(by_rank))
    assert cal.predict(scores) == ["C", "C", "B", "A", "S", "S"]
    # Rows in S, A, B, C order, as a new array (torch and in-place edits work on it).
    p = cal.probabilities(scores)
    assert p.flags["C_CONTIGUOUS"] and torch.from_numpy(p).shape == (6, 4)
    assert cal.boundaries() == (-2.0, 1.0, 4.0)
    flat_slope = OrdinalCalibration(slope=0.0, thresholds=(0, 1, 2)).boundaries()
    assert len(flat_slope) == 3 and all(math.isnan(b) for b in flat_slope)
    # Equal thresholds: a tier of probability 0, never negative.
    flat = OrdinalCalibration(slope=1.0, thresholds=(0.0, 0.0, 0.0)).probabilities_by_rank([0.3])
    assert flat[0, 1] == 0.0 and flat[0, 2] == 0.0 and flat.min() >= 0.0


def test_probability_first_is_better_scales_the_score_difference():
    getcontext().prec = 50
    cal = OrdinalCalibration(slope=-1.5, thresholds=(0.0, 1.0, 2.0))
    e = Decimal(-1.5 * (2.0 - 1.2)).exp()
    want = float(e * (e - 1 - Decimal(-1.5 * (2.0 - 1.2))) / (e - 1) ** 2)
    assert cal.prob_first_better(2.0, 1.2) == pytest.approx(want, rel=1e-12)
    assert type(cal.prob_first_better(np.float32(1.0), 0)) is float


# --- storage ----------------------------------------------------------------------------------------
def test_to_dict_holds_every_field_as_plain_python():
    cal = OrdinalCalibration(slope=2.0, thresholds=(-1.0, 0.0, 3.0), fitted_on="test", num_images=np.int64(9),
                             tier_counts={"S": np.int64(1), "C": 8}, log_likelihood=np.float32(-2.5), prior_sd=3,
                             metrics={"a": (np.float64(0.25), [np.int32(2)]), 3: {"b": np.bool_(True)}})
    d = cal.to_dict()
    assert d == {"version": 1, "method": "cumulative_logit", "description": cm.METHOD_TEXT,
                 "tier_order": ["C", "B", "A", "S"], "slope": 2.0, "thresholds": [-1.0, 0.0, 3.0],
                 "boundaries": [-0.5, 0.0, 1.5], "fitted_on": "test", "num_images": 9,
                 "tier_counts": {"S": 1, "C": 8}, "log_likelihood": -2.5, "prior_sd": 3.0,
                 "metrics": {"a": [0.25, [2]], "3": {"b": True}}}
    assert type(d["num_images"]) is int and type(d["tier_counts"]["S"]) is int
    assert type(d["metrics"]["a"][0]) is float and type(d["metrics"]["a"][1][0]) is int
    assert type(d["log_likelihood"]) is float and type(d["prior_sd"]) is float
    assert "cumulative logit" in cm.METHOD_TEXT and "sigmoid(threshold_k - slope * score)" in cm.METHOD_TEXT
    back = OrdinalCalibration.from_dict(d)
    assert back == OrdinalCalibration(slope=2.0, thresholds=(-1.0, 0.0, 3.0), fitted_on="test", num_images=9,
                                      tier_counts={"S": 1, "C": 8}, log_likelihood=-2.5, prior_sd=3.0,
                                      metrics={"a": [0.25, [2]], "3": {"b": True}})


def test_from_dict_fills_defaults_and_refuses_what_it_cannot_read():
    cal = OrdinalCalibration.from_dict({"slope": "1.5", "thresholds": [0, 1, 2], "tier_counts": None,
                                        "metrics": None})
    assert cal.slope == 1.5 and cal.thresholds == (0.0, 1.0, 2.0) and cal.fitted_on == "val"
    assert cal.num_images == 0 and cal.tier_counts == {} and cal.metrics == {} and cal.prior_sd == 5.0
    assert math.isnan(cal.log_likelihood)
    with _exactly("stored calibration must be a dict, got list"):
        OrdinalCalibration.from_dict([1.0, 0, 1, 2])
    with _exactly("unknown calibration method 'isotonic'; this mirip reads 'cumulative_logit'"):
        OrdinalCalibration.from_dict({"method": "isotonic", "slope": 1, "thresholds": [0, 1, 2]})
    with _exactly("stored calibration has tier order ['S', 'A', 'B', 'C'], expected ['C', 'B', 'A', 'S']"):
        OrdinalCalibration.from_dict({"tier_order": ["S", "A", "B", "C"], "slope": 1, "thresholds": [0, 1, 2]})
    with _exactly("stored calibration is malformed (KeyError('slope'))"):
        OrdinalCalibration.from_dict({"thresholds": [0, 1, 2]})
    with _exactly("stored calibration is malformed (KeyError('thresholds'))"):
        OrdinalCalibration.from_dict({"slope": 1})
    with _exactly("stored calibration is malformed (ValueError(\"could not convert string to float: 'x'\"))"):
        OrdinalCalibration.from_dict({"slope": "x", "thresholds": [0, 1, 2]})
    with _exactly("stored calibration is malformed (TypeError(\"'int' object is not iterable\"))"):
        OrdinalCalibration.from_dict({"slope": 1, "thresholds": 3})
    with _exactly("calibration thresholds must be ordered, got (2.0, 1.0, 0.0)") as info:
        OrdinalCalibration.from_dict({"slope": 1, "thresholds": [2, 1, 0]})
    assert info.value.__context__ is None or not isinstance(info.value, KeyError)
    with pytest.raises(CalibrationError) as info:
        OrdinalCalibration.from_dict({"slope": 1})
    assert info.value.__suppress_context__


def test_from_checkpoint_gives_the_objects_or_one_line_why_not():
    cal = OrdinalCalibration(slope=1.0, thresholds=(0.0, 1.0, 2.0))
    ref = ScoreReference((0.0, 100.0), (1.0, 2.0), {"S": None}, {"all": 2})
    got_cal, got_ref, why = from_checkpoint({"calibration": cal.to_dict(), "score_reference": ref.to_dict()})
    assert why is None and got_cal.thresholds == (0.0, 1.0, 2.0) and got_ref == ref
    got_cal, got_ref, why = from_checkpoint({"calibration": cal.to_dict()})
    assert got_cal is not None and got_ref is None and why is None
    assert from_checkpoint({}, "old.pt") == (None, None, cm.NO_CALIBRATION.format(path="old.pt"))
    assert from_checkpoint({}) == (None, None, cm.NO_CALIBRATION.format(path="checkpoint"))
    assert cm.NO_CALIBRATION.format(path="p") == (
        "checkpoint p has no score-to-tier calibration (it was written before mirip stored one): scores only, no "
        "tier columns; retrain with scripts/train.py to get tier predictions")
    assert from_checkpoint({"calibration": None, "calibration_note": "no val split"}, "n.pt") == (
        None, None, "checkpoint n.pt has no score-to-tier calibration (no val split): scores only, no tier columns")
    assert from_checkpoint({"calibration": None, "calibration_note": ""}, "n.pt")[2] == (
        "checkpoint n.pt has no score-to-tier calibration (the run could not fit one): scores only, no tier columns")
    assert from_checkpoint({"calibration": {"slope": 1, "thresholds": [1, 0, 2]}}, "b.pt") == (
        None, None, "checkpoint b.pt: calibration thresholds must be ordered, got (1.0, 0.0, 2.0); scores only, "
                    "no tier columns")
    assert from_checkpoint({"calibration": cal.to_dict(), "score_reference": {"levels": [0]}}, "r.pt") == (
        None, None, "checkpoint r.pt: stored score reference is malformed (KeyError('overall')); scores only, "
                    "no tier columns")


# --- the fit ----------------------------------------------------------------------------------------
def _naive_objective(scores, ranks, slope, thresholds, mean, sd, prior_sd):
    """Negative log-likelihood plus the Gaussian prior on the standardised parameters, term by term."""
    nll = 0.0
    for s, r in zip(scores, ranks):
        cdf = [0.0] + [1 / (1 + math.exp(-(t - slope * s))) for t in thresholds] + [1.0]
        nll -= math.log(cdf[r + 1] - cdf[r])
    std = [t - slope * mean for t in thresholds] + [slope * sd]  # the thresholds and slope on z = (s - mean) / sd
    return nll + sum(v * v for v in std) / (2 * prior_sd ** 2), nll


FIT_SCORES = [-2.1, -1.4, -0.9, -0.5, -0.2, 0.1, 0.3, 0.8, 1.1, 1.6, 2.0, 2.7, 0.0, -1.0, 1.3, 0.6]
FIT_RANKS = [0, 0, 1, 0, 1, 2, 1, 2, 3, 2, 3, 3, 1, 1, 2, 3]


@pytest.mark.parametrize("prior_sd", [5.0, 0.7])
def test_the_fit_is_the_minimum_of_the_naive_posterior(prior_sd):
    s, y = np.array(FIT_SCORES), np.array(FIT_RANKS)
    mean, sd = s.mean(), s.std()
    cal = fit_ordinal(s, y, prior_sd=prior_sd, fitted_on="train", bins=4)
    params = [cal.slope, *cal.thresholds]

    def objective(p):
        return _naive_objective(s, y, p[0], p[1:], mean, sd, prior_sd)[0]

    best = objective(params)
    for i in range(4):  # every one-parameter step, either way, does worse: a minimum, found to 1e-4
        for step in (1e-4, -1e-4):
            moved = list(params)
            moved[i] += step
            assert objective(moved) > best
    assert cal.log_likelihood == pytest.approx(-_naive_objective(s, y, cal.slope, cal.thresholds, mean, sd,
                                                                 prior_sd)[1], rel=1e-9)
    assert cal.fitted_on == "train" and cal.num_images == 16 and cal.prior_sd == prior_sd
    assert cal.tier_counts == {"S": 4, "A": 4, "B": 5, "C": 3}
    assert list(cal.tier_counts) == ["S", "A", "B", "C"]
    # The fit's own figures, on the split it was fitted on, without the reliability table.
    m = cal.metrics
    assert "reliability" not in m and m["num_images"] == 16 and m["calibration_error"]["bins"] == 4
    pred = cal.predict_ranks(s)
    assert m["tier_accuracy"] == pytest.approx(float(np.mean(pred == y)))


def test_a_separable_fit_is_the_minimum_of_the_naive_posterior_too():
    # Perfectly separated tiers: the likelihood alone has no maximum; with the prior the fit is a hard, flat one.
    s, y = np.arange(8.0), np.array([0, 0, 1, 1, 2, 2, 3, 3])
    cal = fit_ordinal(s, y)
    params = [cal.slope, *cal.thresholds]

    def objective(p):
        return _naive_objective(s, y, p[0], p[1:], s.mean(), s.std(), 5.0)[0]

    best = objective(params)
    for i in range(4):
        for step in (1e-4, -1e-4):
            moved = list(params)
            moved[i] += step
            assert objective(moved) > best


def test_the_fit_starts_from_the_tier_frequencies_and_the_sign_of_the_correlation():
    z = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    y = np.array([0, 0, 1, 1, 3, 3])
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    # P(rank <= k) = 2/6, 4/6, 4/6: the third gap is raised to 0.1.
    want = [logit(2 / 6), math.log(logit(4 / 6) - logit(2 / 6)), math.log(0.1), 1.0]
    np.testing.assert_allclose(calibration_fit._initial_params(z, y), want, rtol=1e-12)
    np.testing.assert_allclose(calibration_fit._initial_params(-z, y)[3], -1.0)
    # Frequencies clipped to 0.02 .. 0.98 (all C: P(rank <= 0) = 1 -> 0.98); a running maximum keeps them ordered.
    got = calibration_fit._initial_params(np.array([0.0, 1.0]), np.array([0, 0]))
    np.testing.assert_allclose(got, [logit(0.98), math.log(0.1), math.log(0.1), 1.0], rtol=1e-12)
    got = calibration_fit._initial_params(np.array([0.0, 1.0, 2.0]), np.array([3, 3, 3]))
    np.testing.assert_allclose(got, [logit(0.02), math.log(0.1), math.log(0.1), 1.0], rtol=1e-12)
    # No score spread: no correlation, slope +1. A negative correlation of tiers spread by less than 1: slope -1;
    # no correlation at all: +1. One tier only: +1, and no division by a zero spread.
    with np.errstate(invalid="ignore"):  # corrcoef of a constant: NaN (fit_ordinal never passes one)
        assert calibration_fit._initial_params(np.zeros(4), np.array([0, 1, 2, 3]))[3] == 1.0
    assert calibration_fit._initial_params(np.array([2.0, 1.0, 0.0, -1.0]), np.array([0, 0, 1, 1]))[3] == -1.0
    assert calibration_fit._initial_params(np.array([-1.0, 1.0, 1.0, -1.0]), np.array([0, 0, 1, 1]))[3] == 1.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calibration_fit._initial_params(np.array([0.0, 1.0, 2.0]), np.array([2, 2, 2]))[3] == 1.0


def test_the_negative_log_posterior_term_by_term():
    z = torch.tensor([-1.2, 0.0, 0.4, 2.0, -0.3], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 3])
    params = torch.tensor([-0.5, math.log(0.8), math.log(1.1), 1.7], dtype=torch.float64)
    th = [-0.5, 0.3, 1.4]
    for prior_sd in (2.0, float("inf")):
        nll = 0.0
        for zi, yi in zip(z.tolist(), y.tolist()):
            cdf = [0.0] + [_sig(t - 1.7 * zi) for t in th] + [1.0]
            nll -= math.log(cdf[yi + 1] - cdf[yi])
        prior = sum(v * v for v in th + [1.7]) / (2 * prior_sd ** 2)
        got = float(calibration_fit._neg_log_posterior(params, z, y, prior_sd))
        assert got == pytest.approx(nll + prior, rel=1e-12)
    # The outer tiers stay finite far out (no log of zero).
    far = calibration_fit._neg_log_posterior(params, torch.tensor([60.0, -60.0], dtype=torch.float64), torch.tensor([3, 0]), 1.0)
    assert torch.isfinite(far)


def test_a_fit_is_refused_with_the_split_named():
    with _exactly("cannot calibrate on the test split: it needs drawings of at least two tiers, found 1 drawing(s) "
                  "of 1 tier(s)"):
        fit_ordinal([1.0], [2], fitted_on="test")
    with _exactly("cannot calibrate on the val split: it needs drawings of at least two tiers, found 3 drawing(s) "
                  "of 1 tier(s)"):
        fit_ordinal([1.0, 2.0, 3.0], [1, 1, 1])
    with _exactly("cannot calibrate on the val split: every drawing has the same score"):
        fit_ordinal([2.0, 2.0, 2.0], [0, 1, 3])
    fit_ordinal([0.0, 1e-9], [0, 3])  # a tiny spread is still a spread
    with _exactly("cannot calibrate on the val split: every drawing has the same score"):
        fit_ordinal([0.0, 2e-12], [0, 3])  # a spread of exactly 1e-12 is not


# --- figures on labelled scores ------------------------------------------------------------------------
def test_reliability_bins_and_ece_by_hand():
    # Columns S, A, B, C; top-label confidences 0.5, 0.5, 0.25 (a tie: the first column wins), 1.0, 0.75.
    p = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25], [0, 0, 1.0, 0],
                  [0.75, 0.25, 0, 0]])
    y = np.array([3, 1, 3, 1, 2])  # right, wrong (C predicted, B true), right (S by the tie), right, wrong
    table = reliability_bins(p, y, bins=4)
    assert table == [
        {"lower": 0.25, "upper": 0.5, "count": 1, "confidence": 0.25, "accuracy": 1.0},
        {"lower": 0.5, "upper": 0.75, "count": 2, "confidence": 0.5, "accuracy": 0.5},
        {"lower": 0.75, "upper": 1.0, "count": 2, "confidence": 0.875, "accuracy": 0.5},
    ]
    ece = (1 * 0.75 + 2 * 0.0 + 2 * 0.375) / 5
    assert expected_calibration_error(p, y, bins=4) == pytest.approx(ece, abs=1e-15)
    # One bin: mean confidence 0.6 against 3 right of 5; ten bins (the default) split them.
    assert expected_calibration_error(p, y, bins=1) == pytest.approx(0.0, abs=1e-15)
    assert tier_metrics(p, y, bins=1)["calibration_error"]["value"] == pytest.approx(0.0, abs=1e-15)
    assert expected_calibration_error(p, y) == pytest.approx(0.3, abs=1e-15)
    # Two bins: the first, [0, 0.5), holds the 0.25.
    assert [(b["lower"], b["count"]) for b in reliability_bins(p, y, bins=2)] == [(0.0, 1), (0.5, 4)]
    assert len(reliability_bins(p, y)) == 4  # ten bins by default: 0.2-0.3, 0.5-0.6, 0.7-0.8, 0.9-1.0
    assert [b["count"] for b in reliability_bins(p, y)] == [1, 2, 1, 1]
    assert math.isnan(expected_calibration_error(np.zeros((0, 4)), []))
    assert reliability_bins(np.zeros((0, 4)), []) == []


def test_ranked_probability_score_confusion_and_tier_metrics_by_hand():
    p = np.array([[0.7, 0.2, 0.1, 0.0], [0.0, 0.0, 0.4, 0.6], [0.1, 0.5, 0.3, 0.1]])
    y = np.array([3, 1, 0])
    # cumulative P(C), P(C or B), P(C, B or A) against [rank <= k]
    rps = ((0.0 - 0) ** 2 + (0.1 - 0) ** 2 + (0.3 - 0) ** 2) / 3 + ((0.6 - 0) ** 2 + (1.0 - 1) ** 2 + 0) / 3 \
        + ((0.1 - 1) ** 2 + (0.4 - 1) ** 2 + (0.9 - 1) ** 2) / 3
    assert ranked_probability_score(p, y) == pytest.approx(rps / 3, abs=1e-15)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mean of an empty slice
        assert math.isnan(ranked_probability_score(np.zeros((0, 4)), []))
    want = [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 1]]
    assert confusion_matrix([3, 1, 0, 0], [3, 0, 2, 0]) == want
    got = confusion_matrix(np.array([[3.0, 1.0], [0.0, 0.0]]), np.array([[3.0, 0.0], [2.0, 0.0]]))
    assert got == want and all(type(c) is int for row in got for c in row)
    m = tier_metrics(p, y, bins=5)
    assert m["num_images"] == 3 and m["tier_accuracy"] == pytest.approx(1 / 3)  # predicted S, C, A
    assert m["tier_mae"] == pytest.approx((0 + 1 + 2) / 3)
    assert m["confusion_matrix"] == {"tiers": ["S", "A", "B", "C"], "rows": "true tier", "columns": "predicted tier",
                                     "counts": [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]]}
    assert m["calibration_error"] == {"name": "expected calibration error (top label, equal-width bins)", "bins": 5,
                                      "value": pytest.approx((abs(1 - 0.7) + abs(0 - 0.6) + abs(0 - 0.5)) / 3)}
    assert m["ranked_probability_score"] == pytest.approx(rps / 3)
    assert sum(b["count"] for b in m["reliability"]) == 3 and m["reliability"][-1]["upper"] == 0.8
    # Majority: the commonest true tier; a tie goes to the better tier.
    tie = tier_metrics(np.tile([0.0, 0.0, 0.0, 1.0], (4, 1)), [0, 1, 1, 0])
    assert tie["majority_tier"] == "B" and tie["majority_tier_accuracy"] == 0.5
    one = tier_metrics(np.tile([1.0, 0.0, 0.0, 0.0], (3, 1)), [0, 2, 0])
    assert one["majority_tier"] == "C" and one["majority_tier_accuracy"] == pytest.approx(2 / 3)
    assert one["tier_accuracy"] == 0.0 and one["tier_mae"] == pytest.approx((3 + 1 + 3) / 3)
    assert tier_metrics(np.zeros((0, 4)), []) == {"num_images": 0}


# --- the score reference ------------------------------------------------------------------------------
def _naive_quantile(values, level):
    v = sorted(values)
    pos = level / 100 * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def test_make_score_reference_quantiles_counts_and_names():
    scores = [3.0, -1.0, 4.0, 1.5, 9.0, 2.0, 0.0]
    ranks = [3, 3, 0, 1, 3, 0, 1]
    ref = make_score_reference(scores, ranks, split="trainval", levels=[0, 10, 50, 75, 100], names=["b", "a"])
    assert ref.levels == (0.0, 10.0, 50.0, 75.0, 100.0) and ref.split == "trainval"
    assert all(type(v) is float for v in ref.levels)  # stored as floats even when given as integers
    assert ref.overall == pytest.approx([_naive_quantile(scores, l) for l in ref.levels], abs=1e-12)
    assert ref.per_tier["S"] == pytest.approx([_naive_quantile([3.0, -1.0, 9.0], l) for l in ref.levels], abs=1e-12)
    assert ref.per_tier["B"] == pytest.approx([_naive_quantile([1.5, 0.0], l) for l in ref.levels], abs=1e-12)
    assert ref.per_tier["A"] is None
    assert ref.counts == {"all": 7, "S": 3, "A": 0, "B": 2, "C": 2}
    assert ref.images_sha256 == hashlib.sha256(b"a\nb").hexdigest() == names_sha256(["b", "a"])
    assert names_sha256([2, 10]) == hashlib.sha256(b"10\n2").hexdigest()
    default = make_score_reference([1.0, 2.0], [0, 3])
    assert default.levels == tuple(float(i) for i in range(101)) and default.split == "train"
    assert default.images_sha256 is None
    with _exactly("cannot make a score reference from an empty test split"):
        make_score_reference([], [], split="test")


def test_percentile_interpolates_between_quantiles_and_collapses_ties():
    ref = ScoreReference(levels=(0.0, 25.0, 50.0, 75.0, 100.0), overall=(0.0, 1.0, 1.0, 1.0, 3.0),
                         per_tier={"S": (-2.0, -1.0, 0.0, 1.0, 2.0), "C": None, "A": (5.0,) * 5},
                         counts={"all": 9})
    # Ties at 1.0 (levels 25, 50, 75) count as their middle, 50.
    got = ref.percentile([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(got, [0.0, 0.0, 25.0, 50.0, 75.0, 100.0, 100.0], atol=1e-12)
    np.testing.assert_allclose(ref.percentile([-1.5, 0.25, 2.5], tier="S"), [12.5, 56.25, 100.0], atol=1e-12)
    assert np.isnan(ref.percentile([0.0, 1.0], tier="C")).all() and ref.percentile([0.0, 1.0], tier="C").shape == (2,)
    assert np.isnan(ref.percentile([0.0], tier="B")).all()  # a tier not stored at all
    np.testing.assert_array_equal(ref.percentile([4.0, 5.0, 6.0], tier="A"), [0.0, 50.0, 100.0])
    # Two quantiles: a straight line between them; levels that do not reach 0 and 100 still give 0 and 100 outside.
    two = ScoreReference(levels=(0.0, 100.0), overall=(1.0, 2.0), per_tier={}, counts={})
    np.testing.assert_allclose(two.percentile([0.5, 1.0, 1.25, 2.0, 2.5]), [0.0, 0.0, 25.0, 100.0, 100.0])
    inner = ScoreReference(levels=(10.0, 50.0, 90.0), overall=(1.0, 2.0, 4.0), per_tier={}, counts={})
    np.testing.assert_allclose(inner.percentile([0.0, 1.0, 1.5, 3.0, 4.0, 5.0]), [0.0, 10.0, 30.0, 70.0, 90.0, 100.0])
    v, l = cm._strictly_increasing(np.array([1.0, 2.0, 2.0, 2.0, 3.0, 3.0]), np.array([0.0, 10, 20, 40, 50, 70]))
    assert v.tolist() == [1.0, 2.0, 3.0] and l.tolist() == [0.0, 70 / 3, 60.0]


def test_score_reference_storage_and_its_errors():
    ref = ScoreReference((0.0, 100.0), (1.0, 2.0), {"S": (1.0, 1.5), "C": None}, {"all": 2, "S": 2}, "val", "ab")
    d = ref.to_dict()
    assert d == {"version": 1, "split": "val", "levels": [0.0, 100.0], "overall": [1.0, 2.0],
                 "per_tier": {"S": [1.0, 1.5], "C": None}, "counts": {"all": 2, "S": 2}, "images_sha256": "ab"}
    assert ScoreReference.from_dict(d) == ref
    bare = ScoreReference.from_dict({"levels": ["0", 100], "overall": [1, 2], "counts": {"all": "2"}})
    assert bare == ScoreReference((0.0, 100.0), (1.0, 2.0), {}, {"all": 2}, "train", None)
    assert ScoreReference.from_dict({"levels": [0], "overall": [1], "per_tier": None}).per_tier == {}
    with _exactly("stored score reference is malformed (KeyError('levels'))"):
        ScoreReference.from_dict({"overall": [1.0]})
    with _exactly("stored score reference is malformed (ValueError(\"could not convert string to float: 'x'\"))"):
        ScoreReference.from_dict({"levels": [0.0], "overall": ["x"]})
    with _exactly("stored score reference is malformed (TypeError(\"'int' object is not iterable\"))"):
        ScoreReference.from_dict({"levels": [0.0], "overall": [1.0], "per_tier": {"S": 3}})
    for bad in ({"levels": [0, 1], "overall": [1.0]}, {"levels": [0], "overall": [1.0], "per_tier": {"S": [1, 2]}}):
        with _exactly("stored score reference: quantile lists and levels differ in length"):
            ScoreReference.from_dict(bad)
    with pytest.raises(CalibrationError) as info:
        ScoreReference.from_dict({})
    assert info.value.__suppress_context__
