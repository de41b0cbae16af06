"""The simulated-teacher benchmark section (mirip.bench.judgments): the teacher's answers, the rounds' pair
budget and bookkeeping, and a tiny end-to-end run through benchmark.py's section interface."""

import argparse
import math
import os

import numpy as np
import pytest

from mirip.bench import judgments as bench
from mirip.cli.benchmark import load_benchmarks


def test_teacher_answers_follow_the_logistic_in_quality():
    quality = np.array([0.0, 0.5, -1.0])
    first = np.repeat([1, 0, 2], 20_000)
    second = np.repeat([0, 2, 1], 20_000)
    won = bench.teacher(quality, first, second, 2.0, np.random.default_rng(0))
    for k, (a, b) in enumerate([(1, 0), (0, 2), (2, 1)]):
        expected = 1.0 / (1.0 + math.exp(-2.0 * (quality[a] - quality[b])))  # written out, not the module's
        assert abs(won[k * 20_000:(k + 1) * 20_000].mean() - expected) < 0.015


def test_world_tiers_are_quartiles_and_the_split_is_disjoint():
    world = bench.make_world(400, 8, seed=1)
    assert np.bincount(world["ranks"], minlength=4).tolist() == [100, 100, 100, 100]
    assert not set(world["pool"]) & set(world["held_out"])
    assert len(world["pool"]) + len(world["held_out"]) == 400
    # Tiers rise with quality: the mean quality of S above that of C.
    assert world["quality"][world["ranks"] == 3].mean() > world["quality"][world["ranks"] == 0].mean() + 1.0


