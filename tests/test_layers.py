"""The package's layers: the feature-spec vocabulary at the bottom, the model layer below stage one, one face
over the cache's role modules. Import checks run in a fresh interpreter, where ``sys.modules`` shows what an
import really pulls in (this process has imported everything already)."""

from __future__ import annotations

import ast
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mirip.features.cache import CacheWriteError, FeatureCache, open_cache

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT / "mirip" / "feature_spec.py"
UPPER_LAYERS = ("mirip.ml", "mirip.features", "mirip.training", "mirip.sweep", "mirip.inference", "mirip.bench")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter on this checkout; it prints one JSON object, returned here."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _loaded(prefixes) -> str:
    return ("import json, sys; print(json.dumps(sorted(m for m in sys.modules "
            f"if any(m == p or m.startswith(p + '.') for p in {tuple(prefixes)!r}))))")


def test_the_extractor_imports_no_part_of_stage_one():
    got = _fresh("import mirip.ml.feature_extractor, mirip.ml.ranking_model\n" + _loaded(["mirip.features"]))
    assert got == [], f"importing the model layer pulled in stage one: {got}"


def test_the_vocabulary_imports_nothing_above_it():
    # Statically, every import in the file (those inside functions too) ...
    tree = ast.parse(VOCAB.read_text(encoding="utf-8"))
    named = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    named += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in named if m == "mirip" or m.startswith("mirip.")], named
    # ... and at run time, with the entry-scaling functions' own imports made.
    got = _fresh("import torch\nimport mirip.feature_spec as v\n"
                 "x = torch.arange(12.0).reshape(4, 3)\n"
                 "v.apply_entry_scales(x, [1, 2], v.entry_scales(x, [1, 2], [0, 2]))\n"
                 "v.checkpoint_feature_spec({'fingerprint': {'pooling': 'mean'}})\n" + _loaded(UPPER_LAYERS))
    assert got == [], f"the vocabulary pulled in upper layers: {got}"


def test_the_old_spec_path_and_the_extractors_poolings_are_the_vocabularys_own_objects():
    import mirip.feature_spec as vocab
    import mirip.features.spec as old
    from mirip.ml import feature_extractor

    for name in old.__all__:
        assert getattr(old, name) is getattr(vocab, name), name
    assert feature_extractor.POOLINGS is vocab.POOLINGS
    assert not hasattr(sys.modules["mirip.features"], "__getattr__"), "mirip.features needs no lazy loader"


def test_pooling_names_are_spelt_out_only_in_the_vocabulary():
    """No module but the vocabulary binds a tuple of pooling names at module level (the copies that drift)."""
    names = {"cls", "mean", "std", "cls_mean"}
    offenders = []
    for path in sorted((ROOT / "mirip").rglob("*.py")):
        if path == VOCAB:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            value = getattr(node, "value", None)
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(value, (ast.Tuple, ast.List)):
                items = [e.value for e in value.elts if isinstance(e, ast.Constant)]
                if len(items) >= 2 and len(items) == len(value.elts) and set(items) <= names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


FP = {"format_version": 3, "backbone": "x", "feature_dim": 4, "feature_dtype": "float32", "views": 0}


def test_set_attribute_is_stored_and_a_failed_one_is_one_write_error_with_the_rows_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "c.h5")
    cache = FeatureCache.create(path, FP)
    cache.append(["a.png", "b.png"], np.arange(8, dtype=np.float32).reshape(2, 4), [1, 2], [3, 4])
    cache.set_attribute("extract_config", '{"batch_size": 2}')
    cache.close()
    with h5py.File(path, "r") as h5:  # read back with h5py alone, not through the cache
        assert h5.attrs["extract_config"] == '{"batch_size": 2}'

    cache = open_cache(path, "a")

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.AttributeManager, "__setitem__", full)
    with pytest.raises(CacheWriteError, match="No space left on device") as info:
        cache.set_attribute("extract_config", "{}")
    monkeypatch.undo()
    assert info.value.committed == 2 and "2 rows are committed" in str(info.value)
    assert not cache.h5.id.valid, "a failed write closes the file"
    assert not list(tmp_path.glob("*.tmp-*")), "and removes the reserve"
    with h5py.File(path, "r") as h5:
        assert int(h5.attrs["num_rows"]) == 2 and h5.attrs["extract_config"] == '{"batch_size": 2}'
        np.testing.assert_array_equal(h5["features"][:], np.arange(8, dtype=np.float32).reshape(2, 4))


def test_guarded_write_turns_an_os_error_into_one_write_error(tmp_path):
    cache = FeatureCache.create(str(tmp_path / "c.h5"), FP)

    def fail():
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(CacheWriteError, match="Input/output error. 0 rows are committed"):
        cache.guarded_write(fail)
    assert not cache.h5.id.valid


# The README's code map, bottom to top: a module may import its own layer and the layers below it, never above.
# mirip.training.benchmarks sits with the benchmarks: it is the seed's import path, kept as a re-export.
LAYERS = [
    ("mirip.feature_spec", "mirip.tiers", "mirip.plain", "mirip.atomic", "mirip.devices", "mirip.paths",
     "mirip.metadata_csv", "mirip.seeding", "mirip.demo_data", "mirip.demo_drawing", "mirip.features.spec"),
    ("mirip.preprocessing", "mirip.ml"),
    ("mirip.fingerprint", "mirip.checkpoint", "mirip.calibration", "mirip.calibration_metrics",
     "mirip.calibration_reference"),
    ("mirip.features",),
    ("mirip.training",),
    ("mirip.sweep",),
    ("mirip.inference", "mirip.scores", "mirip.scoring_inputs", "mirip.explain", "mirip.heatmap",
     "mirip.report_html"),
    ("mirip.serve",),
    ("mirip.bench", "mirip.training.benchmarks", "mirip.cli_options"),
]


def _layer(module: str) -> int:
    best = None  # the longest matching prefix decides (mirip.training.benchmarks before mirip.training)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer of the code map; add it to LAYERS and the README"
    return best[0]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mirip."):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("mirip."))


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for path in sorted((ROOT / "mirip").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if module == "mirip":
            continue
        own = _layer(module)
        wrong += [f"{module} (layer {own}) imports {m} (layer {_layer(m)})" for m in _imports(path)
                  if _layer(m) > own]
    assert not wrong, "\n".join(wrong)
