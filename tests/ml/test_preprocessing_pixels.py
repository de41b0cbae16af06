"""Tone and colour reach the backbone as drawn: bit depth, ICC profiles, large scans (issue 12, items 6-8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _icc_helpers import adobe_rgb_profile, adobe_to_srgb_reference
from mirip.ml.preprocessing import ImageReadError, Preprocessor, load_image
from mirip.store.fingerprint import FingerprintMismatch, check_fingerprint


def _faint_pencil() -> np.ndarray:
    # A faint drawing: 8-bit values 180..210 only. Stretching it to 0..255 would invent contrast.
    return (180 + (np.arange(48 * 40) % 31)).reshape(40, 48).astype(np.uint8)


@pytest.mark.parametrize("kind", ["I;16 png", "I;16 tiff", "I (32-bit int)", "F (float 0..1)"])
def test_deep_greyscale_matches_its_8bit_twin(tmp_path, kind):
    eight = _faint_pencil()
    Image.fromarray(eight, "L").save(tmp_path / "twin.png")
    if kind.startswith("I;16"):
        deep = Image.fromarray(eight.astype(np.uint16) * 257)
        path = tmp_path / ("deep.png" if "png" in kind else "deep.tiff")
    elif kind.startswith("I "):
        deep, path = Image.fromarray(eight.astype(np.int32) * 257, "I"), tmp_path / "deep.tiff"
    else:
        deep, path = Image.fromarray(eight.astype(np.float32) / 255.0, "F"), tmp_path / "deep.tiff"
    deep.save(path)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(tmp_path / "twin.png")))
    pre = Preprocessor(image_size=28)
    assert torch.equal(pre(path), pre(tmp_path / "twin.png"))


def test_sixteen_bit_is_not_stretched(tmp_path):
    arr = np.full((8, 8), 1000, dtype=np.uint16)  # very dark grey: 1000 / 257 = 3.9 -> 4
    arr[0, 0] = 2000
    Image.fromarray(arr).save(tmp_path / "dark.png")
    out = np.asarray(load_image(tmp_path / "dark.png"))
    assert out.max() == 8 and out.min() == 4  # not 255 and 0


_PIXELS = np.array([[[200, 60, 40], [30, 150, 90], [128, 128, 128], [250, 240, 20]]], dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_embedded_icc_profile_is_converted_to_srgb(tmp_path, mode):
    img = Image.fromarray(_PIXELS).convert(mode)
    img.save(tmp_path / "adobe.png", icc_profile=adobe_rgb_profile())
    out = np.asarray(load_image(tmp_path / "adobe.png")).astype(int)
    expected = adobe_to_srgb_reference(_PIXELS)
    assert np.abs(out - expected).max() <= 1
    assert np.abs(out - _PIXELS.astype(int)).max() > 20  # the conversion really moved the colours
    # A PIL image handed over in memory is converted the same way.
    with Image.open(tmp_path / "adobe.png") as opened:
        assert torch.equal(Preprocessor(image_size=14, resize_mode="stretch")(opened),
                           Preprocessor(image_size=14, resize_mode="stretch")(tmp_path / "adobe.png"))


def test_color_management_none_ignores_profiles(tmp_path):
    Image.fromarray(_PIXELS).save(tmp_path / "adobe.png", icc_profile=adobe_rgb_profile())
    out = np.asarray(load_image(tmp_path / "adobe.png", icc=False))
    assert np.array_equal(out, _PIXELS)
    assert Preprocessor(color_management="none").config()["color_management"] == "none"
    with pytest.raises(ValueError, match="color management"):
        Preprocessor(color_management="lab")


_PROFILE_DIRS = ("/usr/share/color/icc", "/usr/share/ghostscript", "/usr/share/color")


def usable_cmyk_profiles(dirs=_PROFILE_DIRS) -> list:
    """ICC files under ``dirs`` that LittleCMS opens and that describe a CMYK device.

    A file named like a CMYK profile is not enough: a machine may carry one that cannot be opened (a
    truncated or non-ICC file), and the loader rightly ignores such a profile, so a test built on it would
    assert a conversion that never happens.
    """
    from PIL import ImageCms

    found = []
    for top in dirs:
        for root, _, files in os.walk(top):
            for name in sorted(files):
                if not name.lower().endswith((".icc", ".icm")):
                    continue
                path = os.path.join(root, name)
                try:
                    profile = ImageCms.ImageCmsProfile(path)
                except (ImageCms.PyCMSError, OSError, ValueError):
                    continue
                if profile.profile.xcolor_space.strip() == "CMYK":
                    found.append(path)
    return found


def test_only_openable_cmyk_profiles_are_used(tmp_path):
    # The precondition of the next test: a file that merely looks like a CMYK profile is never chosen.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "FOGRA39-cmyk.icc").write_bytes(b"not a profile")
    (tmp_path / "adobe.icc").write_bytes(adobe_rgb_profile())  # opens, but is RGB
    assert usable_cmyk_profiles([str(tmp_path)]) == []


def test_cmyk_with_profile_converts(tmp_path):
    candidates = usable_cmyk_profiles()
    if not candidates:
        pytest.skip("no CMYK ICC profile that opens on this machine (none can be built by hand: CMYK "
                    "profiles are LUT-based)")
    icc = open(candidates[0], "rb").read()
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.tif", icc_profile=icc)
    plain = np.asarray(load_image(tmp_path / "c.tif", icc=False)).astype(int)
    managed = np.asarray(load_image(tmp_path / "c.tif")).astype(int)
    assert managed.shape == plain.shape and not np.array_equal(managed, plain)


def test_fingerprint_records_color_management_and_refuses_old_caches():
    from mirip.store.fingerprint import make_fingerprint

    class Info:
        name, revision, pretrained, random_init_seed = "tiny", "", False, 0

    class Ex:
        info, output_dim, pooling, precision = Info(), 32, "cls", "fp32"
        entry_names, entry_blocks, entry_dims, num_layers = ["cls@-1"], [2], [32], 2

        def family_facts(self):
            return {"family": "dinov2", "token_layout": {"num_prefix_tokens": 1}, "cls": "token"}

    new = make_fingerprint(Ex(), Preprocessor(image_size=28))
    assert new["color_management"] == "icc-to-srgb"
    old = {k: v for k, v in new.items() if k != "color_management"}  # a cache written before the field existed
    with pytest.raises(FingerprintMismatch, match="color_management: the cache has 'none', this command asks for 'icc-to-srgb'"):
        check_fingerprint(new, old)
    check_fingerprint(old, make_fingerprint(Ex(), Preprocessor(image_size=28, color_management="none")))


# --- large scans ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "scan.jpg"
    Image.new("L", (12000, 9000), 200).save(path, quality=50)  # 108 MP: over Pillow's 89 MP warning threshold
    return path


def test_large_legitimate_scan_loads_with_draft_decoding(big_scan):
    img = load_image(big_scan, draft_size=768)
    assert img.mode == "RGB" and img.size == (1500, 1125)  # decoded at 1/8 scale, never at full size
    assert Preprocessor(image_size=28)(big_scan).shape == (3, 28, 28)


def test_limit_is_documented_and_raisable(big_scan, monkeypatch):
    import mirip.ml.preprocessing as pre

    assert pre.DEFAULT_MAX_IMAGE_PIXELS == 2 * 89_478_485  # twice Pillow's warning threshold
    with pytest.raises(ImageReadError, match="exceeds the 50000000 pixel limit.*--max-image-pixels"):
        load_image(big_scan, draft_size=768, max_pixels=50_000_000)
    # Above Pillow's own error threshold (2x its global limit), the raised mirip limit is the one that counts.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000_000)
    assert load_image(big_scan, draft_size=768, max_pixels=200_000_000).size == (1500, 1125)
    assert Image.MAX_IMAGE_PIXELS == 10_000_000  # restored


def _peak_rss_kb(path, draft: bool) -> int:
    code = ("import resource, sys; from mirip.ml.preprocessing import load_image; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"load_image(sys.argv[1], draft_size={768 if draft else None}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow  # two fresh interpreters importing torch: ~10 s
def test_draft_decoding_keeps_peak_memory_low(big_scan):
    with_draft, without = _peak_rss_kb(big_scan, True), _peak_rss_kb(big_scan, False)
    # A full decode holds 108 MB of greyscale (324 MB as RGB); the draft decode a 1/64 of it.
    assert with_draft < 40_000 and without > 100_000, (with_draft, without)
