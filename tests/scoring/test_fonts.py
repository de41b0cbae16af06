"""Heatmap legends draw file names in any script: with an installed font that has the glyphs, else in ASCII.

Glyph coverage is checked here with fontTools' character maps (not mirip's rendering test); the legend's name
line is compared with the same text drawn by plain ImageDraw at the legend's place.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mirip.scoring import fonts
from mirip.scoring.explain import Explanation
from mirip.scoring.heatmap import render_explanation

KOREAN = "한글 Aqua C.jpg"
MAX_SIDE = 64
NAME_TOP = MAX_SIDE + 36  # the legend starts 4 px under the picture; the name is its third line


def _explanation(name: str) -> Explanation:
    grid = np.arange(16, dtype=np.float32).reshape(4, 4) - 8
    return Explanation(path=os.path.join("drawings", name), score=0.5, baseline_score=0.1, map=grid,
                       content=np.ones((4, 4), bool), patch_size=14, image_size=(56, 56), content_box=(0, 0, 56, 56),
                       source_box=(0, 0, 56, 56), exact=True, methods={"mean@-1": "exact"}, unassigned=0.0,
                       quadrature_gap=0.0)


def _name_band(name: str) -> np.ndarray:
    picture = Image.new("RGB", (56, 56), (200, 200, 200))
    canvas = render_explanation(_explanation(name), picture, max_side=MAX_SIDE)
    return np.asarray(canvas)[NAME_TOP:]


def _reference_band(text: str, font, width: int) -> np.ndarray:
    canvas = Image.new("RGB", (width, MAX_SIDE + 58), (255, 255, 255))
    ImageDraw.Draw(canvas).text((0, NAME_TOP), text, fill=(80, 80, 80), font=font)
    return np.asarray(canvas)[NAME_TOP:]


def _cmap(path) -> set:
    ttlib = pytest.importorskip("fontTools.ttLib")
    if hasattr(path, "seek"):
        path.seek(0)
    collection = isinstance(path, str) and path.lower().endswith((".ttc", ".otc"))
    return set(ttlib.TTFont(path, fontNumber=0 if collection else -1, lazy=True).getBestCmap() or {})


def _installed_font_covering(text: str):
    needed = {ord(c) for c in text if not c.isspace()}
    for d in fonts.FONT_DIRS:
        for root, _, names in os.walk(os.path.expanduser(d)):
            for n in names:
                if n.lower().endswith((".ttf", ".otf", ".ttc", ".otc")) and needed <= _cmap(os.path.join(root, n)):
                    return os.path.join(root, n)
    return None


def test_korean_name_is_drawn_with_a_font_that_has_its_glyphs(monkeypatch):
    monkeypatch.delenv("MIRIP_FONT_DIRS", raising=False)
    if _installed_font_covering(KOREAN) is None:
        pytest.skip("no installed font covers Hangul here (the ASCII fallback is tested below)")
    font, drawn = fonts.font_for(KOREAN, 12)
    assert drawn == KOREAN
    assert {ord(c) for c in KOREAN if not c.isspace()} <= _cmap(font.path)
    band = _name_band(KOREAN)
    np.testing.assert_array_equal(band, _reference_band(KOREAN, font, band.shape[1]))


def test_ascii_names_keep_the_built_in_font(monkeypatch):
    monkeypatch.delenv("MIRIP_FONT_DIRS", raising=False)
    font, drawn = fonts.font_for("plain name.png", 12)
    assert drawn == "plain name.png" and font.getname() == fonts.default_font(12).getname()


def test_without_a_covering_font_names_are_ascii_and_the_warning_comes_once(monkeypatch, tmp_path):
    monkeypatch.setenv("MIRIP_FONT_DIRS", str(tmp_path))  # a machine with no fonts installed
    monkeypatch.setattr(fonts, "_said", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bands = [_name_band(KOREAN), _name_band("김민수 그림.png")]
    said = [w for w in caught if "ASCII" in str(w.message)]
    assert len(said) == 1 and "fonts-nanum" in str(said[0].message)
    plain = fonts.default_font(12)
    np.testing.assert_array_equal(bands[0], _reference_band("hangeul Aqua C.jpg", plain, bands[0].shape[1]))
    np.testing.assert_array_equal(bands[1], _reference_band("gimminsu geurim.png", plain, bands[1].shape[1]))


@pytest.mark.parametrize("text, expected", [("닭 없다", "dak eopda"), ("café.png", "cafe.png"),
                                            ("中-1.png", "\\u4e2d-1.png"), ("a_b-c d.png", "a_b-c d.png")])
def test_ascii_form_is_readable(text, expected):
    assert fonts.ascii_form(text) == expected
