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
