"""The tier agreement's bootstrap interval (score.py's console line): against a naive loop over resamples."""

from __future__ import annotations

import numpy as np
import pytest

from mirip.scoring.report_html import agreement_summary, tier_agreement_interval
from mirip.training.bootstrap import resample_counts

TIERS = "SABC"


def _naive(scores, tiers, counts, level):
    """Each resample spelt out: every drawing repeated by its weight, every cross-tier pair of copies counted."""
    rank = {t: 3 - i for i, t in enumerate(TIERS)}
    values = []
    for row in counts:
        copies = [i for i, c in enumerate(row) for _ in range(int(c))]
        wins = pairs = 0.0
        for a in copies:
            for b in copies:
                if tiers[a] and tiers[b] and rank[tiers[a]] > rank[tiers[b]]:
                    pairs += 1
                    wins += 1.0 if scores[a] > scores[b] else 0.5 if scores[a] == scores[b] else 0.0
        values.append(wins / pairs if pairs else np.nan)
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


@pytest.mark.parametrize("grouped", [False, True])
def test_interval_matches_a_naive_loop_over_resamples(grouped):
    rng = np.random.default_rng(3)
    n = 24
    tiers = [TIERS[i % 4] for i in range(n)]
    scores = [float(3 - i % 4) + rng.normal() for i in range(n)]
    scores[5] = scores[6]  # a tie counts half
    units = [i // 3 for i in range(n)] if grouped else list(range(n))
    got = tier_agreement_interval(scores, tiers, units, resamples=60, level=0.9, seed=11)
    want = _naive(scores, tiers, resample_counts(units, 60, 11), 0.9)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_groups_widen_the_interval_when_a_group_shares_its_errors():
    # Eight groups of six drawings; in two groups every drawing is ranked against its tier: the errors come in
    # clumps, so resampling whole groups must give a wider interval than resampling drawings.
    rng = np.random.default_rng(0)
    tiers, scores, groups = [], [], []
    for g in range(8):
        for k in range(6):
            t = TIERS[(g + k) % 4]
            tiers.append(t)
            quality = 3 - TIERS.index(t)
            scores.append((-quality if g in (2, 5) else quality) + 0.3 * rng.normal())
            groups.append(f"student{g}")
    by_drawing = tier_agreement_interval(scores, tiers, list(range(len(tiers))), 400)
    by_group = tier_agreement_interval(scores, tiers, groups, 400)
    assert by_group[1] - by_group[0] > 1.3 * (by_drawing[1] - by_drawing[0])


def test_summary_prints_the_interval_and_what_was_resampled():
    entries = [{"path": f"{i}.png", "score": float(3 - i % 4), "tier": TIERS[i % 4], "group": f"g{i // 4}"}
               for i in range(16)]
    lines = agreement_summary(entries, splits_known=False, resamples=50, group_key="group", group_name="student")
    assert lines[0].startswith("tier agreement: 100.0%")
    assert lines[1] == "  95% interval [100.0%, 100.0%] (bootstrap over the 4 student groups, 50 resamples)"
    assert agreement_summary(entries, splits_known=False) == lines[:1]
