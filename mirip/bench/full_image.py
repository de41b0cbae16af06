"""Benchmark of full-image mode: the seed's PerformanceBenchmarks on a backbone + head, plus goals of this project.

Measures ms per pair (seed ceiling 100 ms, goal 15 ms), peak memory at a batch
(seed ceiling 12 GB, goal 4 GB), images/s, training memory, reproducibility,
and the end-to-end vs two-stage training-time estimate extrapolated from
measured step times (goal: two-stage at least 100x faster and under 4 minutes).
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any, Dict, List

import torch

from mirip.common.devices import default_precision, resolve_device
from mirip.common.feature_spec import FeatureSpec
from mirip.common.machine import device_name
from mirip.ml.backbones import RandomWeightsWarning
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.ranking_model import PairwiseRankingModel
from mirip.training.benchmarks import PerformanceBenchmarks

GOALS = {"inference_ms": 15.0, "memory_gb": 4.0, "speedup": 100.0, "two_stage_minutes": 4.0}
# (full default, --quick default) for every option left unset on the command line.
DEFAULTS = {
    "batch_size": (32, 4),
    "num_pairs": (100, 5),
    "warmup": (10, 2),
    "throughput_iterations": (3, 1),
    "timed_steps": (3, 1),
    "head_steps": (50, 10),
    "repro_pairs": (16, 4),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("full_image: full-image mode (PerformanceBenchmarks)")
    g.add_argument("--full-image-batch-size", type=int, default=None,
                   help="batch for memory and images/s, and pairs per training step (default 32; --quick 4)")
    g.add_argument("--full-image-num-pairs", type=int, default=None, help="pairs timed one by one (100; --quick 5)")
    g.add_argument("--full-image-warmup", type=int, default=None, help="warm-up pairs before timing (10; --quick 2)")
    g.add_argument("--full-image-throughput-iterations", type=int, default=None,
                   help="timed batches for images/s (3; --quick 1)")
    g.add_argument("--full-image-timed-steps", type=int, default=None,
                   help="timed end-to-end training steps and extraction batches (3; --quick 1)")
    g.add_argument("--full-image-head-steps", type=int, default=None,
                   help="timed head-only training steps (50; --quick 10)")
    g.add_argument("--full-image-repro-pairs", type=int, default=None,
                   help="pairs evaluated per reproducibility run (16; --quick 4)")
    g.add_argument("--full-image-epochs", type=int, default=100, help="epochs in the training-time estimate")
    g.add_argument("--full-image-samples-per-epoch", type=int, default=10000,
                   help="pairs per epoch in the training-time estimate")
    g.add_argument("--full-image-dataset-images", type=int, default=None,
                   help="images extracted once in the two-stage estimate (default: samples per epoch)")
    g.add_argument("--full-image-checkpoint", default=None, metavar="PT",
                   help="measure the full-image model this checkpoint rebuilds (its backbone, feature spec, head)")
    g.add_argument("--full-image-feature", default=None, metavar="SPEC",
                   help="feature spec of the measured model without a checkpoint, e.g. 'cls@-4,-3,-2,-1+mean@-1' "
                        "(default cls@-1)")


def _option(args: argparse.Namespace, name: str) -> int:
    value = getattr(args, f"full_image_{name}", None)
    if value is not None:
        return int(value)
    full, quick = DEFAULTS[name]
    return quick if getattr(args, "quick", False) else full


def _synthetic_pairs(num_pairs: int, batch: int, image_size: int) -> List[tuple]:
    """A fixed list of (img1, img2, labels) batches, the shape a pair DataLoader yields."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, num_pairs, batch):
        n = min(batch, num_pairs - start)
        x1 = torch.randn(n, 3, image_size, image_size, generator=gen)
        x2 = torch.randn(n, 3, image_size, image_size, generator=gen)
        labels = torch.where(torch.arange(n) % 2 == 0, 1, -1)
        batches.append((x1, x2, labels))
    return batches


