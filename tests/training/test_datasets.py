"""DataSplitter, PairwiseDataset (image files), FeaturePairDataset (cached features) and the ranking metrics."""

from __future__ import annotations

import itertools
import math
import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch

from mirip.common.tiers import TIER_RANK
from mirip.ml.preprocessing import Preprocessor
from mirip.store.cache import write_cache
from mirip.store.cache_errors import CacheError
from mirip.store.fingerprint import FingerprintMismatch
from mirip.training.datasets.data_splitter import DataSplitter
from mirip.training.datasets.pairwise_dataset import DEFAULT_MAX_PAIRS, FeaturePairDataset, PairwiseDataset
from mirip.training.metrics import kendall_tau_b, pairwise_accuracy, rankdata, spearman, tier_pair_accuracy

from _stage2_helpers import fake_fingerprint


def _meta(n_per_tier=10, dup=()):
    rows = [{"filename": f"f{t}{i}.png", "tier": t} for t in "SABC" for i in range(n_per_tier)]
    rows += [{"filename": name, "tier": tier} for name, tier in dup]
    return pd.DataFrame(rows)


# --- DataSplitter --------------------------------------------------------------------------------
def test_splitter_ratio_assertion():
    with pytest.raises(AssertionError, match="Ratios must sum to 1.0"):
        DataSplitter(0.8, 0.1, 0.2)


