"""Judges' reliability (train.py --judge-reliability): the noisy Bradley-Terry fit against simulated judges and a
naive likelihood, the shrinkage and weights, the fit's train-split-only data, and a run that follows the
reliable judge over a contradicting one."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from _stage2_helpers import fake_fingerprint, single_thread
from mirip.common.judgments import write_judgments_csv
from mirip.store.cache import write_cache
from mirip.training.judge_reliability import (PRIOR_JUDGMENTS, TIER_PRIOR_SD, estimate_reliability, fit_noisy_bt,
                                              noisy_bt_loglik, reliability_weight, shrunk_q)
from mirip.training.judged_pairs import JudgedPairs, attach_judgments, expand_judged


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def _simulated(n=120, per_judge=500, seed=0, few=0):
    """Judges on a known latent order: 'good' answers by a steep logistic of it, 'coin' at random, 'contra'
    always against 'good''s answer; 'few' (``few`` judgments) like 'good'."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=n)
    ranks = np.digitize(latent, np.quantile(latent, [0.25, 0.5, 0.75]))
    rows = []
    for judge, count in (("good", per_judge), ("coin", per_judge), ("contra", per_judge), ("few", few)):
        for _ in range(count):
            a, b = rng.choice(n, size=2, replace=False)
            y = float(rng.random() < 1 / (1 + math.exp(-4 * (latent[a] - latent[b]))))
            y = {"coin": float(rng.random() < 0.5), "contra": 1 - y}.get(judge, y)
            rows.append((a, b, y, judge))
    first, second, outcome, judges = (np.array([r[k] for r in rows]) for k in range(4))
    return latent, ranks, first, second, outcome, list(judges)


def test_simulated_judges_are_told_apart_and_weighted():
    _, ranks, first, second, outcome, judges = _simulated()
    fit = estimate_reliability(first, second, outcome, judges, ranks)
    got = fit.report()
    assert got["good"]["q"] > 0.9 and got["good"]["weight"] > 0.8
    assert abs(got["coin"]["q"] - 0.5) < 0.1 and got["coin"]["weight"] < 0.2
    assert got["contra"]["q"] < 0.2 and got["contra"]["weight"] == 0.0
    w = fit.pair_weights(judges)
    assert np.allclose(w[np.array(judges) == "good"], got["good"]["weight"])
    assert np.all(w[np.array(judges) == "contra"] == 0.0)


def test_unnamed_judges_are_one_judge():
    _, ranks, first, second, outcome, judges = _simulated(per_judge=200)
    fit = estimate_reliability(first, second, outcome, [""] * len(judges), ranks)
    assert fit.judges == [""] and list(fit.report()) == ["(unnamed)"] and fit.pairs.tolist() == [len(judges)]


def _naive_loglik(scores, q, first, second, outcome):
    total = 0.0
    for a, b, y in zip(first, second, outcome):
        s = 1 / (1 + math.exp(-(scores[a] - scores[b])))
        p = q * s + (1 - q) * (1 - s)
        total += y * math.log(p) + (1 - y) * math.log(1 - p)
    return total


def test_q_for_fixed_scores_matches_a_brute_force_grid():
    rng = np.random.default_rng(4)
    scores = rng.normal(scale=1.5, size=30)
    first, second = rng.integers(30, size=300), rng.integers(30, size=300)
    keep = first != second
    first, second = first[keep], second[keep]
    p_true = 0.8 / (1 + np.exp(-(scores[first] - scores[second]))) + 0.2 / (1 + np.exp(scores[first] - scores[second]))
    outcome = (rng.random(len(first)) < p_true).astype(float)
    outcome[::17] = 0.5  # ties count half each way
    grid = np.linspace(0.001, 0.999, 999)
    best = grid[int(np.argmax([_naive_loglik(scores, q, first, second, outcome) for q in grid]))]
    _, q = fit_noisy_bt(first, second, outcome, np.zeros(len(first), int), 30, 1, scores=scores)
    assert abs(q[0] - best) < 2e-3
    assert noisy_bt_loglik(scores, np.array([0.7]), first, second, outcome, np.zeros(len(first), int)) == \
        pytest.approx(_naive_loglik(scores, 0.7, first, second, outcome), rel=1e-10)


