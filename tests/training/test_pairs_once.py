"""Issue 12 item 15: small sets use each cross-tier pair once; Evaluator honours a loader's subset of pairs."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler

from conftest import make_image
from mirip.ml.preprocessing import Preprocessor
from mirip.training.datasets.pairwise_dataset import PairwiseDataset
from mirip.training.evaluator import Evaluator

TIERS = ["S", "S", "A", "A", "B", "B", "C", "C", "C"]  # cross-tier pairs: (81 - 4 - 4 - 4 - 9) / 2 = 30


@pytest.fixture
def small_set(tmp_path):
    names = [f"d{i}.png" for i in range(len(TIERS))]
    for i, name in enumerate(names):
        make_image(tmp_path / name, size=(20, 16), seed=i)
    return pd.DataFrame({"filename": names, "tier": TIERS}), str(tmp_path)


def _naive_cross_pairs():
    rank = {"S": 3, "A": 2, "B": 1, "C": 0}
    return {frozenset((i, j)) for i, j in itertools.combinations(range(len(TIERS)), 2) if rank[TIERS[i]] != rank[TIERS[j]]}


@pytest.mark.parametrize("num_pairs", [None, 30, 1000])
def test_small_set_uses_every_cross_tier_pair_exactly_once(small_set, num_pairs):
    meta, image_dir = small_set
    ds = PairwiseDataset(meta, image_dir, transform=Preprocessor(image_size=14), num_pairs=num_pairs, seed=3)
    expected = _naive_cross_pairs()
    assert len(expected) == 30 and len(ds) == 30
    rank = {"S": 3, "A": 2, "B": 1, "C": 0}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        first, second, labels = ds.pair_arrays()
        pairs = [frozenset((int(a), int(b))) for a, b in zip(first, second)]
        assert len(set(pairs)) == 30 and set(pairs) == expected  # each once, none missing
        assert sorted(labels.tolist()) == [-1] * 15 + [1] * 15
        for a, b, label in zip(first, second, labels):  # label 1 when the first is the better drawing
            assert label == (1 if rank[TIERS[a]] > rank[TIERS[b]] else -1)
    order0 = PairwiseDataset(meta, image_dir, transform=Preprocessor(image_size=14), seed=3).pair_arrays()[0]
    assert not np.array_equal(order0, ds.pair_arrays()[0])  # epochs reshuffle


def test_larger_requests_than_pairs_fit_are_sampled_as_before(small_set):
    meta, image_dir = small_set
    ds = PairwiseDataset(meta, image_dir, transform=Preprocessor(image_size=14), num_pairs=12, seed=3)
    assert len(ds) == 12


class MeanScore(nn.Module):
    """A scorer with no parameters: the mean pixel value. Enough to test which pairs are counted."""

    def get_score(self, x):
        return x.float().mean(dim=(1, 2, 3)).unsqueeze(1)

    def forward(self, x1, x2):
        return self.get_score(x1), self.get_score(x2)


def _naive(loader, model):
    correct = total = 0
    for x1, x2, labels in loader:
        s1, s2 = model(x1, x2)
        correct += int((torch.sign(s1 - s2).reshape(-1) == labels.reshape(-1).float()).sum())
        total += len(labels)
    return correct, total


@pytest.mark.parametrize("kind", ["subset sampler", "drop_last", "all"])
def test_evaluator_counts_the_pairs_the_loader_yields(small_set, kind):
    meta, image_dir = small_set
    ds = PairwiseDataset(meta, image_dir, transform=Preprocessor(image_size=14), seed=5)
    if kind == "subset sampler":
        loader = DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(list(range(0, 30, 3)),
                                                                           generator=torch.Generator().manual_seed(0)))
        expected_total = 10
    elif kind == "drop_last":
        loader = DataLoader(ds, batch_size=7, drop_last=True)
        expected_total = 28
    else:
        loader = DataLoader(ds, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(0))
        expected_total = 30
    model = MeanScore()
    correct, total = _naive(loader, model)
    result = Evaluator(model, device="cpu").evaluate_detailed(loader)
    assert total == expected_total
    assert result["total_pairs"] == total and result["correct_predictions"] == correct
