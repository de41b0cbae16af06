"""An engine chosen by measurement: torch fp32, torch bf16 and OpenVINO on the scoring model's own shapes.

The model timed is the one mirip scores with: the backbone and its feature bank (``--engines-feature``, the
entries a checkpoint names) as ``DINOv2FeatureExtractor.extract`` computes them. OpenVINO gets that very
module through ``ov.convert_model`` (example input, batch left dynamic), compiled for the CPU at the plugin's
default inference precision and, where the CPU reports bf16 support, with the bf16 precision hint. Every
engine runs at each batch size in interleaved rounds (a change in the shared machine's load hits all alike),
next to the same run's fp32 GEMM rate; features are compared with torch fp32 (cosine per image).

The decision rule (issue 30): an engine ships only if it is at least ``ENGINE_BAR`` times faster than torch at
mirip's default precision for this chip (bf16 with AMX / AVX512-BF16, fp32 elsewhere) at every batch size,
with features at cosine >= ``COS_FLOOR``. This section measures; it ships nothing.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from mirip.bench.roofline import gemm_tflops, model_flops
from mirip.common.devices import cpu_bf16_support, default_precision
from mirip.common.feature_spec import DEFAULT_SPEC
from mirip.common.machine import device_name
from mirip.ml.backbones import RandomWeightsWarning
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.openvino_engine import convert, import_openvino

ENGINE_BAR = 1.3
COS_FLOOR = 0.9999
# (full default, --quick default) for every option left unset on the command line.
DEFAULTS = {"batches": ("1,2,4,8", "1,2"), "rounds": (3, 1), "seconds": (2.0, 0.2), "gemm_size": (2048, 256),
            "feature": (DEFAULT_SPEC, DEFAULT_SPEC)}
Engine = Callable[[torch.Tensor], torch.Tensor]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engines: torch fp32 / bf16 vs OpenVINO on the scoring model (CPU)")
    g.add_argument("--engines-batches", default=None, help="comma-separated batch sizes (1,2,4,8; --quick 1,2)")
    g.add_argument("--engines-rounds", type=int, default=None, help="interleaved rounds, median reported (3; --quick 1)")
    g.add_argument("--engines-seconds", type=float, default=None,
                   help="seconds each engine and batch is timed for, per round (2.0; --quick 0.2)")
    g.add_argument("--engines-gemm-size", type=int, default=None, help="N of the fp32 N x N GEMM (2048; --quick 256)")
    g.add_argument("--engines-feature", default=None, metavar="SPEC",
                   help="the feature bank timed, as a checkpoint names it, e.g. 'cls@-4,-3,-2,-1+mean@-1' (default %s)" % DEFAULT_SPEC)


def _opt(args: argparse.Namespace, name: str):
    value = getattr(args, f"engines_{name}", None)
    if value is not None:
        return value
    full, quick = DEFAULTS[name]
    return quick if getattr(args, "quick", False) else full


def openvino_bf16_support() -> Optional[str]:
    """Why the CPU plugin can honour a bf16 hint ("BF16" among its capabilities), or None: it would fall back
    to f32 silently, and a row labelled bf16 would be f32."""
    ov = import_openvino()
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16 in the CPU plugin's capabilities" if "BF16" in caps else None


class OpenVINOFeatures:
    """A compiled OpenVINO model called like ``extract``: (B, 3, H, W) float tensor -> (B, D) float32."""

    def __init__(self, model, threads: int, precision_hint: Optional[str] = None):
        ov = import_openvino()
        config: Dict[str, Any] = {"INFERENCE_NUM_THREADS": int(threads)}  # as many as torch gets: a fair race
        if precision_hint:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.compiled(images.detach().float().cpu().numpy())[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).copy())


def build_engines(args: argparse.Namespace, size: int) -> tuple:
    """({engine name: callable}, {engine name: why skipped}, the torch fp32 extractor)."""
    backbone = getattr(args, "backbone", None) or "facebook/dinov2-small"
    spec, rand = _opt(args, "feature"), bool(getattr(args, "random_init", False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # the report says "random weights"
        fp32 = DINOv2FeatureExtractor(backbone, device="cpu", random_init=rand, precision="fp32", entries=spec)
        engines: Dict[str, Engine] = {"torch fp32": fp32.extract}
        skipped: Dict[str, str] = {}
        units = cpu_bf16_support()
        if units:
            bf16 = DINOv2FeatureExtractor(backbone, device="cpu", random_init=rand, precision="bf16", entries=spec)
            bf16.load_state_dict(fp32.state_dict())  # the same weights as fp32 (random init draws anew)
            engines["torch bf16"] = bf16.extract
        else:
            skipped["torch bf16"] = "no AMX/AVX512-BF16 (bf16 would run emulated, ~100x slower than fp32 here)"
    try:
        t0 = time.perf_counter()
        model = convert(fp32, size)
        print(f"  OpenVINO conversion {time.perf_counter() - t0:.1f} s", flush=True)
        default = OpenVINOFeatures(model, torch.get_num_threads())
        engines[f"openvino {default.precision}"] = default
        if openvino_bf16_support():
            engines["openvino bf16 hint"] = OpenVINOFeatures(model, torch.get_num_threads(), "bf16")
        else:
            skipped["openvino bf16 hint"] = "no BF16 in the CPU plugin's capabilities (the hint would give f32)"
    except ImportError as exc:
        skipped["openvino"] = str(exc)
    return engines, skipped, fp32


def _rate(fn: Engine, images: torch.Tensor, seconds: float) -> float:
    """Images per second over at least ``seconds`` and at least two calls (warm-up is the caller's)."""
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        fn(images)
        calls += 1
    return calls * images.shape[0] / (time.perf_counter() - start)


def _measure(engines: Dict[str, Engine], images: Dict[int, torch.Tensor], rounds: int, seconds: float,
             gemm_size: int) -> tuple:
    """({engine: {batch: [images/s per round]}}, [fp32 GEMM TFLOP/s per round]), interleaved round by round."""
    for fn in engines.values():  # first calls compile kernels (OpenVINO: per new batch shape): not timed
        for x in images.values():
            fn(x)
    runs: Dict[str, Dict[int, List[float]]] = {e: {b: [] for b in images} for e in engines}
    gemm: List[float] = []
    for r in range(rounds):
        gemm.append(gemm_tflops(torch.float32, "cpu", gemm_size, seconds))
        for b, x in images.items():
            for name, fn in engines.items():
                runs[name][b].append(_rate(fn, x, seconds))
        print(f"  round {r + 1}/{rounds}: GEMM fp32 {gemm[-1]:.3f} TFLOP/s; batch {max(images)}: "
              + ", ".join(f"{n} {runs[n][max(images)][-1]:.2f}" for n in engines) + " img/s", flush=True)
    return runs, gemm


def _cosines(engines: Dict[str, Engine], x: torch.Tensor) -> Dict[str, Dict[str, float]]:
    ref = engines["torch fp32"](x).float()
    out = {}
    for name, fn in engines.items():
        cos = torch.nn.functional.cosine_similarity(ref, fn(x).float(), dim=1)
        out[name] = {"min": float(cos.min()), "mean": float(cos.mean())}
    return out


def decide(rows: List[Dict[str, Any]], cosines: Dict[str, Dict[str, float]], baseline: str) -> Dict[str, Any]:
    """Each non-torch engine's slowest ratio over the baseline across batches, and whether it clears the bar."""
    out = {}
    for name in dict.fromkeys(r["engine"] for r in rows if not r["engine"].startswith("torch")):
        worst = min(r["vs_baseline"] for r in rows if r["engine"] == name)
        parity = cosines[name]["min"] >= COS_FLOOR
        out[name] = {"min_vs_baseline": worst, "parity": parity, "ships": worst >= ENGINE_BAR and parity}
    return out


def run(args: argparse.Namespace) -> Dict[str, Any]:
    size = int(getattr(args, "image_size", 224) or 224)
    batches = [int(b) for b in str(_opt(args, "batches")).split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise ValueError(f"--engines-batches must list positive batch sizes, got {_opt(args, 'batches')!r}")
    rounds, seconds = int(_opt(args, "rounds")), float(_opt(args, "seconds"))
    engines, skipped, fp32 = build_engines(args, size)
    gen = torch.Generator().manual_seed(0)
    images = {b: torch.randn(b, 3, size, size, generator=gen) for b in batches}
    runs, gemm = _measure(engines, images, rounds, seconds, int(_opt(args, "gemm_size")))
    cosines = _cosines(engines, images[max(batches)])
    flops, roof = model_flops(fp32, size), float(np.median(gemm))
    baseline = f"torch {default_precision('cpu')}"
    rows = []
    for b in batches:
        base, ref = float(np.median(runs[baseline][b])), float(np.median(runs["torch fp32"][b]))
        for name in engines:
            ips = float(np.median(runs[name][b]))
            rows.append({"engine": name, "batch": b, "images_per_s": ips, "runs_images_per_s": runs[name][b],
                         "vs_torch_fp32": ips / ref, "vs_baseline": ips / base, "tflops": ips * flops / 1e12,
                         "share_of_fp32_gemm": ips * flops / 1e12 / roof})
    return {"device": "cpu", "device_name": device_name("cpu"), "backbone": getattr(args, "backbone", None),
            "random_init": bool(getattr(args, "random_init", False)), "feature": str(_opt(args, "feature")),
            "image_size": size, "rounds": rounds, "seconds": seconds, "torch_threads": torch.get_num_threads(),
            "cpu_bf16_units": cpu_bf16_support(), "gemm_size": int(_opt(args, "gemm_size")),
            "gemm_fp32_tflops": roof, "gemm_runs_tflops": gemm, "gflops_per_image": flops / 1e9,
            "baseline": baseline, "bar": ENGINE_BAR, "cos_floor": COS_FLOOR, "rows": rows, "cosine": cosines,
            "decision": decide(rows, cosines, baseline), "skipped": skipped}


def to_markdown(r: Dict[str, Any]) -> str:
    lines = [
        f"**Engines** — {r['device_name']} (CPU, {r['torch_threads']} threads, bf16 units: "
        f"{r['cpu_bf16_units'] or 'none'}): {r['backbone']} ({'random' if r['random_init'] else 'pretrained'} "
        f"weights), {r['image_size']} px, feature `{r['feature']}`, {r['gflops_per_image']:.2f} GFLOP per image; "
        f"GEMM {r['gemm_size']}² fp32 {r['gemm_fp32_tflops']:.3f} TFLOP/s; median of {r['rounds']} interleaved "
        f"rounds. Baseline for the decision: {r['baseline']} (mirip's default on this chip).",
        "",
        "| engine | batch | images/s | × torch fp32 | × baseline | TFLOP/s | share of fp32 GEMM | cos min vs fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['engine']} | {row['batch']} | {row['images_per_s']:.2f} | {row['vs_torch_fp32']:.2f} | "
                     f"{row['vs_baseline']:.2f} | {row['tflops']:.3f} | {100 * row['share_of_fp32_gemm']:.0f}% | "
                     f"{r['cosine'][row['engine']]['min']:.6f} |")
    lines.append("")
    for name, d in r["decision"].items():
        lines.append(f"- {name}: slowest ratio over {r['baseline']} {d['min_vs_baseline']:.2f}× (bar {r['bar']}×), "
                     f"features {'within' if d['parity'] else 'NOT within'} cos ≥ {r['cos_floor']} → "
                     f"{'clears the bar' if d['ships'] else 'does not clear the bar'}")
    for name, why in r["skipped"].items():
        lines.append(f"- {name}: skipped: {why}")
    return "\n".join(lines) + "\n"
