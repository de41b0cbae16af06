"""sweep.py --features a.h5 b.h5: caches of the same images as one more axis, on identical splits."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from mirip.cli import sweep as sweep_script
from mirip.store.cache import write_cache
from mirip.store.checkpoint import load_checkpoint_file

from _sweep_helpers import TIER_RANK, one_thread

FAST = ["--max-epochs", "3", "--learning-rate", "0.01", "--pairs-per-epoch", "64", "--eval-pairs", "80", "--batch-size", "16",
        "--device", "cpu", "--no-progress", "--hidden-dim", "16", "--projector-dim", "8"]
N = 60


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _cache(path, names, tiers, backbone, family, dim, separation, seed):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(len(names), dim)).astype(np.float32)
    feats[:, 0] += separation * np.array([TIER_RANK[t] for t in tiers])
    fp = {"feature_dim": dim, "feature_dtype": "float32", "backbone": backbone, "backbone_family": family,
          "image_size": 224, "pretrained": True}
    # Rows in a different order per cache: the splits must follow the names, not row positions.
    order = rng.permutation(len(names))
    return write_cache(str(path), fp, [names[i] for i in order], feats[order])


@pytest.fixture
def two_caches(tmp_path):
    names = [f"img_{i:03d}.png" for i in range(N)]
    tiers = list(np.array(list("SABC"))[np.arange(N) % 4])
    meta = tmp_path / "metadata.csv"
    pd.DataFrame({"filename": names, "tier": tiers}).to_csv(meta, index=False)
    # The hub ids are only names in synthetic caches' fingerprints: no model is loaded (the suite runs with
    # HF_HUB_OFFLINE=1 and these features are random numbers).
    a = _cache(tmp_path / "dinov2.h5", names, tiers, "facebook/dinov2-large", "dinov2", 12, 1.5, 0)
    b = _cache(tmp_path / "siglip.h5", names, tiers, "google/siglip-so400m-patch14-384", "siglip", 8, 0.3, 1)
    return a, b, str(meta), names


def test_two_caches_one_table_identical_splits(two_caches, tmp_path, capsys):
    a, b, meta, names = two_caches
    out = tmp_path / "sweep"
    rc = sweep_script.main(["--features", a, b, "--metadata", meta, "--output-dir", str(out),
                            "--margin", "0.5", "1.0", "--seeds", "0", "1", *FAST])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    winner = [line for line in printed.splitlines() if line.startswith("best on validation: cache")]
    assert len(winner) == 1 and "margin=" in winner[0] and "{" not in winner[0], winner

    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2 * 2 * 2  # caches x margins x seeds
    assert sorted(set(table["cache"])) == ["dinov2", "siglip"]
    assert set(table["backbone"]) == {"facebook/dinov2-large", "google/siglip-so400m-patch14-384"}
    for label in ("dinov2", "siglip"):
        assert (table["cache"] == label).sum() == 4
        assert all(os.path.isfile(out / c) for c in table.loc[table["cache"] == label, "checkpoint"])

    # Identical splits: the same image names in each split for both caches, per seed, as trained on.
    for seed in (0, 1):
        split_a = json.loads((out / "dinov2" / "splits" / f"seed{seed}.json").read_text())
        split_b = json.loads((out / "siglip" / "splits" / f"seed{seed}.json").read_text())
        assert split_a == split_b
        assert sorted(split_a["train"] + split_a["val"] + split_a["test"]) == sorted(names)
        assert len(split_a["test"]) > 0 and not set(split_a["train"]) & set(split_a["test"])
        # The checkpoints agree on which drawings were the training split (calibrated on it).
        refs = {load_checkpoint_file(str(out / c))["score_reference"]["images_sha256"]
                for c in table.loc[table["seed"] == seed, "checkpoint"]}
        assert len(refs) == 1
    assert json.loads((out / "splits" / "seed0.json").read_text()) != json.loads(
        (out / "splits" / "seed1.json").read_text())

    summary = (out / "summary.md").read_text()
    assert "| rank | cache | features |" in summary
    assert "`dinov2`" in summary and "`siglip`" in summary
    assert "facebook/dinov2-large" in summary and "google/siglip-so400m-patch14-384" in summary
    assert (out / "heatmap.png").stat().st_size > 0
    best = json.loads((out / "best.json").read_text())
    winner = a if best["cache"] == "dinov2" else b
    assert best["features"] == winner and f"--features {winner}" in best["train_command"]
    # The strongly separated cache wins on validation.
    assert best["cache"] == "dinov2"


def test_a_cache_missing_metadata_images_is_refused_naming_them(two_caches, tmp_path, capsys):
    a, _, meta, names = two_caches
    tiers = list(np.array(list("SABC"))[np.arange(N) % 4])
    keep = [i for i in range(N) if i not in (5, 17)]
    short = _cache(tmp_path / "short.h5", [names[i] for i in keep], [tiers[i] for i in keep], "x/y", "clip", 8, 1.0, 2)
    out = tmp_path / "sweep"
    rc = sweep_script.main(["--features", a, short, "--metadata", meta, "--output-dir", str(out), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert "img_005.png" in err and "img_017.png" in err and "short.h5" in err
    assert not (out / "dinov2").exists()  # refused before anything trained
