"""The sweep end to end: grid validation, outputs, restart, selection on validation, checkpoints others accept."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from mirip.cli import sweep as sweep_script
from mirip.ml.ranking_model import RankingHead
from mirip.store.checkpoint import load_checkpoint_file
from mirip.sweep.grid import SweepConfigError, SweepGrid, group_configs
from mirip.sweep.report import aggregate, choose_best, to_argv
from mirip.sweep.runner import RESULT_COLUMNS, SweepRunner, run_sweep
from mirip.sweep.settings import SweepSettings
from mirip.training.config import TrainingConfig
from mirip.training.run import evaluate_checkpoint

from _sweep_helpers import one_thread, write_synthetic

FAST = ["--max-epochs", "3", "--pairs-per-epoch", "64", "--eval-pairs", "120", "--batch-size", "16",
        "--early-stopping-patience", "2", "--device", "cpu", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture
def data(tmp_path):
    return write_synthetic(tmp_path, n=80, dim=12)


def _settings(data, out, **training) -> SweepSettings:
    features, metadata = data
    tc = dict(max_epochs=3, pairs_per_epoch=64, eval_pairs=120, batch_size=16, early_stopping_patience=2,
              device="cpu")
    tc.update(training)
    return SweepSettings(features=features, metadata=metadata, output_dir=str(out), training=TrainingConfig(**tc))


# --- the grid ------------------------------------------------------------------------------------
def test_grid_is_the_product_grouped_by_seed_and_shape():
    grid = SweepGrid(margin=(0.1, 0.5, 1.0), hidden_dim=(16, 32), projector_dim=(4, 8), seed=(0, 1))
    configs = grid.configs()
    assert len(configs) == len(grid) == 24
    assert len({c.config_id for c in configs}) == 24
    groups = group_configs(configs)
    assert len(groups) == 8 and all(len(g) == 3 for g in groups.values())
    assert all({c.shape_key for c in g} == {k} for k, g in groups.items())


@pytest.mark.parametrize("kwargs, message", [
    (dict(margin=()), "--margin: the grid is empty"),
    (dict(hidden_dim=(16, 0)), "--hidden-dim: dims must be positive, got 0"),
    (dict(projector_dim=(-4,)), "--projector-dim: dims must be positive"),
    (dict(margin=(0.5, -0.1)), "--margin: a margin must be non-negative, got -0.1"),
    (dict(learning_rate=(0.0,)), "--learning-rate: a learning rate must be positive"),
    (dict(dropout=(1.0,)), r"--dropout: a dropout must be in \[0, 1\)"),
    (dict(weight_decay=(-1e-3,)), "--weight-decay: a weight decay must be non-negative"),
    (dict(seed=(0, 0)), "--seeds: value\\(s\\) listed more than once: 0"),
    (dict(hidden_dim=(2.5,)), "--hidden-dim: values must be integers"),
    (dict(margin=(float("nan"),)), "--margin: values must be finite"),
])
def test_bad_grid_values_are_named(kwargs, message):
    with pytest.raises(SweepConfigError, match=message):
        SweepGrid(**kwargs)


def test_cli_bad_input_fails_before_any_training(data, tmp_path, capsys):
    features, metadata = data
    base = ["--features", features, "--metadata", metadata, *FAST]
    out = tmp_path / "bad"
    assert sweep_script.main(base + ["--output-dir", str(out), "--margin", "0.5", "-1"]) == 2
    assert "--margin: a margin must be non-negative, got -1" in capsys.readouterr().err
    assert sweep_script.main(base + ["--output-dir", str(out), "--hidden-dim", "0"]) == 2
    assert "dims must be positive" in capsys.readouterr().err
    assert sweep_script.main(base + ["--output-dir", str(out), "--batch-size", "0"]) == 2
    assert "batch_size must be positive" in capsys.readouterr().err
    assert sweep_script.main(base + ["--output-dir", str(out), "--val-ratio", "0", "--train-ratio", "0.9"]) == 2
    assert "val-ratio must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # unknown option: argparse's usage error
        sweep_script.main(base + ["--output-dir", str(out), "--margins", "0.5"])
    assert exc.value.code == 2 and "unrecognized arguments: --margins" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an option given with no values is an empty grid
        sweep_script.main(base + ["--output-dir", str(out), "--margin"])
    assert not out.exists()  # nothing was written, nothing trained


def test_missing_cached_features_are_listed(tmp_path, data):
    features, metadata = data
    meta = pd.read_csv(metadata)
    meta.loc[len(meta)] = {"filename": "not_cached.png", "tier": "S"}
    meta.to_csv(metadata, index=False)
    with pytest.raises(Exception, match="not_cached.png"):
        run_sweep(SweepGrid(hidden_dim=(8,), projector_dim=(4,)), _settings(data, tmp_path / "o"), progress=False)
    assert not (tmp_path / "o" / "results").exists()


# --- a whole sweep -------------------------------------------------------------------------------
GRID = dict(margin=(0.1, 1.0), hidden_dim=(8, 16), projector_dim=(4,), learning_rate=(3e-3,), dropout=(0.1,),
            weight_decay=(0.01,), seed=(0, 1))


def test_outputs_one_row_per_configuration_and_seed(data, tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(SweepGrid(**GRID), _settings(data, out), progress=False, log=lambda m: None)
    assert result["trained"] == 8 and result["skipped"] == 0
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == list(RESULT_COLUMNS)
    assert len(table) == 8
    assert sorted(zip(table.margin, table.hidden_dim, table.seed)) == sorted(
        (m, h, s) for m in (0.1, 1.0) for h in (8, 16) for s in (0, 1))
    assert table.val_acc.between(0, 1).all() and table.test_acc.between(0, 1).all()
    assert (table.best_epoch >= 1).all() and (table.best_epoch <= table.epochs_run).all()
    assert (table.group_size == 2).all()  # two margins stacked per (seed, hidden, proj)
    assert (table.wall_time_s > 0).all()
    summary = (out / "summary.md").read_text()
    assert summary.count("\n| ") == 2 + 4  # header + rule + one row per grid point
    assert "±" in summary
    best = json.loads((out / "best.json").read_text())
    # This synthetic cache's fingerprint does not say how its features were made, and the tables say so.
    assert (table.backbone_weights == "unknown").all() and best["backbone_weights"] == "unknown"
    assert "RANDOM" not in summary
    assert (out / "heatmap.png").stat().st_size > 0
    # The winner is the grid point with the highest mean val accuracy.
    means = table.groupby(["margin", "hidden_dim"], sort=False).val_acc.mean()
    assert means.max() == pytest.approx(best["val_acc_mean"])
    assert (best["config"]["margin"], best["config"]["hidden_dim"]) == means.idxmax()
    # Every checkpoint is a normal mirip checkpoint: rebuilds a head, weights-only, with the fingerprint.
    for rel in table.checkpoint:
        ckpt = load_checkpoint_file(out / rel)
        head = RankingHead(**ckpt["head"])
        head.load_head_state_dict(ckpt["model_state_dict"])
        assert ckpt["fingerprint"]["feature_dim"] == 12 and ckpt["epoch"] == ckpt["best_epoch"]
    # ... which evaluate.py's code accepts, reproducing the sweep's test numbers from the stored run config.
    row = table.iloc[3]
    metrics = evaluate_checkpoint(str(out / row.checkpoint), data[0], data[1], split="test", device="cpu")
    assert metrics["model"]["accuracy"] == pytest.approx(row.test_acc)
    assert metrics["model"]["spearman"] == pytest.approx(row.spearman)


def test_restart_skips_finished_configurations(data, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    grid = SweepGrid(**GRID)
    calls = []
    real_save = SweepRunner._save

    def interrupted_save(self, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the fourth head is being saved
        calls.append(1)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(SweepRunner, "_save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, _settings(data, out), progress=False, log=lambda m: None)
    done = sorted(os.listdir(out / "results"))
    assert len(done) == 3
    first = {f: (out / "results" / f).read_text() for f in done}
    monkeypatch.setattr(SweepRunner, "_save", real_save)
    logs = []
    result = run_sweep(grid, _settings(data, out), progress=False, log=logs.append)
    assert result["trained"] == 5 and result["skipped"] == 3
    assert "3 already finished, 5 to train" in logs[0]
    assert {f: (out / "results" / f).read_text() for f in done} == first  # not retrained
    assert len(pd.read_csv(out / "results.csv")) == 8
    # A third run has nothing left to do, and the same table.
    again = run_sweep(grid, _settings(data, out), progress=False, log=lambda m: None)
    assert again["trained"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), result["results"].reset_index(drop=True),
                                  check_dtype=False)


def test_restart_equals_uninterrupted_run(data, tmp_path):
    """Heads of a group are independent: training a group's remaining heads alone gives the same numbers."""
    grid = SweepGrid(**{**GRID, "seed": (0,)})
    full = run_sweep(grid, _settings(data, tmp_path / "a"), progress=False, log=lambda m: None)["results"]
    part = tmp_path / "b"
    first = SweepGrid(**{**GRID, "seed": (0,), "margin": (0.1,)})
    run_sweep(first, _settings(data, part), progress=False, log=lambda m: None)
    rest = run_sweep(grid, _settings(data, part), progress=False, log=lambda m: None)
    assert rest["trained"] == 2
    cols = ["config_id", "best_epoch", "epochs_run", "val_acc", "test_acc"]
    pd.testing.assert_frame_equal(rest["results"][cols].reset_index(drop=True), full[cols].reset_index(drop=True),
                                  check_exact=False, rtol=1e-6)


