"""The seed's PerformanceBenchmarks on CPU with a tiny backbone: constants, signatures, report keys, estimates."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from mirip.ml.ranking_model import PairwiseRankingModel, RankingHead
from mirip.training.benchmarks import PerformanceBenchmarks, set_seed

SEED_KEYS = {
    "inference_time_per_pair": float, "inference_time_ms": float, "memory_usage_bytes": int,
    "memory_usage_mb": float, "memory_usage_gb": float, "device": str, "batch_size": int, "image_size": int,
    "meets_inference_requirement": bool, "meets_memory_requirement": bool, "requirements": dict,
}
SIZE = 28  # tiny images keep every test well under a second


@pytest.fixture(autouse=True)
def one_thread():
    # Timing loops of tiny ops are at the mercy of a busy machine's thread scheduling; one thread keeps them quick.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model(tiny_backbone):
    return PairwiseRankingModel(tiny_backbone, device="cpu")


def _check_report(report: dict, batch_size: int, image_size: int) -> None:
    for key, kind in SEED_KEYS.items():
        assert isinstance(report[key], kind), (key, type(report[key]))
    assert set(report["requirements"]) == {"max_inference_time_ms", "max_memory_gb"}
    assert report["requirements"] == {"max_inference_time_ms": 100.0, "max_memory_gb": 12.0}
    assert report["inference_time_ms"] == pytest.approx(report["inference_time_per_pair"] * 1000)
    assert report["memory_usage_mb"] == pytest.approx(report["memory_usage_bytes"] / 2**20)
    assert report["memory_usage_gb"] == pytest.approx(report["memory_usage_bytes"] / 2**30)
    assert report["meets_inference_requirement"] == (report["inference_time_per_pair"] <= 0.1)
    assert report["meets_memory_requirement"] == (report["memory_usage_gb"] <= 12.0)
    assert (report["batch_size"], report["image_size"], report["device"]) == (batch_size, image_size, "cpu")
    assert report["inference_time_per_pair"] > 0 and report["images_per_second"] > 0
    # Peak RSS of a Python process with torch loaded is at least tens of MB and surely below 64 GB.
    assert 20 * 2**20 < report["memory_usage_bytes"] < 64 * 2**30


def test_constants_and_signatures():
    assert PerformanceBenchmarks.MAX_INFERENCE_TIME_SECONDS == 0.1
    assert PerformanceBenchmarks.MAX_MEMORY_GB == 12.0
    assert PerformanceBenchmarks.TARGET_TRAINING_HOURS == 6.0

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}

    P = PerformanceBenchmarks
    assert defaults(P.__init__) == {"model": inspect.Parameter.empty, "device": None}
    assert defaults(P.measure_inference_time) == {"num_pairs": 100, "warmup_iterations": 10, "image_size": 768}
    assert defaults(P.measure_memory_usage) == {"batch_size": 32, "image_size": 768}
    assert defaults(P.measure_training_memory) == {"batch_size": 32, "image_size": 768}
    assert defaults(P.estimate_training_time) == {"num_epochs": 100, "samples_per_epoch": 10000, "batch_size": 32}
    assert defaults(P.validate_reproducibility) == {"dataloader": inspect.Parameter.empty, "seed": 42, "num_runs": 2}
    assert defaults(P.run_full_benchmark) == {"batch_size": 32, "image_size": 768}


@pytest.mark.slow
def test_seed_example_as_written(model):
    # The seed's example with only .cuda() swapped: defaults are 768 px, 100 pairs, batch 32 (~25 s on 2 cores).
    benchmarks = PerformanceBenchmarks(model=model, device="cpu")
    report = benchmarks.run_full_benchmark()
    _check_report(report, 32, 768)
    summary = f"{report['inference_time_ms']:.2f}ms {report['memory_usage_gb']:.2f}GB"
    assert summary and isinstance(report["meets_inference_requirement"] and report["meets_memory_requirement"], bool)


def test_seed_example_small(model):
    benchmarks = PerformanceBenchmarks(model=model, device="cpu")
    report = benchmarks.run_full_benchmark(batch_size=4, image_size=SIZE, num_pairs=3, warmup_iterations=1,
                                           throughput_iterations=1)
    _check_report(report, 4, SIZE)
    assert report["memory_method"] in ("peak_rss", "peak_rss_lifetime") and report["precision"] == "fp32"


def test_memory_grows_with_batch(model):
    bench = PerformanceBenchmarks(model, device="cpu")
    small = bench.measure_memory_usage(batch_size=1, image_size=SIZE)
    # 64 images at 392 px: the input alone is 118 MB, so the peak must rise by at least that much.
    big = bench.measure_memory_usage(batch_size=64, image_size=392)
    if bench.memory_method == "peak_rss":  # only a resettable peak can show the difference
        assert big - small > 100 * 2**20
    assert isinstance(small, int) and isinstance(big, int)


def test_training_memory_leaves_model_untouched(model):
    bench = PerformanceBenchmarks(model, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    gb = bench.measure_training_memory(batch_size=4, image_size=SIZE)
    assert isinstance(gb, float) and 0.01 < gb < 64
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_training_time_estimate_two_ways(model):
    bench = PerformanceBenchmarks(model, device="cpu")
    hours = bench.estimate_training_time(num_epochs=2, samples_per_epoch=40, batch_size=4, image_size=SIZE,
                                         timed_steps=1, head_steps=3)
    e = bench.last_training_estimate
    assert hours == e["end_to_end_hours"] and e["steps_per_epoch"] == 10 and e["total_steps"] == 20
    assert e["num_images"] == 40  # default: a dataset as large as one epoch's pairs
    assert e["end_to_end_seconds"] == pytest.approx(20 * e["end_to_end_step_seconds"])
    assert e["two_stage_seconds"] == pytest.approx(40 * e["extraction_seconds_per_image"] + 20 * e["head_step_seconds"])
    assert e["speedup"] == pytest.approx(e["end_to_end_seconds"] / e["two_stage_seconds"])
    assert e["end_to_end_hours"] == pytest.approx(e["end_to_end_seconds"] / 3600)
    assert isinstance(e["meets_target_two_stage"], bool) and e["target_training_hours"] == 6.0
    with pytest.raises(ValueError, match="positive"):
        bench.estimate_training_time(num_epochs=0)


def _pairs(n=6, size=SIZE):
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)
    labels = torch.tensor([1, -1] * (n // 2))
    return [(x1[:4], x2[:4], labels[:4]), (x1[4:], x2[4:], labels[4:])]


def test_validate_reproducibility(model):
    bench = PerformanceBenchmarks(model, device="cpu")
    ok, diff = bench.validate_reproducibility(_pairs(), seed=42, num_runs=3)
    assert ok is True and diff == 0.0
    info = bench.last_reproducibility
    assert len(info["accuracies"]) == 3 and info["max_score_difference"] == 0.0
    # Accuracy is computed against the labels: flipping every label flips the accuracy.
    acc = info["accuracies"][0]
    flipped = [(a, b, -y) for a, b, y in _pairs()]
    bench.validate_reproducibility(flipped)
    assert bench.last_reproducibility["accuracies"][0] == pytest.approx(1 - acc)
    with pytest.raises(ValueError, match="at least 2"):
        bench.validate_reproducibility(_pairs(), num_runs=1)


class _Drifting:
    """A loader whose images change on every pass: what an unseeded augmentation would do."""

    def __init__(self):
        self.calls = 0

    def __iter__(self):
        self.calls += 1
        g = torch.Generator().manual_seed(self.calls)
        n = 16
        yield torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randn(n, 3, SIZE, SIZE, generator=g), \
            torch.tensor([1, -1] * (n // 2))


def test_validate_reproducibility_detects_drift(model):
    bench = PerformanceBenchmarks(model, device="cpu")
    ok, _ = bench.validate_reproducibility(_Drifting())
    assert ok is False and bench.last_reproducibility["max_score_difference"] > 0


def test_head_only_model_on_features():
    head = RankingHead(input_dim=16, projector_output_dim=8, hidden_dim=8)
    bench = PerformanceBenchmarks(head, device="cpu")
    assert bench.measure_inference_time(num_pairs=2, warmup_iterations=1) > 0
    bench.estimate_training_time(num_epochs=1, samples_per_epoch=8, batch_size=4, timed_steps=1, head_steps=2)
    assert bench.last_training_estimate["extraction_seconds_per_image"] == 0.0


def test_set_seed_still_exported():
    set_seed(42)
    a = torch.randn(3, 3)
    n = np.random.rand()
    set_seed(42)
    assert torch.allclose(a, torch.randn(3, 3)) and n == np.random.rand()
