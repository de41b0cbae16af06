"""A rerun of stage one whose images are all cached answers from the cache alone: no backbone is loaded, and
the summary says there was nothing to extract instead of a speed of 0.0 images/s. Any work or doubt (a changed
image, another setting, a damaged row) still loads the backbone."""

from __future__ import annotations

import h5py
import pytest

from _extract_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from _extract_helpers import extract, make_images, script_main, touch_later
from mirip.extract import run as extract_module


@pytest.fixture
def loads(monkeypatch):
    """How many times a run builds the backbone."""
    real, count = extract_module.DINOv2FeatureExtractor, []

    def counting(*args, **kwargs):
        count.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_module, "DINOv2FeatureExtractor", counting)
    return count


@pytest.fixture
def cached(tmp_path, tiny_backbone):
    d = tmp_path / "images"
    names = make_images(d, 5)
    extract(d, tmp_path / "f.h5", tiny_backbone)
    return d, names, tmp_path / "f.h5"


def test_a_rerun_with_everything_cached_loads_no_backbone(cached, tiny_backbone, loads):
    d, names, out = cached
    summary = extract(d, out, tiny_backbone)
    assert loads == []
    assert (summary.total, summary.extracted, summary.skipped_cached, summary.rows) == (5, 0, 5, 5)
    assert summary.verified == 5 and summary.output == str(out)
    text = summary.to_text()
    assert "speed:" not in text and "nothing to extract" in text and "backbone was not loaded" in text


def test_the_default_cache_name_is_found_without_the_backbone(tmp_path, tiny_backbone, loads):
    d = tmp_path / "images"
    make_images(d, 3)
    first = extract(d, None, tiny_backbone, cache_dir=str(tmp_path / "cache"))
    assert len(loads) == 1
    again = extract(d, None, tiny_backbone, cache_dir=str(tmp_path / "cache"))
    assert len(loads) == 1 and again.output == first.output and again.skipped_cached == 3


def test_the_script_says_nothing_to_extract(cached, tiny_backbone, capsys, loads):
    d, _, out = cached
    rc = script_main()(["--image-dir", str(d), "--output", str(out), "--backbone", tiny_backbone, "--image-size",
                        "28", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--no-progress"])
    assert rc == 0 and loads == []
    printed = capsys.readouterr().out
    assert "speed: 0.0" not in printed and "nothing to extract" in printed


@pytest.mark.parametrize("change", ["touched", "new image", "damaged row", "other size", "retry failed"])
def test_any_work_or_doubt_still_loads_the_backbone(cached, tiny_backbone, loads, change):
    d, names, out = cached
    kwargs = {}
    if change == "touched":
        touch_later(d / names[1])
    elif change == "new image":
        make_images(d, 1, start=5)
    elif change == "damaged row":
        with h5py.File(out, "a") as h5:
            h5["features"][2, 0] += 1.0  # its checksum no longer matches
    elif change == "other size":
        kwargs["image_size"] = 42  # refused below as today: the cache was made at 28 px
    else:
        (d / "broken.png").write_bytes(b"not a png")
        extract(d, out, tiny_backbone)  # records the failure (and loads the backbone: a new image)
        loads.clear()
        kwargs["retry_failed"] = True
    if change == "other size":
        with pytest.raises(ValueError, match="image_size"):
            extract(d, out, tiny_backbone, **kwargs)
        assert len(loads) == 1
        return
    summary = extract(d, out, tiny_backbone, **kwargs)
    assert len(loads) == 1, change
    assert summary.backbone_loaded and "speed:" in summary.to_text()
