"""The compiled backbone path and the GPU suite, on CPU with the tiny backbone.

The default suite traces with torch.compile's "eager" backend (dynamo only: seconds); code generation
with inductor takes about a minute on the 2-core CPU, so that test and the whole GPU suite are slow.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mirip.ml import compiled as C
from mirip.ml.feature_extractor import DINOv2FeatureExtractor

from _sweep_helpers import one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _images(n=3, size=28, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _naive_cls(extractor, images):
    """Reference without mirip's extract path: the HF model's own last hidden state, CLS token."""
    with torch.no_grad():
        return extractor.backbone(pixel_values=images).last_hidden_state[:, 0].float()


def test_compiled_extractor_equals_eager_and_pads_short_batches(tiny_backbone):
    ex = DINOv2FeatureExtractor(tiny_backbone, device="cpu", precision="fp32")
    x = _images(3)
    ref = _naive_cls(ex, x)
    info = C.compile_extractor(ex, backend="eager", warmup_images=x, batch_size=3)
    assert info.compiled and info.compile_seconds > 0 and C.is_compiled(ex)
    torch.testing.assert_close(ex.extract(x), ref, rtol=1e-5, atol=1e-5)
    # A last, shorter batch is padded to the compiled shape; its rows are the images' own features.
    torch.testing.assert_close(ex.extract(x[:2]), ref[:2], rtol=1e-5, atol=1e-5)
    C.uncompile(ex)
    assert not C.is_compiled(ex) and "forward" not in ex.backbone.__dict__ and "_extract" not in ex.__dict__
    torch.testing.assert_close(ex.extract(x), ref, rtol=1e-5, atol=1e-5)


def test_compile_refuses_what_it_cannot_serve(tiny_backbone):
    bank = DINOv2FeatureExtractor(tiny_backbone, device="cpu", entries="cls@-2,-1")
    info = C.compile_extractor(bank, backend="eager")
    assert not info.compiled and "intermediate blocks" in info.reason and not C.is_compiled(bank)
    trainable = DINOv2FeatureExtractor(tiny_backbone, device="cpu", trainable=True)
    assert "trainable" in C.compile_extractor(trainable, backend="eager").reason


def test_break_even_and_auto_mode():
    assert C.break_even_images(10.0, 0.010, 0.005) == 2001
    assert C.break_even_images(10.0, 0.005, 0.006) is None  # compiled slower: never worth it
    assert C.should_compile("on", 1) and not C.should_compile("off", 10**9)
    assert not C.should_compile("auto", 99, min_images=100) and C.should_compile("auto", 100, min_images=100)
    with pytest.raises(ValueError, match="unknown compile mode"):
        C.should_compile("always", 1)


def test_sdpa_backend_chosen_by_measurement(tiny_backbone):
    ex = DINOv2FeatureExtractor(tiny_backbone, device="cpu", precision="fp32")
    choice = C.choose_sdpa_backend(ex, _images(2), repeats=1)
    timed = {k: v for k, v in choice["seconds"].items() if v is not None}
    assert "math" in timed and choice["chosen"] == min(timed, key=timed.get)
    assert set(choice["unavailable"]) == {k for k, v in choice["seconds"].items() if v is None}
    ref = _naive_cls(ex, _images(2))
    with C.sdpa_context(choice["chosen"]):
        torch.testing.assert_close(ex.extract(_images(2)), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown SDPA backend"):
        C.sdpa_context("fastest")


@pytest.mark.slow
def test_inductor_compiled_extractor_equals_eager(tiny_backbone):
    ex = DINOv2FeatureExtractor(tiny_backbone, device="cpu", precision="fp32")
    x = _images(2)
    ref = _naive_cls(ex, x)
    C.compile_extractor(ex, warmup_images=x, batch_size=2)
    torch.testing.assert_close(ex.extract(x), ref, rtol=1e-4, atol=1e-4)


# --- the GPU suite, on CPU ---------------------------------------------------------------------------
def _suite(tmp_path, tiny_backbone, only, *extra):
    from scripts.gpu_check import main

    out = tmp_path / "gpu"
    argv = ["--quick", "--device", "cpu", "--backbone", tiny_backbone, "--random-init", "--image-size", "28",
            "--compile-backend", "eager", "--output-dir", str(out), "--only", only, "--head-steps", "3",
            "--repeats", "1", "--numerics-epochs", "2", "--train-images", "80", "--train-pairs", "48",
            "--train-epochs", "2", "--baseline-epochs", "1", "--pair-repeats", "1", *extra]
    code = main(argv)
    report = json.loads((out / "gpu_suite.json").read_text())
    assert (out / "gpu_suite.md").exists()
    return code, report


def test_gpu_suite_core_sections_run_on_cpu(tmp_path, tiny_backbone):
    code, report = _suite(tmp_path, tiny_backbone, "backbone,head_step,full_image")
    assert code == 0 and report["failed"] == []
    s = report["sections"]
    assert s["backbone"]["numerics"]["ok"] and s["backbone"]["sdpa"]["chosen"] in C.SDPA_BACKENDS
    assert s["backbone"]["compile_seconds"] > 0
    assert s["head_step"]["graph_mode"] == "static" and s["head_step"]["numerics"]["ok"]
    assert s["head_step"]["sync_free_epoch"]["checked"] is False  # CUDA only
    assert s["full_image"]["numerics"]["ok"] and s["full_image"]["compile"]["compiled"]
    rows = {r["figure"]: r for r in report["summary"]}
    assert rows["head step, batch 32 (ms)"]["baseline"] == s["head_step"]["eager_ms"]


def test_gpu_suite_time_budget_skips_the_sections_left_and_says_so(tmp_path, tiny_backbone):
    """With --max-seconds spent, no further section starts: those left are recorded as skipped (unmeasured),
    the report and its markdown are still written, and a skip is not a failure."""
    code, report = _suite(tmp_path, tiny_backbone, "head_step,backbone,full_image", "--max-seconds", "0.001")
    assert code == 0 and report["failed"] == []
    assert list(report["sections"]) == ["head_step", "backbone", "full_image"]
    # The first section always runs; by the time it ends the budget is spent.
    assert report["sections"]["head_step"]["numerics"]["ok"]
    assert report["skipped"] == ["backbone", "full_image"]
    assert report["sections"]["backbone"]["skipped"].startswith("time budget")
    assert "SKIPPED sections (time budget, unmeasured): backbone, full_image" in (
        tmp_path / "gpu" / "gpu_suite.md").read_text()


@pytest.mark.slow
def test_gpu_suite_every_section_runs_on_cpu(tmp_path, tiny_backbone):
    from mirip.bench.gpu_suite import SECTIONS

    code, report = _suite(tmp_path, tiny_backbone, ",".join(SECTIONS))
    from mirip.bench.gpu_report import failed_checks

    assert report["failed"] == [], {k: v.get("error") for k, v in report["sections"].items()}
    assert failed_checks(report) == [], {k: v for k, v in report["sections"].items() if k != "sweep"}
    assert code == 0
    runs = report["sections"]["extraction"]["runs"]
    assert set(runs) == {"off@16", "on@16"} and runs["on@16"]["compile"]["compiled"]
    assert report["sections"]["sweep"]["ratio"] > 0


def test_gpu_suite_rejects_unknown_sections(tmp_path, capsys):
    from scripts.gpu_check import main

    with pytest.raises(SystemExit):
        main(["--only", "bogus", "--device", "cpu", "--output-dir", str(tmp_path)])
    assert "unknown section" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "gpu_suite.json")


def test_gpu_suite_serve_section_measures_the_service_on_cpu(tmp_path, tiny_backbone):
    pytest.importorskip("fastapi")
    code, report = _suite(tmp_path, tiny_backbone, "serve")
    assert code == 0 and report["failed"] == [], report["sections"]["serve"].get("error")
    s = report["sections"]["serve"]
    assert [r["concurrency"] for r in s["levels"]] == [1, 8]
    assert all(r["errors"] == 0 and r["requests"] == 8 for r in s["levels"])
    assert s["p99_ms_at_8"] == s["levels"][1]["p99_ms"] > 0
    rows = {r["figure"]: r for r in report["summary"]}
    assert rows["service p99 per request at concurrency 8 (ms)"]["now"] == s["p99_ms_at_8"]
