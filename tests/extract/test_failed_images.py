"""Rows whose images extraction recorded as unreadable are left out of training, evaluation and sweeps
(issue 18, item 2), and a multi-cache sweep reads its metadata with --encoding (item 4)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mirip.store.cache import open_cache, write_cache
from mirip.store.checkpoint import load_checkpoint_file
from mirip.training.datasets.data_splitter import DataSplitter

from _extract_helpers import extract, make_images
from _sweep_helpers import TIER_RANK, one_thread

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--max-epochs", "2", "--pairs-per-epoch", "64", "--eval-pairs", "80", "--batch-size", "16", "--device", "cpu",
        "--no-progress", "--hidden-dim", "16", "--projector-dim", "8"]
BAD = ("empty.png", "truncated.jpg", "notes.png", "missing.png")


def _script(name):
    module = importlib.import_module(f"mirip.cli.{name}")
    return module


train_script, evaluate_script, sweep_script = _script("train"), _script("evaluate"), _script("sweep")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_backbone):
    """A real extraction of 76 good images and 4 unreadable ones (empty, truncated, text, missing), all in the CSV."""
    d = tmp_path_factory.mktemp("failed")
    images = d / "images"
    good = make_images(images, 76)
    (images / "empty.png").write_bytes(b"")
    whole = (images / "img_000.png").read_bytes()
    (images / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (images / "notes.png").write_text("notes, not a picture\n")
    names = good + list(BAD)
    tiers = [("SABC"[i % 4]) for i in range(len(names))]
    meta = d / "metadata.csv"
    pd.DataFrame({"filename": names, "tier": tiers}).to_csv(meta, index=False)
    cache = d / "features.h5"
    extract(images, cache, tiny_backbone, metadata=str(meta), tier_column="tier")
    with open_cache(str(cache)) as c:
        assert set(c.failures()) == set(BAD) and c.num_rows == 76  # the precondition: extraction recorded them
    return str(cache), str(meta), names, tiers


def test_train_leaves_out_failed_images_and_keeps_the_others_in_their_split(extracted, tmp_path, capsys):
    cache, meta, names, tiers = extracted
    out = tmp_path / "run"
    assert train_script.main(["--features", cache, "--metadata", meta, "--output-dir", str(out), "--seed", "3",
                              *FAST]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("left out"))
    assert "left out 4 image(s) that extraction could not read" in line and "excluded_images.json" in line
    listed = json.loads((out / "excluded_images.json").read_text())
    assert sorted(listed) == sorted(BAD) and all(listed.values())  # every one with its reason

    # Independently: the seed's split of the whole metadata, with the unreadable rows removed afterwards.
    frame = pd.DataFrame({"filename": names, "tier": tiers})
    parts = DataSplitter(0.8, 0.1, 0.1, seed=3, stratify_column="tier", group_column="filename").split(frame)
    want = {s: sorted(set(p.filename) - set(BAD)) for s, p in zip(("train", "val", "test"), parts)}
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["split_sizes"] == {s: len(v) for s, v in want.items()}
    assert sorted(metrics["excluded_images"]) == sorted(BAD)
    ckpt = load_checkpoint_file(str(out / "best.pt"))
    assert sorted(ckpt["excluded_images"]) == sorted(BAD)
    assert ckpt["score_reference"]["counts"]["all"] == len(want["train"])

    # scoring's split membership rebuilds the same split (and accepts the train-split hash)
    from mirip.scoring.inputs import split_membership

    membership, note = split_membership(ckpt, meta)
    assert note is None and not set(membership) & set(BAD)
    assert {s: sorted(n for n, sp in membership.items() if sp == s) for s in want} == want

    # evaluate.py on the run's test split: the same rows, and it says what it left out
    assert evaluate_script.main(["--checkpoint", str(out / "best.pt"), "--features", cache, "--metadata", meta,
                                 "--split", "test", "--json", str(tmp_path / "e.json")]) == 0
    assert "left out 4 image(s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["model"]["num_images"] == len(want["test"])


def test_strict_images_refuses_and_never_extracted_rows_stay_an_error(extracted, tmp_path, capsys):
    cache, meta, names, tiers = extracted
    assert train_script.main(["--features", cache, "--metadata", meta, "--output-dir", str(tmp_path / "r1"),
                              "--strict-images", *FAST]) == 2
    err = capsys.readouterr().err
    assert "4 image(s) of the metadata could not be read" in err and "empty.png" in err and "--strict-images" in err
    more = tmp_path / "more.csv"
    pd.DataFrame({"filename": names + ["never.png"], "tier": tiers + ["A"]}).to_csv(more, index=False)
    assert train_script.main(["--features", cache, "--metadata", str(more), "--output-dir", str(tmp_path / "r2"),
                              *FAST]) == 2
    assert "1 image(s) have no cached feature" in (err := capsys.readouterr().err) and "never.png" in err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_sweep_leaves_out_failed_images(extracted, tmp_path, capsys):
    cache, meta, _, _ = extracted
    out = tmp_path / "sweep"
    assert sweep_script.main(["--features", cache, "--metadata", meta, "--output-dir", str(out), "--seeds", "0",
                              *FAST]) == 0, capsys.readouterr().err
    assert sorted(json.loads((out / "excluded_images.json").read_text())) == sorted(BAD)
    split = json.loads((out / "splits" / "seed0.json").read_text())
    assert not set(sum(split.values(), [])) & set(BAD) and len(sum(split.values(), [])) == 76


def _synthetic(path, names, tiers, failed, seed):
    """A cache holding every name but ``failed``, which it records as unreadable."""
    rng = np.random.default_rng(seed)
    keep = [i for i, n in enumerate(names) if n not in failed]
    feats = rng.normal(size=(len(keep), 8)).astype(np.float32)
    feats[:, 0] += np.array([TIER_RANK[tiers[i]] for i in keep])
    write_cache(str(path), {"feature_dim": 8, "feature_dtype": "float32", "backbone": f"b{seed}"},
                [names[i] for i in keep], feats)
    with open_cache(str(path), "a") as c:
        c.set_failures({n: ("image file is empty (0 bytes)", 0, 0) for n in failed})
    return str(path)


def test_multi_cache_sweep_leaves_out_the_union_and_reads_with_encoding(tmp_path, capsys):
    names = [f"그림_{i:03d}.png" for i in range(48)]  # non-ASCII names: the encoding matters
    tiers = ["SABC"[i % 4] for i in range(48)]
    a = _synthetic(tmp_path / "a.h5", names, tiers, {names[1]}, 0)
    b = _synthetic(tmp_path / "b.h5", names, tiers, {names[2], names[3]}, 1)
    meta = tmp_path / "metadata.csv"
    # UTF-16: neither UTF-8 nor the CP949 fallback reads it, so only --encoding utf-16 can.
    pd.DataFrame({"filename": names, "tier": tiers}).to_csv(meta, index=False, encoding="utf-16")
    out = tmp_path / "sweep"
    rc = sweep_script.main(["--features", a, b, "--metadata", str(meta), "--output-dir", str(out), "--seeds", "0",
                            "--encoding", "utf-16", *FAST])
    assert rc == 0, capsys.readouterr().err
    union = {names[1], names[2], names[3]}
    assert set(json.loads((out / "excluded_images.json").read_text())) == union
    for where in (out, out / "a", out / "b"):  # the shared split and each cache's own
        split = json.loads((where / "splits" / "seed0.json").read_text())
        assert not set(sum(split.values(), [])) & union and len(sum(split.values(), [])) == 45
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["cache"]) == ["a", "b"]
    for checkpoint in results["checkpoint"]:  # what scoring needs to rebuild each head's split
        assert load_checkpoint_file(str(out / checkpoint))["excluded_images"] == sorted(union)
