"""benchmark.py --only engines: OpenVINO's features against a naive DINOv2 forward, and the section's ratios."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import Dinov2Model

from mirip.bench import engines
from mirip.cli import benchmark as bench_script
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.openvino_engine import convert

# OpenVINO runs in this test process: scripts/test.sh gives these tests a pytest process of their own
# (pyproject.toml's openvino marker).
pytestmark = pytest.mark.openvino

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino is not installed (pip install 'mirip[openvino]')")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converted(tiny_backbone):
    """One conversion (seconds) shared by the tests: the tiny backbone's cls@-1+mean@-1 at 28 px."""
    pytest.importorskip("openvino")
    ext = DINOv2FeatureExtractor(tiny_backbone, device="cpu", precision="fp32", entries="cls@-1+mean@-1")
    return convert(ext, 28, example_batch=2)


def _run_section(backbone, out, *extra):
    rc = bench_script.main(["--only", "engines", "--backbone", backbone, "--image-size", "28", "--quick",
                            "--device", "cpu", "--threads", "1", "--output-dir", str(out),
                            "--engines-gemm-size", "64", "--engines-seconds", "0.01", *extra])
    assert rc == 0
    return json.loads((out / "benchmark.json").read_text())["results"]["engines"]


@needs_openvino
def test_openvino_features_match_a_naive_dinov2_forward_at_any_batch(tiny_backbone, converted):
    compiled = engines.OpenVINOFeatures(converted, threads=1)
    naive = Dinov2Model.from_pretrained(tiny_backbone).eval()
    for batch in (1, 3):  # neither is the traced example's batch
        x = torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            h = naive(pixel_values=x).last_hidden_state
        expected = torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=1)
        got = compiled(x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert torch.nn.functional.cosine_similarity(got, expected, dim=1).min() >= engines.COS_FLOOR


@needs_openvino
def test_section_times_every_engine_against_the_same_runs_baseline(tiny_backbone, converted, tmp_path,
                                                                  monkeypatch, restore_threads):
    def reuse(extractor, image_size, example_batch=2):  # the fixture converted this very model
        assert (extractor.model_name, extractor.entry_names, image_size) == (tiny_backbone, ["cls@-1", "mean@-1"], 28)
        return converted

    monkeypatch.setattr(engines, "convert", reuse)  # the name the section calls
    monkeypatch.setenv("MIRIP_CPU_BF16", "1")  # a chip with bf16 units: the baseline becomes torch bf16
    r = _run_section(tiny_backbone, tmp_path, "--engines-feature", "cls@-1+mean@-1")
    ov_name = next(n for n in r["cosine"] if n.startswith("openvino"))
    assert set(r["cosine"]) == {"torch fp32", "torch bf16", ov_name} and r["baseline"] == "torch bf16"
    rows = {(x["engine"], x["batch"]): x for x in r["rows"]}
    assert set(rows) == {(e, b) for e in r["cosine"] for b in (1, 2)}
    for (e, b), x in rows.items():
        assert x["vs_torch_fp32"] == pytest.approx(x["images_per_s"] / rows[("torch fp32", b)]["images_per_s"])
        assert x["vs_baseline"] == pytest.approx(x["images_per_s"] / rows[("torch bf16", b)]["images_per_s"])
        assert x["share_of_fp32_gemm"] == pytest.approx(x["images_per_s"] * r["gflops_per_image"] / 1e3
                                                        / r["gemm_fp32_tflops"])
    assert r["cosine"][ov_name]["min"] >= engines.COS_FLOOR
    worst = min(rows[(ov_name, b)]["vs_baseline"] for b in (1, 2))
    assert r["decision"][ov_name]["min_vs_baseline"] == pytest.approx(worst)
    assert "openvino bf16 hint" in r["skipped"] or "openvino bf16 hint" in r["cosine"]
    md = (tmp_path / "benchmark.md").read_text()
    assert "**Engines**" in md and ov_name in md and "× baseline" in md


def test_without_openvino_the_section_still_times_torch_and_says_why(tiny_backbone, tmp_path, monkeypatch,
                                                                     restore_threads):
    def missing():
        raise ImportError("openvino is not installed (pip install 'mirip[openvino]'): no module")

    monkeypatch.setattr(engines, "import_openvino", missing)
    r = _run_section(tiny_backbone, tmp_path, "--engines-batches", "2")
    assert [(x["engine"], x["batch"]) for x in r["rows"]] == [("torch fp32", 2)]
    assert "pip install" in r["skipped"]["openvino"] and "no AMX" in r["skipped"]["torch bf16"]
    assert r["decision"] == {} and "openvino: skipped" in (tmp_path / "benchmark.md").read_text()


def test_an_engine_ships_only_if_it_clears_the_bar_at_every_batch_with_parity():
    def rows(name, ratios):
        return [{"engine": name, "batch": b, "vs_baseline": v} for b, v in zip((1, 2, 4, 8), ratios)]

    all_rows = (rows("torch fp32", [1, 1, 1, 1]) + rows("fast", [1.5, 1.4, 1.31, 2.0])
                + rows("one slow batch", [1.5, 1.2, 1.6, 1.7]) + rows("fast but off", [2, 2, 2, 2]))
    cos = {"torch fp32": {"min": 1.0}, "fast": {"min": 0.99995}, "one slow batch": {"min": 1.0},
           "fast but off": {"min": 0.9990}}
    d = engines.decide(all_rows, cos, "torch fp32")
    assert set(d) == {"fast", "one slow batch", "fast but off"}
    assert d["fast"] == {"min_vs_baseline": 1.31, "parity": True, "ships": True}
    assert d["one slow batch"]["min_vs_baseline"] == 1.2 and not d["one slow batch"]["ships"]
    assert d["fast but off"]["parity"] is False and not d["fast but off"]["ships"]
