"""The intervals a run adds to its figures: agreement with teachers' judged pairs, against a naive loop."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from mirip.training.bootstrap import BootstrapConfig, resample_counts
from mirip.training.judged_pairs import JudgedPairs, judged_agreement
from mirip.training.run_intervals import add_judged_intervals


def _naive_interval(scores, pairs: JudgedPairs, counts, level):
    """Per resample, every decisive pair counted once per drawn copy of each drawing, in plain Python."""
    values = []
    for row in counts:
        hit_sum = weight_sum = 0.0
        for a, b, o in zip(pairs.first, pairs.second, pairs.outcome):
            if o == 0.5:
                continue
            w = row[a] * row[b]
            d = scores[a] - scores[b]
            hit = 0.5 if d == 0 else float((d > 0) == (o == 1.0))
            hit_sum += w * hit
            weight_sum += w
        if weight_sum:
            values.append(hit_sum / weight_sum)
    tail = (1 - level) / 2 * 100
    return [np.percentile(values, tail), np.percentile(values, 100 - tail)]


def _setup(group: bool):
    rng = np.random.default_rng(3)
    n = 40
    scores = rng.normal(size=n)
    scores[5] = scores[6]  # a score tie counts half
    rows = {"val": np.arange(0, 20), "test": np.arange(20, 40)}
    meta = pd.DataFrame({"student": [f"s{i // 4}" for i in range(n)]})
    data = SimpleNamespace(splits=rows, metadata=meta)
    by_split = {}
    for split in rows:
        first, second = rng.integers(0, 20, 60), rng.integers(0, 20, 60)
        keep = first != second
        outcome = rng.choice([1.0, 0.0, 0.5], size=int(keep.sum()), p=[0.55, 0.4, 0.05])
        by_split[split] = JudgedPairs(first[keep], second[keep], outcome, ["kim"] * int(keep.sum()))
    report = {f"{s}_agreement": judged_agreement(scores[rows[s]], by_split[s]) for s in rows}
    return scores, data, SimpleNamespace(by_split=by_split), report, ("student" if group else None)


def test_judged_agreement_intervals_match_a_naive_loop_over_resamples():
    for group in (False, True):
        scores, data, judged, report, column = _setup(group)
        boot = BootstrapConfig(resamples=300, level=0.9, seed=7)
        add_judged_intervals(report, judged, scores, data, boot, column)
        for split, rows in data.splits.items():
            units = data.metadata["student"].to_numpy()[rows] if group else np.arange(len(rows))
            counts = resample_counts(units, boot.resamples, boot.seed)  # the same draws; the arithmetic is ours
            want = _naive_interval(scores[rows], judged.by_split[split], counts, boot.level)
            got = report[f"{split}_agreement"]
            np.testing.assert_allclose(got["interval"], want, rtol=1e-12)
            assert got["interval"][0] <= got["agreement"] <= got["interval"][1]
            assert got["interval_unit"] == ("group:student" if group else "image") and got["interval_level"] == 0.9


def test_no_resamples_no_judged_intervals():
    scores, data, judged, report, _ = _setup(False)
    add_judged_intervals(report, judged, scores, data, BootstrapConfig(resamples=0), None)
    assert "interval" not in report["val_agreement"]
