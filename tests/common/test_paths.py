"""Issue 12 item 5: one path normalisation for extract and train, and one rule for symbolic links."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from _extract_helpers import config, make_images
from _stage2_helpers import fake_fingerprint, single_thread
from mirip.common.paths import PathEscapeError, normalize_relpath
from mirip.extract.reader import list_images
from mirip.extract.run import extract_features
from mirip.store.cache import write_cache
from mirip.training.config import TrainingConfig
from mirip.training.run_config import RunConfig
from mirip.training.run_data import load_run_data, read_metadata

_one_thread = pytest.fixture(autouse=True)(single_thread)


def test_train_finds_features_of_dot_slash_paths(tmp_path):
    names = [f"img_{i}.png" for i in range(8)]
    tiers = ["S", "A", "B", "C"] * 2
    import numpy as np

    feats = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    write_cache(str(tmp_path / "f.h5"), fake_fingerprint(4), names, feats)  # keys as extraction writes them
    listed = [f"./{n}" if i % 2 else f"sub/../{n}" for i, n in enumerate(names)]
    pd.DataFrame({"filename": listed, "tier": tiers}).to_csv(tmp_path / "m.csv", index=False)
    cfg = RunConfig(features=str(tmp_path / "f.h5"), metadata=str(tmp_path / "m.csv"), output_dir=str(tmp_path / "o"),
                    training=TrainingConfig(device="cpu"))
    data = load_run_data(cfg)
    assert data.names == names
    assert np.allclose(data.features.numpy(), feats)


def test_train_and_extract_use_the_same_normalisation(tmp_path):
    pd.DataFrame({"filename": ["./a.png", "b//c.png", "./a.png"], "tier": ["S", "A", "B"]}).to_csv(
        tmp_path / "m.csv", index=False)
    # "./a.png" twice is one image named twice, whichever way it is spelled.
    with pytest.raises(ValueError, match="more than once"):
        read_metadata(str(tmp_path / "m.csv"))
    assert [normalize_relpath(p) for p in ("./a.png", "b//c.png")] == ["a.png", "b/c.png"]


def test_escaping_paths_are_refused_by_train_too(tmp_path):
    pd.DataFrame({"filename": ["a.png", "../b.png"], "tier": ["S", "A"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(PathEscapeError, match=r"escapes the image directory.*line 3"):
        read_metadata(str(tmp_path / "m.csv"))


@pytest.fixture
def linked_dir(tmp_path):
    """images/ with real files, a link to a file outside, a link to a directory outside, a link inside."""
    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    make_images(root, 2)
    make_images(outside, 2, start=10)
    make_images(root / "sub", 1, start=20)
    os.symlink(outside / "img_010.png", root / "out_file.png")
    os.symlink(outside, root / "out_dir")
    os.symlink(root / "img_000.png", root / "alias.png")  # stays inside: followed
    os.symlink(root / "sub", root / "sub_alias")  # a directory inside: its images are listed under sub/
    return root


def test_walk_skips_links_leaving_the_image_dir_and_reports_them(linked_dir):
    skipped = {}
    found = list_images(linked_dir, skipped=skipped)
    assert found == ["alias.png", "img_000.png", "img_001.png", "sub/img_020.png"]
    assert set(skipped) == {"out_file.png", "out_dir", "sub_alias"}
    assert "outside the image directory" in skipped["out_file.png"]
    assert "--allow-outside-links" in skipped["out_dir"]
    allowed = list_images(linked_dir, allow_outside_links=True)
    assert "out_file.png" in allowed and "out_dir/img_010.png" in allowed and "out_dir/img_011.png" in allowed


def test_metadata_naming_a_link_outside_is_refused_like_dotdot(linked_dir, tmp_path):
    meta = tmp_path / "m.csv"
    pd.DataFrame({"filename": ["img_000.png", "out_file.png", "out_dir/img_011.png", "alias.png"]}).to_csv(
        meta, index=False)
    with pytest.raises(PathEscapeError) as info:
        list_images(linked_dir, str(meta))
    message = str(info.value)
    assert "2 image path(s) in " + str(meta) in message and "--allow-outside-links" in message
    assert "out_file.png -> " in message and "out_dir/img_011.png -> " in message and "alias.png" not in message
    assert len(list_images(linked_dir, str(meta), allow_outside_links=True)) == 4


def test_extraction_summary_lists_skipped_links(linked_dir, tiny_backbone, tmp_path):
    summary = extract_features(config(linked_dir, tmp_path / "f.h5", tiny_backbone))
    assert summary.extracted == 4 and set(summary.skipped_links) == {"out_file.png", "out_dir", "sub_alias"}
    text = summary.to_text()
    assert "symbolic links skipped: 3" in text and "out_file.png" in text
