"""sweep.py --judgments J --judgment-weight W...: the weight as a sweep axis.

Agreement with the judged pairs is recomputed here with plain loops over the judgments file, the sweep's
split files and each head's checkpoint, never with mirip.training.judged_pairs.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mirip.cli import sweep as sweep_script
from mirip.cli import train as train_script
from mirip.ml.ranking_model import RankingHead
from mirip.store.cache import open_cache
from mirip.store.checkpoint import load_checkpoint_file
from mirip.sweep.grid import SweepGrid, group_configs
from mirip.training.head_config import HeadConfig

from _sweep_helpers import TIER_RANK, one_thread, write_synthetic

FAST = ["--max-epochs", "4", "--pairs-per-epoch", "64", "--eval-pairs", "120", "--batch-size", "16",
        "--early-stopping-patience", "0", "--device", "cpu", "--no-progress", "--hidden-dim", "8",
        "--projector-dim", "4", "--learning-rate", "0.01", "--dropout", "0.0", "--val-ratio", "0.25",
        "--test-ratio", "0.15", "--train-ratio", "0.6"]
PAIR_INVARIANT = ("projector.net.5.bias", "score_head.0.bias")  # no gradient from pairs (see test_runner)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture
def judged_data(tmp_path):
    """100 drawings whose features follow the tiers, and 1,500 judged pairs that say the lower tier won."""
    features, metadata = write_synthetic(tmp_path, n=100, dim=8, separation=1.5)
    meta = pd.read_csv(metadata)
    rng = np.random.default_rng(1)
    rows = []
    while len(rows) < 1500:
        a, b = rng.choice(len(meta), size=2, replace=False)
        ra, rb = TIER_RANK[meta.tier[a]], TIER_RANK[meta.tier[b]]
        if ra != rb:
            rows.append({"a": meta.filename[a], "b": meta.filename[b], "winner": "a" if ra < rb else "b"})
    rows[0]["winner"] = "tie"  # a tie is trained on (both orders at half weight) and never scored
    judgments = tmp_path / "judgments.csv"
    pd.DataFrame(rows).to_csv(judgments, index=False)
    return features, metadata, str(judgments)


def naive_val_agreement(out, row, judgments, features) -> float:
    """Share of the decisive judged pairs with both drawings in the head's val split that its scores order as
    the judges did."""
    val = json.loads((out / "splits" / f"seed{int(row['seed'])}.json").read_text())["val"]
    ckpt = load_checkpoint_file(out / row["checkpoint"])
    head = RankingHead(**ckpt["head"]).eval()
    head.load_head_state_dict(ckpt["model_state_dict"])
    with open_cache(features) as cache:
        feats = torch.as_tensor(cache.features(cache.rows_for(val)), dtype=torch.float32)
    with torch.no_grad():
        score = {name: head.get_score(feats[i:i + 1]).item() for i, name in enumerate(val)}
    hits = []
    for a, b, winner in pd.read_csv(judgments)[["a", "b", "winner"]].itertuples(index=False):
        if a in score and b in score and winner != "tie":
            hits.append((score[a] > score[b]) == (winner == "a"))
    return float(np.mean(hits))


def test_a_higher_judgment_weight_follows_judgments_that_contradict_the_tiers(judged_data, tmp_path, capsys):
    features, metadata, judgments = judged_data
    out = tmp_path / "sweep"
    assert sweep_script.main(["--features", features, "--metadata", metadata, "--output-dir", str(out),
                              "--judgments", judgments, "--judgment-weight", "0", "3", "--seeds", "0", "1",
                              *FAST]) == 0
    table = pd.read_csv(out / "results.csv")
    assert sorted(table.judgment_weight.unique()) == [0.0, 3.0] and len(table) == 4
    assert table.config_id.str.endswith(("-jw0.0", "-jw3.0")).all()
    for _, row in table.iterrows():
        assert row["val_judged_agreement"] == pytest.approx(naive_val_agreement(out, row, judgments, features))
        assert row["val_judged_pairs"] > 20
    mean = table.groupby("judgment_weight")["val_judged_agreement"].mean()
    assert mean[3.0] > mean[0.0] + 0.3, mean  # tiers alone order them backwards; weight 3 follows the judges
    summary = (out / "summary.md").read_text()
    assert "| judgment weight |" in summary and "val judged agreement" in summary
    best = json.loads((out / "best.json").read_text())
    assert "--judgments" in best["train_argv"] and "--judgment-weight" in best["train_argv"]


def test_a_sweep_head_at_weight_w_is_train_py_with_judgments_at_w(judged_data, tmp_path):
    features, metadata, judgments = judged_data
    out = tmp_path / "sweep"
    assert sweep_script.main(["--features", features, "--metadata", metadata, "--output-dir", str(out),
                              "--judgments", judgments, "--judgment-weight", "0.5", "1.5", "--margin", "0.5", "1.0",
                              "--seeds", "4", "--optimizer", "plain", *FAST]) == 0
    table = pd.read_csv(out / "results.csv")
    row = table[(table.judgment_weight == 1.5) & (table.margin == 0.5)].iloc[0]
    alone = tmp_path / "alone"
    assert train_script.main(["--features", features, "--metadata", metadata, "--output-dir", str(alone),
                              "--judgments", judgments, "--judgment-weight", "1.5", "--margin", "0.5", "--seed", "4",
                              "--bootstrap", "0", *FAST]) == 0
    ours = load_checkpoint_file(out / row["checkpoint"])
    theirs = load_checkpoint_file(alone / "best.pt")
    assert ours["epoch"] == theirs["epoch"] and ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-9)
    # Stacked and single heads round differently in the last bits, over ~100 steps at lr 0.01: ~1e-5 apart here.
    for name, value in theirs["model_state_dict"].items():
        if name not in PAIR_INVARIANT:
            torch.testing.assert_close(ours["model_state_dict"][name], value, rtol=1e-3, atol=1e-4)
    report = json.loads((alone / "test_metrics.json").read_text())["judgments"]
    assert row["val_judged_agreement"] == pytest.approx(report["val_agreement"]["agreement"], abs=1e-6)
    assert row["val_judged_pairs"] == report["val_agreement"]["pairs"]
    assert row["judged_across_splits"] == report["across_splits"]


@pytest.mark.slow
def test_a_sweep_with_judge_reliability_is_train_py_with_it(judged_data, tmp_path):
    features, metadata, judgments = judged_data
    frame = pd.read_csv(judgments)
    coin = np.arange(len(frame)) % 3 == 0  # a third of the pairs from a judge who flips a coin
    frame["judge"] = np.where(coin, "coin", "kim")
    frame.loc[coin, "winner"] = np.random.default_rng(2).choice(["a", "b"], size=int(coin.sum()))
    frame.to_csv(judgments, index=False)
    common = ["--features", features, "--metadata", metadata, "--judgments", judgments, "--judgment-weight", "1.5",
              "--margin", "0.5", *FAST]
    states = {}
    for flag in ([], ["--judge-reliability"]):
        out = tmp_path / f"sweep{len(flag)}"
        assert sweep_script.main(common + ["--output-dir", str(out), "--seeds", "4", "--optimizer", "plain",
                                           *flag]) == 0
        states[len(flag)] = load_checkpoint_file(out / pd.read_csv(out / "results.csv").checkpoint[0])
    best = json.loads((out / "best.json").read_text())
    assert "--judge-reliability" in best["train_argv"]
    alone = tmp_path / "alone"
    assert train_script.main(common + ["--output-dir", str(alone), "--seed", "4", "--bootstrap", "0",
                                       "--judge-reliability"]) == 0
    theirs = load_checkpoint_file(alone / "best.pt")
    for name, value in theirs["model_state_dict"].items():
        if name not in PAIR_INVARIANT:
            torch.testing.assert_close(states[1]["model_state_dict"][name], value, rtol=1e-3, atol=1e-4)
    assert any(not torch.allclose(states[0]["model_state_dict"][n], v, atol=1e-3)
               for n, v in theirs["model_state_dict"].items() if n not in PAIR_INVARIANT)  # the flag changed it


def test_heads_of_other_weights_train_in_other_groups_and_no_weight_keeps_the_ids():
    grid = SweepGrid(margin=(0.5, 1.0), judgment_weight=(0.0, 2.0), seed=(3,))
    groups = group_configs(grid.configs())
    assert len(groups) == 2 and all({c.judgment_weight for c in g} == {k[-1]} for k, g in groups.items())
    assert HeadConfig(1.0, 512, 256, 1e-4, 0.1, 0.01, 42).config_id == "m1.0-h512-p256-lr0.0001-do0.1-wd0.01-s42"


@pytest.mark.parametrize("extra, message", [
    (["--judgment-weight", "1"], "--judgment-weight needs --judgments"),
    (["--judgments", "J", "--judgment-weight", "1", "-0.5"], "--judgment-weight: a judgment weight must be "
                                                             "non-negative, got -0.5"),
    (["--judgments", "J", "--seeds", "1", "2", "--save-ensemble"], "--save-ensemble: an ensemble does not train on"),
    (["--judgments", "missing.csv"], "--judgments: no such file"),
    (["--judge-reliability"], "--judge-reliability weighs judged pairs by their judge: it needs --judgments"),
])
def test_bad_judgment_options_are_refused_before_training(judged_data, tmp_path, capsys, extra, message):
    features, metadata, judgments = judged_data
    extra = [judgments if e == "J" else e for e in extra]
    out = tmp_path / "refused"
    assert sweep_script.main(["--features", features, "--metadata", metadata, "--output-dir", str(out),
                              *extra, *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
