"""Does the map point at what the head ranks? Damage confined to one quadrant, a head trained to rank it.

The drawings and the trained head come from ``mirip.bench.explain`` (they are the set-up, not what is
tested); the quadrant masses and the masked pictures are computed here with plain numpy slicing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _inference_helpers import torch_threads
from conftest import save_tiny_backbone
from mirip.bench.explain import quadrant_set, scorer_for, train_damage_head
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.scoring.explain import Explainer

SIZE = 112  # an 8 x 8 grid: quadrants of 4 x 4 cells


@pytest.fixture(scope="module")
def damage_case(tmp_path_factory):
    backbone = save_tiny_backbone(tmp_path_factory.mktemp("tiny-quadrant"))
    with torch_threads(2):
        ext = DINOv2FeatureExtractor(backbone, device="cpu", entries="mean@-1")
        pre = ext.preprocessor(SIZE)
        clean, damaged, _ = quadrant_set(64, SIZE, seed=1, sigma=100.0)
        scorer = scorer_for(ext, pre, train_damage_head(ext, pre, clean, damaged))
        _, test, quadrants = quadrant_set(8, SIZE, seed=7, sigma=100.0)
        images = torch.stack([pre(im) for im in test])
        maps = [r["map"] for r in Explainer(scorer).explain_batch(images)]
    return scorer, images, maps, quadrants


def _quadrant_sums(m: np.ndarray):
    return [m[:4, :4].sum(), m[:4, 4:].sum(), m[4:, :4].sum(), m[4:, 4:].sum()]  # TL, TR, BL, BR


def test_negative_mass_lies_in_the_damaged_quadrant(damage_case):
    _, _, maps, quadrants = damage_case
    shares = []
    for m, q in zip(maps, quadrants):
        assert m.shape == (8, 8)
        neg = _quadrant_sums(np.clip(-m, 0, None))
        assert int(np.argmax(neg)) == q, (q, np.round(np.array(neg) / sum(neg), 2))
        shares.append(neg[q] / sum(neg))
    assert np.mean(shares) > 0.5  # chance: 0.25


def _paint_white(image: torch.Tensor, cells, scorer) -> torch.Tensor:
    pre = scorer.preprocessor
    arr = image.numpy().copy()
    white = (1.0 - np.array(pre.mean)) / np.array(pre.std)
    for cell in cells:
        r, c = divmod(int(cell), 8)
        arr[:, 14 * r:14 * (r + 1), 14 * c:14 * (c + 1)] = white[:, None, None]
    return torch.from_numpy(arr).float()


def test_masking_the_top_attributed_cells_moves_the_score_more_than_random_cells(damage_case):
    scorer, images, maps, _ = damage_case
    rng = np.random.default_rng(0)
    top, rand = [], []
    with torch_threads(2):
        for img, m in zip(images, maps):
            flat = m.reshape(-1)
            k = 6  # about a tenth of the 64 cells
            s0 = float(scorer.score_tensor(img[None])[0])
            chosen = np.argsort(-np.abs(flat))[:k]
            top.append(abs(float(scorer.score_tensor(_paint_white(img, chosen, scorer)[None])[0]) - s0))
            draws = torch.stack([_paint_white(img, rng.choice(64, k, replace=False), scorer) for _ in range(6)])
            rand.append(float(np.mean(np.abs(scorer.score_tensor(draws).numpy() - s0))))
    assert np.mean(top) > 1.5 * np.mean(rand), (np.mean(top), np.mean(rand))
