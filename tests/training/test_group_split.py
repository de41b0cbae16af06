"""Splits by group: no student or scene in two splits, tiers balanced as far as whole groups allow, and the
leakage a split by image lets through shows as inflated test accuracy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mirip.common.tiers import TIERS
from mirip.training.config import TrainingConfig
from mirip.training.datasets.data_splitter import DataSplitter
from mirip.training.run import train
from mirip.training.run_config import RunConfig
from mirip.training.run_data import load_run_data

from _stage2_helpers import scenes, single_thread, write_scenes

_one_thread = pytest.fixture(autouse=True)(single_thread)


def _cfg(cache, csv, out, group=None, **kw):
    return RunConfig(features=cache, metadata=csv, output_dir=str(out), group_column=group, train_ratio=0.6,
                     val_ratio=0.15, test_ratio=0.25, hidden_dim=16, projector_dim=8, ridge_alpha=1e-3,
                     bootstrap_resamples=200,
                     training=TrainingConfig(max_epochs=8, pairs_per_epoch=512, eval_pairs=2000, device="cpu",
                                             early_stopping_patience=0, seed=3), **kw)


def test_grouped_split_keeps_every_scene_in_one_split(tmp_path):
    feats, meta = scenes()
    cache, csv = write_scenes(tmp_path, feats, meta)
    data = load_run_data(_cfg(cache, csv, tmp_path / "r", group="scene"))
    scene_of = dict(zip(meta["filename"], meta["scene"]))
    where = {}
    for split, rows in data.splits.items():
        for i in rows:
            where.setdefault(scene_of[data.names[i]], set()).add(split)
    assert all(len(s) == 1 for s in where.values()), {k: v for k, v in where.items() if len(v) > 1}
    assert sum(len(r) for r in data.splits.values()) == len(meta)
    # Whole scenes of 4: 40 scenes at 60/15/25 is 24/6/10 scenes, every tier present in every split.
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [96, 24, 40]
    for rows in data.splits.values():
        assert len(set(data.ranks[rows])) == 4


def test_split_by_image_leaks_scenes_and_inflates_test_accuracy(tmp_path):
    feats, meta = scenes()
    cache, csv = write_scenes(tmp_path, feats, meta)
    leaky = train(_cfg(cache, csv, tmp_path / "leaky"), progress=False, log=lambda m: None)
    grouped = train(_cfg(cache, csv, tmp_path / "grouped", group="scene"), progress=False, log=lambda m: None)
    # The ridge baseline memorises scenes it has seen: near perfect on leaked copies, near chance on new scenes.
    assert leaky["linear_baseline"]["accuracy"] > grouped["linear_baseline"]["accuracy"] + 0.2
    assert leaky["model"]["accuracy"] > grouped["model"]["accuracy"] + 0.1
    # The grouped run's intervals resample scenes, not images, and it says how well the tiers balanced.
    assert grouped["model"]["intervals"]["unit"] == "group:scene"
    assert grouped["model"]["intervals"]["units"] == 10
    assert grouped["split_balance"]["parts"]["test"]["groups"] == 10


def test_mixed_tier_groups_of_uneven_size_stay_whole_and_near_the_ratios():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 7, size=60)
    rows = [(f"st{g}", f"st{g}_{i}.png", TIERS[rng.integers(0, 4)]) for g, n in enumerate(sizes) for i in range(n)]
    meta = pd.DataFrame(rows, columns=["student", "filename", "tier"])
    splitter = DataSplitter(0.7, 0.15, 0.15, seed=4, stratify_column="tier", group_column="student")
    parts = splitter.split(meta)
    students = [set(p["student"]) for p in parts]
    assert not (students[0] & students[1] or students[0] & students[2] or students[1] & students[2])
    assert sum(len(p) for p in parts) == len(meta)
    for part, ratio in zip(parts, (0.7, 0.15, 0.15)):
        assert abs(len(part) / len(meta) - ratio) < 0.05
        shares = part["tier"].value_counts(normalize=True)
        whole = meta["tier"].value_counts(normalize=True)
        assert (shares.reindex(whole.index, fill_value=0) - whole).abs().max() < 0.12
    gap = splitter.get_split_info()["group_balance"]
    assert gap["parts"]["val"]["rows"] == len(parts[1])


def test_too_few_groups_are_refused_naming_the_column():
    meta = pd.DataFrame({"filename": [f"{i}.png" for i in range(8)], "tier": list("SSAABBCC"),
                         "student": ["a"] * 4 + ["b"] * 4})
    with pytest.raises(ValueError, match=r"group column 'student'.*2 group\(s\) cannot fill 3 parts"):
        DataSplitter(0.8, 0.1, 0.1, stratify_column="tier", group_column="student").split(meta)
    with pytest.raises(ValueError, match="group column 'class' is not a column"):
        DataSplitter(group_column="class").split(meta)


def test_one_drawing_per_group_keeps_the_seed_split():
    meta = pd.DataFrame({"filename": [f"{i}.png" for i in range(40)], "tier": [TIERS[i % 4] for i in range(40)]})
    meta["student"] = meta["filename"].str.replace(".png", "")
    by_image = DataSplitter(stratify_column="tier").split(meta)
    by_student = DataSplitter(stratify_column="tier", group_column="student").split(meta)
    assert all(a.index.equals(b.index) for a, b in zip(by_image, by_student))


def test_sweep_and_evaluate_split_by_group_as_the_run_did(tmp_path, capsys):
    from mirip.cli import evaluate as evaluate_cli
    from mirip.cli import sweep as sweep_cli
    from mirip.store.checkpoint import load_checkpoint_file

    feats, meta = scenes(n_scenes=20, copies=3, dim=8)
    cache, csv = write_scenes(tmp_path, feats, meta)
    out = tmp_path / "sweep"
    assert sweep_cli.main(["--features", cache, "--metadata", csv, "--output-dir", str(out), "--group-column", "scene",
                           "--margin", "0.5", "--hidden-dim", "8", "--projector-dim", "4", "--learning-rate", "1e-3",
                           "--max-epochs", "2", "--pairs-per-epoch", "128", "--eval-pairs", "200", "--device", "cpu",
                           "--no-progress", "--train-ratio", "0.6", "--val-ratio", "0.2", "--test-ratio", "0.2"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert (table["val_acc_low"] <= table["val_acc"]).all() and (table["val_acc"] <= table["val_acc_high"]).all()
    ckpt = next(out.rglob("*.pt"))
    assert load_checkpoint_file(str(ckpt))["run_config"]["group_column"] == "scene"
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert evaluate_cli.main(["--checkpoint", str(ckpt), "--features", cache, "--metadata", csv, "--split", "test",
                              "--bootstrap", "50", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    import json

    result = json.loads(report.read_text())
    assert result["model"]["num_images"] == 12  # 4 whole scenes of 3
    assert result["model"]["intervals"]["unit"] == "group:scene" and result["model"]["intervals"]["units"] == 4
    assert "bootstrap interval, 50 resamples of the 4 groups" in printed
