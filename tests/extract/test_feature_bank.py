"""The feature bank: spec syntax, hooks on the requested blocks, bank caches, format-1 caches, specs in stage two."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from _extract_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from _extract_helpers import extract, make_images
from mirip.common.feature_spec import FeatureSpec, FeatureSpecError, match_entries, resolve_layer
from mirip.extract.run import open_for_append
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.store.cache import open_cache, write_cache
from mirip.store.cache_errors import CacheError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
LAYERS = 4


@pytest.fixture(scope="module")
def deep_backbone(tmp_path_factory) -> str:
    """A tiny DINOv2 with four blocks, so that -4..-1 are all distinct blocks."""
    d = tmp_path_factory.mktemp("deep-dinov2")
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, mlp_ratio=2,
                             patch_size=14, image_size=28)).save_pretrained(d)
    return str(d)


# --- the spec ------------------------------------------------------------------------------------
def test_spec_parses_groups_in_order_and_prints_canonically():
    spec = FeatureSpec.parse(" cls@-4,-3, -2,-1 + mean@-1 ")
    assert spec.names == ["cls@-4", "cls@-3", "cls@-2", "cls@-1", "mean@-1"]
    assert str(spec) == "cls@-4,-3,-2,-1+mean@-1"
    assert str(FeatureSpec.parse("mean@-1+std@-1")) == "mean@-1+std@-1"
    assert str(FeatureSpec.from_entries(["cls@1", "cls@2", "std@2", "cls@3"])) == "cls@1,2+std@2+cls@3"


@pytest.mark.parametrize("bad, words", [
    ("", "empty"), ("cls", "POOLING@LAYER"), ("max@-1", "unknown pooling"), ("cls@0", "0 is neither"),
    ("cls@-1+cls@-1", "more than once"), ("cls@x", "POOLING@LAYER"),
])
def test_bad_specs_are_refused_with_what_to_write(bad, words):
    with pytest.raises(FeatureSpecError, match=words):
        FeatureSpec.parse(bad)


def test_layers_resolve_from_either_end_and_out_of_range_is_refused():
    assert [resolve_layer(l, 24) for l in (-1, -4, 1, 24)] == [24, 21, 1, 24]
    with pytest.raises(FeatureSpecError, match="1..24"):
        resolve_layer(-25, 24)
    # A spec finds an entry by name, or by its absolute block when the bank records blocks.
    assert match_entries("cls@4+mean@-1", ["cls@-1", "mean@-1"], [4, 4], 4) == [0, 1]
    with pytest.raises(FeatureSpecError, match="holds: cls@-1, mean@-1"):
        match_entries("std@-1", ["cls@-1", "mean@-1"], [4, 4], 4)


# --- the extractor -------------------------------------------------------------------------------
def _naive_entries(backbone: str, x: torch.Tensor) -> dict:
    """Every block's tokens from output_hidden_states, through the final norm, pooled by hand."""
    model = Dinov2Model.from_pretrained(backbone).eval()
    with torch.no_grad():
        states = model(pixel_values=x, output_hidden_states=True).hidden_states  # embeddings, block 1..L
        out = {}
        for block in range(1, LAYERS + 1):
            t = model.layernorm(states[block])
            for layer in (block, block - LAYERS - 1):
                out[f"cls@{layer}"] = t[:, 0]
                out[f"mean@{layer}"] = t[:, 1:].mean(1)
                out[f"std@{layer}"] = torch.sqrt(((t[:, 1:] - t[:, 1:].mean(1, keepdim=True)) ** 2).mean(1))
    return out


