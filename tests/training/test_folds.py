"""train.py --folds K: K heads on disjoint folds that cover every non-test drawing once, mean +- std reported,
folds of whole groups with a group column; and the warning for a val split too small to choose an epoch on."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mirip.cli import train as train_cli

from _stage2_helpers import single_thread, write_dataset
from _stage2_helpers import scenes, write_scenes

_one_thread = pytest.fixture(autouse=True)(single_thread)
SMALL = ["--max-epochs", "3", "--pairs-per-epoch", "256", "--eval-pairs", "500", "--hidden-dim", "16",
         "--projector-dim", "8", "--device", "cpu", "--no-progress", "--bootstrap", "100"]



def test_folds_train_k_heads_on_disjoint_folds_covering_every_non_test_image(tmp_path, capsys):
    cache, meta = write_dataset(tmp_path, per_tier=10, dim=8, separation=1.5)
    out = tmp_path / "run"
    assert train_cli.main(["--features", cache, "--metadata", meta, "--output-dir", str(out), "--folds", "3",
                           *SMALL]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "folds.json").read_text())
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert len(report["table"]) == 3 and all((out / f"fold_{k}" / "best.pt").exists() for k in (1, 2, 3))
    val_sets = [set(row["val_names"]) for row in report["table"]]
    assert all(not (a & b) for i, a in enumerate(val_sets) for b in val_sets[i + 1:])  # disjoint
    everything = set(pd.read_csv(meta)["filename"])
    test_names = everything - set().union(*val_sets)
    assert set().union(*val_sets) | test_names == everything and len(test_names) == metrics["split_sizes"]["test"]
    for row in report["table"]:
        assert row["train_images"] + row["val_images"] == 36  # every non-test image, the fold's own left out
    accs = [row["accuracy"] for row in report["table"]]
    assert metrics["cross_validation"]["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert metrics["cross_validation"]["summary"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert "cross-validated (3 folds, 36 non-test images)" in printed and "+-" in printed
    assert "fold  train  val" in printed


def test_folds_by_group_keep_each_scene_in_one_fold(tmp_path):
    feats, meta = scenes(n_scenes=24, copies=3, dim=8)
    cache, csv = write_scenes(tmp_path, feats, meta)
    out = tmp_path / "run"
    assert train_cli.main(["--features", cache, "--metadata", csv, "--output-dir", str(out), "--folds", "4",
                           "--group-column", "scene", "--val-ratio", "0.2", "--test-ratio", "0.2",
                           "--train-ratio", "0.6", *SMALL]) == 0
    scene_of = dict(zip(meta["filename"], meta["scene"]))
    report = json.loads((out / "folds.json").read_text())
    fold_scenes = [{scene_of[n] for n in row["val_names"]} for row in report["table"]]
    assert all(not (a & b) for i, a in enumerate(fold_scenes) for b in fold_scenes[i + 1:])
    assert sum(len(s) for s in fold_scenes) == 24 - len(
        {scene_of[n] for n in set(meta["filename"]) - {n for row in report["table"] for n in row["val_names"]}})


def test_a_val_split_too_small_to_choose_an_epoch_on_is_warned(tmp_path, capsys):
    cache, meta = write_dataset(tmp_path, per_tier=10, dim=8, separation=1.5)
    out = tmp_path / "run"
    assert train_cli.main(["--features", cache, "--metadata", meta, "--output-dir", str(out), *SMALL]) == 0
    warnings = json.loads((out / "test_metrics.json").read_text())["warnings"]
    small = [w for w in warnings if "chose the best epoch" in w]
    assert small and "only 4 images" in small[0] and "--val-ratio" in small[0]
    assert f"WARNING: {small[0]}" in capsys.readouterr().out


def test_folds_must_be_two_or_more(tmp_path, capsys):
    cache, meta = write_dataset(tmp_path, per_tier=3, dim=8)
    assert train_cli.main(["--features", cache, "--metadata", meta, "--output-dir", str(tmp_path / "r"),
                           "--folds", "1", *SMALL]) == 2
    assert "folds must be 0" in capsys.readouterr().err
