"""Score -> tier calibration: recovery of a known ordinal model, calibrated probabilities, percentiles, storage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mirip.training.calibration import OrdinalCalibration, from_checkpoint, logistic_difference_cdf
from mirip.training.calibration_fit import fit_ordinal
from mirip.training.calibration import CalibrationError
from mirip.training.calibration_metrics import (confusion_matrix, expected_calibration_error,
                                                ranked_probability_score, tier_metrics)
from mirip.training.calibration import ScoreReference
from mirip.training.calibration_fit import make_score_reference

TRUE_SLOPE = 1.3
TRUE_THRESHOLDS = np.array([-1.5, 0.8, 2.9])


def draw(n: int, seed: int, slope: float = TRUE_SLOPE, thresholds=TRUE_THRESHOLDS):
    """Scores and ranks from the cumulative-logit model, sampled through its latent variable (not its formula)."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(1.0, 2.0, n)
    latent = slope * scores + rng.logistic(size=n)
    ranks = (latent[:, None] > np.asarray(thresholds)[None, :]).sum(axis=1)
    return scores, ranks


@pytest.fixture(scope="module")
def fitted():
    scores, ranks = draw(8000, seed=0)
    return fit_ordinal(scores, ranks)


def test_recovers_slope_and_thresholds(fitted):
    # Standard errors at n=8000 are about 0.03 on each; 0.15 / 6% leaves no room for a wrong model.
    assert fitted.slope == pytest.approx(TRUE_SLOPE, rel=0.06)
    np.testing.assert_allclose(fitted.thresholds, TRUE_THRESHOLDS, atol=0.15)
    assert fitted.num_images == 8000 and sum(fitted.tier_counts.values()) == 8000


def naive_probabilities(scores, slope, thresholds):
    """P(S), P(A), P(B), P(C) written out tier by tier."""
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    rows = []
    for s in scores:
        c = [sig(t - slope * s) for t in thresholds]
        rows.append([1 - c[2], c[2] - c[1], c[1] - c[0], c[0]])
    return np.array(rows)


def test_probabilities_match_the_formula_sum_to_one_and_move_with_the_score(fitted):
    grid = np.linspace(-8, 10, 400)
    p = fitted.probabilities(grid)
    np.testing.assert_allclose(p, naive_probabilities(grid, fitted.slope, fitted.thresholds), atol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    assert (p >= 0).all()
    # Higher score: P(S) up, P(C) down, P(tier >= k) up for every k, expected tier up.
    assert np.all(np.diff(p[:, 0]) > 0) and np.all(np.diff(p[:, 3]) < 0)
    at_least = np.cumsum(p, axis=1)[:, :3]  # P(S), P(S or A), P(S, A or B)
    assert np.all(np.diff(at_least, axis=0) >= 0)
    expected = p @ np.array([3, 2, 1, 0])
    assert np.all(np.diff(expected) > 0)
    ranks = fitted.predict_ranks(grid)
    assert np.all(np.diff(ranks) >= 0) and set(ranks) == {0, 1, 2, 3}


def binned_error(probs, ranks, column, bins=10):
    """Naive one-tier reliability: per bin of P(tier), |mean P - observed frequency|, weighted by bin size."""
    tier_rank = 3 - column
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = [(p[column], r == tier_rank) for p, r in zip(probs, ranks) if lo <= p[column] < hi or (b == bins - 1 and p[column] == 1)]
        if sel:
            total += len(sel) / len(ranks) * abs(np.mean([x for x, _ in sel]) - np.mean([y for _, y in sel]))
    return total


def test_fitted_probabilities_are_calibrated_on_fresh_draws(fitted):
    scores, ranks = draw(8000, seed=1)
    probs = fitted.probabilities(scores)
    for column in range(4):
        assert binned_error(probs, ranks, column) < 0.025
    assert expected_calibration_error(probs, ranks) < 0.025
    # A miscalibrated model (twice too confident) fails the same checks: the test can fail.
    over = OrdinalCalibration(slope=2 * TRUE_SLOPE, thresholds=tuple(2 * TRUE_THRESHOLDS))
    assert expected_calibration_error(over.probabilities(scores), ranks) > 0.08
    assert max(binned_error(over.probabilities(scores), ranks, c) for c in range(4)) > 0.05


def test_ranked_probability_score_and_confusion_against_loops():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4), size=50)
    y = rng.integers(0, 4, 50)
    naive = 0.0
    for row, r in zip(p, y):
        by_rank = row[::-1]  # C, B, A, S
        naive += sum((by_rank[: k + 1].sum() - (r <= k)) ** 2 for k in range(3)) / 3
    assert ranked_probability_score(p, y) == pytest.approx(naive / 50, abs=1e-12)
    perfect = np.eye(4)[3 - y]
    assert ranked_probability_score(perfect, y) == 0.0
    pred = 3 - np.argmax(p, axis=1)
    m = confusion_matrix(y, pred)
    for i, t in enumerate(range(3, -1, -1)):
        for j, q in enumerate(range(3, -1, -1)):
            assert m[i][j] == sum(1 for a, b in zip(y, pred) if a == t and b == q)
    metrics = tier_metrics(p, y)
    assert metrics["tier_accuracy"] == pytest.approx(np.mean(pred == y))
    assert metrics["tier_mae"] == pytest.approx(np.mean(np.abs(pred - y)))
    assert metrics["majority_tier_accuracy"] == pytest.approx(np.bincount(y, minlength=4).max() / 50)
    assert "expected calibration error" in metrics["calibration_error"]["name"]


