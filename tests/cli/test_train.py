"""scripts/train.py and scripts/evaluate.py end to end on a synthetic cache."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from mirip.store.cache import open_cache
from mirip.training.run_config import RunConfig

from _stage2_helpers import fake_fingerprint, single_thread, write_dataset

_one_thread = pytest.fixture(autouse=True)(single_thread)
ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    module = importlib.import_module(f"mirip.cli.{name}")
    return module


train_script, evaluate_script = _script("train"), _script("evaluate")
FAST = ["--max-epochs", "3", "--pairs-per-epoch", "300", "--eval-pairs", "400", "--hidden-dim", "16",
        "--projector-dim", "8", "--learning-rate", "1e-3", "--device", "cpu", "--no-progress"]


@pytest.fixture
def data(tmp_path):
    return write_dataset(str(tmp_path), per_tier=20, dim=8)


def _train(cache, meta, out, *extra):
    return train_script.main(["--features", cache, "--metadata", meta, "--output-dir", str(out), *FAST, *extra])


def test_train_writes_every_output_and_evaluate_reproduces_the_test_split(data, tmp_path, capsys):
    cache, meta = data
    out = tmp_path / "run"
    assert _train(cache, meta, out, "--margin", "0.5", "--seed", "7") == 0
    printed = capsys.readouterr().out
    assert "test pairwise accuracy" in printed and "linear baseline" in printed
    for name in ("best.pt", "last.pt", "config.json", "history.json", "test_metrics.json", "curves.png"):
        assert (out / name).is_file(), name
    cfg = RunConfig.load(str(out / "config.json"))
    assert cfg.margin == 0.5 and cfg.training.seed == 7 and cfg.training.max_epochs == 3 and cfg.hidden_dim == 16
    history = json.loads((out / "history.json").read_text())
    assert {k: len(v) for k, v in history.items() if k != "lr"} == {
        "train_loss": 3, "val_loss": 3, "train_acc": 3, "val_acc": 3}
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["split_sizes"] == {"train": 64, "val": 8, "test": 8}
    for key in ("accuracy", "total_pairs", "correct_predictions", "tier_pair_accuracy", "spearman", "kendall",
                "num_images"):
        assert key in metrics["model"] and key in metrics["linear_baseline"]
    assert metrics["model"]["total_pairs"] == 400 and metrics["model"]["num_images"] == 8
    best = torch.load(out / "best.pt", weights_only=True)
    with open_cache(cache) as c:
        assert best["fingerprint"] == c.fingerprint
    assert best["head"]["margin"] == 0.5 and best["epoch"] == metrics["best_epoch"]

    report = tmp_path / "eval.json"
    assert evaluate_script.main(["--checkpoint", str(out / "best.pt"), "--features", cache, "--metadata", meta,
                                 "--split", "test", "--json", str(report)]) == 0
    assert "Kendall tau-b" in capsys.readouterr().out
    evaluated = json.loads(report.read_text())
    assert evaluated["model"] == metrics["model"] and evaluated["linear_baseline"] == metrics["linear_baseline"]
    assert evaluate_script.main(["--checkpoint", str(out / "best.pt"), "--features", cache, "--metadata", meta,
                                 "--json", str(report)]) == 0
    assert "on the all split" in capsys.readouterr().out
    everything = json.loads(report.read_text())
    assert everything["model"]["num_images"] == 80 and "linear_baseline" not in everything


def test_resume_continues_and_existing_runs_are_protected(data, tmp_path, capsys):
    cache, meta = data
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(cache, meta, full, "--max-epochs", "4", "--scheduler-t-max", "4") == 0
    assert _train(cache, meta, part, "--max-epochs", "2", "--scheduler-t-max", "4") == 0
    assert _train(cache, meta, part, "--max-epochs", "2") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _train(cache, meta, part, "--max-epochs", "4", "--scheduler-t-max", "4", "--margin", "2", "--resume") == 2
    assert "margin: the checkpoint has 1.0, this command asks for 2.0" in capsys.readouterr().err  # a resumed run must be the same run
    assert _train(cache, meta, part, "--max-epochs", "4", "--scheduler-t-max", "4", "--resume") == 0
    assert json.loads((part / "history.json").read_text()) == json.loads((full / "history.json").read_text())
    assert json.loads((part / "test_metrics.json").read_text())["model"] == \
        json.loads((full / "test_metrics.json").read_text())["model"]


def test_bad_inputs_give_clear_errors(data, tmp_path, capsys):
    cache, meta = data
    frame = pd.read_csv(meta)
    bad_tier = tmp_path / "bad_tier.csv"
    frame.assign(tier=frame.tier.where(frame.index != 3, "Q")).to_csv(bad_tier, index=False)
    assert _train(cache, str(bad_tier), tmp_path / "r1") == 2
    err = capsys.readouterr().err
    assert "bad_tier.csv: Invalid tier value in 1 of " in err and "line 5: 'Q'" in err  # data row 3 is line 5

    missing = tmp_path / "missing.csv"
    pd.concat([frame, pd.DataFrame({"filename": ["new1.png", "new2.png"], "tier": ["A", "B"]})]).to_csv(missing, index=False)
    assert _train(cache, str(missing), tmp_path / "r2") == 2
    assert "2 image(s) have no cached feature" in (err := capsys.readouterr().err) and "new1.png, new2.png" in err

    dup = tmp_path / "dup.csv"
    pd.concat([frame, frame.iloc[[5]]]).to_csv(dup, index=False)
    assert _train(cache, str(dup), tmp_path / "r3") == 2
    assert "img_0005.png on line 7, line 82" in capsys.readouterr().err  # data rows 5 and 80

    one_tier = tmp_path / "one.csv"
    frame[frame.tier == "S"].to_csv(one_tier, index=False)
    assert _train(cache, str(one_tier), tmp_path / "r4") == 2
    assert "cannot form pairs" in capsys.readouterr().err

    assert _train(cache, meta, tmp_path / "r5", "--train-ratio", "0.5") == 2
    assert "Ratios must sum to 1.0" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        train_script.main(["--features", cache, "--metadata", meta, "--output-dir", "x", "--hidden-dim", "0"])


def test_a_cache_with_another_fingerprint_is_refused(data, tmp_path, capsys):
    cache, meta = data
    out = tmp_path / "run"
    assert _train(cache, meta, out) == 0
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_cache, _ = write_dataset(str(other_dir), per_tier=20, dim=8, fingerprint=fake_fingerprint(8, image_size=224))
    assert evaluate_script.main(["--checkpoint", str(out / "best.pt"), "--features", other_cache,
                                 "--metadata", meta]) == 2
    err = capsys.readouterr().err
    assert f"image_size: the cache has 224, checkpoint {out / 'best.pt'} asks for 28; to fix: evaluate on" in err
    os.replace(other_cache, cache)  # the run's cache replaced by a different extraction
    assert _train(cache, meta, out, "--max-epochs", "5", "--resume") == 2
    assert "image_size" in capsys.readouterr().err


def test_help_lists_every_training_option(capsys):
    with pytest.raises(SystemExit) as exc:
        train_script.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--learning-rate", "--weight-decay", "--batch-size", "--max-epochs", "--gradient-clip-norm",
                 "--early-stopping-patience", "--scheduler-t-max", "--scheduler-eta-min", "--save-every-n-epochs",
                 "--wandb-enabled", "--wandb-project", "--wandb-run-name", "--device", "--seed", "--pairs-per-epoch",
                 "--margin", "--hidden-dim", "--projector-dim", "--dropout"):
        assert flag in text, flag


def test_without_a_val_split_train_accuracy_picks_the_best(data, tmp_path, capsys):
    cache, meta = data
    out = tmp_path / "noval"
    assert _train(cache, meta, out, "--train-ratio", "0.9", "--val-ratio", "0", "--test-ratio", "0.1") == 0
    assert "train accuracy" in capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    assert history["val_acc"] == [] and len(history["train_acc"]) == 3
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["split_sizes"]["val"] == 0 and metrics["best_accuracy"] == max(history["train_acc"])


@pytest.mark.parametrize("pretrained", [False, True])
def test_every_run_file_states_the_backbone_weights(tmp_path, capsys, pretrained):
    cache, meta = write_dataset(str(tmp_path), per_tier=20, dim=8,
                                fingerprint=fake_fingerprint(8, pretrained=pretrained))
    out = tmp_path / "run"
    assert _train(cache, meta, out) == 0
    said = "random" if not pretrained else "pretrained"
    assert ("RANDOM (untrained)" in capsys.readouterr().out) is not pretrained
    for name in ("config.json", "test_metrics.json"):
        assert json.loads((out / name).read_text())["features_backbone"]["backbone_weights"] == said, name
    assert RunConfig.load(str(out / "config.json")).hidden_dim == 16  # the extra key does not break loading
    report = tmp_path / "eval.json"
    assert evaluate_script.main(["--checkpoint", str(out / "best.pt"), "--features", cache, "--metadata", meta,
                                 "--json", str(report)]) == 0
    assert json.loads(report.read_text())["features_backbone"]["backbone_weights"] == said