def test_restart_with_other_fixed_settings_is_refused(data, tmp_path):
    out = tmp_path / "sweep"
    grid = SweepGrid(**{**GRID, "seed": (0,), "hidden_dim": (8,)})
    run_sweep(grid, _settings(data, out), progress=False, log=lambda m: None)
    with pytest.raises(SweepConfigError, match="max_epochs: was 3, now 4"):
        run_sweep(grid, _settings(data, out, max_epochs=4), progress=False, log=lambda m: None)


def test_best_is_chosen_on_validation_never_test():
    rows = []
    for margin, val, test in ((0.1, 0.60, 0.95), (0.5, 0.80, 0.50), (1.0, 0.70, 0.90)):
        for seed in (0, 1):
            rows.append({"margin": margin, "hidden_dim": 8, "projector_dim": 4, "learning_rate": 1e-3, "dropout": 0.0,
                         "weight_decay": 0.0, "seed": seed, "val_acc": val + 0.01 * seed, "test_acc": test,
                         "spearman": 0.5, "best_epoch": 2, "wall_time_s": 1.0, "checkpoint": f"c{margin}-{seed}.pt"})
    table = aggregate(pd.DataFrame(rows))
    assert list(table.margin) == [0.5, 1.0, 0.1]  # by val, although test ranks 0.1 first
    best = choose_best(table)
    assert best["margin"] == 0.5 and best["best_seed"] == 1 and best["best_checkpoint"] == "c0.5-1.pt"
    assert best["val_acc_mean"] == pytest.approx(0.805)
    assert best["val_acc_std"] == pytest.approx(np.std([0.80, 0.81], ddof=1))


