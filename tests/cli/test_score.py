"""scripts/score.py: a folder with a broken file, CSV, top/bottom, --compare, the HTML report, refusals."""

from __future__ import annotations

import base64
import importlib.util
import os
import re

import pandas as pd
import pytest

from _inference_helpers import torch_threads
from conftest import make_image
from mirip.scoring.report_html import render_html, tier_agreement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


score = importlib.import_module("mirip.cli.score")


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def test_score_folder_with_broken_file(scored_folder, tmp_path, capsys):
    d, meta, ckpt, meta_path = scored_folder
    out, page = tmp_path / "out" / "scores.csv", tmp_path / "report.html"
    rc = score.main(["--checkpoint", ckpt, str(d), "--output", str(out), "--html", str(page), "--metadata",
                     str(meta_path), "--batch-size", "3", "--top", "2", "--device", "cpu", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns[:3]) == ["path", "score", "rank"] and table.columns[-1] == "error"
    # Every file asked for has a row: the unreadable one last, no score or rank, its reason in error.
    assert len(table) == 9 and os.path.basename(table["path"].iloc[-1]) == "broken.jpg"
    assert table.iloc[-1][["score", "rank"]].tolist() == ["", ""] and table["error"].iloc[-1]
    assert (table["error"].iloc[:-1] == "").all()
    frame = pd.read_csv(out).iloc[:-1]
    assert list(frame["rank"]) == list(range(1, 9))
    assert frame["score"].is_monotonic_decreasing
    assert set(frame["weights"]) == {"pretrained"}
    assert sorted(os.path.basename(p) for p in frame["path"]) == sorted(meta["filename"])
    tiers = dict(zip(meta["filename"], meta["tier"]))
    assert all(tiers[os.path.basename(p)] == t for p, t in zip(frame["path"], frame["tier"]))
    assert "top 2 of 8" in printed and "bottom 2" in printed
    assert "could not read 1 file(s)" in printed and "broken.jpg" in printed
    assert "readme.txt" not in printed
    assert "scored 8 of 9 images" in printed

    text = page.read_text()
    # One list of every drawing by score, then (tiers known) disagreements and the per-tier distributions.
    listing = text[text.index("id='by-score'"):text.index("id='disagreements'")]
    imgs = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', listing)
    assert len(imgs) == 8 and all(base64.b64decode(b)[:2] == b"\xff\xd8" for b in imgs)
    positions = [listing.index(f'data-path="{p}"') for p in frame["path"]]
    assert positions == sorted(positions)
    assert "id='distributions'" in text and "<svg" in text
    # This checkpoint predates calibrations and holds no run config: no tiers predicted, split unknown, says so.
    assert "predicted_tier" not in frame.columns and "no score-to-tier calibration" in printed
    assert "MAY INCLUDE training drawings" in text and "id='confusion'" not in text
    assert "broken.jpg" in text and "cross-tier pairs" in text
    assert "src=\"http" not in text and "<link" not in text  # self-contained


def test_html_without_metadata_is_ordered_by_score(scored_folder, tmp_path):
    d, _, ckpt, _ = scored_folder
    page = tmp_path / "r.html"
    assert score.main(["--checkpoint", ckpt, str(d), "--output", str(tmp_path / "s.csv"), "--html", str(page),
                       "--device", "cpu", "--no-progress"]) == 0
    frame = pd.read_csv(tmp_path / "s.csv")
    frame = frame[frame["error"].isna()]
    text = page.read_text()
    positions = [text.index(f'data-path="{p}"') for p in frame["path"]]
    assert positions == sorted(positions) and "Tier" not in text


def test_compare(scored_folder, capsys):
    d, _, ckpt, _ = scored_folder
    a, b = str(d / "img_0.png"), str(d / "img_7.png")
    assert score.main(["--checkpoint", ckpt, "--compare", a, b, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    sa = float(re.search(r"^first\s+\S+\s+score (\S+)", out, re.M).group(1))
    sb = float(re.search(r"^second\s+\S+\s+score (\S+)", out, re.M).group(1))
    winner, loser = (a, b) if sa > sb else (b, a)
    assert f"better: {winner} scores {abs(sa - sb):.4f} higher than {loser}" in out
    assert not re.search(r"^[AB] ", out, re.M)  # files are named, never "A"/"B" (which read as tiers)
    assert "no probability: the checkpoint holds no calibration" in out


def test_compare_with_broken_file(scored_folder, capsys):
    d, _, ckpt, _ = scored_folder
    assert score.main(["--checkpoint", ckpt, "--compare", str(d / "img_0.png"), str(d / "broken.jpg"),
                       "--device", "cpu"]) == 1
    assert "broken.jpg" in capsys.readouterr().err


def test_random_init_is_announced_everywhere(scored_folder, tmp_path, capsys):
    d, _, ckpt, _ = scored_folder
    page = tmp_path / "r.html"
    assert score.main(["--checkpoint", ckpt, str(d / "img_0.png"), str(d / "img_1.png"), "--random-init",
                       "--output", str(tmp_path / "s.csv"), "--html", str(page), "--device", "cpu",
                       "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "NOTE: substituted RANDOM weights" in out and "random backbone weights" in out
    assert set(pd.read_csv(tmp_path / "s.csv")["weights"]) == {"random"}
    assert "RANDOM" in page.read_text()


def test_refusals_and_errors(scored_folder, tmp_path, capsys):
    d, _, ckpt, _ = scored_folder
    assert score.main(["--checkpoint", ckpt, str(d), "--image-size", "112", "--device", "cpu"]) == 2
    assert "image_size" in capsys.readouterr().err
    assert score.main(["--checkpoint", str(tmp_path / "none.pt"), str(d)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert score.main(["--checkpoint", ckpt, str(empty), "--device", "cpu", "--output", str(tmp_path / "x.csv")]) == 1
    assert "no image files found" in capsys.readouterr().err
    bad_meta = tmp_path / "bad.csv"
    pd.DataFrame({"filename": ["img_0.png"], "tier": ["Z"]}).to_csv(bad_meta, index=False)
    assert score.main(["--checkpoint", ckpt, str(d), "--metadata", str(bad_meta), "--device", "cpu",
                       "--output", str(tmp_path / "y.csv"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "Invalid tier value in 1 of 1 row(s), column 'tier': line 2: 'Z'" in err
    with pytest.raises(SystemExit):
        score.main(["--checkpoint", ckpt])  # nothing to score


def test_only_broken_files_fails(scored_folder, tmp_path, capsys):
    d, _, ckpt, _ = scored_folder
    assert score.main(["--checkpoint", ckpt, str(d / "broken.jpg"), "--device", "cpu",
                       "--output", str(tmp_path / "s.csv"), "--no-progress"]) == 1
    assert "scored 0 of 1" in capsys.readouterr().out


def test_tier_agreement_counts_pairs():
    # S above both A's: 2 wins; A(1.0) vs C(1.0) tie, A(0.0) below C: 0.5 + 0 ; S vs C: 1
    agreement, pairs = tier_agreement([2.0, 1.0, 0.0, 1.0], ["S", "A", "A", "C"])
    assert pairs == 2 + 1 + 2
    assert agreement == pytest.approx((2 + 1 + 0.5) / 5)


def test_render_html_escapes_names():
    entries = [{"path": "/x/<b>evil</b>.png", "score": 1.0, "rank": 1}]
    page = render_html(entries, {"/x/<b>evil</b>.png": None})
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt;.png" in page and "thumbnail unavailable" in page


def test_script_help_runs():
    with pytest.raises(SystemExit) as exc:
        score.main(["--help"])
    assert exc.value.code == 0


def test_group_column_gives_the_agreement_an_interval_over_groups(scored_folder, tmp_path, capsys):
    d, meta, ckpt, _ = scored_folder
    grouped = tmp_path / "grouped.csv"
    meta.assign(student=[f"s{i // 2}" for i in range(len(meta))]).to_csv(grouped, index=False)
    args = ["--checkpoint", ckpt, str(d), "--output", str(tmp_path / "s.csv"), "--metadata", str(grouped),
            "--device", "cpu", "--no-progress", "--bootstrap", "200"]
    assert score.main(args + ["--group-column", "student"]) == 0
    out = capsys.readouterr().out
    assert f"(bootstrap over the {len(meta) // 2} student groups, 200 resamples)" in out
    assert score.main(args) == 0
    assert f"(bootstrap over the {len(meta)} drawings, 200 resamples)" in capsys.readouterr().out
    assert score.main(args + ["--group-column", "class"]) == 2
    assert "no column 'class' (--group-column)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        score.main(["--checkpoint", ckpt, str(d), "--group-column", "student"])
    assert "--group-column names a column of --metadata" in capsys.readouterr().err


def test_find_images(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    make_image(tmp_path / "a" / "2.png")
    make_image(tmp_path / "a" / "sub" / "1.JPG", fmt="JPEG")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / ".hidden.png").write_text("x")
    single = make_image(tmp_path / "one.png")
    images, missing = score.find_images([tmp_path / "a", single, tmp_path / "a" / "2.png", tmp_path / "nope"])
    assert images == [str(tmp_path / "a" / "2.png"), str(tmp_path / "a" / "sub" / "1.JPG"), single]
    assert missing == [str(tmp_path / "nope")]
