"""The feature spec's contract, function by function (mirip/common/feature_spec.py; mutation-tested, docs/testing.md).

Every expected value here is written out by hand or computed naively (numpy loops), never with spec.py's helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mirip.common.feature_spec import (DEFAULT_SPEC, Entry, FeatureSpec, FeatureSpecError, apply_entry_scales,
                                       bank_entries, canonical_spec, checkpoint_feature_spec, default_spec,
                                       entry_scales, match_entries, parse_entry, resolve_feature_norm, resolve_layer)


def _raises_exactly(message: str):
    import re

    return pytest.raises(FeatureSpecError, match="^" + re.escape(message) + "$")


# --- entries and layers --------------------------------------------------------------------------
def test_resolve_layer_counts_from_either_end_and_refuses_the_rest_with_the_range():
    assert [resolve_layer(l, 4) for l in (1, 2, 4, -1, -2, -4)] == [1, 2, 4, 4, 3, 1]
    assert resolve_layer("3", "4") == 3 and resolve_layer(-1, 1) == 1
    for bad in (0, 5, -5, 99, -99):
        with _raises_exactly(f"layer {bad} does not exist in a backbone of 4 blocks; use 1..4 "
                             "(from the first block) or -1..-4 (from the last)"):
            resolve_layer(bad, 4)


def test_an_entry_keeps_its_layer_as_written_and_resolves_its_block():
    e = Entry("mean", -2)
    assert e.name == "mean@-2" and str(e) == "mean@-2"
    assert e.block(12) == 11 and Entry("std", 3).block(12) == 3
    with pytest.raises(FeatureSpecError):
        Entry("cls", -13).block(12)


def test_parse_entry_reads_pooling_and_signed_layer():
    assert parse_entry("cls@-1") == Entry("cls", -1)
    assert parse_entry("  mean@12 ") == Entry("mean", 12)
    assert parse_entry("std@+3") == Entry("std", 3)
    assert parse_entry("cls_mean@-1") == Entry("cls_mean", -1)  # format-1 caches only
    with _raises_exactly("bad feature entry 'cls@1.5': write POOLING@LAYER, e.g. cls@-1 or mean@-4"):
        parse_entry("cls@1.5")
    for bad in ("cls", "@-1", "cls@", "CLS@-1", "cls@-1x", "xcls@-1 y", "cls-1"):
        with pytest.raises(FeatureSpecError, match="write POOLING@LAYER"):
            parse_entry(bad)
    with _raises_exactly("bad feature entry 'max@-1': unknown pooling 'max'; use one of cls, mean, std"):
        parse_entry("max@-1")
    with _raises_exactly("bad feature entry 'cls@0': layers are 1-based (1 is the first block) or negative "
                         "(-1 is the last block); 0 is neither"):
        parse_entry("cls@0")
    with pytest.raises(FeatureSpecError, match="0 is neither"):
        parse_entry("cls@-0")


def test_bank_entries_are_pooling_major_in_the_given_order_and_unique():
    got = bank_entries([-1, 2], ["mean", "cls"])
    assert [(e.pooling, e.layer) for e in got] == [("mean", -1), ("mean", 2), ("cls", -1), ("cls", 2)]
    assert [e.name for e in bank_entries([3], ["std"])] == ["std@3"]
    for layers, poolings in (([], ["cls"]), ([-1], []), ([], [])):
        with _raises_exactly("a feature bank needs at least one layer and one pooling"):
            bank_entries(layers, poolings)
    with _raises_exactly("the bank names entries more than once: cls@-1"):
        bank_entries([-1, -1, -1], ["cls"])
    with pytest.raises(FeatureSpecError, match="unknown pooling"):
        bank_entries([-1], ["max"])


# --- specs ---------------------------------------------------------------------------------------
def test_spec_parse_reads_groups_and_passes_a_spec_through():
    spec = FeatureSpec.parse("cls@-4, -3+mean@1 +std@-1")
    assert spec.entries == (Entry("cls", -4), Entry("cls", -3), Entry("mean", 1), Entry("std", -1))
    assert FeatureSpec.parse(spec) is spec
    assert len(spec) == 4 and len(FeatureSpec.parse("cls@-1")) == 1
    assert spec.names == ["cls@-4", "cls@-3", "mean@1", "std@-1"]
    # Layers as written: cls@4 and cls@-1 are two names, even where they are one block.
    assert FeatureSpec.parse("cls@4+cls@-1").names == ["cls@4", "cls@-1"]


@pytest.mark.parametrize("text, part", [("cls", "cls"), ("@-1", "@-1"), ("cls@", "cls@"), ("cls@-1+", ""),
                                         ("+cls@-1", ""), ("cls@-1++mean@-1", ""), ("cls@-1+mean", "mean")])
def test_a_part_that_is_not_pooling_at_layers_is_named(text, part):
    with _raises_exactly(f"bad feature spec {text!r}: part {part!r} is not POOLING@LAYER[,LAYER...] "
                         "(parts are joined by '+', e.g. cls@-4,-3,-2,-1+mean@-1)"):
        FeatureSpec.parse(text)


def test_spec_errors_name_the_spec_and_the_entry():
    for empty in ("", "   "):
        with _raises_exactly("empty feature spec; write e.g. cls@-1 or cls@-4,-3,-2,-1+mean@-1"):
            FeatureSpec.parse(empty)
    with _raises_exactly("bad feature spec 'cls@-1,0': bad feature entry 'cls@0': layers are 1-based (1 is the "
                         "first block) or negative (-1 is the last block); 0 is neither"):
        FeatureSpec.parse("cls@-1,0")
    with _raises_exactly("bad feature spec 'cls@-1,': bad feature entry 'cls@': write POOLING@LAYER, e.g. cls@-1 "
                         "or mean@-4"):
        FeatureSpec.parse("cls@-1,")
    with _raises_exactly("feature spec 'cls@-1,-2+mean@1+cls@-1+mean@1,1' names entries more than once: "
                         "cls@-1, mean@1"):
        FeatureSpec.parse("cls@-1,-2+mean@1+cls@-1+mean@1,1")
    with _raises_exactly("bad feature spec 'cls@1,2@3': bad feature entry 'cls@2@3': write POOLING@LAYER, e.g. "
                         "cls@-1 or mean@-4"):
        FeatureSpec.parse("cls@1,2@3")
    with pytest.raises(FeatureSpecError) as info:
        FeatureSpec.parse("cls@x")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_the_canonical_form_joins_only_adjacent_entries_of_one_pooling():
    cases = {
        "cls@-1": "cls@-1",
        " cls@-4 , -3,-2,-1 + mean@-1 ": "cls@-4,-3,-2,-1+mean@-1",
        "cls@1+cls@2+std@2+cls@3": "cls@1,2+std@2+cls@3",
        "mean@-1+std@-1": "mean@-1+std@-1",
    }
    for text, canonical in cases.items():
        assert str(FeatureSpec.parse(text)) == canonical
        assert FeatureSpec.parse(text).canonical == canonical
        assert canonical_spec(text) == canonical
    assert str(FeatureSpec.from_entries([Entry("cls", 1), "cls@2", "mean@-1"])) == "cls@1,2+mean@-1"
    assert FeatureSpec.from_entries(["std@2"]).entries == (Entry("std", 2),)
    given = Entry("mean", -3)
    assert FeatureSpec.from_entries([given]).entries[0] is given  # entries are kept, not re-parsed
    assert canonical_spec(FeatureSpec((Entry("cls", -1), Entry("cls", -2)))) == "cls@-1,-2"


# --- matching a spec to a bank -------------------------------------------------------------------
def test_match_entries_by_name_in_spec_order():
    bank = ["cls@-1", "mean@-1", "cls@-2"]
    assert match_entries("cls@-2+cls@-1", bank) == [2, 0]
    assert match_entries("mean@-1+cls@-1,-2", bank) == [1, 0, 2]
    # Without blocks (or without the block count) only names match.
    for blocks, layers in ((None, 4), ([4, 4, 3], None), ([4, 4, 3], 0)):
        with pytest.raises(FeatureSpecError, match="names cls@4, which"):
            match_entries("cls@4", bank, blocks, layers)


def test_match_entries_by_absolute_block_and_pooling():
    bank, blocks = ["cls@-1", "mean@-1", "cls@-2"], [4, 4, 3]
    assert match_entries("cls@3,4+mean@4", bank, blocks, 4) == [2, 0, 1]
    assert match_entries("cls@3", bank, np.array([4, 4, 3]), 4) == [2]
    with pytest.raises(FeatureSpecError, match="names mean@3, which"):  # block 3 holds only cls
        match_entries("mean@3", bank, blocks, 4)
    # An entry outside the backbone is missing, not an error of its own.
    with _raises_exactly("feature spec cls@-1,-9,9 names cls@-9, cls@9, which the feature cache does not "
                         "hold; it holds: cls@-1, mean@-1, cls@-2. Choose among those, or extract a bank with "
                         "them (scripts/extract.py --layers ... --pooling ...)"):
        match_entries("cls@-1+cls@-9,9", bank, blocks, 4)
    # A name match wins over a block match: two entries of one block under different names.
    assert match_entries("cls@-1", ["cls@-1", "cls@4"], [4, 4], 4) == [0]
    assert match_entries("cls@4", ["cls@4", "cls@-1"], [4, 4], 4) == [0]


def test_match_entries_says_where_it_looked():
    with _raises_exactly("feature spec std@-1 names std@-1, which checkpoint x.pt does not hold; it holds: "
                         "cls@-1. Choose among those, or extract a bank with them "
                         "(scripts/extract.py --layers ... --pooling ...)"):
        match_entries("std@-1", ["cls@-1"], where="checkpoint x.pt")


def test_default_spec_is_the_only_entry_else_cls_last():
    assert default_spec(["mean@-1"]) == "mean@-1"
    assert default_spec(["cls_mean@-1"]) == "cls_mean@-1"
    assert default_spec([" std@2 "]) == "std@2"
    assert default_spec(["mean@-1", "std@-1"]) == "cls@-1"
    assert default_spec([]) == "cls@-1"
    assert DEFAULT_SPEC == "cls@-1"


def test_feature_norm_auto_scales_only_specs_of_several_entries():
    assert resolve_feature_norm("auto", "cls@-1") == "none"
    assert resolve_feature_norm("auto", "cls@-1,-2") == "entry"
    assert resolve_feature_norm("auto", FeatureSpec.parse("cls@-1+mean@-1")) == "entry"
    assert resolve_feature_norm("entry", "cls@-1") == "entry"
    assert resolve_feature_norm("none", "cls@-1+mean@-1") == "none"
    for bad in ("Auto", "", "rms"):
        with _raises_exactly(f"feature_norm must be one of auto, entry, none, got {bad!r}"):
            resolve_feature_norm(bad, "cls@-1")


# --- per-entry scaling -----------------------------------------------------------------------------
def _naive_scales(x: np.ndarray, dims, rows=None):
    x = np.asarray(x, dtype=np.float64)
    if rows is not None:
        x = x[list(rows)]
    out, start = [], 0
    for d in dims:
        cols = x[:, start:start + d]
        variances = []
        for j in range(d):
            c = cols[:, j]
            m = sum(c) / len(c) if len(c) else 0.0
            variances.append(sum((v - m) ** 2 for v in c) / len(c) if len(c) else 0.0)
        rms = (sum(variances) / d) ** 0.5
        out.append(1.0 / rms if rms > 0 else 1.0)
        start += d
    return out


def test_entry_scales_are_one_over_each_entries_rms_spread():
    g = np.random.default_rng(3)
    x32 = torch.from_numpy((g.normal(size=(7, 5)) * [1.0, 3.0, 0.1, 0.2, 7.0] + 0.3).astype(np.float32))
    got = entry_scales(x32, [2, 3])
    want = _naive_scales(x32.numpy(), [2, 3])
    np.testing.assert_allclose(got, want, rtol=1e-12)  # computed in float64, not float32
    assert isinstance(got, list) and len(got) == 2
    rows = np.array([0, 2, 3, 6])
    rows.setflags(write=False)  # split positions often come read-only from pandas
    np.testing.assert_allclose(entry_scales(x32, [1, 4], rows), _naive_scales(x32.numpy(), [1, 4], [0, 2, 3, 6]),
                               rtol=1e-12)
    np.testing.assert_allclose(entry_scales(x32, [5], [1, 4]), _naive_scales(x32.numpy(), [5], [1, 4]), rtol=1e-12)
    # Three entries, spreads below and above 1: each entry starts where the previous one ended.
    small = x32 * torch.tensor([0.05, 0.05, 50.0, 0.3, 0.3])
    want = _naive_scales(small.numpy(), [2, 1, 2])
    assert want[0] > 1 and want[1] < 1
    np.testing.assert_allclose(entry_scales(small, [2, 1, 2]), want, rtol=1e-12)
    # A constant entry (no spread) and no rows at all leave the scale at 1.
    flat = torch.cat([torch.full((4, 2), 2.5), torch.arange(8.0).reshape(4, 2)], dim=1)
    assert entry_scales(flat, [2, 2])[0] == 1.0
    np.testing.assert_allclose(entry_scales(flat, [2, 2])[1], 1 / np.sqrt(5.0), rtol=1e-12)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rows: no variance of nothing computed (torch warns about it)
        assert entry_scales(flat, [2, 2], rows=[]) == [1.0, 1.0]


def test_apply_entry_scales_multiplies_each_entrys_columns_in_a_copy():
    x = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(2, 6)
    before = x.clone()
    out = apply_entry_scales(x, [1, 2, 3], [2.0, 0.5, -1.0])
    want = before.numpy() * np.array([2.0, 0.5, 0.5, -1.0, -1.0, -1.0])
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6)
    assert out.dtype == torch.float64 and torch.equal(x, before)
    assert apply_entry_scales(x, [6], None) is x and apply_entry_scales(x, [6], []) is x
    # The entries are the last dimension: one image (1-d) or views of images (3-d) scale the same way.
    np.testing.assert_allclose(apply_entry_scales(x[0], [1, 2, 3], [2.0, 0.5, -1.0]).numpy(), want[0], rtol=1e-6)
    views = apply_entry_scales(x.reshape(2, 1, 6), [1, 2, 3], [2.0, 0.5, -1.0])
    np.testing.assert_allclose(views.numpy().reshape(2, 6), want, rtol=1e-6)
    with _raises_exactly("1 entry scales for 1 entries of dims [6] do not fit features of width 3"):
        apply_entry_scales(torch.ones(2, 6, 3), [6], [1.0])
    half = apply_entry_scales(x.half(), [3, 3], [1.0, 3.0])
    assert half.dtype == torch.float16
    with _raises_exactly("2 entry scales for 3 entries of dims [1, 2, 3] do not fit features of width 6"):
        apply_entry_scales(x, [1, 2, 3], [1.0, 2.0])
    with _raises_exactly("2 entry scales for 2 entries of dims [2, 3] do not fit features of width 6"):
        apply_entry_scales(x, [2, 3], [1.0, 2.0])


# --- a checkpoint's spec ---------------------------------------------------------------------------
def test_checkpoint_feature_spec_reads_the_spec_else_the_format_1_entry():
    assert checkpoint_feature_spec({"feature_spec": "cls@-1, -2 +mean@-1"}) == "cls@-1,-2+mean@-1"
    fp = {"feature_entries": ["std@-2", "cls@-1"], "pooling": "mean"}
    assert checkpoint_feature_spec({"feature_spec": "std@2", "fingerprint": fp}) == "std@2"
    assert checkpoint_feature_spec({"feature_spec": "", "fingerprint": {"feature_entries": ["mean@ 3"]}}) == "mean@3"
    assert checkpoint_feature_spec({"fingerprint": {"pooling": "mean"}}) == "mean@-1"
    assert checkpoint_feature_spec({"fingerprint": {"pooling": "cls_mean", "feature_entries": []}}) == "cls_mean@-1"
    assert checkpoint_feature_spec({"fingerprint": {"pooling": None}}) == "cls@-1"
    assert checkpoint_feature_spec({"fingerprint": None}) == "cls@-1"
    assert checkpoint_feature_spec({}) == "cls@-1"
    # Several entries and no spec: the seed's default, not the pooling at the last block.
    assert checkpoint_feature_spec({"fingerprint": fp}) == "cls@-1"