def test_best_json_trains_the_same_head_with_train_py(data, tmp_path):
    """best.json's options, handed to scripts/train.py, reproduce the sweep's checkpoint for that seed."""
    from mirip.cli import train as train_script

    features, metadata = data
    out = tmp_path / "sweep"
    argv = ["--features", features, "--metadata", metadata, "--output-dir", str(out), "--margin", "0.1", "1.0",
            "--hidden-dim", "8", "--projector-dim", "4", "--learning-rate", "0.003", "--dropout", "0.2",
            "--seeds", "5", "--optimizer", "plain", *FAST]
    assert sweep_script.main(argv) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["train_argv"] == to_argv(best["train_options"])
    run_dir = tmp_path / "alone"
    assert train_script.main(best["train_argv"] + ["--output-dir", str(run_dir), "--no-progress"]) == 0
    ours = load_checkpoint_file(best["checkpoint"])
    theirs = load_checkpoint_file(run_dir / "best.pt")
    assert ours["epoch"] == theirs["epoch"] and ours["accuracy"] == theirs["accuracy"]
    for name, value in theirs["model_state_dict"].items():
        if name not in ("projector.net.5.bias", "score_head.0.bias"):  # pair-invariant, see test_sweep_stacked
            torch.testing.assert_close(ours["model_state_dict"][name], value, rtol=1e-5, atol=1e-6)
    test_metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert test_metrics["model"]["accuracy"] == pytest.approx(best["test_acc_mean"])


