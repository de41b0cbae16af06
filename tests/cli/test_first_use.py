"""Issue 12 items 10, 13, 14: CSV encodings, Ctrl-C, file modes, empty output dirs, flags, --help, messages."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import stat
from pathlib import Path

import pandas as pd
import pytest

from _extract_helpers import make_images
from _stage2_helpers import fake_fingerprint, single_thread, write_dataset
from mirip.common.atomic import output_directory, write_atomic
from mirip.common.metadata_csv import EncodingNotice, MetadataError, read_metadata_csv
from mirip.training.run_data import read_metadata

_one_thread = pytest.fixture(autouse=True)(single_thread)
ROOT = Path(__file__).resolve().parents[2]
KOREAN = pd.DataFrame({"filename": ["소묘_001.png", "수채화_002.png"], "tier": ["S", "A"], "학생": ["김", "이"]})


def _script(name):
    module = importlib.import_module(f"mirip.cli.{name}")
    return module


# --- item 10: CSV encodings --------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_utf8_with_or_without_bom(tmp_path, encoding, recwarn):
    path = tmp_path / "m.csv"
    KOREAN.to_csv(path, index=False, encoding=encoding)
    frame = read_metadata_csv(path)
    assert list(frame.columns) == ["filename", "tier", "학생"] and frame["filename"].tolist() == KOREAN["filename"].tolist()
    assert not [w for w in recwarn if issubclass(w.category, EncodingNotice)]


def test_cp949_excel_export_is_read_with_a_notice(tmp_path):
    path = tmp_path / "excel.csv"
    KOREAN.to_csv(path, index=False, encoding="cp949")
    with pytest.warns(EncodingNotice, match=r"excel.csv is not UTF-8; read it as CP949.*--encoding"):
        meta = read_metadata(str(path))
    assert meta["filename"].tolist() == KOREAN["filename"].tolist()
    # --encoding names it outright: no guessing, no notice.
    assert read_metadata_csv(path, "cp949")["학생"].tolist() == ["김", "이"]


def test_encoding_errors_name_the_file(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"filename,tier\n\xff\xfe\xfa.png,S\n")  # neither UTF-8 nor CP949
    with pytest.raises(MetadataError, match=r"latin.csv is neither UTF-8 nor CP949.*--encoding"):
        read_metadata_csv(path)
    with pytest.raises(MetadataError, match=r"latin.csv is not valid utf-8"):
        read_metadata_csv(path, "utf-8")
    with pytest.raises(MetadataError, match=r"unknown encoding 'klingon' for .*latin.csv"):
        read_metadata_csv(path, "klingon")
    assert read_metadata_csv(path, "latin-1")["tier"].tolist() == ["S"]


def test_empty_csv_error_names_the_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(MetadataError, match=r"metadata file .*empty.csv is empty"):
        read_metadata(str(tmp_path / "empty.csv"))


def test_every_metadata_script_has_encoding_and_uses_it(tmp_path, capsys):
    for name in ("extract", "train", "sweep", "evaluate", "score"):
        module = _script(name)
        parser = module.build_parser() if name != "benchmark" else None
        assert any("--encoding" in a.option_strings for a in parser._actions), name
    cache, meta = write_dataset(str(tmp_path), per_tier=10, dim=4)
    frame = pd.read_csv(meta)
    frame["note"] = "한글"
    frame.to_csv(meta, index=False, encoding="cp949")
    train = _script("train")
    args = ["--features", cache, "--metadata", meta, "--output-dir", str(tmp_path / "run"), "--max-epochs", "1",
            "--pairs-per-epoch", "20", "--eval-pairs", "20", "--hidden-dim", "4", "--projector-dim", "4",
            "--device", "cpu", "--no-progress"]
    assert train.main(args + ["--encoding", "utf-8"]) == 2
    assert "is not valid utf-8" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert train.main(args + ["--encoding", "cp949"]) == 0


# --- item 14: extract checks the tier column -----------------------------------------------------------------
def test_extract_checks_the_tier_column(tmp_path, capsys):
    extract = _script("extract")
    make_images(tmp_path / "img", 2)
    meta = tmp_path / "m.csv"
    pd.DataFrame({"filename": ["img_000.png", "img_001.png"], "teir": ["S", "A"]}).to_csv(meta, index=False)
    base = ["--metadata", str(meta), "--image-dir", str(tmp_path / "img"), "--backbone", str(tmp_path / "none"),
            "--output", str(tmp_path / "f.h5"), "--no-progress"]
    assert extract.main(base) == 2
    err = capsys.readouterr().err
    assert "no tier column 'tier' (columns: filename, teir)" in err and "m.csv" in err
    pd.DataFrame({"filename": ["img_000.png", "img_001.png"], "tier": ["S", "Z"]}).to_csv(meta, index=False)
    assert extract.main(base) == 2
    assert "Invalid tier value in 1 of 2 row(s), column 'tier': line 3: 'Z'" in capsys.readouterr().err
    assert not (tmp_path / "f.h5").exists()


# --- item 13: Ctrl-C in extract.py --------------------------------------------------------------------------
def test_ctrl_c_in_extract_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    extract = _script("extract")

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "extract_features", interrupted)
    make_images(tmp_path / "img", 1)
    try:
        rc = extract.main(["--image-dir", str(tmp_path / "img"), "--no-progress"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped extract.main (a traceback for the user)")
    assert rc == 130
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "run the same command again" in lines[0] and "Traceback" not in captured.err


# --- item 14: file modes, empty output directories, flags, --help, random weights -----------------------------
def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        reference = tmp_path / "plain.txt"
        reference.write_text("x")  # what open() gives under the same umask
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == stat.S_IMODE(os.stat(reference).st_mode) == 0o644
        os.umask(0o077)
        write_atomic(tmp_path / "b.json", "{}")
        assert stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o600
    finally:
        os.umask(old)


def test_train_outputs_are_0644_under_umask_022(tmp_path):
    cache, meta = write_dataset(str(tmp_path), per_tier=10, dim=4)
    old = os.umask(0o022)
    try:
        assert _script("train").main(["--features", cache, "--metadata", meta, "--output-dir", str(tmp_path / "run"),
                                      "--max-epochs", "1", "--pairs-per-epoch", "20", "--eval-pairs", "20",
                                      "--hidden-dim", "4", "--projector-dim", "4", "--device", "cpu",
                                      "--no-progress"]) == 0
    finally:
        os.umask(old)
    for name in ("best.pt", "last.pt", "config.json", "test_metrics.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "run" / name).st_mode) == 0o644, name


@pytest.mark.parametrize("script", ["train", "sweep"])
def test_a_failed_run_leaves_no_empty_output_directory(tmp_path, capsys, script):
    cache, _ = write_dataset(str(tmp_path), per_tier=10, dim=4)
    out = tmp_path / "runs" / "new"
    argv = ["--features", cache, "--metadata", str(tmp_path / "missing.csv"), "--output-dir", str(out),
            "--device", "cpu", "--no-progress"]
    assert _script(script).main(argv) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_output_directory_keeps_what_existed_or_holds_files(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with output_directory(tmp_path / "kept"):
            raise RuntimeError
    assert (tmp_path / "kept").is_dir()
    with pytest.raises(RuntimeError):
        with output_directory(tmp_path / "new") as d:
            Path(d, "partial.json").write_text("{}")
            raise RuntimeError
    assert (tmp_path / "new" / "partial.json").is_file()


def test_messages_name_flags_with_dashes(tmp_path, capsys):
    cache, meta = write_dataset(str(tmp_path), per_tier=10, dim=4)
    train = _script("train")
    args = ["--features", cache, "--metadata", meta, "--output-dir", str(tmp_path / "run"), "--max-epochs", "1",
            "--pairs-per-epoch", "20", "--eval-pairs", "20", "--hidden-dim", "4", "--projector-dim", "4",
            "--device", "cpu", "--no-progress"]
    assert train.main(args) == 0
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert not re.search(r"(?<!-)\b(resume|overwrite) to\b", err)


@pytest.mark.parametrize("name", ["extract", "train", "sweep", "evaluate", "score", "benchmark", "demo"])
def test_help_shows_each_default_once(name):
    module = _script(name)
    parser = module.build_parser(module.load_benchmarks()[0]) if name == "benchmark" else module.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help or action.help == argparse.SUPPRESS:
            continue
        text = formatter._expand_help(action)
        assert text.lower().count("default:") <= 1, (name, action.option_strings, text)
        assert "(default: None)" not in text, (name, action.option_strings)
        if isinstance(action, argparse._StoreTrueAction):
            assert "(default: False)" not in text, (name, action.option_strings)


@pytest.mark.parametrize("pretrained", [False, True])
def test_evaluate_says_when_backbone_weights_are_random(tmp_path, capsys, pretrained):
    cache, meta = write_dataset(str(tmp_path), per_tier=10, dim=4,
                                fingerprint=fake_fingerprint(4, pretrained=pretrained))
    assert _script("train").main(["--features", cache, "--metadata", meta, "--output-dir", str(tmp_path / "run"),
                                  "--max-epochs", "1", "--pairs-per-epoch", "20", "--eval-pairs", "20",
                                  "--hidden-dim", "4", "--projector-dim", "4", "--device", "cpu",
                                  "--no-progress"]) == 0
    capsys.readouterr()
    assert _script("evaluate").main(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--features", cache,
                                     "--metadata", meta]) == 0
    assert ("RANDOM (untrained)" in capsys.readouterr().out) is not pretrained