def test_joint_fit_is_a_maximum_of_the_posterior():
    _, ranks, first, second, outcome, judges = _simulated(n=40, per_judge=120, seed=2)
    names = sorted(set(judges))
    judge = np.array([names.index(j) for j in judges])
    anchor = ranks - ranks.mean()

    def posterior(s, q):  # naive: per-pair likelihood plus the tier prior, written out
        ll = sum(_naive_loglik(s, q[j], first[judge == j], second[judge == j], outcome[judge == j])
                 for j in range(len(names)))
        return ll - 0.5 * np.sum((s - anchor) ** 2) / TIER_PRIOR_SD ** 2

    s, q = fit_noisy_bt(first, second, outcome, judge, 40, len(names), ranks)
    top = posterior(s, q)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ds, dq = rng.normal(scale=0.05, size=40), rng.normal(scale=0.02, size=len(names))
        assert posterior(s + ds, np.clip(q + dq, 1e-6, 1 - 1e-6)) <= top + 1e-7


def test_few_judgments_shrink_toward_the_pool_and_weights_follow_q():
    q, counts = np.array([0.95, 0.55, 0.2]), np.array([400, 100, 5])
    pooled = (0.95 * 400 + 0.55 * 100 + 0.2 * 5) / 505
    want = [(n * x + PRIOR_JUDGMENTS * pooled) / (n + PRIOR_JUDGMENTS) for x, n in zip(q, counts)]
    assert shrunk_q(q, counts) == pytest.approx(want)
    assert shrunk_q(q, counts)[2] > 0.6  # five judgments against the pool barely move it
    assert reliability_weight(np.array([1.0, 0.75, 0.5, 0.1])).tolist() == [1.0, 0.5, 0.0, 0.0]
    _, ranks, first, second, outcome, judges = _simulated(per_judge=300, few=6)
    got = estimate_reliability(first, second, outcome, judges, ranks).report()["few"]
    assert abs(got["q"] - got["q_fitted"]) > 0 and got["fit_pairs"] == 6


