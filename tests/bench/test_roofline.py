"""The roofline benchmark: the ViT's FLOP count against torch's own counter, and a quick run's figures."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mirip.bench import roofline
from mirip.bench.roofline import model_flops, gemm_tflops
from mirip.cli import benchmark as bench_script
from mirip.ml.feature_extractor import DINOv2FeatureExtractor


@pytest.mark.parametrize("size", [28, 56])
def test_flop_count_matches_torchs_counter(tiny_backbone, size):
    ext = DINOv2FeatureExtractor(tiny_backbone, device="cpu", precision="fp32")
    with FlopCounterMode(display=False) as counter:
        ext.extract(torch.randn(2, 3, size, size))
    cfg = ext.backbone.config
    tokens = (size // cfg.patch_size) ** 2 + 1
    # The counter sees the linear layers and the patch conv; CPU attention (SDPA) it leaves out: Q K^T and
    # attention @ V, 2 * T^2 * H multiply-adds per block, added here by hand.
    attention = cfg.num_hidden_layers * 2 * 2 * tokens ** 2 * cfg.hidden_size
    assert model_flops(ext, size) == pytest.approx(counter.get_total_flops() / 2 + attention, rel=1e-9)


def test_gemm_rate_counts_two_flops_per_multiply_add(monkeypatch):
    for dtype in (torch.float32, torch.bfloat16):
        assert gemm_tflops(dtype, "cpu", 64, 0.01) > 0
    calls = []
    monkeypatch.setattr(roofline, "_timed_rate", lambda fn, device, seconds: calls.append(fn()) or 10.0)
    assert gemm_tflops(torch.float32, "cpu", 100, 0.01) == pytest.approx(10.0 * 2 * 100 ** 3 / 1e12)
    assert tuple(calls[0].shape) == (100, 100)


def test_quick_roofline_run_reports_shares_of_the_same_runs_gemm(tiny_backbone, tmp_path):
    threads = torch.get_num_threads()
    try:
        rc = bench_script.main(["--only", "roofline", "--backbone", tiny_backbone, "--image-size", "28", "--quick",
                                "--device", "cpu", "--threads", "1", "--output-dir", str(tmp_path),
                                "--roofline-gemm-size", "64", "--roofline-seconds", "0.01"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    r = json.loads((tmp_path / "benchmark.json").read_text())["results"]["roofline"]
    assert set(r["gemm_tflops"]) == {"fp32", "bf16"}
    rows = {(x["precision"], x["batch"]): x for x in r["forward"]}
    assert set(rows) == {("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)}
    for (p, b), x in rows.items():
        assert x["tflops"] == pytest.approx(x["images_per_s"] * r["gflops_per_image"] / 1e3)
        assert x["share_of_gemm"] == pytest.approx(x["tflops"] / r["gemm_tflops"][p])
        assert x["vs_fp32"] == pytest.approx(x["images_per_s"] / rows[("fp32", b)]["images_per_s"])
    assert 0.99 <= r["bf16_cos_min"] <= 1.0 + 1e-6
    md = (tmp_path / "benchmark.md").read_text()
    assert "Roofline" in md and "share of its GEMM rate" in md
