"""Heatmaps of JPEGs show the whole drawing: explanations describe the file, not its draft-reduced decode.

A JPEG wider than twice the scorer's input is decoded at 1/2, 1/4 or 1/8 of its size (PIL's draft mode);
``image_size`` and ``source_box`` must still be the file's, and the rendered panel must be the file's pixels.
References here come from PIL's plain full-size decode and numpy slicing, not from mirip's loader.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _inference_helpers import torch_threads
from conftest import save_tiny_backbone
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.ranking_model import PairwiseRankingModel
from mirip.scoring.heatmap import render_explanation, save_explanations
from mirip.scoring.scorer import Scorer

SIZE = 56
MAX_SIDE = 384
GAP, LEGEND_H = 8, 58  # the panel layout of render_explanation: [drawing | gap | overlay], legend below


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-jpeg"))


def _scorer(backbone: str, mode: str = "pad") -> Scorer:
    ext = DINOv2FeatureExtractor(backbone, device="cpu", entries="mean@-1")
    torch.manual_seed(0)
    model = PairwiseRankingModel(backbone, projector_output_dim=8, hidden_dim=16, dropout=0.0, feature_extractor=ext)
    return Scorer(model, ext.preprocessor(SIZE, mode))


@pytest.fixture(scope="module")
def scorer(backbone):
    return _scorer(backbone)


def _halves(width: int, height: int) -> np.ndarray:
    """Left half black, right half white, a red band along the bottom tenth (so a crop of the top shows)."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, width // 2:] = 255
    arr[height - height // 10:] = (255, 0, 0)
    return arr


def _save_jpeg(path, arr: np.ndarray, orientation: int = 1) -> str:
    img = Image.fromarray(arr)
    exif = img.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif)
    return str(path)


def _draft_scale(path) -> int:
    with Image.open(path) as im:
        full = im.size
        im.draft("RGB", (SIZE, SIZE))
        return full[0] // im.size[0]


def _panel(png: Image.Image, width: int, height: int) -> np.ndarray:
    """The drawing panel of a rendered explanation whose drawing is width x height."""
    s = MAX_SIDE / max(width, height)
    w, h = max(1, round(width * s)), max(1, round(height * s))
    assert png.size == (2 * w + GAP, h + LEGEND_H)
    return np.asarray(png.convert("RGB"), dtype=np.float32)[:h, :w]


def _expected(arr: np.ndarray, size) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR), dtype=np.float32)


def _assert_shows(panel: np.ndarray, upright: np.ndarray) -> None:
    ref = _expected(upright, (panel.shape[1], panel.shape[0]))
    assert np.abs(panel - ref).mean() < 10, "the panel is not the whole drawing"
    h, w = panel.shape[:2]
    top = panel[: h * 8 // 10]
    assert top[:, : w * 4 // 10].mean() < 30 and top[:, w * 6 // 10:].mean() > 225  # black | white
    assert panel[h - h // 20:, :, 0].mean() > 200 and panel[h - h // 20:, :, 1].mean() < 60  # the red band


# (width, height) -> PIL's draft scale for a 56 px input: 1, 2, 4, 8, and a 4K painting at 8.
SIZES = {(90, 70): 1, (150, 200): 2, (300, 400): 4, (800, 1000): 8, (3840, 2160): 8}


@pytest.mark.parametrize("size", list(SIZES), ids=[f"{w}x{h}" for w, h in SIZES])
def test_jpeg_heatmap_panel_shows_the_whole_file_at_every_draft_scale(scorer, size, tmp_path):
    arr = _halves(*size)
    path = _save_jpeg(tmp_path / "drawing.jpg", arr)
    assert _draft_scale(path) == SIZES[size]  # the case really is decoded at that scale
    with torch_threads(1):
        exp, = scorer.explain([path], progress=False)
    assert exp.image_size == size and exp.source_box == (0, 0) + size
    _assert_shows(_panel(render_explanation(exp, max_side=MAX_SIDE), *size), arr)


def test_index_json_records_the_files_size(scorer, tmp_path):
    path = _save_jpeg(tmp_path / "drawing.jpg", _halves(800, 1000))
    with torch_threads(1):
        result = scorer.explain([path], progress=False)
    row, = save_explanations(result, str(tmp_path / "heat"))
    index = json.loads((tmp_path / "heat" / "index.json").read_text())
    assert index["explanations"][0]["image_size"] == [800, 1000] == row["image_size"]
    with Image.open(row["png"]) as png:
        _assert_shows(_panel(png, 800, 1000), _halves(800, 1000))


def test_exif_rotated_jpeg_reports_and_shows_the_upright_drawing(scorer, tmp_path):
    upright = _halves(800, 1000)
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # orientation 6: shown turned 90 degrees clockwise
    path = _save_jpeg(tmp_path / "turned.jpg", stored, orientation=6)
    assert _draft_scale(path) == 8
    with torch_threads(1):
        exp, = scorer.explain([path], progress=False)
    assert exp.image_size == (800, 1000) and exp.source_box == (0, 0, 800, 1000)
    _assert_shows(_panel(render_explanation(exp, max_side=MAX_SIDE), 800, 1000), upright)


def test_center_crop_source_box_is_on_the_file(backbone, tmp_path):
    arr = _halves(800, 1000)
    path = _save_jpeg(tmp_path / "tall.jpg", arr)
    with torch_threads(1):
        exp, = _scorer(backbone, "center_crop").explain([path], progress=False)
    assert exp.image_size == (800, 1000)
    # The central 800 x 800 square, worked out by hand; a draft decode may shift it by its rounding (8 px).
    np.testing.assert_allclose(exp.source_box, (0, 100, 800, 900), atol=8)
    panel = _panel(render_explanation(exp, max_side=MAX_SIDE), 800, 800)
    ref = _expected(arr[100:900], (panel.shape[1], panel.shape[0]))
    assert np.abs(panel - ref).mean() < 10


def test_an_already_decoded_upload_renders_like_the_file(scorer, tmp_path):
    """The service explains the draft-decoded upload it holds and draws on that same picture."""
    arr = _halves(800, 1000)
    path = _save_jpeg(tmp_path / "upload.jpg", arr)
    decoded = scorer.preprocessor.load_bytes(open(path, "rb").read(), "upload.jpg")
    assert decoded.size == (100, 125)  # drafted
    with torch_threads(1):
        exp, = scorer.explain_images([("upload.jpg", decoded)])
    assert exp.image_size == (800, 1000)
    _assert_shows(_panel(render_explanation(exp, decoded, max_side=MAX_SIDE), 800, 1000), arr)
