"""score.py --metadata with labelled drawings: which of them the checkpoint's run saw (by split), said only when
some were, and the tier agreement on the console as in the report."""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil

import pandas as pd
import pytest

from _inference_helpers import make_cache_and_checkpoint, torch_threads
from conftest import make_image
from mirip.cli import score
from mirip.store.checkpoint import load_checkpoint_file, save_checkpoint_file
from mirip.training.datasets.data_splitter import DataSplitter
from mirip.training.run_config import RunConfig

SEED = 5


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def run(tiny_backbone, tmp_path_factory):
    """A checkpoint whose run config and train-split record name 40 training drawings (10 per tier)."""
    tmp = tmp_path_factory.mktemp("run")
    images = tmp / "train_images"
    images.mkdir()
    meta = pd.DataFrame({"filename": [f"t_{i:02d}.png" for i in range(40)], "tier": list("SABC" * 10)})
    for i, name in enumerate(meta["filename"]):
        make_image(images / name, seed=100 + i)
    meta_path = tmp / "train.csv"
    meta.to_csv(meta_path, index=False)
    with torch_threads(1):
        cache, ckpt_path, _, _ = make_cache_and_checkpoint(tiny_backbone, str(images), list(meta["filename"]),
                                                           str(tmp))
    # The split, independently: the seed's splitter on the whole metadata, as a run makes it.
    parts = DataSplitter(0.8, 0.1, 0.1, seed=SEED, stratify_column="tier", group_column="filename").split(meta)
    split = {name: s for s, part in zip(("train", "val", "test"), parts) for name in part["filename"]}
    train = sorted(n for n, s in split.items() if s == "train")
    ckpt = load_checkpoint_file(ckpt_path)
    cfg = RunConfig(features=cache, metadata=str(meta_path), output_dir=str(tmp / "out"))
    cfg.training.seed = SEED
    ckpt["run_config"] = cfg.to_dict()
    ckpt["score_reference"] = {"images_sha256": hashlib.sha256("\n".join(train).encode()).hexdigest()}
    save_checkpoint_file(ckpt_path, ckpt)
    return tmp, images, meta_path, ckpt_path, split


def _new_drawings(folder, count, start=0):
    os.makedirs(folder, exist_ok=True)
    names = [f"new_{i}.png" for i in range(start, start + count)]
    for i, name in enumerate(names):
        make_image(os.path.join(folder, name), seed=900 + start + i)
    return names


def _score(ckpt, folder, truth, out_dir, *extra):
    csv, page = os.path.join(out_dir, "scores.csv"), os.path.join(out_dir, "report.html")
    rc = score.main(["--checkpoint", str(ckpt), str(folder), "--metadata", str(truth), "--output", csv, "--html",
                     page, "--device", "cpu", "--no-progress", *extra])
    assert rc == 0
    return pd.read_csv(csv, keep_default_na=False), html.unescape(open(page, encoding="utf-8").read())


def _naive_agreement(rows):
    """Share of cross-tier pairs whose better-tier drawing scores higher (ties half), over every pair."""
    rank = {"S": 3, "A": 2, "B": 1, "C": 0}
    wins = pairs = 0.0
    for a in rows:
        for b in rows:
            if rank[a["tier"]] > rank[b["tier"]]:
                pairs += 1
                wins += 1.0 if a["score"] > b["score"] else 0.5 if a["score"] == b["score"] else 0.0
    return wins / pairs, int(pairs)


def _printed_agreement(printed):
    found = re.search(r"^tier agreement: ([0-9.]+)% of (\d+) cross-tier pairs", printed, re.M)
    assert found, printed
    return float(found.group(1)), int(found.group(2))


def test_new_labelled_drawings_are_not_called_training_drawings(run, tmp_path, capsys):
    _, _, _, ckpt, _ = run
    names = _new_drawings(tmp_path / "new", 8)
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"filename": names, "tier": list("SSAABBCC")}).to_csv(truth, index=False)
    table, page = _score(ckpt, tmp_path / "new", truth, tmp_path)
    printed = capsys.readouterr().out
    assert "none of the 8 scored drawings was in the checkpoint's run" in printed
    assert "splits unknown" not in printed and "different names" not in printed
    assert "MAY INCLUDE" not in page and "none of which was in the training run's train or val split" in page
    assert set(table["split"]) == {""}
    agreement, pairs = _naive_agreement(table.to_dict("records"))
    assert _printed_agreement(printed) == (round(100 * agreement, 1), pairs)
    assert f"{100 * agreement:.1f}% of {pairs} cross-tier pairs" in page  # the same figure as the report's


def test_drawings_from_the_run_are_counted_per_split_and_left_out_of_agreement(run, tmp_path, capsys):
    _, images, _, ckpt, split = run
    folder = tmp_path / "mixed"
    folder.mkdir()
    seen = [next(n for n in sorted(split) if split[n] == s) for s in ("train", "train", "val", "test")]
    seen = sorted(set(seen) | {sorted(n for n in split if split[n] == "train")[1]})
    for name in seen:
        shutil.copy(images / name, folder / name)
    new = _new_drawings(folder, 5)
    tiers = dict(zip(new, "SABCS"))
    tiers.update({n: "SABC"[int(n[2:4]) % 4] for n in seen})
    truth = tmp_path / "truth.csv"  # a file of its own, with another split: not the run's metadata
    pd.DataFrame({"filename": list(tiers), "tier": list(tiers.values())}).to_csv(truth, index=False)
    table, page = _score(ckpt, folder, truth, tmp_path)
    printed = capsys.readouterr().out
    want = {s: sum(1 for n in seen if split[n] == s) for s in ("train", "val", "test")}
    assert (f"{len(seen)} of the {len(seen) + 5} scored drawings were in the checkpoint's run "
            f"({want['train']} train, {want['val']} val, {want['test']} test") in printed
    assert {os.path.basename(p): s for p, s in zip(table["path"], table["split"])} == {
        **{n: "" for n in new}, **{n: split[n] for n in seen}}
    held_out = [r for r in table.to_dict("records") if r["split"] not in ("train", "val")]
    agreement, pairs = _naive_agreement(held_out)
    assert _printed_agreement(printed) == (round(100 * agreement, 1), pairs)
    assert "MAY INCLUDE" not in page


def test_a_moved_run_metadata_is_unknown_until_named(run, tmp_path, capsys):
    _, _, meta_path, ckpt, _ = run
    moved = tmp_path / "moved.csv"
    shutil.copy(meta_path, moved)
    stale = load_checkpoint_file(ckpt)
    stale["run_config"]["metadata"] = str(tmp_path / "gone" / "train.csv")
    stale_path = tmp_path / "stale.pt"
    save_checkpoint_file(str(stale_path), stale)
    names = _new_drawings(tmp_path / "new", 4)
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"filename": names, "tier": list("SABC")}).to_csv(truth, index=False)
    _, page = _score(stale_path, tmp_path / "new", truth, tmp_path)
    printed = capsys.readouterr().out
    assert "NOTE: splits unknown" in printed and "gone" in printed and "is not found" in printed
    assert "--run-metadata" in printed and "MAY INCLUDE" in page
    _, page = _score(stale_path, tmp_path / "new", truth, tmp_path, "--run-metadata", str(moved))
    printed = capsys.readouterr().out
    assert "none of the 4 scored drawings was in the checkpoint's run" in printed and "MAY INCLUDE" not in page