def test_the_winner_is_announced_once_in_words(data, tmp_path, capsys):
    features, metadata = data
    assert sweep_script.main(["--features", features, "--metadata", metadata, "--output-dir", str(tmp_path / "s"),
                              "--margin", "0.1", "1.0", "--hidden-dim", "8", "--projector-dim", "4", *FAST]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "best on validation" in line]
    assert len(lines) == 1, lines
    assert "margin=" in lines[0] and "{" not in lines[0], lines[0]


def test_sweep_checkpoint_loads_in_full_image_mode(tiny_backbone, tmp_path):
    """A head from the sweep scores image files through the backbone as it scored their cached features."""
    from conftest import make_image
    from mirip.store.cache import write_cache
    from mirip.store.fingerprint import make_fingerprint
    from mirip.scoring.scorer import load_scorer
    from mirip.ml.feature_extractor import DINOv2FeatureExtractor
    from mirip.ml.preprocessing import Preprocessor

    images = tmp_path / "images"
    images.mkdir()
    names = [f"img_{i:02d}.png" for i in range(24)]
    paths = [make_image(images / n, seed=i) for i, n in enumerate(names)]
    extractor = DINOv2FeatureExtractor(tiny_backbone, device="cpu")
    preprocessor = Preprocessor(image_size=28)
    with torch.no_grad():
        feats = np.stack([extractor.extract(preprocessor(p)[None])[0].numpy() for p in paths])
    cache = write_cache(str(tmp_path / "features.h5"), make_fingerprint(extractor, preprocessor), names, feats)
    metadata = tmp_path / "metadata.csv"
    pd.DataFrame({"filename": names, "tier": list("SABC" * 6)}).to_csv(metadata, index=False)
    out = tmp_path / "sweep"
    settings = SweepSettings(features=cache, metadata=str(metadata), output_dir=str(out), train_ratio=0.5,
                             val_ratio=0.25, test_ratio=0.25,
                             training=TrainingConfig(max_epochs=2, pairs_per_epoch=32, eval_pairs=32, batch_size=8,
                                                     device="cpu"))
    result = run_sweep(SweepGrid(margin=(0.5, 1.0), hidden_dim=(8,), projector_dim=(4,), seed=(0,)), settings,
                       progress=False, log=lambda m: None)
    scorer = load_scorer(out / result["results"].checkpoint.iloc[1], device="cpu")
    got = scorer.score_paths(paths[:6], progress=False)
    head = RankingHead(**scorer.checkpoint["head"])
    head.load_head_state_dict(scorer.checkpoint["model_state_dict"])
    with torch.no_grad():
        want = head.eval().get_score(torch.from_numpy(feats[:6])).reshape(-1)
    np.testing.assert_allclose(got.scores, want.numpy(), rtol=1e-4, atol=1e-5)


def test_benchmark_runs_and_both_arms_agree():
    import argparse

    from mirip.bench import sweep as bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    bench.add_arguments(parser)
    args = parser.parse_args(["--quick", "--sweep-images", "200", "--sweep-dim", "16", "--sweep-pairs", "64",
                              "--sweep-eval-pairs", "100", "--sweep-epochs", "2", "--sweep-margins", "0.1", "1.0",
                              "--sweep-hidden-dims", "8", "16", "--sweep-projector-dims", "4", "--sweep-threads", "1"])
    result = bench.run(args)
    assert result["configurations"] == 4 and result["groups"] == 2
    assert len(result["sweep_s"]) == len(result["sequential_s"]) == 1
    assert result["ratio"] == pytest.approx(result["sweep_median_s"] / result["sequential_median_s"])
    assert result["max_val_acc_diff"] == 0.0  # the sweep's heads are the sequential runs' heads
    assert "sequential Trainer runs" in bench.to_markdown(result)