def test_small_and_separable_splits_stay_finite_and_ordered():
    scores = np.arange(8.0)
    ranks = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    cal = fit_ordinal(scores, ranks)  # perfectly separated: plain maximum likelihood would diverge
    assert np.all(np.isfinite(cal.thresholds)) and cal.slope > 0
    assert cal.predict(scores) == ["C", "C", "B", "B", "A", "A", "S", "S"]
    two = fit_ordinal([0.0, 1.0, 2.0, 3.0], [0, 0, 3, 3])  # B and A absent
    assert two.tier_counts == {"S": 2, "A": 0, "B": 0, "C": 2}
    assert two.predict([0.0, 3.0]) == ["C", "S"]
    with pytest.raises(CalibrationError, match="at least two tiers"):
        fit_ordinal([1.0, 2.0, 3.0], [2, 2, 2])
    with pytest.raises(CalibrationError, match="same score"):
        fit_ordinal([1.0, 1.0], [0, 3])
    with pytest.raises(CalibrationError, match="finite"):
        fit_ordinal([1.0, float("nan")], [0, 3])


def test_probability_first_is_better_is_the_latent_model():
    rng = np.random.default_rng(5)
    diff = rng.logistic(size=400_000) - rng.logistic(size=400_000)
    for x in (-4.0, -0.7, 0.0, 0.25, 1.5, 6.0):
        assert logistic_difference_cdf(x) == pytest.approx((diff <= x).mean(), abs=0.003)
    assert logistic_difference_cdf(1e-6) == pytest.approx(0.5, abs=1e-6)
    assert logistic_difference_cdf(800.0) == 1.0 and logistic_difference_cdf(-800.0) == 0.0
    cal = OrdinalCalibration(slope=2.0, thresholds=(-1.0, 0.0, 1.0))
    assert cal.prob_first_better(1.0, 0.5) == pytest.approx(float(logistic_difference_cdf(1.0)))
    assert cal.prob_first_better(0.3, 0.3) == 0.5
    assert cal.prob_first_better(0.0, 1.0) + cal.prob_first_better(1.0, 0.0) == pytest.approx(1.0)