def test_splitter_seed_example_and_info():
    splitter = DataSplitter(train_ratio=0.8, val_ratio=0.1, test_ratio=0.1, stratify_column="tier")
    train, val, test = splitter.split(_meta(10))
    assert (len(train), len(val), len(test)) == (32, 4, 4)
    for part in (train, val, test):
        assert part["tier"].value_counts().to_dict() == {t: len(part) // 4 for t in "SABC"}
    info = splitter.get_split_info()
    assert {k: info[k] for k in ("train_ratio", "val_ratio", "test_ratio", "seed", "stratify_column")} == {
        "train_ratio": 0.8, "val_ratio": 0.1, "test_ratio": 0.1, "seed": 42, "stratify_column": "tier"}
    assert (info["train_size"], info["val_size"], info["test_size"]) == (32, 4, 4)


def test_splitter_images_never_in_two_splits_and_seeded():
    meta = _meta(25, dup=[("fS0.png", "S"), ("fA3.png", "A"), ("fA3.png", "A")])
    parts = DataSplitter(0.6, 0.2, 0.2, seed=3).split(meta)
    names = [set(p["filename"]) for p in parts]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert sum(len(p) for p in parts) == len(meta)
    assert sorted(itertools.chain(*(p.index for p in parts))) == list(meta.index)  # nothing lost
    again = DataSplitter(0.6, 0.2, 0.2, seed=3).split(meta)
    other = DataSplitter(0.6, 0.2, 0.2, seed=4).split(meta)
    assert all(a.index.equals(b.index) for a, b in zip(parts, again))
    assert not parts[0].index.equals(other[0].index)


def test_splitter_unknown_stratify_column():
    with pytest.raises(ValueError, match="stratify_column 'grade'"):
        DataSplitter(stratify_column="grade").split(_meta(2))


# --- PairwiseDataset (image files) ---------------------------------------------------------------
def test_pairwise_dataset_seed_example(image_dir):
    directory, meta = image_dir
    ds = PairwiseDataset(metadata=meta, image_dir=str(directory), transform=Preprocessor(image_size=28))
    assert len(ds) == 24  # 8 images, 2 per tier: every one of the 24 cross-tier pairs' worth
    img1, img2, label = ds[0]
    assert img1.shape == img2.shape == (3, 28, 28) and label in (1, -1)
    first, second, labels = ds.pair_arrays()
    ranks = np.array([TIER_RANK[t] for t in meta["tier"]])
    assert np.all(np.sign(ranks[first] - ranks[second]) == labels)
    assert int((labels == 1).sum()) == 12


def test_pairwise_dataset_default_transform_and_any_callable(image_dir):
    directory, meta = image_dir
    assert isinstance(PairwiseDataset(meta, str(directory)).transform, Preprocessor)  # 768 px default
    seen = []

    def transform(img):
        seen.append(img.mode)
        return torch.zeros(3, 4, 4)

    ds = PairwiseDataset(meta, str(directory), transform=transform, num_pairs=5)
    assert len(ds) == 5 and ds[4][0].shape == (3, 4, 4) and seen == ["RGB", "RGB"]


def test_pairwise_dataset_errors(image_dir):
    directory, meta = image_dir
    with pytest.raises(FileNotFoundError, match="Image not found: .*missing.png"):
        PairwiseDataset(pd.concat([meta, pd.DataFrame([{"filename": "missing.png", "tier": "A"}])]), str(directory))
    bad = meta.copy()
    bad.loc[5, "tier"] = "D"
    with pytest.raises(ValueError, match=r"Invalid tier value in 1 of \d+ row\(s\), column 'tier': row 5 \(index label\): 'D'"):
        PairwiseDataset(bad, str(directory))
    with pytest.raises(ValueError, match="at least two different tiers, found S \\(2 images\\)"):
        PairwiseDataset(meta[meta.tier == "S"], str(directory))


def test_pairwise_dataset_epochs_are_fresh_and_deterministic(image_dir):
    directory, meta = image_dir
    ds = PairwiseDataset(meta, str(directory), transform=Preprocessor(image_size=28), num_pairs=40, seed=7)
    e0 = [a.copy() for a in ds.pair_arrays()]
    ds.set_epoch(1)
    e1 = [a.copy() for a in ds.pair_arrays()]
    ds.set_epoch(0)
    assert all(np.array_equal(a, b) for a, b in zip(e0, ds.pair_arrays()))
    assert not all(np.array_equal(a, b) for a, b in zip(e0, e1))


# --- FeaturePairDataset --------------------------------------------------------------------------
def _feature_ds(n_per_tier=25, dim=8, **kw):
    ranks = np.repeat([3, 2, 1, 0], n_per_tier)
    feats = torch.randn(len(ranks), dim, generator=torch.Generator().manual_seed(0))
    return feats, ranks, FeaturePairDataset(feats, ranks, **kw)


def test_feature_batches_are_exact_gathers():
    feats, ranks, ds = _feature_ds(num_pairs=1000, batch_size=32, seed=1)
    assert len(ds) == 32
    batches = list(ds)
    assert [b[2].shape[0] for b in batches] == [32] * 31 + [8]
    first, second, labels = ds.pair_arrays()
    f1 = torch.cat([b[0] for b in batches])
    assert torch.equal(f1, feats[torch.from_numpy(first)])
    assert torch.equal(torch.cat([b[1] for b in batches]), feats[torch.from_numpy(second)])
    lab = torch.cat([b[2] for b in batches]).numpy()
    assert np.array_equal(lab, labels) and int((lab == 1).sum()) == 500
    assert np.all(np.sign(ranks[first] - ranks[second]) == lab)  # no same-tier pair, label = who is better


def test_feature_rows_select_a_split_without_copy():
    feats = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    rows = np.array([3, 5, 7, 11])
    ds = FeaturePairDataset(feats, [3, 2, 1, 0], rows=rows, num_pairs=10, batch_size=10)
    f1, f2, labels = ds[0]
    first, second, _ = ds.pair_arrays()
    assert torch.equal(f1, feats[rows[first]]) and torch.equal(f2, feats[rows[second]])
    assert ds.features is feats
    assert torch.equal(ds.image_features(), feats[rows])


def test_feature_pairs_deterministic_per_seed_and_epoch():
    _, _, a = _feature_ds(num_pairs=200, seed=5)
    _, _, b = _feature_ds(num_pairs=200, seed=5)
    _, _, c = _feature_ds(num_pairs=200, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a.pair_arrays(), b.pair_arrays()))
    assert not np.array_equal(a.pair_arrays()[0], c.pair_arrays()[0])
    before = a[0][0].clone()
    a.set_epoch(3)
    assert a.epoch == 3 and not torch.equal(before, a[0][0])


