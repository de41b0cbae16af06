"""sweep.py --save-ensemble: the winner retrained as one ensemble checkpoint of the sweep's seeds.

The winner is recomputed here from results.csv with a plain pandas groupby, never with the sweep's helpers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from mirip.cli import score as score_cli
from mirip.cli import sweep as sweep_script
from mirip.cli import train as train_script
from mirip.ml.ranking_model import RankingHead
from mirip.store.cache import open_cache
from mirip.store.checkpoint import load_checkpoint_file

from _sweep_helpers import one_thread, write_synthetic

FAST = ["--max-epochs", "3", "--pairs-per-epoch", "64", "--eval-pairs", "120", "--batch-size", "16",
        "--early-stopping-patience", "2", "--device", "cpu", "--no-progress", "--optimizer", "plain"]
PAIR_INVARIANT = ("projector.net.5.bias", "score_head.0.bias")  # no gradient from pairs (see test_runner)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def naive_winner(results_csv) -> dict:
    """The configuration with the highest mean val accuracy over seeds, first in file order on ties."""
    table = pd.read_csv(results_csv)
    keys = ["margin", "hidden_dim", "projector_dim", "learning_rate", "dropout", "weight_decay"]
    means = table.groupby(keys, sort=False)["val_acc"].mean()
    return dict(zip(keys, means.index[int(np.argmax(means.to_numpy()))]))


def members(ckpt) -> list:
    heads = []
    for state in ckpt["ensemble"]["member_states"]:
        head = RankingHead(**ckpt["head"]).eval()
        head.load_head_state_dict(state)
        heads.append(head)
    return heads


def test_the_saved_ensemble_is_the_winner_on_the_first_seeds_split_and_train_py_trains_the_same(tmp_path, capsys):
    features, metadata = write_synthetic(tmp_path, n=80, dim=12)
    out = tmp_path / "sweep"
    argv = ["--features", features, "--metadata", metadata, "--output-dir", str(out), "--margin", "0.05", "1.0",
            "--learning-rate", "0.0001", "0.01", "--hidden-dim", "8", "--projector-dim", "4", "--dropout", "0.1",
            "--seeds", "3", "4", "--save-ensemble", *FAST]
    assert sweep_script.main(argv) == 0
    printed = capsys.readouterr().out
    best = json.loads((out / "best.json").read_text())
    ens = best["ensemble"]
    assert ens["members"] == 2 and ens["member_seeds"] == [3, 4] and ens["split_seed"] == 3
    assert ens["checkpoint"] == str(out / "best_ensemble" / "best.pt") and ens["checkpoint"] in printed
    assert f"test pairwise accuracy {ens['test_accuracy']:.4f}" in printed
    ckpt = load_checkpoint_file(ens["checkpoint"])
    # The members' configuration is the winner's (recomputed from results.csv), and their split seed 3's.
    winner = naive_winner(out / "results.csv")
    rc = ckpt["run_config"]
    assert rc["margin"] == winner["margin"] and rc["dropout"] == winner["dropout"]
    assert ckpt["config"]["learning_rate"] == winner["learning_rate"] and ckpt["config"]["seed"] == 3
    assert rc["hidden_dim"] == 8 and rc["projector_dim"] == 4
    assert ckpt["ensemble"]["seeds"] == [3, 4]
    # Member 0 is the sweep's own head for the winner at seed 3: same split, init and batches.
    rows = pd.read_csv(out / "results.csv")
    own = rows[(rows.margin == winner["margin"]) & (rows.learning_rate == winner["learning_rate"]) & (rows.seed == 3)]
    sweep_head = load_checkpoint_file(out / own["checkpoint"].iloc[0])["model_state_dict"]
    for name, value in sweep_head.items():
        if name not in PAIR_INVARIANT:
            torch.testing.assert_close(ckpt["ensemble"]["member_states"][0][name], value, rtol=1e-5, atol=1e-6)
    # The recorded train.py command trains the same ensemble.
    alone = tmp_path / "alone"
    assert ens["train_argv"][-2:] == ["--ensemble", "2"] and "train.py" in ens["train_command"]
    assert train_script.main(ens["train_argv"] + ["--output-dir", str(alone), "--no-progress"]) == 0
    theirs = load_checkpoint_file(alone / "best.pt")
    for ours_state, their_state in zip(ckpt["ensemble"]["member_states"], theirs["ensemble"]["member_states"]):
        for name, value in their_state.items():
            torch.testing.assert_close(ours_state[name], value, rtol=1e-5, atol=1e-6)
    # Run again: nothing trains, the ensemble is kept and still recorded.
    assert sweep_script.main(argv) == 0
    assert "kept from an earlier run" in capsys.readouterr().out
    assert json.loads((out / "best.json").read_text())["ensemble"]["checkpoint"] == ens["checkpoint"]


def test_save_ensemble_with_one_seed_is_refused_before_training(tmp_path, capsys):
    features, metadata = write_synthetic(tmp_path, n=40, dim=6)
    out = tmp_path / "one"
    assert sweep_script.main(["--features", features, "--metadata", metadata, "--output-dir", str(out),
                              "--seeds", "7", "--save-ensemble", *FAST]) == 2
    assert "--save-ensemble trains one member per sweep seed" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_score_py_scores_the_saved_ensemble_with_its_members_spread(tiny_backbone, tmp_path):
    from conftest import make_image
    from _inference_helpers import IMAGE_SIZE, cached_features
    from mirip.ml.feature_extractor import DINOv2FeatureExtractor
    from mirip.ml.preprocessing import Preprocessor
    from mirip.store.cache import write_cache
    from mirip.store.fingerprint import make_fingerprint

    images = tmp_path / "images"
    images.mkdir()
    names = [f"img_{i}.png" for i in range(32)]
    for i, name in enumerate(names):
        make_image(images / name, seed=i)
    extractor = DINOv2FeatureExtractor(tiny_backbone, device="cpu", pooling="cls")
    preprocessor = Preprocessor(image_size=IMAGE_SIZE)
    paths = [str(images / n) for n in names]
    cache = write_cache(str(tmp_path / "cache.h5"), make_fingerprint(extractor, preprocessor), names,
                        cached_features(extractor, preprocessor, paths))
    meta = tmp_path / "metadata.csv"
    pd.DataFrame({"filename": names, "tier": list("SABC" * 8)}).to_csv(meta, index=False)
    out = tmp_path / "sweep"
    assert sweep_script.main(["--features", cache, "--metadata", str(meta), "--output-dir", str(out),
                              "--hidden-dim", "8", "--projector-dim", "4", "--seeds", "0", "1", "2",
                              "--learning-rate", "0.01", "--save-ensemble", *FAST]) == 0
    ckpt_path = json.loads((out / "best.json").read_text())["ensemble"]["checkpoint"]
    csv = tmp_path / "scores.csv"
    assert score_cli.main(["--checkpoint", ckpt_path, *paths[:4], "--output", str(csv), "--backbone", tiny_backbone,
                           "--device", "cpu", "--no-progress"]) == 0
    table = pd.read_csv(csv).set_index("path")
    with open_cache(cache) as c:
        feats = torch.as_tensor(c.features(c.rows_for(names[:4])), dtype=torch.float32)
    with torch.no_grad():
        per = np.array([[h.get_score(feats[i:i + 1]).item() for i in range(4)]
                        for h in members(load_checkpoint_file(ckpt_path))])
    for i in range(4):
        row = table.loc[paths[i]]
        assert row["score"] == pytest.approx(per[:, i].mean(), abs=1e-4)
        assert row["score_std"] == pytest.approx(per[:, i].std(ddof=1), abs=1e-4) and row["score_std"] > 0