@pytest.mark.parametrize("arm", ["active", "random"])
def test_rounds_accumulate_fresh_pairs_one_judgment_per_drawing(monkeypatch, arm):
    world = bench.make_world(80, 4, seed=0)
    seen = []

    def fake_train(world_, judged, weight, epochs, pairs, seed):
        seen.append((judged.first.copy(), judged.second.copy()))
        return np.random.default_rng(len(seen)).normal(size=len(world_["quality"]))

    monkeypatch.setattr(bench, "train_scores", fake_train)
    start = np.random.default_rng(0).normal(size=80)
    out = bench.run_arm(world, arm, start, 3, 3.0, 1.0, 1, 10, 0, log=lambda m: None)
    n = len(world["pool"])
    assert len(out) == 3 and [len(f) for f, _ in seen] == [n // 2, n, 3 * (n // 2)]
    first, second = seen[-1]
    keys = {frozenset((int(a), int(b))) for a, b in zip(first, second)}
    assert len(keys) == len(first), "a pair was asked twice"
    assert all(a != b for a, b in zip(first, second))
    if arm == "active":  # suggestions spread: every drawing about once per round (when the last free
        # drawings were already judged against each other, the cap rises and one of them meets a used one)
        shown = np.bincount(np.concatenate([first, second]), minlength=n)
        assert 2 <= shown.min() and shown.max() <= 4 and (shown == 3).mean() >= 0.9


def test_quick_run_through_the_section_interface(tmp_path):
    modules, skipped = load_benchmarks(("judgments",))
    assert "judgments" in modules, skipped
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir")
    modules["judgments"].add_arguments(parser)
    args = parser.parse_args(["--quick", "--output-dir", str(tmp_path), "--judgments-drawings", "48",
                              "--judgments-dim", "8", "--judgments-epochs", "1", "--judgments-pairs", "64"])
    result = bench.run(args)
    assert os.path.getsize(result["png"]) > 0
    for where in ("held_out", "pool"):
        assert len(result["curves"][where]["active"]["within"]) == result["rounds"] == 2
        assert set(result["goals"][where]) >= {"beats_tiers_alone", "active_fraction", "active_within_goal"}
    text = bench.to_markdown(result)
    assert "| held_out | active |" in text and "sigmoid(3 x (q_a - q_b))" in text


@pytest.mark.parametrize("kind", ["random", "contrary"])
def test_noisy_judges_answer_by_their_kind_and_share_the_pairs(kind):
    rng = np.random.default_rng(0)
    quality = rng.normal(size=400)
    first, second = rng.integers(0, 400, 30_000), rng.integers(0, 400, 30_000)
    keep = first != second
    first, second = first[keep], second[keep]
    names = bench.judge_names(3, 1, kind)
    assert names == [f"{kind}1", "teacher1", "teacher2"]
    won, judges = bench.judge_round(quality, first, second, 3.0, names, 1, kind, np.random.default_rng(1))
    judges = np.array(judges)
    by_order = won == (quality[first] > quality[second])  # the answer follows the latent order
    counts = {n: int((judges == n).sum()) for n in names}
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    honest = by_order[judges != names[0]].mean()
    noisy = by_order[judges == names[0]].mean()
    assert honest > 0.75
    if kind == "random":
        assert abs(noisy - 0.5) < 0.02
    else:  # the teacher's mirror image
        assert abs(noisy - (1 - honest)) < 0.02


def test_reliability_arms_differ_only_by_the_judges_weights(monkeypatch):
    world = bench.make_world(80, 4, seed=0)
    calls = []

    def fake_train(world_, judged, weight, epochs, pairs, seed):
        calls.append((judged, weight, epochs, pairs, seed))
        return np.random.default_rng(len(calls)).normal(size=len(world_["quality"]))

    monkeypatch.setattr(bench, "train_scores", fake_train)
    names = bench.judge_names(3, 1, "contrary")
    measured, fits = bench.run_reliability_arms(world, 3, 6.0, 1.0, 2, 10, 5, names, 1, "contrary",
                                                log=lambda m: None)
    n = len(world["pool"])
    assert len(calls) == 6 and [len(v) for v in measured.values()] == [3, 3] and len(fits) == 3
    for k in range(3):
        (plain, *plain_rest), (weighted, *weighted_rest) = calls[2 * k], calls[2 * k + 1]
        assert plain_rest == weighted_rest == [1.0, 2, 10, 5]  # same budget and seed
        assert len(plain) == (k + 1) * (n // 2)
        for field in ("first", "second", "outcome"):
            assert np.array_equal(getattr(plain, field), getattr(weighted, field))
        assert plain.judges == weighted.judges
        assert plain.reliability is None
        # Each pair carries its judge's weight: the contrary judge's pairs stop training, the others' do not.
        judges = np.array(weighted.judges)
        for judge, row in fits[k].items():
            assert np.all(weighted.reliability[judges == judge] == row["weight"])
        assert np.all(weighted.reliability[judges == "contrary1"] == 0.0)
        assert np.all(weighted.reliability[judges != "contrary1"] > 0.5)


def test_noisy_judges_run_through_the_section_interface(tmp_path):
    modules, _ = load_benchmarks(("judgments",))
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir")
    modules["judgments"].add_arguments(parser)
    args = parser.parse_args(["--quick", "--output-dir", str(tmp_path), "--judgments-drawings", "48",
                              "--judgments-dim", "8", "--judgments-epochs", "1", "--judgments-pairs", "64",
                              "--judgments-noisy-judges", "1", "--judgments-noisy-kind", "random"])
    result = bench.run(args)
    assert os.path.getsize(result["png"]) > 0
    assert set(result["q"]) == {"random1", "teacher1", "teacher2"}
    for where in ("held_out", "pool"):
        assert set(result["curves"][where]) == {"tiers_alone", "plain", "reliability"}
        assert len(result["curves"][where]["reliability"]["within"]) == 2
    text = bench.to_markdown(result)
    assert "| held_out | judge reliability weights |" in text and "| random1 |" in text
    args.judgments_noisy_judges = 4
    with pytest.raises(ValueError, match="--judgments-noisy-judges"):
        bench.run(args)