def test_feature_dataset_never_draws_from_global_torch_rng():
    _, _, ds = _feature_ds(num_pairs=100, batch_size=16)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ds.set_epoch(2)
    for _ in ds:
        pass
    assert torch.equal(torch.rand(3), expected)


def test_feature_dataset_errors():
    feats = torch.randn(6, 4)
    feats[2, 1] = float("nan")
    feats[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or infinite features in 2 image\(s\), rows 2 \(c.png\), 4 \(e.png\)"):
        FeaturePairDataset(feats, [3, 3, 2, 2, 1, 1], names=[f"{c}.png" for c in "abcdef"])
    with pytest.raises(ValueError, match="at least two different tiers, found B \\(6 images\\)"):
        FeaturePairDataset(torch.randn(6, 4), [1] * 6)
    with pytest.raises(ValueError, match="6 ranks for 3 images"):
        FeaturePairDataset(torch.randn(6, 4), [1, 2] * 3, rows=[0, 1, 2])


def test_feature_dataset_scales_without_quadratic_pairs():
    # 400k images: 6e10 cross-tier pairs exist; building an epoch must stay O(num_pairs + N).
    # Measured by what it allocates (numpy reports to tracemalloc), not by wall time on a shared machine: the
    # pair index of 20,000 pairs and per-tier row lists are a few MB; any N x N structure would be terabytes.
    feats = torch.zeros(400_000, 2, dtype=torch.float16)
    ranks = np.repeat([3, 2, 1, 0], 100_000)
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        ds = FeaturePairDataset(feats, ranks, num_pairs=20_000, batch_size=256)
        ds.set_epoch(1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds) == math.ceil(20_000 / 256) and ds[0][0].dtype == torch.float32
    assert peak < 64 * 2**20, f"building an epoch allocated {peak / 2**20:.0f} MiB"
    assert time.perf_counter() - t0 < 60  # a backstop against a quadratic loop, far above the ~0.1 s it takes


def test_from_cache_checks_rows_fingerprint_and_tiers(tmp_path):
    fp = fake_fingerprint(4)
    path = write_cache(str(tmp_path / "c.h5"), fp, ["a.png", "b.png", "c.png"], np.eye(3, 4, dtype=np.float32))
    meta = pd.DataFrame({"filename": ["c.png", "a.png"], "tier": ["S", "B"]})
    ds = FeaturePairDataset.from_cache(path, meta, expected_fingerprint=fp, num_pairs=4)
    assert torch.equal(ds.image_features(), torch.from_numpy(np.eye(3, 4, dtype=np.float32)[[2, 0]]))
    with pytest.raises(CacheError, match="2 image\\(s\\) have no cached feature .*x.png, y.png"):
        FeaturePairDataset.from_cache(path, pd.DataFrame({"filename": ["a.png", "x.png", "y.png"], "tier": list("SAB")}))
    with pytest.raises(FingerprintMismatch, match="image_size: the cache has 28, this command asks for 224; to fix: "):
        FeaturePairDataset.from_cache(path, meta, expected_fingerprint=fake_fingerprint(4, image_size=224))
    with pytest.raises(ValueError, match=r"Invalid tier value .*: row 1 \(index label\): 'Z'"):
        FeaturePairDataset.from_cache(path, pd.DataFrame({"filename": ["a.png", "b.png"], "tier": ["S", "Z"]}))


def _naive_cross_tier_pairs(tiers) -> int:
    return sum(1 for i, j in itertools.combinations(range(len(tiers)), 2) if tiers[i] != tiers[j])


def test_default_pairs_capped(tmp_path):
    """Without num_pairs: every cross-tier pair of a small set, at most DEFAULT_MAX_PAIRS for a large one."""
    assert DEFAULT_MAX_PAIRS == 10_000
    for i in range(240):
        (tmp_path / f"f{i}.png").touch()  # only existence is checked when the dataset is built

    def dataset(tiers, **kw):
        meta = pd.DataFrame({"filename": [f"f{i}.png" for i in range(len(tiers))], "tier": tiers})
        return PairwiseDataset(meta, str(tmp_path), **kw)

    small = list("SSSAABBBBC") * 3
    assert len(dataset(small)) == _naive_cross_tier_pairs(small) == 315
    large = list("SABC") * 60  # 21,600 cross-tier pairs
    assert _naive_cross_tier_pairs(large) == 21_600
    assert len(dataset(large)) == DEFAULT_MAX_PAIRS
    assert len(dataset(large, num_pairs=12_345)) == 12_345  # an explicit length is not capped


# --- metrics -------------------------------------------------------------------------------------
def _naive_kendall_b(x, y):
    con = dis = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif dx == dy:
            con += 1
        else:
            dis += 1
    return (con - dis) / math.sqrt((con + dis + tx) * (con + dis + ty))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kendall_and_spearman_match_naive(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=60).astype(float)  # many ties
    y = x + rng.integers(0, 3, size=60)
    assert kendall_tau_b(x, y) == pytest.approx(_naive_kendall_b(x, y), abs=1e-12)
    z, w = rng.normal(size=100), rng.normal(size=100)  # > 64 distinct values each: the Fenwick-tree path
    assert kendall_tau_b(z, w) == pytest.approx(_naive_kendall_b(z, w), abs=1e-12)
    tiers = np.arange(100) % 4  # scores vs tiers: the few-values path
    assert kendall_tau_b(z, tiers) == pytest.approx(_naive_kendall_b(z, tiers), abs=1e-12)
    rx, ry = rankdata(x), rankdata(y)
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)