def test_percentiles_are_monotone_and_match_the_stored_quantiles():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=500)
    ranks = rng.integers(0, 4, 500)
    ref = make_score_reference(scores, ranks)
    np.testing.assert_allclose(ref.overall, np.quantile(scores, np.arange(101) / 100))
    # At every stored quantile the percentile is its level.
    np.testing.assert_allclose(ref.percentile(np.asarray(ref.overall)), ref.levels, atol=1e-9)
    for tier in "SABC":
        q = np.asarray(ref.per_tier[tier])
        np.testing.assert_allclose(q, np.quantile(scores[ranks == "CBAS".index(tier)], np.arange(101) / 100))
        np.testing.assert_allclose(ref.percentile(q, tier=tier), ref.levels, atol=1e-9)
    grid = np.linspace(-5, 5, 1000)
    pct = ref.percentile(grid)
    assert np.all(np.diff(pct) >= 0) and pct[0] == 0.0 and pct[-1] == 100.0
    # Against a naive empirical CDF: within one quantile step.
    for s in (-1.0, 0.0, 0.7):
        assert ref.percentile([s])[0] == pytest.approx(100 * np.mean(scores <= s), abs=1.5)
    # Ties in the reference (many equal scores) still give a monotone answer.
    tied = make_score_reference(np.r_[np.zeros(50), np.arange(1.0, 51.0)], np.zeros(100, dtype=int))
    assert np.all(np.diff(tied.percentile(np.linspace(-1, 60, 200))) >= 0)
    one_tier = make_score_reference([1.0, 2.0], [3, 3])
    assert one_tier.per_tier["C"] is None and np.isnan(one_tier.percentile([1.0], tier="C")[0])


def test_round_trip_through_a_weights_only_checkpoint(tmp_path, fitted):
    scores, ranks = draw(300, seed=2)
    ref = make_score_reference(scores, ranks)
    path = tmp_path / "c.pt"
    torch.save({"calibration": fitted.to_dict(), "score_reference": ref.to_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    cal, ref2, why = from_checkpoint(loaded, str(path))
    assert why is None
    np.testing.assert_allclose(cal.probabilities(scores), fitted.probabilities(scores))
    np.testing.assert_allclose(ref2.percentile(scores), ref.percentile(scores))
    assert loaded["calibration"]["fitted_on"] == "val" and loaded["calibration"]["tier_order"] == ["C", "B", "A", "S"]
    none, _, reason = from_checkpoint({}, "old.pt")
    assert none is None and "old.pt" in reason and "no score-to-tier calibration" in reason
    _, _, no_val = from_checkpoint({"calibration": None, "calibration_note": "no validation split"}, "new.pt")
    assert "no validation split" in no_val and "written before" not in no_val
    _, _, bad = from_checkpoint({"calibration": {"slope": 1.0, "thresholds": [2.0, 1.0, 0.0]}}, "x.pt")
    assert "ordered" in bad
    assert isinstance(ScoreReference.from_dict(ref.to_dict()), ScoreReference)


def test_calibration_plot_legends_cover_no_point(tmp_path, monkeypatch):
    """Each panel's legend lies outside its plotting area (and off its x tick labels and label), so nothing is hidden:
    checked on the figure as drawn, legend boxes against axes boxes in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mirip.training.calibration_fit import fit_ordinal, save_calibration_plot

    rng = np.random.default_rng(0)
    ranks = np.repeat(np.arange(4), 30)
    scores = ranks + rng.normal(scale=0.8, size=ranks.size)
    cal = fit_ordinal(scores, ranks)
    # A test split scored backwards: confident and wrong, points in the lower right of the reliability square.
    splits = {"val": (scores, ranks), "test": (-scores, ranks)}
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    assert save_calibration_plot(str(tmp_path / "c.png"), cal, splits)
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    try:
        for ax in fig.axes:
            legend = ax.get_legend().get_window_extent(renderer)
            for covered in (ax.get_window_extent(renderer), ax.xaxis.get_tightbbox(renderer)):
                assert not legend.overlaps(covered), (ax.get_title(), legend, covered)
    finally:
        close(fig)
