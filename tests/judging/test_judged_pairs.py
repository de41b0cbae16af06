"""Teachers' judged pairs: the file format and its refusals, training beside tier pairs (never across splits,
followed as their weight rises), and the suggested next pairs (never repeated, spread, scored as documented)."""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from _stage2_helpers import fake_fingerprint, single_thread
from mirip.common.judgments import JudgmentsError, read_judgments, write_judgments_csv
from mirip.common.metadata_csv import MetadataError
from mirip.judging.suggest import spread_embedding, suggest_pairs
from mirip.store.cache import write_cache
from mirip.training.judged_pairs import JudgedFeaturePairDataset, JudgedPairs, split_judged

NAMES = [f"img_{i}.png" for i in range(6)]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def _write(path, text: str, encoding: str = "utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)


# --- the file ------------------------------------------------------------------------------------
def test_both_layouts_read_normalised_with_repeats_counted(tmp_path):
    pairs = _write(tmp_path / "j.csv", "a,b,winner,judge\n./img_0.png,img_1.png,b,kim\nimg_1.png,img_0.png,A,lee\n"
                                       "img_2.png,img_3.png,tie,\n")
    frame = read_judgments(pairs, known=NAMES)
    assert frame.values.tolist() == [["img_0.png", "img_1.png", "b", "kim", ""], ["img_1.png", "img_0.png", "a", "lee", ""],
                                     ["img_2.png", "img_3.png", "tie", "", ""]]
    assert frame.attrs["repeats"] == 1  # the same pair in the other order is repeated evidence, kept
    wl = _write(tmp_path / "wl.csv", "winner,loser,time\nimg_4.png,img_5.png,2026-12-05T10:00\n", "cp949")
    assert read_judgments(wl).values.tolist() == [["img_4.png", "img_5.png", "a", "", "2026-12-05T10:00"]]


def test_write_reads_back(tmp_path):
    rows = [{"a": "img_0.png", "b": "img_1.png", "winner": "tie", "judge": "kim", "time": "t1"},
            {"a": "img_2.png", "b": "img_3.png", "winner": "a"}]
    assert write_judgments_csv(tmp_path / "out.csv", rows) == 2
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "a,b,winner,judge,time"
    back = read_judgments(tmp_path / "out.csv")
    assert back.to_dict("records") == [{**rows[0]}, {**rows[1], "judge": "", "time": ""}]
    with pytest.raises(ValueError, match="winner"):
        write_judgments_csv(tmp_path / "bad.csv", [{"a": "x", "b": "y", "winner": "left"}])


def test_every_bad_row_refused_at_once_with_its_line(tmp_path):
    path = _write(tmp_path / "bad.csv", "a,b,winner\nimg_0.png,img_1.png,a\nimg_0.png,./img_0.png,a\n"
                                        "img_1.png,img_2.png,left\nimg_1.png,ghost.png,b\n,img_2.png,a\n"
                                        "/abs.png,img_2.png,a\nimg_3.png,../up.png,tie\n")
    with pytest.raises(JudgmentsError) as err:
        read_judgments(path, known=NAMES)
    text = str(err.value)
    assert "6 problem(s)" in text
    for line, what in [(3, "against itself"), (4, "'left' is not a, b or tie"), (5, "'ghost.png' is not in the"),
                       (6, "empty image path"), (7, "absolute image path"), (8, "escapes the image directory")]:
        assert f"line {line}: " in text and what in text, (line, what)
    assert "line 2:" not in text


@pytest.mark.parametrize("text, match", [("x,y,z\n1,2,3\n", "expected a,b,winner"),
                                         ("", r"empty: expected a CSV with a header row \(a,b,winner or winner,loser\)"),
                                         ("a,b,winner\n", "no judged pairs")])
def test_unusable_files_refused(tmp_path, text, match):
    with pytest.raises(MetadataError, match=match):  # JudgmentsError is one
        read_judgments(_write(tmp_path / "j.csv", text))


# --- training ------------------------------------------------------------------------------------
def test_pairs_across_splits_are_counted_and_never_trained():
    rng = np.random.default_rng(0)
    n = 40
    splits = {"train": rng.permutation(n)[:24], "val": None, "test": None}
    rest = np.setdiff1d(np.arange(n), splits["train"])
    splits["val"], splits["test"] = rest[:8], rest[8:]
    first, second = rng.integers(n, size=200), rng.integers(n, size=200)
    keep = first != second
    pairs = JudgedPairs(first[keep], second[keep], rng.choice([0.0, 0.5, 1.0], size=keep.sum()), [""] * keep.sum())
    by_split, across = split_judged(pairs, splits, n)
    split_of = {int(r): s for s, rows in splits.items() for r in rows}
    assert across == sum(split_of[int(a)] != split_of[int(b)] for a, b in zip(pairs.first, pairs.second))
    assert sum(len(p) for p in by_split.values()) + across == len(pairs)
    features = torch.randn(n, 4)
    ds = JudgedFeaturePairDataset(features, np.arange(24) % 4, judged=by_split["train"], weight=2.0,
                                  rows=splits["train"], num_pairs=64, seed=1)
    for epoch in range(3):
        ds.set_epoch(epoch)
        index = ds.epoch_index()
        assert index.shape[1] > 64  # the judged pairs came in
        assert set(index[:2].reshape(-1).tolist()) <= set(splits["train"].tolist())


def _contradicting_bank(directory):
    """Tiers carried by feature 0, a judged order carried by feature 1 that runs against the tiers."""
    rng = np.random.default_rng(3)
    n = 160
    tiers = np.array(list("SABC"))[np.arange(n) % 4]
    rank = np.array([3 - "SABC".index(t) for t in tiers], dtype=np.float64)
    judged_quality = -rank + rng.normal(scale=0.3, size=n)
    feats = np.stack([rank + rng.normal(scale=0.3, size=n), judged_quality] + [rng.normal(size=n) for _ in range(4)], 1)
    names = [f"img_{i:03d}.png" for i in range(n)]
    cache = os.path.join(directory, "bank.h5")
    write_cache(cache, fake_fingerprint(6), names, feats.astype(np.float32))
    meta = os.path.join(directory, "metadata.csv")
    pd.DataFrame({"filename": names, "tier": tiers}).to_csv(meta, index=False)
    rows = []
    for _ in range(600):
        a, b = rng.choice(n, size=2, replace=False)
        if tiers[a] != tiers[b]:
            rows.append({"a": names[a], "b": names[b], "winner": "a" if judged_quality[a] > judged_quality[b] else "b",
                         "judge": "kim"})
    judgments = os.path.join(directory, "judged.csv")
    write_judgments_csv(judgments, rows)
    return cache, meta, judgments


@pytest.mark.slow
def test_model_follows_contradicting_judgments_as_their_weight_rises(tmp_path):
    from mirip.cli.train import main

    cache, meta, judgments = _contradicting_bank(tmp_path)
    agreement = {}
    for weight in (0.0, 3.0, 8.0):
        out = tmp_path / f"w{weight}"
        assert main(["--features", cache, "--metadata", meta, "--output-dir", str(out), "--judgments", judgments,
                     "--judgment-weight", str(weight), "--max-epochs", "4", "--pairs-per-epoch", "512",
                     "--batch-size", "32", "--learning-rate", "3e-3", "--device", "cpu", "--no-progress",
                     "--hidden-dim", "16", "--projector-dim", "8"]) == 0
        report = json.loads((out / "test_metrics.json").read_text())["judgments"]
        agreement[weight] = report["judges"]["kim"]["agreement_with_model"]
        assert report["across_splits"] + sum(report["per_split"].values()) == report["pairs"]
        assert report["test_agreement"]["pairs"] == report["per_split"]["test"]
        low, high = report["test_agreement"]["interval"]  # train.py's default bootstrap gives it an interval
        assert low <= report["test_agreement"]["agreement"] <= high
    assert agreement[0.0] < 0.3  # tiers alone: the judged order is the tiers' reverse
    assert agreement[0.0] <= agreement[3.0] <= agreement[8.0]
    assert agreement[8.0] > 0.8


# --- the next pairs ------------------------------------------------------------------------------
def _naive_value(scores, counts, i, j, slope):
    """The documented value, one pair at a time in plain Python."""
    ps = [1 / (1 + math.exp(-slope * (m[i] - m[j]))) for m in scores]
    p = sum(ps) / len(ps)
    sd = math.sqrt(sum((x - p) ** 2 for x in ps) / len(ps))
    return ((1 - abs(2 * p - 1)) + (2 * sd if len(ps) > 1 else 0)) / (1 + (counts[i] + counts[j]) / 2), p


def test_best_suggestion_matches_a_naive_search_over_all_pairs():
    rng = np.random.default_rng(5)
    n = 30
    scores = rng.normal(size=(3, n))  # an ensemble of three
    counts = rng.integers(0, 4, size=n).astype(float)
    judged = {frozenset(map(int, rng.choice(n, 2, replace=False))) for _ in range(40)}
    slope = 1.7
    picks = suggest_pairs(scores, counts, judged, 1, probability=lambda d: 1 / (1 + np.exp(-slope * d)),
                          window=n)
    values = {(i, j): _naive_value(scores, counts, i, j, slope) for i, j in itertools.combinations(range(n), 2)
              if frozenset((i, j)) not in judged}
    best = max(values, key=lambda k: values[k][0])
    i, j, reason, p_a = picks[0]
    assert frozenset((i, j)) == frozenset(best)
    assert p_a == pytest.approx(values[(i, j)][1] if (i, j) in values else 1 - values[(j, i)][1], abs=1e-12)
    assert f"{p_a:.2f}" in reason


def test_spread_suggestion_matches_a_naive_search_scaled_by_distance():
    rng = np.random.default_rng(9)
    n = 25
    scores = rng.normal(size=(2, n))
    counts = rng.integers(0, 3, size=n).astype(float)
    judged = {frozenset(map(int, rng.choice(n, 2, replace=False))) for _ in range(30)}
    embedding = rng.normal(size=(n, 3)) * [3.0, 1.0, 0.2]
    slope = 1.3
    picks = suggest_pairs(scores, counts, judged, 1, probability=lambda d: 1 / (1 + np.exp(-slope * d)),
                          window=n, embedding=embedding)
    fresh = [(i, j) for i, j in itertools.combinations(range(n), 2) if frozenset((i, j)) not in judged]
    dist = {(i, j): math.sqrt(sum((embedding[i][c] - embedding[j][c]) ** 2 for c in range(3))) for i, j in fresh}
    mean = sum(dist.values()) / len(dist)
    values = {k: _naive_value(scores, counts, *k, slope)[0] * dist[k] / mean for k in fresh}
    best = max(values, key=values.get)
    assert frozenset(picks[0][:2]) == frozenset(best)
    with pytest.raises(ValueError, match=r"embedding of shape \(24, 3\) for 25 drawings"):
        suggest_pairs(scores, counts, judged, 1, embedding=embedding[:-1])


def test_spread_embedding_is_the_top_principal_components():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 6)) * [5.0, 0.5, 3.0, 1.0, 0.2, 2.0] + 7.0
    got = spread_embedding(x, 2)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # the other route: an SVD of the data itself
    want = centred @ vt[:2].T
    assert got.shape == (200, 2)
    for c in range(2):  # each axis up to its sign
        assert min(np.abs(got[:, c] - want[:, c]).max(), np.abs(got[:, c] + want[:, c]).max()) < 1e-8
    assert spread_embedding(x, 0) is None
    # Wide features (the power-iteration route): a planted 3-d signal among 200 noise dims.
    wide = rng.normal(size=(400, 200))
    wide[:, :3] += rng.normal(size=(400, 3)) * [6.0, 4.0, 3.0]
    wide = wide @ np.linalg.qr(rng.normal(size=(200, 200)))[0]  # not along the coordinate axes
    got = spread_embedding(wide, 3)
    centred = wide - wide.mean(axis=0)
    want = centred @ np.linalg.svd(centred, full_matrices=False)[2][:3].T
    for c in range(3):
        assert abs(np.corrcoef(got[:, c], want[:, c])[0, 1]) > 0.999


