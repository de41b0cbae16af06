"""sweep.py --folds K: every configuration x seed cross-validated over K folds of the non-test images (whole
groups with --group-column), one results.csv row per fold, configurations ranked by their mean over folds and
seeds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mirip.cli import sweep as sweep_cli

from _stage2_helpers import scenes, write_scenes
from _sweep_helpers import one_thread

FAST = ["--max-epochs", "3", "--pairs-per-epoch", "64", "--eval-pairs", "120", "--batch-size", "16",
        "--early-stopping-patience", "2", "--device", "cpu", "--no-progress", "--hidden-dim", "8",
        "--projector-dim", "4"]
HYPER = ["margin", "hidden_dim", "projector_dim", "learning_rate", "dropout", "weight_decay", "feature"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _names(path):
    return {k: set(v) for k, v in json.loads(path.read_text()).items()}


def test_sweep_folds_cover_non_test_once_by_group_and_rank_by_cv_mean(tmp_path):
    feats, meta = scenes(n_scenes=24, copies=3, dim=8)
    cache, csv = write_scenes(tmp_path, feats, meta)
    out = tmp_path / "sweep"
    assert sweep_cli.main(["--features", cache, "--metadata", csv, "--output-dir", str(out), "--folds", "3",
                           "--group-column", "scene", "--margin", "0.1", "1.0", "--learning-rate", "1e-4", "3e-3",
                           "--seeds", "0", "1", "--train-ratio", "0.6", "--val-ratio", "0.2", "--test-ratio", "0.2",
                           *FAST]) == 0
    scene_of = dict(zip(meta["filename"], meta["scene"]))
    for seed in (0, 1):
        whole = _names(out / "splits" / f"seed{seed}.json")
        non_test = whole["train"] | whole["val"]
        folds = [_names(out / "splits" / f"seed{seed}-fold{k}.json") for k in (1, 2, 3)]
        vals = [f["val"] for f in folds]
        assert sorted(n for v in vals for n in v) == sorted(non_test)  # each non-test image validates exactly once
        for f in folds:
            assert f["test"] == whole["test"] and not (f["train"] & f["val"]) and f["train"] | f["val"] == non_test
            assert not ({scene_of[n] for n in f["train"]} & {scene_of[n] for n in f["val"]})  # no scene leaks
        val_scenes = [{scene_of[n] for n in v} for v in vals]
        assert all(not (a & b) for i, a in enumerate(val_scenes) for b in val_scenes[i + 1:])

    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 * 2 * 3 and sorted(set(results["fold"])) == [1, 2, 3]
    assert results.groupby(HYPER + ["seed"], dropna=False)["fold"].nunique().eq(3).all()
    # The ranking, naively: mean val accuracy over every fold and seed row of a configuration.
    means = {}
    for _, r in results.iterrows():
        means.setdefault((r["margin"], r["learning_rate"]), []).append(r["val_acc"])
    naive = sorted(means, key=lambda k: -np.mean(means[k]))
    best = json.loads((out / "best.json").read_text())
    assert (best["config"]["margin"], best["config"]["learning_rate"]) == naive[0]
    assert best["val_acc_mean"] == pytest.approx(np.mean(means[naive[0]]))
    assert best["val_acc_std"] == pytest.approx(np.std(means[naive[0]], ddof=1))
    assert best["folds"] == 3 and best["seeds"] == [0, 1] and "--folds" in best["train_argv"]
    summary = (out / "summary.md").read_text()
    assert "over folds and seeds" in summary and "Cross-validated" in summary
    ranked = [line for line in summary.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert all(int(line.split("|")[9]) == 2 for line in ranked)  # seeds, not fold rows
    assert [float(line.split("|")[10].split("±")[0]) for line in ranked] == pytest.approx(
        [np.mean(means[k]) for k in naive], abs=1e-4)


def test_sweep_folds_refuses_one_fold(tmp_path, capsys):
    feats, meta = scenes(n_scenes=8, copies=2, dim=8)
    cache, csv = write_scenes(tmp_path, feats, meta)
    assert sweep_cli.main(["--features", cache, "--metadata", csv, "--output-dir", str(tmp_path / "s"),
                           "--folds", "1", *FAST]) == 2
    assert "--folds must be 0 (no cross-validation) or at least 2, got 1" in capsys.readouterr().err
