"""Contracts between the stages: fingerprint, feature cache, checkpoint files, pair sampling."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import transformers

import mirip
from mirip.common.tiers import tier_ranks
from mirip.ml.backbones import BackboneInfo
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.preprocessing import Preprocessor
from mirip.store.cache import FeatureCache, open_cache, write_cache
from mirip.store.cache_errors import CacheError
from mirip.store.checkpoint import CheckpointError, load_checkpoint_file, save_checkpoint_file
from mirip.store.fingerprint import (FingerprintMismatch, RANDOM_WEIGHTS_NOTE, check_fingerprint, diff_fingerprints,
                                     from_attrs, make_fingerprint, to_attrs, weights_summary)
from mirip.training.datasets.pair_sampling import count_cross_tier_pairs, sample_pairs, tier_combinations, tier_groups

FP = {"feature_dim": 4, "feature_dtype": "float32", "backbone": "b", "image_size": 28, "mean": [0.1, 0.2, 0.3]}


def test_fingerprint_names_the_differing_field(tiny_backbone):
    ext = DINOv2FeatureExtractor(tiny_backbone, device="cpu")
    a = make_fingerprint(ext, Preprocessor(image_size=28))
    b = make_fingerprint(ext, Preprocessor(image_size=56))
    assert a["pretrained"] is True and a["feature_dim"] == 32 and a["pooling"] == "cls"
    with pytest.raises(FingerprintMismatch, match="image_size: the cache has 56, this command asks for 28") as info:
        check_fingerprint(a, b)
    assert list(info.value.fields) == ["image_size"]
    check_fingerprint(a, dict(a, torch_version="0.0"))  # software versions alone do not block reading
    with pytest.raises(FingerprintMismatch, match="torch_version"):
        check_fingerprint(a, dict(a, torch_version="0.0"), ignore=())


def test_a_field_on_one_side_only_is_a_difference(tmp_path):
    """An older cache lacks a newer field (a feature spec, a colour conversion): that is a mismatch, not a match."""
    base = {"backbone": "b", "image_size": 28}
    assert diff_fingerprints(base, dict(base, feature_spec="cls@-1")) == {"feature_spec": (None, "cls@-1")}
    assert diff_fingerprints(dict(base, feature_spec="cls@-1"), base) == {"feature_spec": ("cls@-1", None)}
    assert diff_fingerprints(base, dict(base)) == {}
    # ``only`` narrows the comparison, ``ignore`` drops fields, also when they are on one side only.
    assert diff_fingerprints(base, dict(base, extra=1, image_size=56), only=["image_size"]) == {"image_size": (28, 56)}
    assert diff_fingerprints(base, dict(base, torch_version="9.9")) == {}
    assert diff_fingerprints(base, dict(base, torch_version="9.9"), ignore=()) == {"torch_version": (None, "9.9")}
    path = str(tmp_path / "old.h5")
    write_cache(path, FP, ["a.png"], np.zeros((1, 4)))
    with open_cache(path) as cache, pytest.raises(FingerprintMismatch, match="resize_mode: the cache has None, this command asks for 'pad'"):
        cache.check_fingerprint(dict(FP, resize_mode="pad"))


def _stub_extractor(revision, seed, pooling="cls", precision="fp32"):
    info = BackboneInfo(name="org/net", revision=revision, pretrained=seed is None, random_init_seed=seed,
                        hidden_size=8, patch_size=14)
    return SimpleNamespace(info=info, output_dim=16, pooling=pooling, precision=precision,
                           entry_names=[f"{pooling}@-1"], entry_blocks=[3], entry_dims=[16], num_layers=3,
                           family_facts=lambda: {"family": "fam", "token_layout": {"num_prefix_tokens": 2},
                                                 "cls": "token"})


def test_make_fingerprint_names_every_field_exactly():
    pre = Preprocessor(image_size=56, resize_mode="stretch")
    fp = make_fingerprint(_stub_extractor("abc123", 1234, "cls_mean", "bf16"), pre)
    assert fp == {
        "format_version": 3, "backbone": "org/net", "backbone_revision": "abc123", "pretrained": False,
        "random_init_seed": 1234, "feature_dim": 16, "image_size": 56, "resize_mode": "stretch", "patch_size": 14,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "color_management": "icc-to-srgb", "pooling": "cls_mean",
        "feature_entries": ["cls_mean@-1"], "feature_entry_blocks": [3], "feature_entry_dims": [16],
        "backbone_layers": 3, "backbone_family": "fam", "token_layout": {"num_prefix_tokens": 2},
        "cls_pooling": "token", "precision": "bf16", "engine": "torch", "feature_dtype": "float32", "views": 0, "mirip_version": mirip.__version__,
        "torch_version": str(torch.__version__), "transformers_version": transformers.__version__,
    }
    assert type(fp["torch_version"]) is str  # not TorchVersion, which h5py cannot store
    fp = make_fingerprint(_stub_extractor(None, None), pre, feature_dtype="float16", views=3)
    assert (fp["backbone_revision"], fp["random_init_seed"], fp["pretrained"]) == ("", -1, True)
    assert (fp["feature_dtype"], fp["views"]) == ("float16", 3)


def test_fingerprint_mismatch_message_and_comparison_details():
    err = FingerprintMismatch({"a": (1, 2), "b": ("x", None)})
    assert str(err) == ("feature cache fingerprint does not match: a: the cache has 2, this command asks for 1; "
                        "b: the cache has None, this command asks for 'x'; to fix: use a cache extracted with the "
                        "settings asked for (scripts/extract.py with another --output), or ask for the cache's settings")
    assert err.fields == {"a": (1, 2), "b": ("x", None)}
    assert (err.has, err.asks) == ({"a": 2, "b": None}, {"a": 1, "b": "x"})
    with pytest.raises(FingerprintMismatch) as info:
        check_fingerprint({"a": 1}, {"a": 2})
    assert str(info.value).startswith("feature cache fingerprint does not match: a: the cache has 2, this command asks for 1;")
    with pytest.raises(FingerprintMismatch) as info:  # a checkpoint is the stored side when it comes first
        check_fingerprint({"a": 1}, {"a": 2}, what="checkpoint x.pt", holder="expected", fix="drop --a")
    assert str(info.value) == ("checkpoint x.pt fingerprint does not match: a: the checkpoint has 1, "
                               "this command asks for 2; to fix: drop --a")
    check_fingerprint({"a": 1, "b": 1}, {"a": 1, "b": 2}, only=["a"])  # b is outside what was asked
    # Values as HDF5 hands them back (bytes, numpy scalars and arrays, tuples) compare as plain values.
    stored = {"s": b"pad", "i": np.int64(3), "l": np.array([0.5, 0.25]), "t": (1, 2)}
    assert diff_fingerprints({"s": "pad", "i": 3, "l": [0.5, 0.25], "t": [1, 2]}, stored) == {}
    assert diff_fingerprints({"s": "crop"}, {"s": b"pad"}) == {"s": ("crop", "pad")}


def test_fingerprint_attrs_roundtrip_every_value_type():
    fp = {"l": [0.5, 1], "d": {"k": [1]}, "n": None, "s": "pad", "e": "", "i": 3, "b": True, "f": 0.25}
    attrs = to_attrs(fp)
    assert attrs == {"l": "[0.5, 1]", "d": '{"k": [1]}', "n": "null", "s": "pad", "e": "", "i": 3, "b": True, "f": 0.25}
    assert from_attrs(attrs, list(fp)) == fp
    assert from_attrs({"x": object(), "y": 1}, ["x", "y"]) == {"y": 1}  # values no fingerprint holds are dropped


def test_weights_summary_states_the_backbone_weights():
    assert weights_summary(None) == {"backbone": None, "backbone_weights": "unknown"}
    assert weights_summary({}) == {"backbone": None, "backbone_weights": "unknown"}
    fp = {"backbone": "org/net", "image_size": 56, "pooling": "cls"}
    base = {"backbone": "org/net", "backbone_family": "dinov2", "image_size": 56, "pooling": "cls"}  # pre-family: DINOv2
    assert weights_summary(fp) == dict(base, backbone_weights="unknown")
    assert weights_summary(dict(fp, pretrained=True)) == dict(base, backbone_weights="pretrained")
    assert weights_summary(dict(fp, pretrained=False)) == dict(base, backbone_weights="random", note=RANDOM_WEIGHTS_NOTE)
    assert weights_summary(dict(fp, backbone_family="siglip"))["backbone_family"] == "siglip"
    assert RANDOM_WEIGHTS_NOTE.startswith("backbone weights are RANDOM (untrained)")


def test_cache_roundtrip_keeps_fingerprint_types(tmp_path):
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_cache(str(tmp_path / "c.h5"), FP, ["a.png", "sub/b.png", "ü.png"], feats, sizes=[1, 2, 3], mtimes=[4, 5, 6])
    with open_cache(str(tmp_path / "c.h5")) as cache:
        assert cache.fingerprint == FP
        assert cache.paths == ["a.png", "sub/b.png", "ü.png"] and cache.index["ü.png"] == 2
        assert np.array_equal(cache.features([2, 0]), feats[[2, 0]])
        assert cache.load_features().shape == (3, 4)
        assert cache.source_facts()[0].tolist() == [1, 2, 3]
        with pytest.raises(CacheError, match="2 image\\(s\\) have no cached feature.*x.png, y.png"):
            cache.rows_for(["a.png", "x.png", "y.png"])
        cache.check_fingerprint(FP)
        with pytest.raises(FingerprintMismatch, match="image_size"):
            cache.check_fingerprint(dict(FP, image_size=56))


def test_uncommitted_rows_are_invisible_and_overwritten(tmp_path):
    path = str(tmp_path / "c.h5")
    with FeatureCache.create(path, FP) as cache:
        cache.append(["a"], np.ones((1, 4)), [1], [1])
        # Simulate a kill after data was written but before the counter was committed.
        cache.h5["features"].resize(3, axis=0)
        cache.h5["paths"].resize(3, axis=0)
        cache.h5["paths"][1:3] = ["ghost1", "ghost2"]
    with open_cache(path, "a") as cache:
        assert cache.paths == ["a"] and len(cache) == 1
        cache.append(["b"], np.full((1, 4), 2.0), [2], [2])
        assert cache.paths == ["a", "b"] and cache.features().tolist()[1] == [2.0] * 4


def test_cache_refuses_duplicates_overwrite_and_junk(tmp_path):
    path = str(tmp_path / "c.h5")
    write_cache(path, FP, ["a"], np.zeros((1, 4)))
    with pytest.raises(CacheError, match="already exists"):
        write_cache(path, FP, ["a"], np.zeros((1, 4)))
    with open_cache(path, "a") as cache, pytest.raises(CacheError, match="already cached"):
        cache.append(["a"], np.zeros((1, 4)), [0], [0])
    (tmp_path / "junk.h5").write_bytes(b"nope")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        open_cache(str(tmp_path / "junk.h5"))
    with pytest.raises(CacheError, match="not found"):
        open_cache(str(tmp_path / "missing.h5"))


def test_cache_failures_and_replace(tmp_path):
    path = str(tmp_path / "c.h5")
    write_cache(path, FP, ["a", "b"], np.zeros((2, 4)))
    with open_cache(path, "a") as cache:
        cache.set_failures({"bad.png": ("not a recognised image format", 10, 20)})
        cache.replace([1], np.ones((1, 4)), [7], [8])
    with open_cache(path) as cache:
        assert cache.failures() == {"bad.png": "not a recognised image format"}
        assert cache.features()[1].tolist() == [1.0] * 4 and cache.source_facts()[0].tolist() == [0, 7]


def test_checkpoint_roundtrip_and_atomic(tmp_path):
    path = tmp_path / "ck" / "best.pt"
    payload = {"model_state_dict": {"w": torch.ones(2)}, "epoch": 3, "config": {"lr": 1e-4}, "fingerprint": None}
    save_checkpoint_file(path, payload)
    assert load_checkpoint_file(path)["epoch"] == 3
    assert os.listdir(path.parent) == ["best.pt"]  # no temporary left behind
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["model_state_dict"]["w"], torch.ones(2))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_and_truncated_checkpoints_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "payload": _Exploit()}, evil)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_checkpoint_file(evil)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"model_state_dict": _Exploit()}))
    with pytest.raises(CheckpointError):
        load_checkpoint_file(raw)
    good = tmp_path / "good.pt"
    save_checkpoint_file(good, {"model_state_dict": {"w": torch.ones(1000)}})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint_file(cut)


def test_tier_validation_names_row_and_value():
    df = pd.DataFrame({"tier": ["S", " a ", "B", "D"]}, index=[10, 11, 12, 13])
    with pytest.raises(ValueError, match=r"Invalid tier value in 1 of 4 row\(s\), column 'tier': row 13 \(index label\): 'D'\. Use one"):
        tier_ranks(df)
    assert tier_ranks(df.iloc[:3]).tolist() == [3, 2, 1]


def test_pairs_are_cross_tier_balanced_and_deterministic():
    ranks = np.array([3] * 5 + [2] * 50 + [1] * 20 + [0] * 3)
    a, b, y = sample_pairs(ranks, 1200, seed=1, epoch=0)
    assert np.all(ranks[a] != ranks[b])
    assert np.all(np.sign(ranks[a] - ranks[b]) == y)  # label 1 exactly when the first is better
    assert (y == 1).sum() == 600 and (y == -1).sum() == 600
    combos = pd.Series([tuple(sorted((int(p), int(q)))) for p, q in zip(ranks[a], ranks[b])]).value_counts()
    assert len(combos) == 6 and combos.min() == combos.max() == 200  # every tier pair equally often
    again = sample_pairs(ranks, 1200, seed=1, epoch=0)
    assert all(np.array_equal(u, v) for u, v in zip((a, b, y), again))
    assert not np.array_equal(a, sample_pairs(ranks, 1200, seed=1, epoch=1)[0])  # fresh pairs per epoch


def test_uniform_balance_and_errors():
    ranks = np.array([3, 3, 2, 0])
    assert count_cross_tier_pairs(ranks) == 5
    a, b, y = sample_pairs(ranks, 101, seed=0, balance="uniform")
    assert len(a) == 101 and (y == 1).sum() == 50 and np.all(ranks[a] != ranks[b])
    with pytest.raises(ValueError, match="at least two different tiers, found only: A"):
        sample_pairs(np.array([2, 2, 2]), 10)
    with pytest.raises(ValueError, match="balance"):
        sample_pairs(ranks, 10, balance="nope")


def test_rows_of_changed_unreadable_files_are_refused(tmp_path):
    path = str(tmp_path / "c.h5")
    write_cache(path, FP, ["a.png", "b.png"], np.zeros((2, 4)))
    with open_cache(path, "a") as cache:
        # b.png changed on disk after extraction and its new content could not be decoded.
        cache.set_failures({"b.png": ("not a recognised image format", 1, 2)})
    with open_cache(path) as cache:
        assert cache.rows_for(["a.png"]).tolist() == [0]
        with pytest.raises(CacheError, match=r"changed since extraction.*b.png \(not a recognised image format\)"):
            cache.rows_for(["a.png", "b.png"])


def test_checkpoint_errors_name_the_file_and_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing\.pt"):
        load_checkpoint_file(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"epoch": 1}, tmp_path / "nostate.pt")
    for name in ("list.pt", "nostate.pt"):
        with pytest.raises(CheckpointError, match=rf"{name} is not a mirip checkpoint \(no model_state_dict\)"):
            load_checkpoint_file(str(tmp_path / name))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*empty\.pt: truncated"):
        load_checkpoint_file(tmp_path / "empty.pt")
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "payload": _Exploit()}, evil)
    with pytest.raises(CheckpointError, match=r"refused to load checkpoint .*evil\.pt: .*Detail: Weights only load failed"):
        load_checkpoint_file(evil)


def test_checkpoint_load_asks_for_weights_only_explicitly(tmp_path, monkeypatch):
    # torch < 2.6 (pyproject allows torch>=2.0) defaults to weights_only=False: relying on the default is unsafe.
    save_checkpoint_file(tmp_path / "c.pt", {"model_state_dict": {}})
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    load_checkpoint_file(tmp_path / "c.pt")
    assert calls and calls[0].get("weights_only") is True


def test_checkpoint_loads_onto_the_cpu_by_default_and_where_asked(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint_file(str(path), {"model_state_dict": {"w": torch.arange(3.0)}, "epoch": 2})
    loaded = load_checkpoint_file(path)
    assert loaded["epoch"] == 2 and loaded["model_state_dict"]["w"].device.type == "cpu"
    assert torch.equal(loaded["model_state_dict"]["w"], torch.arange(3.0))
    assert load_checkpoint_file(path, map_location="meta")["model_state_dict"]["w"].device.type == "meta"
    save_checkpoint_file(path, {"model_state_dict": {}, "epoch": 5})  # replaces the file whole
    assert load_checkpoint_file(path)["epoch"] == 5 and sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_tier_groups_and_combinations_best_first():
    groups = tier_groups(np.array([0, 3, 1, 3, 0]))
    assert list(groups) == [3, 1, 0]
    assert {k: v.tolist() for k, v in groups.items()} == {3: [1, 3], 1: [2], 0: [0, 4]}
    assert tier_combinations(np.array([0, 3, 2, 0])) == [(3, 2), (3, 0), (2, 0)]
    assert tier_combinations(np.array([1, 1])) == []
    assert count_cross_tier_pairs(np.array([3, 3, 3, 2, 0, 0])) == 3 * 1 + 3 * 2 + 1 * 2
    assert count_cross_tier_pairs(np.array([2, 2])) == 0


def test_sample_pairs_defaults_limits_and_coverage():
    ranks = np.array([3] * 4 + [2] * 7 + [1] * 3 + [0] * 5)
    default = sample_pairs(ranks, 50)
    explicit = sample_pairs(ranks, 50, seed=42, epoch=0, balance="tier_pair")
    assert all(np.array_equal(u, v) for u, v in zip(default, explicit))
    assert not np.array_equal(default[0], sample_pairs(ranks, 50, seed=43)[0])  # the seed matters
    assert all(a.dtype == np.int64 and a.shape == (50,) for a in default)
    one = sample_pairs(ranks, 1)
    assert len(one[0]) == 1 and one[2].tolist() == [-1]  # half of one pair, rounded down, is labelled +1
    with pytest.raises(ValueError, match="num_pairs must be positive, got 0"):
        sample_pairs(ranks, 0)
    with pytest.raises(ValueError, match="found only: none"):
        sample_pairs(np.array([], dtype=np.int64), 5)
    with pytest.raises(ValueError, match="found only: S"):
        sample_pairs(np.array([3, 3]), 5)
    # Every image of every tier is drawn (no index range cut short), as first and as second.
    a, b, y = sample_pairs(ranks, 4000, seed=5)
    assert set(a.tolist()) == set(b.tolist()) == set(range(len(ranks)))
    assert set(y.tolist()) == {1, -1} and np.all(np.sign(ranks[a] - ranks[b]) == y)


def test_uniform_balance_weights_combinations_by_their_pair_counts():
    # S-A has 2*20 = 40 pairs, S-C 2*50 = 100, A-C 20*50 = 1000: uniform over pairs draws each that often.
    ranks = np.array([3] * 2 + [2] * 20 + [0] * 50)
    a, b, y = sample_pairs(ranks, 20_000, seed=0, balance="uniform")
    lo = np.minimum(ranks[a], ranks[b])
    hi = np.maximum(ranks[a], ranks[b])
    for (h, l), pairs in {(3, 2): 40, (3, 0): 100, (2, 0): 1000}.items():
        assert float(np.mean((hi == h) & (lo == l))) == pytest.approx(pairs / 1140, abs=0.01)
    assert (y == 1).sum() == 10_000
    with pytest.raises(ValueError, match="unknown pair balance 'nope'; use one of tier_pair, uniform"):
        sample_pairs(ranks, 10, balance="nope")


# --- the cache format, pinned (mutation survivors of mirip/store/cache.py) -----------------------
def test_created_cache_layout(tmp_path):
    path = tmp_path / "new" / "deeper" / "c.h5"  # parent directories are made
    fp = {"feature_dim": 4, "backbone": "b"}  # no feature_dtype: float32; no views: none stored
    with FeatureCache.create(str(path), fp) as cache:
        assert cache.path == str(path) and (cache.num_rows, cache.dtype, cache.num_views) == (0, np.float32, 0)
        h5 = cache.h5
        assert h5["features"].shape == (0, 4) and h5["features"].chunks == (256, 4) and "views" not in h5
        assert h5["features"].maxshape == (None, 4)
        for name in ("paths", "source_size", "source_mtime_ns"):
            assert h5[name].shape == (0,) and h5[name].chunks == (4096,) and h5[name].maxshape == (None,)
        assert h5["source_size"].dtype == np.int64 and h5["paths"].dtype.kind == "O"
        for name in ("paths", "reasons", "source_size", "source_mtime_ns"):
            assert h5["failed"][name].shape == (0,) and h5["failed"][name].chunks == (1024,)
        assert (int(h5.attrs["num_rows"]), int(h5.attrs["num_failed"])) == (0, 0) and cache.failures() == {}
    assert sorted(os.listdir(path.parent)) == ["c.h5"]  # built under a temporary name, renamed
    # ~1 MiB feature chunks: rows = 2**20 // (dim * itemsize), between 1 and 256.
    for dim, dtype, rows in ((3000, "float32", 87), (2048, "float16", 256), (8192, "float16", 64),
                             (300_000, "float32", 1)):
        with FeatureCache.create(str(tmp_path / f"{dim}{dtype}.h5"), {"feature_dim": dim, "feature_dtype": dtype}) as c:
            assert c.h5["features"].chunks == (rows, dim) and c.dtype == np.dtype(dtype)
    for views, vrows in ((1, 256), (2, 128), (300, 1)):
        fp = {"feature_dim": 4, "feature_dtype": "float16", "views": views}
        with FeatureCache.create(str(tmp_path / f"v{views}.h5"), fp) as c:
            assert c.num_views == views and c.h5["views"].shape == (0, views, 4)
            assert c.h5["views"].chunks == (vrows, views, 4) and c.h5["views"].maxshape == (None, views, 4)
            assert c.h5["views"].dtype == np.float16


def test_open_refuses_files_missing_any_part_of_the_format(tmp_path):
    for missing in ("features", "num_rows", "fingerprint_keys"):
        path = tmp_path / f"no-{missing}.h5"
        write_cache(str(path), FP, ["a"], np.zeros((1, 4)))
        with h5py.File(path, "a") as h5:
            del (h5 if missing == "features" else h5.attrs)[missing]
        with pytest.raises(CacheError, match=rf"no-{missing}\.h5 is an HDF5 file but not a mirip feature cache"):
            open_cache(str(path))
    with open_cache(write_cache(str(tmp_path / "ok.h5"), FP, ["a"], np.zeros((1, 4)))) as cache:
        assert cache.path == str(tmp_path / "ok.h5")


def test_cache_reads_rows_in_any_order_and_refuses_out_of_range(tmp_path):
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write_cache(str(tmp_path / "c.h5"), FP, ["a", "b", "c"], feats, sizes=[5, 6, 7], mtimes=[8, 9, 10])
    with open_cache(path, "a") as cache:
        assert np.array_equal(cache.features([2, 0, 2, 1]), feats[[2, 0, 2, 1]])
        assert cache.features([]).shape == (0, 4) and cache.rows_for([]).dtype == np.int64
        for bad in ([-1], [3], [0, 3]):
            with pytest.raises(IndexError, match="row out of range for cache with 3 rows"):
                cache.features(bad)
        assert cache.row_of("b") == 1 and cache.row_of("zz") is None
        assert cache.source_facts()[1].tolist() == [8, 9, 10]
        assert load_dtype(cache) == torch.float16
        assert cache.load_features(device="meta").device.type == "meta"
        # Rows written past the counter (a killed append) stay invisible to every reader.
        for name in ("features", "paths", "source_size", "source_mtime_ns"):
            cache.h5[name].resize(5, axis=0)
        assert cache.features().shape == (3, 4) and len(cache.source_facts()[0]) == 3


def load_dtype(cache):
    return cache.load_features(dtype=torch.float16).dtype


def test_rows_for_lists_missing_and_stale_paths_together(tmp_path):
    path = write_cache(str(tmp_path / "c.h5"), FP, [f"p{i}" for i in range(12)], np.zeros((12, 4)))
    with open_cache(path, "a") as cache:
        cache.set_failures({"p1": ("unreadable", 1, 1)})
        with pytest.raises(CacheError) as info:
            cache.rows_for(["x"] + [f"m{i}" for i in range(10)] + ["p1"])
        assert str(info.value) == (
            f"11 image(s) have no cached feature in {path}: x, m0, m1, m2, m3, m4, m5, m6, m7, m8 ... (11 in all); "
            "1 image(s) changed since extraction and could not be read again (p1 (unreadable)). "
            "Run scripts/extract.py on them first.")
        with pytest.raises(CacheError) as info:
            cache.rows_for([f"m{i}" for i in range(10)])
        assert "m9. Run" in str(info.value) and "in all" not in str(info.value)  # exactly ten: no "..."
        with pytest.raises(FingerprintMismatch) as info:
            cache.check_fingerprint(dict(FP, image_size=56))
        assert str(info.value).startswith(f"feature cache {path} fingerprint does not match: image_size: the cache has 28, this command asks for 56")
        cache.check_fingerprint(dict(FP, image_size=56), only=["backbone"])
        with pytest.raises(FingerprintMismatch, match="torch_version"):
            cache.check_fingerprint(dict(FP, torch_version="0.1"), ignore=())


def test_append_and_replace_with_views_cast_and_commit(tmp_path):
    fp = dict(FP, feature_dtype="float16", views=2)
    path = str(tmp_path / "v.h5")
    f = np.arange(12, dtype=np.float64).reshape(3, 4) / 8
    v = np.arange(24, dtype=np.float64).reshape(3, 2, 4) / 8
    with FeatureCache.create(path, fp) as cache:
        assert cache.append(["a", "b"], f[:2], [1, 2], [3, 4], views=v[:2]) == range(0, 2)
        assert cache.append(["c"], f[2:], [5], [6], views=v[2:]) == range(2, 3)
        assert cache.row_of("c") == 2 and cache.index == {"a": 0, "b": 1, "c": 2}
        with pytest.raises(ValueError, match=r"stores 2 augmented views per image; pass views="):
            cache.append(["d"], f[:1], [0], [0])
        with pytest.raises(ValueError, match=r"expected views of shape \(1, 2, 4\), got \(1, 3, 4\)"):
            cache.append(["d"], f[:1], [0], [0], views=np.zeros((1, 3, 4)))
        with pytest.raises(ValueError, match=r"expected features of shape \(1, 4\), got \(1, 5\)"):
            cache.append(["d"], np.zeros((1, 5)), [0], [0], views=v[:1])
        with pytest.raises(CacheError, match=r"paths already cached \(use replace\): duplicates within the batch$"):
            cache.append(["d", "d"], f[:2], [0, 0], [0, 0], views=v[:2])
        with pytest.raises(CacheError, match=r"paths already cached.*\['b'\]"):
            cache.append(["b", "e"], f[:2], [0, 0], [0, 0], views=v[:2])
        assert cache.num_rows == 3
        cache.replace([2, 0], f[[0, 1]] + 1, [50, 10], [60, 30], views=v[[0, 1]] + 1)
    with open_cache(path) as cache:
        assert cache.features().dtype == np.float16 and cache.views().dtype == np.float16
        np.testing.assert_array_equal(cache.features(), np.stack([f[1] + 1, f[1], f[0] + 1]).astype(np.float16))
        np.testing.assert_array_equal(cache.views(), np.stack([v[1] + 1, v[1], v[0] + 1]).astype(np.float16))
        np.testing.assert_array_equal(cache.views([2, 0, 2]), cache.views()[[2, 0, 2]])
        assert cache.load_views(dtype=torch.float32).dtype == torch.float32 and cache.load_views().shape == (3, 2, 4)
        assert cache.load_views(device="meta").device.type == "meta"
        assert cache.views([]).shape == (0, 2, 4)
        assert [x.tolist() for x in cache.source_facts()] == [[10, 2, 50], [30, 4, 60]]
        with pytest.raises(IndexError, match="row out of range"):
            cache.views([3])
    with FeatureCache.create(str(tmp_path / "plain.h5"), FP) as cache:
        with pytest.raises(ValueError, match="created without augmented views; cannot store views"):
            cache.append(["a"], f[:1], [0], [0], views=v[:1])
        with pytest.raises(CacheError, match="holds no augmented views"):
            cache.views()
        cache.append(["a"], f[:1], [0], [0])
        with pytest.raises(ValueError, match="created without augmented views"):
            cache.replace([0], f[:1], [0], [0], views=v[:1])


def test_failure_list_is_replaced_whole_with_its_facts(tmp_path):
    path = write_cache(str(tmp_path / "c.h5"), FP, ["a"], np.zeros((1, 4)), mtimes=[7])
    with open_cache(path, "a") as cache:
        assert cache.source_facts()[0].tolist() == [0] and cache.source_facts()[1].tolist() == [7]
        cache.set_failures({"x": ("bad", 1, 2), "y": ("worse", 3, 4)})
        assert cache.failure_records() == {"x": ("bad", 1, 2), "y": ("worse", 3, 4)}
        assert int(cache.h5.attrs["num_failed"]) == 2
        cache.set_failures({"z": ("gone", 5, 6)})
        assert cache.failure_records() == {"z": ("gone", 5, 6)} and cache.h5["failed"]["paths"].shape == (1,)
        cache.set_failures({})
        assert cache.failures() == {} and cache.h5["failed"]["reasons"].shape == (0,)
    with pytest.raises(CacheError, match="already exists"):
        write_cache(path, FP, ["b"], np.ones((1, 4)))
    write_cache(path, FP, ["b"], np.ones((1, 4)), sizes=[9], overwrite=True)
    with open_cache(path) as cache:
        assert cache.paths == ["b"] and [x.tolist() for x in cache.source_facts()] == [[9], [0]]


def test_cache_defaults_refuse_to_replace_and_open_read_only(tmp_path):
    path = write_cache(str(tmp_path / "c.h5"), FP, list("abcdef"), np.zeros((6, 4)))
    with pytest.raises(CacheError, match="already exists"):
        FeatureCache.create(path, FP)  # overwrite defaults to False
    with FeatureCache.open(path) as cache:
        assert cache.h5.mode == "r" and cache.num_rows == 6
    with FeatureCache.open(path, "a") as cache:
        with pytest.raises(CacheError) as info:
            cache.append(list("abcdef"), np.zeros((6, 4)), [0] * 6, [0] * 6)
        assert str(info.value) == "paths already cached (use replace): ['a', 'b', 'c', 'd', 'e']"  # the first five