def test_suggestions_never_repeat_a_judged_pair_and_cover_drawings_evenly():
    rng = np.random.default_rng(2)
    n = 200
    scores = rng.normal(size=n)
    judged = {frozenset((int(a), int(b))) for a, b in zip(np.argsort(scores)[:-1], np.argsort(scores)[1:])}
    picks = suggest_pairs(scores, np.zeros(n), judged, n // 2, rng=rng, window=32,
                          embedding=rng.normal(size=(n, 4)))
    keys = [frozenset((i, j)) for i, j, _, _ in picks]
    assert len(picks) == n // 2 and len(set(keys)) == len(keys) and not set(keys) & judged
    shown = np.bincount(np.array([[i, j] for i, j, _, _ in picks]).reshape(-1), minlength=n)
    assert shown.max() == 1  # n/2 pairs over n drawings: each drawing exactly once
    assert (shown == 1).all()
    # The least-judged drawings are preferred: with half the drawings judged often, they appear less.
    counts = np.where(np.arange(n) < n // 2, 10.0, 0.0)
    picks = suggest_pairs(scores, counts, set(), n // 4, rng=rng, embedding=rng.normal(size=(n, 4)))
    used = np.array([[i, j] for i, j, _, _ in picks]).reshape(-1)
    assert (used >= n // 2).mean() > 0.9


def test_suggest_command_writes_fillable_pairs_never_already_judged(tmp_path):
    from mirip.cli.suggest_pairs import main as suggest
    from mirip.cli.train import main as train

    cache, meta, judgments = _contradicting_bank(tmp_path)
    run = tmp_path / "run"
    assert train(["--features", cache, "--metadata", meta, "--output-dir", str(run), "--max-epochs", "1",
                  "--pairs-per-epoch", "64", "--device", "cpu", "--no-progress", "--hidden-dim", "8",
                  "--projector-dim", "4"]) == 0
    out = tmp_path / "pairs.csv"
    assert suggest(["--checkpoint", str(run / "best.pt"), "--features", cache, "--metadata", meta,
                    "--judgments", judgments, "--count", "40", "--output", str(out)]) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns) == ["a", "b", "winner", "judge", "time", "p_a_better", "reason"]
    assert len(frame) == 40 and (frame["winner"] == "").all()
    done = {frozenset(p) for p in zip(*(read_judgments(judgments)[c] for c in ("a", "b")))}
    assert not {frozenset(p) for p in zip(frame["a"], frame["b"])} & done
    frame["winner"] = "a"  # the teacher's answers: the file goes straight back into training
    frame.to_csv(out, index=False)
    assert len(read_judgments(out, known=pd.read_csv(meta)["filename"])) == 40
    assert suggest(["--checkpoint", str(run / "best.pt"), "--features", cache, "--metadata", meta,
                    "--count", "5", "--spread-components", "-1", "--output", str(out)]) == 2