def test_bank_entries_equal_a_naive_computation_and_cls_last_is_the_default_feature_bit_for_bit(deep_backbone):
    x = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    default = DINOv2FeatureExtractor(deep_backbone, device="cpu").extract(x)
    bank = DINOv2FeatureExtractor(deep_backbone, device="cpu", layers=[-4, -3, -2, -1], pooling=["cls", "mean", "std"])
    assert bank.entry_names[:4] == ["cls@-4", "cls@-3", "cls@-2", "cls@-1"] and len(bank.entry_names) == 12
    assert bank.entry_blocks[:4] == [1, 2, 3, 4] and bank.output_dim == 12 * 32
    got = bank.extract_entries(x)
    assert torch.equal(got["cls@-1"], default)  # bit for bit
    assert torch.equal(got["mean@-1"], DINOv2FeatureExtractor(deep_backbone, device="cpu", pooling="mean").extract(x))
    naive = _naive_entries(deep_backbone, x)
    for name, value in got.items():
        torch.testing.assert_close(value, naive[name], atol=1e-5, rtol=1e-5, msg=name)
    assert got["std@-2"].std() > 0 and not torch.allclose(got["cls@-4"], got["cls@-1"])
    # An explicit list, in any order and with positive indices, gives the same numbers in that order.
    picked = DINOv2FeatureExtractor(deep_backbone, device="cpu", entries="std@2+cls@4+mean@1").extract(x)
    torch.testing.assert_close(picked, torch.cat([naive["std@2"], naive["cls@4"], naive["mean@1"]], 1),
                               atol=1e-5, rtol=1e-5)


def test_hooks_go_on_exactly_the_requested_blocks_and_the_rest_of_the_model_is_skipped(deep_backbone):
    ext = DINOv2FeatureExtractor(deep_backbone, device="cpu", entries="cls@1+mean@2")
    blocks = ext.backbone.encoder.layer
    hooked, ran = [], []
    original = torch.nn.Module.register_forward_hook

    def spy(module, hook, *a, **k):
        hooked.append(next(i for i, b in enumerate(blocks, 1) if b is module))
        return original(module, hook, *a, **k)

    for i, b in enumerate(blocks, 1):
        b.register_forward_pre_hook(lambda m, args, i=i: ran.append(i))
    torch.nn.Module.register_forward_hook = spy
    try:
        ext.extract(torch.randn(2, 3, 28, 28))
    finally:
        torch.nn.Module.register_forward_hook = original
    assert sorted(hooked) == [1, 2]
    assert ran == [1, 2]  # blocks 3 and 4 are not needed, so they never run
    assert all(len(b._forward_hooks) == 0 for b in blocks)  # the extractor's hooks are gone after the forward
    with pytest.raises(ValueError, match="1..4"):
        DINOv2FeatureExtractor(deep_backbone, device="cpu", layers=[-5])


# --- the cache -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bank_cache(deep_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    names = make_images(root / "images", 12)
    tiers = "SSSAAABBBCCC"
    pd.DataFrame({"filename": names, "tier": list(tiers)}).to_csv(root / "meta.csv", index=False)
    extract(root / "images", root / "one.h5", deep_backbone)
    summary = extract(root / "images", root / "bank.h5", deep_backbone, layers=[-4, -3, -2, -1],
                      pooling=["cls", "mean", "std"])
    return root, summary


def test_a_bank_cache_lists_its_entries_and_cls_last_equals_the_single_vector_cache(bank_cache):
    root, summary = bank_cache
    assert "12 entries: cls@-4, cls@-3" in summary.to_text() and "MiB on disk" in summary.to_text()
    assert summary.size_bytes == os.path.getsize(root / "bank.h5")
    with open_cache(str(root / "bank.h5")) as bank, open_cache(str(root / "one.h5")) as one:
        fp = bank.fingerprint
        assert fp["format_version"] == 3 and fp["backbone_layers"] == LAYERS
        assert fp["feature_entries"] == bank.entries and fp["feature_entry_blocks"] == [1, 2, 3, 4] * 3
        assert one.entries == ["cls@-1"] and one.default_spec == "cls@-1"
        assert bank.h5["features"].chunks[1] == 32  # one entry per chunk column
        np.testing.assert_array_equal(bank.features(spec="cls@-1"), one.features())  # bit for bit
        both = bank.features([3, 0], spec="mean@-1+cls@4")  # by name or by absolute block
        full = bank.features()
        np.testing.assert_array_equal(both, np.concatenate([full[[3, 0], 224:256], full[[3, 0], 96:128]], 1))
        with pytest.raises(FeatureSpecError, match=r"holds: cls@-4, cls@-3, .*std@-1"):
            bank.features(spec="cls@-1+mean@-5")


SPLIT = ["--train-ratio", "0.5", "--val-ratio", "0.25", "--test-ratio", "0.25"]


