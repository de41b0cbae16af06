"""The OpenVINO engine (mirip.ml.openvino_engine): the torch bank's features at any batch size, the converted IR
cached on disk by everything that changes the graph, and a clear message where openvino is missing."""

from __future__ import annotations

import sys

import pytest
import torch

ov = pytest.importorskip("openvino")

from _inference_helpers import torch_threads  # noqa: E402
from mirip.ml import openvino_engine  # noqa: E402
from mirip.ml.feature_extractor import DINOv2FeatureExtractor  # noqa: E402

# OpenVINO runs in this test process: scripts/test.sh gives these tests a pytest process of their own
# (pyproject.toml's openvino marker).
pytestmark = pytest.mark.openvino

SIZE = 28
SPEC = "cls@1+mean@-1"


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def conversions(monkeypatch):
    """Counts ``ov.convert_model`` calls (the real one still runs)."""
    calls = []
    real = ov.convert_model

    def spy(*args, **kwargs):
        calls.append(kwargs.get("input"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ov, "convert_model", spy)
    return calls


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ov-cache"))


def _extractor(backbone, spec=SPEC):
    return DINOv2FeatureExtractor(backbone, device="cpu", precision="fp32", entries=spec)


def _naive(backbone, spec, images):
    """The torch features straight from transformers' hidden states, not through mirip's hooks."""
    ext = _extractor(backbone, spec)
    with torch.no_grad():
        hidden = ext.backbone(pixel_values=images, output_hidden_states=True).hidden_states
    parts = []
    for entry in spec.split("+"):
        pooling, layer = entry.split("@")
        tokens = ext.backbone.layernorm(hidden[int(layer)] if int(layer) > 0 else hidden[len(hidden) + int(layer)])
        parts.append(tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(dim=1))
    return torch.cat(parts, dim=1)


def test_features_match_torch_at_batch_sizes_other_than_the_example(tiny_backbone, cache_dir, capsys):
    ext = _extractor(tiny_backbone)
    info = openvino_engine.attach_openvino(ext, SIZE, cache_dir)
    assert info.precision in ("fp32", "bf16") and f"({info.precision} on the CPU plugin)" in capsys.readouterr().out
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3, 5):  # the conversion's example batch is 2: a fixed batch would refuse these
        images = torch.randn(batch, 3, SIZE, SIZE, generator=gen)
        got, ref = ext.extract(images), _naive(tiny_backbone, SPEC, images)
        assert got.shape == ref.shape == (batch, 64)
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
        assert float(cos.min()) >= 0.9999 and float((got - ref).abs().max()) < 1e-3


def test_entry_scales_apply_after_the_engine(tiny_backbone, cache_dir):
    ext = _extractor(tiny_backbone)
    openvino_engine.attach_openvino(ext, SIZE, cache_dir, announce=False)
    images = torch.randn(2, 3, SIZE, SIZE)
    plain = ext.extract(images)
    ext.set_entry_scales([0.5, 3.0])
    scaled = ext.extract(images)
    torch.testing.assert_close(scaled[:, :32], plain[:, :32] * 0.5)
    torch.testing.assert_close(scaled[:, 32:], plain[:, 32:] * 3.0)


def test_the_ir_is_reused_and_a_changed_key_converts_again(tiny_backbone, cache_dir, conversions, capsys):
    fresh = str(cache_dir) + "-reuse"
    first = openvino_engine.attach_openvino(_extractor(tiny_backbone), SIZE, fresh)
    assert first.converted and len(conversions) == 1 and "converted and cached" in capsys.readouterr().out
    second = openvino_engine.attach_openvino(_extractor(tiny_backbone), SIZE, fresh)
    assert not second.converted and len(conversions) == 1 and second.ir_path == first.ir_path
    assert "read from the cache (no conversion)" in capsys.readouterr().out
    other_spec = openvino_engine.attach_openvino(_extractor(tiny_backbone, "cls@-1"), SIZE, fresh, announce=False)
    assert other_spec.converted and len(conversions) == 2 and other_spec.key != first.key
    other_size = openvino_engine.attach_openvino(_extractor(tiny_backbone), 42, fresh, announce=False)
    assert other_size.converted and len(conversions) == 3 and other_size.key not in (first.key, other_spec.key)
    ext = _extractor(tiny_backbone)
    with torch.no_grad():  # other weights, same architecture
        next(ext.backbone.parameters()).add_(1.0)
    other_weights = openvino_engine.attach_openvino(ext, SIZE, fresh, announce=False)
    assert other_weights.converted and len(conversions) == 4


def test_a_sharing_extractor_runs_its_own_entries_in_torch(tiny_backbone, cache_dir):
    ext = _extractor(tiny_backbone)
    openvino_engine.attach_openvino(ext, SIZE, cache_dir, announce=False)
    other = ext.sharing_backbone("mean@1")
    images = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(other.extract(images), _naive(tiny_backbone, "mean@1", images), atol=1e-5, rtol=1e-4)


def test_a_wrong_image_size_is_refused_naming_the_built_one(tiny_backbone, cache_dir):
    ext = _extractor(tiny_backbone)
    openvino_engine.attach_openvino(ext, SIZE, cache_dir, announce=False)
    with pytest.raises(ValueError, match=r"built for \(B, 3, 28, 28\) images, got \(1, 3, 42, 42\)"):
        ext.extract(torch.randn(1, 3, 42, 42))


def test_missing_openvino_names_the_extra_to_install(tiny_backbone, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "mirip\[openvino\]"'):
        openvino_engine.attach_openvino(_extractor(tiny_backbone), SIZE, "unused")
