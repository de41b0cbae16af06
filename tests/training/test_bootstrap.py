"""Bootstrap intervals: the same numbers as a naive loop over resamples, and a 95% interval that holds the
true accuracy about 95% of the time."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mirip.training.bootstrap import (BootstrapConfig, add_intervals, metric_intervals, pair_accuracies,
    percentile_interval, resample_counts)


def _data(n=30, seed=0):
    rng = np.random.default_rng(seed)
    ranks = rng.integers(0, 4, size=n)
    scores = ranks + rng.normal(scale=1.2, size=n)
    i, j = np.triu_indices(n, 1)
    keep = ranks[i] != ranks[j]
    first, second = i[keep], j[keep]
    labels = np.where(ranks[first] > ranks[second], 1, -1)
    logits = -np.abs(scores[:, None] - np.array([3, 2, 1, 0])[None, :])  # columns S, A, B, C
    probs = np.exp(2 * logits) / np.exp(2 * logits).sum(axis=1, keepdims=True)
    return scores, ranks, first, second, labels, probs


def _naive_ece(p, y, bins=10):
    conf, pred = p.max(axis=1), 3 - p.argmax(axis=1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [k for k in range(len(y)) if (lo <= conf[k] < hi) or (b == bins - 1 and conf[k] == 1.0)]
        if members:
            acc = sum(pred[k] == y[k] for k in members) / len(members)
            total += len(members) / len(y) * abs(acc - sum(conf[k] for k in members) / len(members))
    return total


def test_intervals_match_a_naive_loop_over_resamples():
    scores, ranks, first, second, labels, probs = _data()
    rng = np.random.default_rng(5)
    draws = [rng.integers(0, len(scores), size=len(scores)) for _ in range(60)]
    counts = np.array([np.bincount(d, minlength=len(scores)) for d in draws], dtype=np.float64)
    got = metric_intervals(counts, scores, ranks, first, second, labels, probs, level=0.9)
    naive = {"accuracy": [], "spearman": [], "kendall": [], "tier_accuracy": [], "calibration_error": [], "S-C": []}
    for d in draws:
        copies = {k: int((d == k).sum()) for k in range(len(scores))}
        right, right_sc = [], []
        for a, b, lab in zip(first, second, labels):
            ok = (scores[a] > scores[b]) == (lab == 1)
            for _ in range(copies[a] * copies[b]):  # every drawn copy of a against every drawn copy of b
                right.append(ok)
                if {ranks[a], ranks[b]} == {3, 0}:
                    right_sc.append(ok)
        naive["accuracy"].append(np.mean(right))
        naive["S-C"].append(np.mean(right_sc) if right_sc else np.nan)
        naive["spearman"].append(stats.spearmanr(scores[d], ranks[d]).statistic)
        naive["kendall"].append(stats.kendalltau(scores[d], ranks[d]).statistic)
        naive["tier_accuracy"].append(np.mean([3 - probs[k].argmax() == ranks[k] for k in d]))
        naive["calibration_error"].append(_naive_ece(probs[d], ranks[d]))
    for key, values in naive.items():
        values = np.array(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        want = [np.percentile(values, 5), np.percentile(values, 95)]
        have = got["tier_pair_accuracy"]["S-C"] if key == "S-C" else got[key]
        assert have == pytest.approx(want, abs=1e-9), key


def test_group_resampling_draws_whole_groups():
    groups = np.repeat([f"student{g}" for g in range(7)], [1, 2, 3, 4, 1, 2, 5])
    counts = resample_counts(groups, 200, seed=3)
    for g in np.unique(groups):
        members = counts[:, groups == g]
        assert (members == members[:, :1]).all()  # all drawings of a student come in together
    per_group = np.array([counts[:, groups == g][:, 0] for g in np.unique(groups)]).T
    assert (per_group.sum(axis=1) == 7).all()  # 7 groups drawn per resample, with replacement


def _true_accuracy(sigma):
    """Pairs of a uniform-tier population with different tiers: P(correct) = Phi(|gap| / (sigma sqrt 2))."""
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    gaps = [abs(a - b) for a in range(4) for b in range(4) if a != b]
    return sum(phi(g / (sigma * math.sqrt(2))) for g in gaps) / len(gaps)


@pytest.mark.slow  # about 25 s: 400 repeats of a 300-resample bootstrap on 100 drawings
def test_95_percent_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    sigma, repeats, hits = 1.5, 400, 0
    truth = _true_accuracy(sigma)
    for r in range(repeats):
        rng = np.random.default_rng(1000 + r)
        ranks = rng.integers(0, 4, size=100)
        scores = ranks + rng.normal(scale=sigma, size=100)
        i, j = np.triu_indices(100, 1)
        keep = ranks[i] != ranks[j]
        labels = np.where(ranks[i[keep]] > ranks[j[keep]], 1, -1)
        counts = resample_counts(np.arange(100), 300, seed=r)
        correct = ((scores[i[keep]] > scores[j[keep]]) == (labels == 1)).astype(float)
        lo, hi = percentile_interval(pair_accuracies(counts, i[keep], j[keep], correct), 0.95)
        hits += lo <= truth <= hi
    print(f"coverage {hits / repeats:.3f} of {repeats} repeats")
    assert 0.90 <= hits / repeats <= 0.98, hits / repeats


def test_no_resamples_means_no_intervals():
    scores, ranks, first, second, labels, _ = _data()
    assert "intervals" not in add_intervals({"accuracy": 0.5}, BootstrapConfig(resamples=0), scores, ranks,
                                            (first, second, labels))
    with pytest.raises(ValueError, match="level"):
        BootstrapConfig(level=95)


def test_the_sweep_tie_note_names_configurations_inside_the_winners_interval():
    import pandas as pd

    from mirip.sweep.report import aggregate, tie_note

    rows = [{"margin": m, "hidden_dim": 16, "projector_dim": 8, "learning_rate": 1e-3, "dropout": 0.1,
             "weight_decay": 0.01, "feature": "cls@-1", "seed": 0, "val_acc": v, "val_acc_low": v - 0.08,
             "val_acc_high": v + 0.06, "test_acc": 0.5, "spearman": 0.1, "best_epoch": 1, "wall_time_s": 1.0,
             "checkpoint": f"m{m}.pt"} for m, v in ((0.1, 0.70), (0.5, 0.75), (1.0, 0.60))]
    note = tie_note(aggregate(pd.DataFrame(rows)))
    assert note.startswith("1 other configuration(s) have a mean val accuracy inside the winner's 95% interval "
                           "[0.67, 0.81] (")
    assert "margin=0.1 " in note and "margin=1 " not in note
    rows[0]["val_acc"] = 0.66  # just below the winner's low end: no longer inside
    assert tie_note(aggregate(pd.DataFrame(rows))) == ""