def test_pair_weights_scale_the_epochs_copies():
    n = 400
    pairs = JudgedPairs(np.arange(n), np.arange(n) + 1, np.ones(n), ["x"] * n)
    plain = expand_judged(pairs, 1.5, seed=3, epoch=1)
    pairs.reliability = np.ones(n)
    assert all(np.array_equal(a, b) for a, b in zip(plain, expand_judged(pairs, 1.5, seed=3, epoch=1)))
    pairs.reliability = np.where(np.arange(n) < n // 2, 0.0, 0.5)
    assert pairs.subset(np.arange(n) % 2 == 1).reliability.tolist() == pairs.reliability[1::2].tolist()
    counts = np.zeros(n)
    for epoch in range(40):
        np.add.at(counts, expand_judged(pairs, 1.5, seed=3, epoch=epoch)[0], 1)
    assert counts[: n // 2].sum() == 0  # weight 0: never trained
    assert counts[n // 2:].mean() / 40 == pytest.approx(0.75, abs=0.03)  # 1.5 x 0.5 copies per epoch


def test_reliability_is_fitted_on_the_train_split_only(tmp_path):
    n = 60
    names = [f"img_{i:02d}.png" for i in range(n)]
    latent = np.arange(n, dtype=float)
    splits = {"train": np.arange(0, 40), "val": np.arange(40, 50), "test": np.arange(50, 60)}
    rng = np.random.default_rng(1)
    rows = []
    for split, rows_of in splits.items():
        for _ in range(200):
            a, b = rng.choice(rows_of, size=2, replace=False)
            right = latent[a] > latent[b]
            honest = split == "train"  # 'lee' follows the order on train pairs, contradicts it elsewhere
            rows.append({"a": names[a], "b": names[b], "winner": "a" if right == honest else "b", "judge": "lee"})
            rows.append({"a": names[a], "b": names[b], "winner": "a" if right else "b", "judge": "kim"})
    path = str(tmp_path / "j.csv")
    write_judgments_csv(path, rows)
    data = SimpleNamespace(names=names, excluded=[], splits=splits, ranks=(latent // 15).astype(int))
    judged = attach_judgments(path, 1.0, data, {"train": None}, log=lambda _: None, reliability=True)
    fitted = judged.info["judge_reliability"]
    assert fitted["lee"]["fit_pairs"] == 200 and fitted["lee"]["q"] > 0.9
    assert judged.by_split["train"].reliability is not None and judged.by_split["val"].reliability is None


def test_flag_needs_judgments(tmp_path, capsys):
    from mirip.cli.train import main

    assert main(["--features", "x.h5", "--metadata", "m.csv", "--output-dir", str(tmp_path / "r"),
                 "--judge-reliability"]) == 2
    assert "--judge-reliability weighs judged pairs by their judge: it needs --judgments" in capsys.readouterr().err


def _noisy_judge_bank(directory):
    """Tiers from a latent quality that features 0 (tier) and 1 (within tier) carry; 'kim' judges by the latent
    order, 'lee' always against it, as often."""
    rng = np.random.default_rng(5)
    n = 200
    tier_rank = np.arange(n) % 4
    within = rng.random(n)
    latent = tier_rank + within
    feats = np.stack([tier_rank + rng.normal(scale=0.2, size=n), within] + [rng.normal(size=n) for _ in range(4)], 1)
    names = [f"img_{i:03d}.png" for i in range(n)]
    cache = os.path.join(directory, "bank.h5")
    write_cache(cache, fake_fingerprint(6), names, feats.astype(np.float32))
    meta = os.path.join(directory, "metadata.csv")
    pd.DataFrame({"filename": names, "tier": np.array(list("CBAS"))[tier_rank],
                  "latent_quality": latent}).to_csv(meta, index=False)
    rows = []
    for _ in range(800):
        a, b = rng.choice(n, size=2, replace=False)
        right = latent[a] > latent[b]
        rows.append({"a": names[a], "b": names[b], "winner": "a" if right else "b", "judge": "kim"})
        rows.append({"a": names[b], "b": names[a], "winner": "a" if right else "b", "judge": "lee"})
    judgments = os.path.join(directory, "judged.csv")
    write_judgments_csv(judgments, rows)
    return cache, meta, judgments


@pytest.mark.slow
def test_run_with_reliability_follows_the_reliable_judge_and_resume_keeps_the_flag(tmp_path, capsys):
    from mirip.cli.train import main

    cache, meta, judgments = _noisy_judge_bank(tmp_path)
    within = {}
    for flag in (False, True):
        out = tmp_path / f"r{flag}"
        argv = ["--features", cache, "--metadata", meta, "--output-dir", str(out), "--judgments", judgments,
                "--judgment-weight", "4", "--max-epochs", "4", "--pairs-per-epoch", "256", "--batch-size", "32",
                "--learning-rate", "3e-3", "--device", "cpu", "--no-progress", "--hidden-dim", "16",
                "--projector-dim", "8", "--train-ratio", "0.5", "--val-ratio", "0.2", "--test-ratio", "0.3",
                "--bootstrap", "0"]
        assert main(argv + (["--judge-reliability"] if flag else [])) == 0
        result = json.loads((out / "test_metrics.json").read_text())
        within[flag] = result["reference_order"]["test"]["within"]
        if flag:
            judges = result["judgments"]["judges"]
            assert judges["kim"]["reliability_weight"] > 0.8 and judges["lee"]["reliability_weight"] == 0.0
            assert "judge reliability weights kim" in capsys.readouterr().out
            assert main(argv + ["--resume"]) == 2  # the flag dropped: a different run
            assert "judge_reliability: the checkpoint has True" in capsys.readouterr().err
        else:
            assert "reliability_q" not in result["judgments"]["judges"]["kim"]
    assert within[True] > within[False] + 0.2
