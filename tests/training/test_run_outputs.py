"""A head worse than chance or than its baselines is said so, on the console and in test_metrics.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mirip.store.cache import write_cache
from mirip.training.config import TrainingConfig
from mirip.training.run_config import RunConfig
from mirip.training.run_data import load_run_data
from mirip.training.run_outputs import quality_warnings

from _stage2_helpers import fake_fingerprint, single_thread, tiered_features

_one_thread = pytest.fixture(autouse=True)(single_thread)
ROOT = Path(__file__).resolve().parents[2]
NAN = float("nan")


def _train_main():
    spec = importlib.util.spec_from_file_location("_script_train_w", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _kinds(warnings):
    """Which of the three checks each warning is, read off its wording (the small-split warning, which
    tests/training/test_folds.py covers, left out)."""
    warnings = [w for w in warnings if "chose the best epoch" not in w]
    return sorted("chance" if "below chance" in w else "ridge" if "linear baseline" in w
                  else "tier" if "commonest" in w else "?" for w in warnings)


@pytest.mark.parametrize("acc, ridge, tier, majority, want", [
    (0.34, 0.66, 0.06, 0.25, ["chance", "ridge", "tier"]),  # the run
    (0.70, 0.66, 0.40, 0.25, []),
    (0.50, 0.50, 0.25, 0.25, []),  # ties are not below
    (0.49, 0.40, 0.30, 0.25, ["chance"]),
    (0.60, 0.61, 0.30, 0.25, ["ridge"]),
    (0.60, 0.50, 0.20, 0.25, ["tier"]),
    (NAN, NAN, NAN, NAN, []),  # a split without pairs: nothing measured, nothing to warn about
])
def test_each_check_fires_exactly_when_its_figure_is_below(acc, ridge, tier, majority, want):
    model = {"accuracy": acc, "distinct_pairs": 120, "tier_accuracy": tier, "majority_tier_accuracy": majority,
             "majority_tier": "S"}
    got = quality_warnings(model, {"accuracy": ridge}, val_images=16)
    assert _kinds(got) == want
    assert all("Try:" in w for w in got)
    assert quality_warnings(None, None) == []
    no_tiers = {k: v for k, v in model.items() if "tier" not in k}
    assert _kinds(quality_warnings(no_tiers, None)) == [k for k in want if k == "chance"]


def _inverted_test_split(tmp_path):
    """A cache whose test drawings carry the tier signal backwards: whatever the head learns from the train split
    orders them wrongly, so its test accuracy is below chance on any machine."""
    feats, _, tiers = tiered_features(20, 8, separation=2.0, noise=0.5, seed=0)
    names = [f"img_{i:04d}.png" for i in range(len(tiers))]
    meta = tmp_path / "metadata.csv"
    pd.DataFrame({"filename": names, "tier": tiers}).to_csv(meta, index=False)
    fp = fake_fingerprint(8)
    write_cache(str(tmp_path / "plain.h5"), fp, names, feats)
    cfg = RunConfig(features=str(tmp_path / "plain.h5"), metadata=str(meta), output_dir=str(tmp_path / "x"),
                    training=TrainingConfig(device="cpu"))
    data = load_run_data(cfg)
    test_names = {data.names[i] for i in data.splits["test"]}
    # Each test drawing gets the features of a drawing of the opposite tier (S <-> C, A <-> B).
    ranks = 3 - np.array(["SABC".index(t) for t in tiers])
    opposite = [int(np.flatnonzero(ranks == 3 - r)[0]) for r in ranks]
    flipped = np.array([feats[opposite[i]] if n in test_names else feats[i] for i, n in enumerate(names)])
    write_cache(str(tmp_path / "inverted.h5"), fp, names, flipped)
    return str(tmp_path / "inverted.h5"), str(meta)


def test_a_run_below_chance_warns_on_the_console_and_in_test_metrics(tmp_path, capsys):
    cache, meta = _inverted_test_split(tmp_path)
    out = tmp_path / "run"
    rc = _train_main()(["--features", cache, "--metadata", meta, "--output-dir", str(out), "--max-epochs", "3",
                        "--pairs-per-epoch", "300", "--eval-pairs", "400", "--hidden-dim", "16",
                        "--projector-dim", "8", "--learning-rate", "1e-3", "--device", "cpu", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "test_metrics.json").read_text())
    model, ridge = metrics["model"], metrics["linear_baseline"]
    assert model["accuracy"] < 0.5  # the set-up did what it is for
    want = (["chance"] + (["ridge"] if model["accuracy"] < ridge["accuracy"] else [])
            + (["tier"] if model["tier_accuracy"] < model["majority_tier_accuracy"] else []))
    assert _kinds(metrics["warnings"]) == sorted(want)
    for warning in metrics["warnings"]:
        assert f"WARNING: {warning}" in printed
    assert f"{model['accuracy']:.4f} is below chance" in metrics["warnings"][0]