def _format1_cache(path, dim=6, n=16, pooling="cls", seed=0):
    names = [f"img_{i:03d}.png" for i in range(n)]
    fp = {"format_version": 1, "backbone": "facebook/dinov2-small", "backbone_revision": "", "pretrained": True,
          "random_init_seed": -1, "feature_dim": dim, "image_size": 56, "resize_mode": "pad", "patch_size": 14,
          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "pooling": pooling, "precision": "fp32",
          "feature_dtype": "float32", "views": 0, "mirip_version": "0.1.0", "torch_version": "2.11",
          "transformers_version": "5.17"}
    rng = np.random.default_rng(seed)
    ranks = np.repeat([3, 2, 1, 0], n // 4)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    feats[:, 0] += ranks  # learnable
    write_cache(str(path), fp, names, feats)
    return names, fp


def test_a_format_1_cache_reads_as_one_entry_trains_and_is_never_rewritten(tmp_path):
    import train as train_script

    names, fp = _format1_cache(tmp_path / "old.h5", pooling="mean")
    pd.DataFrame({"filename": names, "tier": list("SSSSAAAABBBBCCCC")}).to_csv(tmp_path / "m.csv", index=False)
    before = (tmp_path / "old.h5").read_bytes()
    with open_cache(str(tmp_path / "old.h5")) as cache:
        assert cache.format_version == 1 and cache.entries == ["mean@-1"] and cache.default_spec == "mean@-1"
        assert cache.features(spec="mean@-1").shape == (16, 6)
    rc = train_script.main(["--features", str(tmp_path / "old.h5"), "--metadata", str(tmp_path / "m.csv"),
                            "--output-dir", str(tmp_path / "run"), "--max-epochs", "2", "--pairs-per-epoch", "64",
                            "--eval-pairs", "32", "--hidden-dim", "8", "--projector-dim", "4", "--no-progress",
                            "--device", "cpu", *SPLIT])
    assert rc == 0
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["feature_spec"] == "mean@-1" and ckpt["head"]["input_dim"] == 6
    assert json.loads((tmp_path / "run" / "config.json").read_text())["feature"] == "mean@-1"
    # Appending with today's fingerprint is refused (format_version differs) and the file stays as it was.
    new_fp = {**fp, "format_version": 2, "feature_entries": ["mean@-1"], "feature_entry_blocks": [12],
              "feature_entry_dims": [6], "backbone_layers": 12}
    with pytest.raises(CacheError, match="format_version"):
        open_for_append(str(tmp_path / "old.h5"), new_fp, overwrite=False)
    assert (tmp_path / "old.h5").read_bytes() == before


def test_a_spec_the_cache_lacks_is_refused_before_training_listing_the_entries(bank_cache, tmp_path, capsys):
    import train as train_script

    root, _ = bank_cache
    rc = train_script.main(["--features", str(root / "one.h5"), "--metadata", str(root / "meta.csv"),
                            "--output-dir", str(tmp_path / "run"), "--feature", "cls@-4,-3,-2,-1+mean@-1",
                            "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "cls@-4, cls@-3, cls@-2, mean@-1" in err and "it holds: cls@-1" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_train_evaluate_on_a_bank_spec_with_per_entry_scaling(bank_cache, tmp_path):
    import evaluate as evaluate_script
    import train as train_script

    root, _ = bank_cache
    spec = "cls@-2,-1+mean@-1+std@-1"
    common = ["--features", str(root / "bank.h5"), "--metadata", str(root / "meta.csv"), "--max-epochs", "2",
              "--pairs-per-epoch", "64", "--eval-pairs", "32", "--hidden-dim", "8", "--projector-dim", "4",
              "--no-progress", "--device", "cpu", "--train-ratio", "0.5", "--val-ratio", "0.25", "--test-ratio", "0.25"]
    assert train_script.main(common + ["--output-dir", str(tmp_path / "run"), "--feature", spec]) == 0
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["feature_spec"] == spec and ckpt["head"]["input_dim"] == 4 * 32
    assert ckpt["feature_norm"] == "entry" and len(ckpt["feature_scales"]) == 4
    # The scales are 1 / RMS spread of each entry over the train split, computed here by hand.
    from mirip.training.run_config import RunConfig
    from mirip.training.run_data import load_run_data

    cfg = RunConfig.from_dict({**ckpt["run_config"]})
    data = load_run_data(cfg)
    with open_cache(str(root / "bank.h5")) as cache:
        raw = cache.features(cache.rows_for(data.names), spec=spec)[data.splits["train"]].astype(np.float64)
    for k, scale in enumerate(ckpt["feature_scales"]):
        block = raw[:, 32 * k:32 * (k + 1)]
        assert scale == pytest.approx(1 / np.sqrt(((block - block.mean(0)) ** 2).mean()), rel=1e-6)
    # evaluate.py needs no flag: the spec and scales come from the checkpoint.
    out = tmp_path / "eval.json"
    assert evaluate_script.main(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--features",
                                 str(root / "bank.h5"), "--metadata", str(root / "meta.csv"), "--split", "test",
                                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert result["feature_spec"] == spec and result["model"]["accuracy"] == test["model"]["accuracy"]
    # Without per-entry scaling the same spec trains on the raw columns.
    assert train_script.main(common + ["--output-dir", str(tmp_path / "raw"), "--feature", spec,
                                       "--feature-norm", "none"]) == 0
    raw_ckpt = torch.load(tmp_path / "raw" / "best.pt", weights_only=True)
    assert raw_ckpt["feature_norm"] == "none" and raw_ckpt["feature_scales"] is None


def test_full_image_scores_equal_cache_scores_for_a_multi_layer_multi_pooling_spec(bank_cache, tmp_path):
    import train as train_script

    from mirip.scoring.scorer import load_scorer
    from mirip.training.run_config import RunConfig
    from mirip.training.run_data import load_run_data

    root, _ = bank_cache
    spec = "cls@-3,-1+mean@-2+std@-1"
    assert train_script.main(["--features", str(root / "bank.h5"), "--metadata", str(root / "meta.csv"),
                              "--output-dir", str(tmp_path / "run"), "--feature", spec, "--max-epochs", "2",
                              "--pairs-per-epoch", "64", "--eval-pairs", "32", "--hidden-dim", "8",
                              "--projector-dim", "4", "--no-progress", "--device", "cpu", *SPLIT]) == 0
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    scorer = load_scorer(tmp_path / "run" / "best.pt", device="cpu")
    ext = scorer.model.feature_extractor
    assert ext.entry_names == ["cls@-3", "cls@-1", "mean@-2", "std@-1"] and ext.entry_blocks == [2, 4, 3, 4]
    assert scorer.describe()["feature_spec"] == spec
    data = load_run_data(RunConfig.from_dict(ckpt["run_config"]))  # the scaled cached features, as trained on
    paths = [str(root / "images" / n) for n in data.names]
    full = torch.tensor(scorer.score_paths(paths, batch_size=5, progress=False).scores)
    with torch.no_grad():
        cached = scorer.model.score_head(scorer.model.projector(data.features.float())).reshape(-1)
    torch.testing.assert_close(full, cached, atol=1e-5, rtol=1e-5)
    assert cached.std() > 1e-4


def test_sweep_over_two_specs_reads_once_groups_by_spec_and_best_carries_its_spec(bank_cache, tmp_path):
    import sweep as sweep_script

    root, _ = bank_cache
    out = tmp_path / "sweep"
    rc = sweep_script.main(["--features", str(root / "bank.h5"), "--metadata", str(root / "meta.csv"),
                            "--output-dir", str(out), "--feature", "cls@-1", "cls@-4,-3,-2,-1+mean@-1",
                            "--margin", "0.5", "1.0", "--hidden-dim", "8", "--projector-dim", "4", "--max-epochs",
                            "2", "--pairs-per-epoch", "64", "--eval-pairs", "32", "--no-progress", "--device", "cpu", *SPLIT])
    assert rc == 0
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and sorted(set(table["feature"])) == ["cls@-1", "cls@-4,-3,-2,-1+mean@-1"]
    assert table["config_id"].is_unique
    summary = (out / "summary.md").read_text()
    assert "`cls@-1`" in summary and "`cls@-4,-3,-2,-1+mean@-1`" in summary
    best = json.loads((out / "best.json").read_text())
    assert "--feature" in best["train_argv"]
    assert best["train_argv"][best["train_argv"].index("--feature") + 1] == best["config"]["feature"]
    for _, row in table.iterrows():
        ckpt = torch.load(out / row["checkpoint"], weights_only=True)
        assert ckpt["feature_spec"] == row["feature"]
        assert ckpt["head"]["input_dim"] == (32 if row["feature"] == "cls@-1" else 5 * 32)