def _build_model(args: argparse.Namespace, device: str, precision: str) -> tuple:
    """(model, backbone name, random weights?, checkpoint or None): from ``--full-image-checkpoint``, which
    decides backbone, preprocessing and feature spec, else the backbone asked for."""
    backbone = getattr(args, "backbone", "facebook/dinov2-large")
    random_init = bool(getattr(args, "random_init", False))
    checkpoint, spec = getattr(args, "full_image_checkpoint", None), getattr(args, "full_image_feature", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # announced below, in the report itself
        if checkpoint:
            # The checkpoint decides backbone, preprocessing and feature spec (layers, poolings), as load_scorer does.
            from mirip.scoring.scorer import load_scorer

            model = load_scorer(checkpoint, device=device, precision=precision).model
            backbone = model.feature_extractor.info.name
            random_init = not model.feature_extractor.info.pretrained
        else:
            extractor = DINOv2FeatureExtractor(backbone, device=device, random_init=random_init, precision=precision,
                                               entries=spec or "cls@-1")
            model = PairwiseRankingModel(backbone, device=device, feature_extractor=extractor)
    return model, backbone, random_init, checkpoint


def _measure(args: argparse.Namespace, bench: PerformanceBenchmarks, batch: int, image_size: int) -> tuple:
    """(full benchmark report, training memory in GB, two-stage time estimate, reproducible?, accuracy difference)."""
    report = bench.run_full_benchmark(batch, image_size, num_pairs=_option(args, "num_pairs"),
                                      warmup_iterations=_option(args, "warmup"),
                                      throughput_iterations=_option(args, "throughput_iterations"))
    training_memory_gb = bench.measure_training_memory(batch, image_size)
    estimate = bench.training_time_estimate(
        int(getattr(args, "full_image_epochs", 100)), int(getattr(args, "full_image_samples_per_epoch", 10000)), batch,
        image_size=image_size, num_images=getattr(args, "full_image_dataset_images", None),
        timed_steps=_option(args, "timed_steps"), warmup_steps=1, head_steps=_option(args, "head_steps"),
    )
    loader = _synthetic_pairs(_option(args, "repro_pairs"), min(batch, 8), image_size)
    reproducible, acc_diff = bench.validate_reproducibility(loader, seed=42, num_runs=2)
    return report, training_memory_gb, estimate, reproducible, acc_diff


def run(args: argparse.Namespace) -> Dict[str, Any]:
    image_size = int(getattr(args, "image_size", 768))
    device = resolve_device(getattr(args, "device", None))
    precision = getattr(args, "precision", None) or default_precision(device)
    batch = _option(args, "batch_size")

    t0 = time.perf_counter()
    model, backbone, random_init, checkpoint = _build_model(args, device, precision)
    spec = str(FeatureSpec.from_entries(model.feature_extractor.entry_names))
    build_seconds = time.perf_counter() - t0
    bench = PerformanceBenchmarks(model, device=device)
    report, training_memory_gb, estimate, reproducible, acc_diff = _measure(args, bench, batch, image_size)

    meets = {
        "inference_goal": report["inference_time_ms"] <= GOALS["inference_ms"],
        "memory_goal": report["memory_usage_gb"] <= GOALS["memory_gb"],
        "speedup_goal": estimate["speedup"] >= GOALS["speedup"],
        "two_stage_time_goal": estimate["two_stage_seconds"] <= GOALS["two_stage_minutes"] * 60,
    }
    return {
        "name": "full_image",
        "backbone": backbone,
        "family": model.feature_extractor.info.family,
        "checkpoint": checkpoint,
        "feature_spec": spec,
        "weights": "random" if random_init else "pretrained",
        "parameters": sum(p.numel() for p in model.parameters()),
        "precision": bench.precision,
        "device": str(device),
        "device_name": device_name(str(device)),
        "image_size": image_size,
        "batch_size": batch,
        "quick": bool(getattr(args, "quick", False)),
        "model_build_seconds": build_seconds,
        "report": report,
        "training_memory_gb": training_memory_gb,
        "training_estimate": estimate,
        "reproducibility": dict(bench.last_reproducibility or {}, accuracy_difference=acc_diff,
                                reproducible=reproducible),
        "meets_seed_requirements": bool(report["meets_inference_requirement"] and report["meets_memory_requirement"]),
        "goals": GOALS,
        "meets_goals": meets,
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def to_markdown(result: Dict[str, Any]) -> str:
    r, e, m = result["report"], result["training_estimate"], result["meets_goals"]
    repro = result["reproducibility"]
    lines = [
        "### Full-image mode (backbone + head)",
        "",
        f"{result['backbone']} ({result.get('family', 'dinov2')}, {result['weights']} weights, "
        f"{result['parameters']:,} parameters), "
        f"{result['image_size']} px, features {result.get('feature_spec', 'cls@-1')}, "
        f"{result['precision']} on {result['device_name']} ({result['device']})"
        + (" — quick smoke run, small repeat counts" if result.get("quick") else ""),
        "",
        "| figure | value | seed ceiling | goal | met (ceiling / goal) |",
        "| --- | --- | --- | --- | --- |",
        f"| inference per pair | {r['inference_time_ms']:.2f} ms | {r['requirements']['max_inference_time_ms']:.0f} ms"
        f" | {result['goals']['inference_ms']:.0f} ms | {_yes(r['meets_inference_requirement'])} / "
        f"{_yes(m['inference_goal'])} |",
        f"| inference memory, batch {r['batch_size']} | {r['memory_usage_gb']:.2f} GB | "
        f"{r['requirements']['max_memory_gb']:.0f} GB | {result['goals']['memory_gb']:.0f} GB | "
        f"{_yes(r['meets_memory_requirement'])} / {_yes(m['memory_goal'])} |",
        f"| throughput, batch {r['batch_size']} | {r['images_per_second']:.1f} images/s | | | |",
        f"| training memory, {result['batch_size']} pairs (end to end) | {result['training_memory_gb']:.2f} GB | "
        f"{r['requirements']['max_memory_gb']:.0f} GB | | {_yes(result['training_memory_gb'] <= r['requirements']['max_memory_gb'])} |",
        f"| reproducible (2 runs, seed 42) | {'yes' if repro['reproducible'] else 'no'} "
        f"(accuracy diff {repro['accuracy_difference']:.3g}, max score diff {repro['max_score_difference']:.3g}) | | | |",
        "",
        f"Training-time estimate, {e['num_epochs']} epochs x {e['samples_per_epoch']:,} pairs "
        f"(batch {e['batch_size']}, {e['total_steps']:,} steps; two-stage extracts {e['num_images']:,} images once):",
        "",
        "| way of training | measured unit time | total |",
        "| --- | --- | --- |",
        f"| end to end (backbone in every step) | {e['end_to_end_step_seconds'] * 1000:.1f} ms/step | "
        f"{_duration(e['end_to_end_seconds'])} |",
        f"| two-stage: extract once | {e['extraction_seconds_per_image'] * 1000:.2f} ms/image | "
        f"{_duration(e['two_stage_extraction_seconds'])} |",
        f"| two-stage: head on cached features | {e['head_step_seconds'] * 1000:.2f} ms/step | "
        f"{_duration(e['two_stage_head_seconds'])} |",
        f"| two-stage total | | {_duration(e['two_stage_seconds'])} |",
        "",
        f"Two-stage is **{e['speedup']:.0f}x** faster than end to end (goal >= {result['goals']['speedup']:.0f}x: "
        f"{_yes(m['speedup_goal'])}; under {result['goals']['two_stage_minutes']:.0f} min: "
        f"{_yes(m['two_stage_time_goal'])}). Seed target {e['target_training_hours']:.0f} h: end to end "
        f"{_yes(e['meets_target_end_to_end'])}, two-stage {_yes(e['meets_target_two_stage'])}.",
        f"Memory is {'the CUDA allocator peak' if r['memory_method'].startswith('cuda') else 'the process peak RSS'}"
        f" ({r['memory_method']}); model built in {result['model_build_seconds']:.1f} s.",
    ]
    if result["weights"] == "random":
        lines.append("Weights are RANDOM: speed and memory are those of the real architecture; scores mean nothing.")
    return "\n".join(lines) + "\n"
