"""Evaluator (seed API and the detailed report) and the ridge baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mirip.ml.ranking_model import RankingHead
from mirip.training.baseline import RidgeBaseline
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.evaluator import Evaluator, format_metrics

from _stage2_helpers import single_thread, tiered_features

_one_thread = pytest.fixture(autouse=True)(single_thread)


def _setup(num_pairs=500):
    feats, ranks, _ = tiered_features(15, 6, seed=4)
    torch.manual_seed(0)
    head = RankingHead(6, projector_output_dim=4, hidden_dim=8)
    ds = FeaturePairDataset(torch.from_numpy(feats), ranks, num_pairs=num_pairs, batch_size=64, seed=2)
    return head, ds, feats, ranks


def test_detailed_report_matches_a_naive_pair_loop():
    head, ds, feats, ranks = _setup()
    ev = Evaluator(model=head, device="cpu")
    result = ev.evaluate_detailed(ds)
    head.eval()
    first, second, labels = ds.pair_arrays()
    correct = 0
    with torch.no_grad():
        for i in range(len(labels)):  # the definition, one pair at a time
            s1, s2 = head(torch.from_numpy(feats[first[i]][None]), torch.from_numpy(feats[second[i]][None]))
            correct += int(np.sign(float(s1) - float(s2)) == labels[i])
    assert result["total_pairs"] == 500 and result["correct_predictions"] == correct
    assert result["accuracy"] == correct / 500 and ev.evaluate(ds) == correct / 500
    assert result["num_images"] == 60
    assert set(result["tier_pair_accuracy"]) == {"S-A", "S-B", "S-C", "A-B", "A-C", "B-C"}
    assert sum(v["pairs"] for v in result["tier_pair_accuracy"].values()) == 500
    assert -1.0 <= result["spearman"] <= 1.0 and -1.0 <= result["kendall"] <= 1.0
    # A loader that cannot list its images (a plain list of batches) gets the same seed keys, pair by pair.
    plain = [tuple(b) for b in ds]
    generic = ev.evaluate_detailed(plain)
    assert (generic["correct_predictions"], generic["total_pairs"]) == (correct, 500)


def test_predict_pair_and_ties():
    head, _, feats, _ = _setup()
    ev = Evaluator(head, "cpu")
    a, b = torch.from_numpy(feats[:1]), torch.from_numpy(feats[-1:])
    pred, s1, s2 = ev.predict_pair(a, b)
    assert pred == (1 if s1 > s2 else -1) and isinstance(s1, float)
    with torch.no_grad():
        head.score_head[0].weight.zero_()  # every image gets the bias: an exact tie
    assert ev.predict_pair(a, b)[0] == 0


def test_ties_count_as_wrong_in_accuracy():
    head, ds, _, _ = _setup()
    with torch.no_grad():
        head.score_head[0].weight.zero_()
    result = Evaluator(head, "cpu").evaluate_detailed(ds)
    assert result["correct_predictions"] == 0 and result["accuracy"] == 0.0


def test_ridge_baseline_recovers_a_linear_score():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    w = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    exact = RidgeBaseline.fit(x, x @ w + 0.7, alpha=1e-9)
    np.testing.assert_allclose(exact.weight, w, atol=1e-6)
    assert exact.bias == pytest.approx(0.7, abs=1e-6)
    feats, ranks, _ = tiered_features(50, 6, seed=1)
    val_feats, val_ranks, _ = tiered_features(20, 6, seed=2)
    ds = FeaturePairDataset(torch.from_numpy(val_feats), val_ranks, num_pairs=300)
    picked = RidgeBaseline.fit(torch.from_numpy(feats), ranks, val_features=val_feats, val_pairs=ds.pair_arrays())
    s = picked.predict(val_feats)
    first, second, labels = ds.pair_arrays()
    assert (np.sign(s[first] - s[second]) == labels).mean() > 0.75
    with pytest.raises(ValueError, match="at least 2 training images"):
        RidgeBaseline.fit(feats[:1], ranks[:1])


def test_format_metrics_table():
    head, ds, _, _ = _setup()
    m = Evaluator(head, "cpu").evaluate_detailed(ds)
    text = format_metrics(m, m, title="test:")
    assert text.splitlines()[0] == (f"test: {m['num_images']} images, {m['distinct_pairs']} distinct cross-tier pairs "
                                    f"({m['total_pairs']} sampled, repeats included)")
    assert "linear baseline" in text and "S-C (" in text
    assert f"{m['accuracy']:.4f}" in text
