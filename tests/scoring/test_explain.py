"""Scorer.explain: per-patch maps of score - blank-page score, for every backbone family and grid size.

References are computed here, not by the library: the blank page's score by scoring a white picture through
the ordinary scoring path, the content cells from the pad geometry worked out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _family_helpers import TINY_FAMILIES, save_tiny
from _inference_helpers import torch_threads
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.ranking_model import PairwiseRankingModel
from mirip.scoring.explain import Explainer
from mirip.scoring.scorer import Scorer

SIZE = 56  # a 4 x 4 grid of 14 px patches


def _scorer(backbone: str, spec: str, size: int = SIZE, seed: int = 0) -> Scorer:
    ext = DINOv2FeatureExtractor(backbone, device="cpu", entries=spec)
    torch.manual_seed(seed)
    model = PairwiseRankingModel(backbone, projector_output_dim=8, hidden_dim=16, dropout=0.0,
                                 feature_extractor=ext)
    return Scorer(model, ext.preprocessor(size))


def _drawing(path, size=(40, 20), seed=0) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)
    return str(path)


def _blank_score(scorer: Scorer) -> float:
    white = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    return float(scorer.score_tensor(scorer.preprocessor(white)[None])[0])


@pytest.fixture(scope="module")
def family_backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {mt: save_tiny(root / mt, mt) for mt in TINY_FAMILIES}


@pytest.mark.parametrize("model_type", list(TINY_FAMILIES))
def test_mean_and_std_maps_are_exact_per_patch_for_every_family(family_backbones, model_type, tmp_path):
    paths = [_drawing(tmp_path / "wide.png", (40, 20), 0), _drawing(tmp_path / "tall.png", (20, 40), 1)]
    scorer = _scorer(family_backbones[model_type], "mean@-1+std@2")
    scorer.model.feature_extractor.set_entry_scales([0.7, 2.5])  # per-entry normalisation, as from a checkpoint
    with torch_threads(1):
        result = scorer.explain(paths, progress=False)
        scores = scorer.score_paths(paths, progress=False).scores
        blank = _blank_score(scorer)
    assert [e.path for e in result] == paths and not result.failures
    for exp, score in zip(result, scores):
        assert exp.grid == (4, 4) and exp.map.dtype == np.float32 and exp.exact
        assert exp.score == pytest.approx(score, abs=1e-5)
        assert exp.baseline_score == pytest.approx(blank, abs=1e-5)
        # Exact: the cells add up to the score minus the blank page's (up to the head's quadrature error).
        assert float(exp.map.sum()) == pytest.approx(score - blank, abs=2e-3 + 1e-2 * abs(score - blank))
        assert exp.unassigned == 0.0
    # 40 x 20 at 56 px: drawn 56 x 28, rows 14..42, i.e. grid rows 1 and 2 (and the transpose for 20 x 40).
    rows = np.array([False, True, True, False])
    assert (result.explanations[0].content == (rows[:, None] & np.ones(4, bool)[None])).all()
    assert (result.explanations[1].content == (np.ones(4, bool)[:, None] & rows[None])).all()
    assert result.explanations[0].content_box == (0, 14, 56, 42)


@pytest.mark.parametrize("model_type", ["dinov2", "dinov2_with_registers", "siglip_vision_model"])
def test_cls_maps_account_for_every_part_of_the_score(family_backbones, model_type, tmp_path):
    path = _drawing(tmp_path / "a.png", (30, 30), 3)
    scorer = _scorer(family_backbones[model_type], "cls@-1+mean@1")
    with torch_threads(1):
        exp, = scorer.explain([path], progress=False)
        score, = scorer.score_paths([path], progress=False).scores
        blank = _blank_score(scorer)
    assert not exp.exact and "first order" in exp.methods["cls@-1"] and exp.methods["mean@1"] == "exact"
    assert np.isfinite(exp.map).all() and np.abs(exp.map).sum() > 0
    assert exp.score == pytest.approx(score, abs=1e-5)
    parts = float(exp.map.sum()) + exp.unassigned + exp.quadrature_gap
    assert parts == pytest.approx(score - blank, abs=1e-4)


def test_any_grid_size(family_backbones):
    scorer = _scorer(family_backbones["dinov2"], "mean@-1")
    images = torch.randn(2, 3, 42, 70)
    with torch_threads(1):
        out = Explainer(scorer).explain_batch(images)
        scores = scorer.score_tensor(images)
    assert [r["map"].shape for r in out] == [(3, 5), (3, 5)]
    assert [r["score"] for r in out] == pytest.approx(scores.tolist(), abs=1e-5)


def test_unreadable_files_are_listed_not_raised(family_backbones, tmp_path):
    good = _drawing(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    scorer = _scorer(family_backbones["dinov2"], "mean@-1")
    result = scorer.explain([good, str(bad), str(tmp_path / "gone.png")], progress=False)
    assert [e.path for e in result] == [good]
    assert [p for p, _ in result.failures] == [str(bad), str(tmp_path / "gone.png")]
    assert all(reason for _, reason in result.failures)
