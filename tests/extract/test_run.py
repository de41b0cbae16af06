"""Stage one: extraction into the feature cache — parity, resume, idempotence, bad input, fingerprints."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import ImageOps

from _extract_helpers import (SIZE, one_torch_thread,  # noqa: F401  (autouse fixture)
                               config, extract, make_images, noise_image, reference_features, script_main, touch_later,
                              write_bad_files, write_metadata, write_mode_images)
from mirip.common.metadata_csv import MetadataError
from mirip.common.paths import PathEscapeError, normalize_relpath
from mirip.extract.config import ExtractConfig
from mirip.extract.reader import list_images
from mirip.extract.run import default_output, extract_features
from mirip.store.cache import open_cache
from mirip.store.cache_errors import CacheError
from mirip.store.fingerprint import FingerprintMismatch

ATOL = 1e-5


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    names = make_images(d, 6)
    return d, names


def test_cached_features_equal_the_extractor_on_the_same_files(images, tiny_backbone, tmp_path):
    d, names = images
    out = tmp_path / "f.h5"
    summary = extract(d, out, tiny_backbone, batch_size=4)
    assert (summary.extracted, summary.skipped_cached, summary.failed, summary.rows) == (6, 0, {}, 6)
    with open_cache(str(out)) as cache:
        assert cache.paths == names
        feats = cache.features()
        assert feats.dtype == np.float32 and feats.shape == (6, 32)
    np.testing.assert_allclose(feats, reference_features(tiny_backbone, [d / n for n in names]), atol=ATOL)


def test_rerun_extracts_nothing_and_new_images_only_are_added(images, tiny_backbone, tmp_path):
    d, names = images
    out = tmp_path / "f.h5"
    extract(d, out, tiny_backbone)
    with open_cache(str(out)) as cache:
        before = cache.features()
    again = extract(d, out, tiny_backbone)
    assert (again.extracted, again.skipped_cached, again.rows) == (0, 6, 6)
    added = make_images(d, 3, start=6)
    third = extract(d, out, tiny_backbone)
    assert (third.extracted, third.skipped_cached, third.rows) == (3, 6, 9)
    with open_cache(str(out)) as cache:
        assert cache.paths == names + added
        np.testing.assert_array_equal(cache.features()[:6], before)
        np.testing.assert_allclose(cache.features()[6:], reference_features(tiny_backbone, [d / n for n in added]),
                                   atol=ATOL)


def test_changed_file_is_re_extracted_into_its_own_row(images, tiny_backbone, tmp_path):
    d, names = images
    out = tmp_path / "f.h5"
    extract(d, out, tiny_backbone)
    noise_image((50, 50), seed=1234).save(d / names[2])
    touch_later(d / names[2])
    summary = extract(d, out, tiny_backbone)
    assert (summary.extracted, summary.replaced, summary.skipped_cached, summary.rows) == (1, 1, 5, 6)
    with open_cache(str(out)) as cache:
        assert cache.paths == names
        row = cache.index[names[2]]
        np.testing.assert_allclose(cache.features([row]), reference_features(tiny_backbone, [d / names[2]]), atol=ATOL)
        size, mtime = cache.source_facts()
        assert size[row] == os.path.getsize(d / names[2]) and mtime[row] == os.stat(d / names[2]).st_mtime_ns


def test_every_bad_file_kind_is_recorded_and_unusual_modes_extract(images, tiny_backbone, tmp_path, capsys):
    d, names = images
    expected = write_bad_files(d)
    modes = write_mode_images(d)
    listed = names + modes + sorted(expected)
    meta = write_metadata(tmp_path / "meta.csv", listed)
    out = tmp_path / "f.h5"
    main = script_main()

    argv = ["--metadata", meta, "--image-dir", str(d), "--output", str(out), "--backbone", tiny_backbone,
            "--image-size", str(SIZE), "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"failed:               {len(expected)}" in text
    with open_cache(str(out)) as cache:
        failures = cache.failures()
        assert cache.paths == names + modes
        np.testing.assert_allclose(cache.features(), reference_features(tiny_backbone, [d / n for n in names + modes]),
                                   atol=ATOL)
    assert sorted(failures) == sorted(expected)
    for name, words in expected.items():
        assert words in failures[name].lower(), (name, failures[name])
        assert f"{name}: {failures[name]}" in text
    # --strict: same data, non-zero exit; the failures are listed again as known.
    assert main(argv + ["--strict"]) == 1
    assert "failed before, skipped: 6" in capsys.readouterr().out


def test_failures_are_skipped_retried_on_request_and_when_the_file_changes(images, tiny_backbone, tmp_path):
    d, names = images
    (d / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "f.h5"
    first = extract(d, out, tiny_backbone)
    assert list(first.failed) == ["broken.png"]
    second = extract(d, out, tiny_backbone)
    assert (second.extracted, second.failed, list(second.known_failed)) == (0, {}, ["broken.png"])
    third = extract(d, out, tiny_backbone, retry_failed=True)
    assert (third.extracted, list(third.failed)) == (0, ["broken.png"])
    noise_image(seed=5).save(d / "broken.png")  # repaired: its size/mtime change, so it is tried again
    touch_later(d / "broken.png")
    fourth = extract(d, out, tiny_backbone)
    assert (fourth.extracted, fourth.failed, fourth.known_failed, fourth.rows) == (1, {}, {}, 7)
    with open_cache(str(out)) as cache:
        assert cache.failures() == {}


def test_overwrite_starts_over(images, tiny_backbone, tmp_path):
    d, _ = images
    out = tmp_path / "f.h5"
    extract(d, out, tiny_backbone)
    summary = extract(d, out, tiny_backbone, overwrite=True)
    assert (summary.extracted, summary.skipped_cached, summary.rows) == (6, 0, 6)


@pytest.mark.parametrize("change, field", [
    (dict(image_size=42), "image_size"),
    (dict(pooling="mean"), "pooling"),
    (dict(resize_mode="stretch"), "resize_mode"),
    (dict(feature_dtype="float16"), "feature_dtype"),
    (dict(random_init=True), "pretrained"),
])
def test_appending_with_another_fingerprint_is_refused_naming_the_field(images, tiny_backbone, tmp_path, change, field):
    d, _ = images
    out = tmp_path / "f.h5"
    extract(d, out, tiny_backbone)
    with pytest.raises(CacheError, match=field):
        extract(d, out, tiny_backbone, **change)
    with open_cache(str(out)) as cache:
        assert cache.num_rows == 6


def test_software_versions_count_when_appending(images, tiny_backbone, tmp_path):
    d, _ = images
    out = tmp_path / "f.h5"
    extract(d, out, tiny_backbone)
    with h5py.File(out, "a") as h5:
        h5.attrs["torch_version"] = "1.0.0"
    with pytest.raises(CacheError, match="torch_version"):
        extract(d, out, tiny_backbone)


@pytest.mark.parametrize("rows, message", [
    ("other\nimg_000.png\n", "no 'filename' column"),
    ("", "is empty"),
    ("filename,tier\n", "no rows"),
    ("filename,tier\nimg_000.png,S\n,A\n", "meta.csv, line 3, column 'filename'"),
])
def test_bad_metadata_fails_before_the_backbone_loads(images, tmp_path, rows, message):
    d, _ = images
    meta = tmp_path / "meta.csv"
    meta.write_text(rows)
    cfg = ExtractConfig(image_dir=str(d), metadata=str(meta), backbone=str(tmp_path / "no-such-backbone"),
                        output=str(tmp_path / "f.h5"), progress=False)
    with pytest.raises(MetadataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        extract_features(cfg)
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.png", "sub/../../outside.png", ".."])
def test_paths_escaping_the_image_dir_are_refused(images, tmp_path, bad):
    d, names = images
    meta = write_metadata(tmp_path / "meta.csv", names[:2] + [bad])
    with pytest.raises(PathEscapeError, match=r"meta.csv, line 4, column"):
        list_images(d, meta)


def test_relative_paths_are_normalised_to_posix():
    assert normalize_relpath("./a//b/../c.png") == "a/c.png"


def test_image_dir_alone_is_walked_recursively(tmp_path, tiny_backbone):
    d = tmp_path / "images"
    make_images(d / "sub" / "deeper", 2)
    make_images(d, 1, start=5, ext="jpg")
    (d / "readme.txt").write_text("not an image")
    make_images(d / ".hidden", 1)
    assert list_images(d) == ["img_005.jpg", "sub/deeper/img_000.png", "sub/deeper/img_001.png"]
    summary = extract(d, tmp_path / "f.h5", tiny_backbone)
    assert summary.extracted == 3


def test_float16_features_and_default_output_name(images, tiny_backbone, tmp_path):
    d, names = images
    summary = extract(d, None, tiny_backbone, feature_dtype="float16", cache_dir=str(tmp_path / "cache"))
    assert os.path.dirname(summary.output) == str(tmp_path / "cache")
    assert os.path.basename(summary.output).startswith(f"{os.path.basename(tiny_backbone)}-{SIZE}px-cls-")
    with open_cache(summary.output) as cache:
        assert cache.dtype == np.float16 and cache.fingerprint["feature_dtype"] == "float16"
        assert summary.output == default_output(cache.fingerprint, str(tmp_path / "cache"))
        ref = reference_features(tiny_backbone, [d / n for n in names])
        np.testing.assert_allclose(cache.features().astype(np.float32), ref, atol=2e-3, rtol=1e-3)
    assert os.path.isfile(summary.output + ".json")


def test_augmented_views_are_cached_and_deterministic(images, tiny_backbone, tmp_path):
    d, names = images
    out = tmp_path / "f.h5"
    extract(d, out, tiny_backbone, views=3)
    with open_cache(str(out)) as cache:
        views = cache.views()
        assert views.shape == (6, 3, 32) and cache.fingerprint["views"] == 3
        np.testing.assert_allclose(cache.features(), reference_features(tiny_backbone, [d / n for n in names]), atol=ATOL)
    mirrored = tmp_path / "mirrored.png"
    from mirip.ml.preprocessing import load_image

    ImageOps.mirror(load_image(d / names[0])).save(mirrored)
    np.testing.assert_allclose(views[0, 0], reference_features(tiny_backbone, [mirrored])[0], atol=ATOL)
    assert not np.allclose(views[0, 1], views[0, 2])
    extract(d, tmp_path / "g.h5", tiny_backbone, views=3, batch_size=2)
    with open_cache(str(tmp_path / "g.h5")) as again:
        np.testing.assert_allclose(again.views(), views, atol=ATOL)


def test_worker_processes_give_the_same_cache(images, tiny_backbone, tmp_path):
    d, _ = images
    extract(d, tmp_path / "a.h5", tiny_backbone, num_workers=0)
    extract(d, tmp_path / "b.h5", tiny_backbone, num_workers=2, batch_size=3)
    with open_cache(str(tmp_path / "a.h5")) as a, open_cache(str(tmp_path / "b.h5")) as b:
        assert a.paths == b.paths
        np.testing.assert_allclose(a.features(), b.features(), atol=ATOL)


def test_extract_config_is_saved_beside_the_cache(images, tiny_backbone, tmp_path):
    import json

    d, _ = images
    out = tmp_path / "f.h5"
    extract(d, out, tiny_backbone, batch_size=5)
    saved = json.loads((tmp_path / "f.h5.json").read_text())
    assert saved["config"]["batch_size"] == 5 and saved["fingerprint"]["image_size"] == SIZE
    assert ExtractConfig(**saved["config"]) == config(d, out, tiny_backbone, batch_size=5)


def test_script_reports_bad_metadata_with_exit_status_2(images, tmp_path, capsys):
    main = script_main()

    d, _ = images
    meta = tmp_path / "m.csv"
    meta.write_text("name\nx.png\n")
    assert main(["--metadata", str(meta), "--image-dir", str(d), "--random-init"]) == 2
    assert "no 'filename' column" in capsys.readouterr().err


def test_moving_the_image_dir_keeps_the_cache_valid(images, tiny_backbone, tmp_path):
    d, _ = images
    out = tmp_path / "f.h5"
    extract(d, out, tiny_backbone)
    moved = tmp_path / "moved"
    shutil.copytree(d, moved, copy_function=shutil.copy2)  # copy2 keeps mtimes
    assert extract(moved, out, tiny_backbone).skipped_cached == 6


def test_fingerprint_mismatch_error_type_is_kept(images, tiny_backbone, tmp_path):
    d, _ = images
    out = tmp_path / "f.h5"
    extract(d, out, tiny_backbone)
    with open_cache(str(out)) as cache:
        with pytest.raises(FingerprintMismatch, match="image_size"):
            cache.check_fingerprint({**cache.fingerprint, "image_size": 1})


def test_uint8_pixels_normalised_on_the_device_equal_the_shared_preprocessing(images, tmp_path):
    from mirip.extract.mapper import Normalizer
    from mirip.extract.reader import ImageFileDataset
    from mirip.ml.preprocessing import Preprocessor

    d, names = images
    pre = Preprocessor(image_size=SIZE)
    items = [(n, 0, 0) for n in names]
    floats = ImageFileDataset(str(d), items, pre, views=1)[2].pixels
    small = ImageFileDataset(str(d), items, pre, views=1, uint8=True)[2].pixels
    assert small.dtype == torch.uint8 and small.shape == floats.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(Normalizer(pre.mean, pre.std, "cpu")(small), floats, atol=1e-6, rtol=0)
    torch.testing.assert_close(floats[0], pre(d / names[2]))


def test_a_failing_writer_stops_the_run_with_the_error(images, tiny_backbone, tmp_path, monkeypatch):
    from mirip.extract import writer

    d, _ = images

    def broken(self, job):
        raise OSError("disk full")

    monkeypatch.setattr(writer.CacheWriter, "write", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        extract(d, tmp_path / "f.h5", tiny_backbone, batch_size=1)