def test_metrics_match_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    scores, tiers = rng.normal(size=300), rng.integers(0, 4, size=300)
    assert kendall_tau_b(scores, tiers) == pytest.approx(stats.kendalltau(scores, tiers).statistic, abs=1e-12)
    assert spearman(scores, tiers) == pytest.approx(stats.spearmanr(scores, tiers).statistic, abs=1e-12)
    a, b = rng.normal(size=500), rng.normal(size=500)
    assert kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_metric_edge_cases():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(kendall_tau_b([1], [2]))
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert pairwise_accuracy(np.array([1.0, 2.0, 5.0]), np.array([1.0, 1.0, 6.0]), np.array([1, 1, -1])) == \
        pytest.approx(2 / 3)  # the tie is wrong
    acc = tier_pair_accuracy(np.array([3.0, 2.0, 0.0]), np.array([3, 2, 0]), np.array([0, 1, 2]),
                             np.array([1, 2, 0]), np.array([1, 1, -1]))
    assert acc == {"S-A": {"accuracy": 1.0, "pairs": 1, "distinct_pairs": 1},
                   "S-C": {"accuracy": 1.0, "pairs": 1, "distinct_pairs": 1},
                   "A-C": {"accuracy": 1.0, "pairs": 1, "distinct_pairs": 1}}


def test_image_pair_loader_batches_in_pair_order_without_global_rng(image_dir):
    from mirip.training.datasets.pairwise_dataset import image_pair_loader

    directory, meta = image_dir
    ds = PairwiseDataset(meta, str(directory), transform=Preprocessor(image_size=28), num_pairs=10)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    batches = list(image_pair_loader(ds, batch_size=4))
    assert torch.equal(torch.rand(2), expected)
    assert [len(b[2]) for b in batches] == [4, 4, 2]
    assert torch.cat([b[2] for b in batches]).tolist() == ds.pair_arrays()[2].tolist()


def test_stratified_split_never_starves_a_split():
    # Five images per tier at 80/10/10: rounding each tier alone would give every tier (4, 1, 0).
    data = pd.DataFrame({"filename": [f"{i}.png" for i in range(20)], "tier": list("SABC") * 5})
    train, val, test = DataSplitter(stratify_column="tier", seed=3).split(data)
    assert (len(train), len(val), len(test)) == (16, 2, 2)
    assert train["tier"].value_counts().to_dict() == {"S": 4, "A": 4, "B": 4, "C": 4}
