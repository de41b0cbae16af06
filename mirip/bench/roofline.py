"""The machine's own limit beside every model figure: GEMM TFLOP/s in fp32 and bf16, measured in this run.

A shared machine's speed changes by the minute, so a model's images/s means little alone. This section times
square matrix products (the work a ViT forward is made of) in fp32 and in bf16 on the benchmark's device, then
the backbone's forward on batches held in memory in fp32 and in bf16, interleaved round by round so both see
the same load. Each forward figure is given as images/s, as achieved TFLOP/s (the ViT's matmul FLOPs counted
analytically, ``vit_flops_per_image``) and as a share of the same run's GEMM rate for its dtype, beside the
fp32 baseline; bf16's features are compared with fp32's (cosine per image).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List

import numpy as np
import torch

from mirip.common.devices import resolve_device
from mirip.common.machine import device_name
from mirip.ml.feature_extractor import DINOv2FeatureExtractor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("roofline: GEMM rate and the backbone's share of it, fp32 and bf16")
    g.add_argument("--roofline-gemm-size", type=int, default=None, help="N of the N x N GEMM (2048; --quick 256)")
    g.add_argument("--roofline-batches", default=None,
                   help="comma-separated forward batch sizes (default 1,8; --quick 1,2)")
    g.add_argument("--roofline-rounds", type=int, default=None,
                   help="interleaved fp32/bf16 rounds, median reported (3; --quick 1)")
    g.add_argument("--roofline-seconds", type=float, default=None,
                   help="seconds each GEMM rate and forward figure is timed for, per round (2.0; --quick 0.2)")


def _opt(args, name: str, full, quick):
    value = getattr(args, f"roofline_{name}", None)
    return value if value is not None else (quick if getattr(args, "quick", False) else full)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_rate(fn, device: str, seconds: float) -> float:
    """Calls of ``fn`` per second over at least ``seconds`` (and at least two calls), after one warm-up call."""
    fn()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    _sync(device)
    return calls / (time.perf_counter() - start)


def gemm_tflops(dtype: torch.dtype, device: str, n: int, seconds: float) -> float:
    """TFLOP/s of an (n x n) @ (n x n) product in ``dtype`` on ``device`` (2 n^3 FLOPs each)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    with torch.inference_mode():
        rate = _timed_rate(lambda: torch.mm(a, b), device, seconds)
    return rate * 2 * n ** 3 / 1e12


def vit_flops_per_image(hidden: int, layers: int, mlp_hidden: int, patch: int, image_size: int,
                        prefix_tokens: int = 1) -> float:
    """Matmul FLOPs of one ViT forward: patch embedding, then per block QKV + output projections, attention
    scores and their product with V, and the MLP (2 FLOPs per multiply-add; norms and softmax left out)."""
    patches = (image_size // patch) ** 2
    tokens = patches + prefix_tokens
    embed = 2 * patches * (3 * patch * patch) * hidden
    per_block = (2 * tokens * hidden * 4 * hidden  # q, k, v and the output projection
                 + 2 * 2 * tokens * tokens * hidden  # Q K^T and attention @ V
                 + 2 * 2 * tokens * hidden * mlp_hidden)  # the MLP's two layers
    return float(embed + layers * per_block)


def model_flops(extractor: DINOv2FeatureExtractor, image_size: int) -> float:
    cfg = extractor.backbone.config
    hidden = int(cfg.hidden_size)
    mlp = int(getattr(cfg, "intermediate_size", 0) or hidden * float(getattr(cfg, "mlp_ratio", 4)))
    prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    return vit_flops_per_image(hidden, int(cfg.num_hidden_layers), mlp, int(cfg.patch_size), image_size, prefix)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = resolve_device(getattr(args, "device", None))
    size = int(getattr(args, "image_size", 224) or 224)
    n, rounds = _opt(args, "gemm_size", 2048, 256), _opt(args, "rounds", 3, 1)
    seconds = _opt(args, "seconds", 2.0, 0.2)
    batches = [int(b) for b in str(_opt(args, "batches", "1,8", "1,2")).split(",") if b.strip()]
    backbone = getattr(args, "backbone", None) or "facebook/dinov2-small"
    random_init = bool(getattr(args, "random_init", False))
    models = {p: DINOv2FeatureExtractor(backbone, device=device, random_init=random_init, precision=p)
              for p in DTYPES}
    flops = model_flops(models["fp32"], size)
    gemm: Dict[str, List[float]] = {p: [] for p in DTYPES}
    forward: Dict[str, Dict[int, List[float]]] = {p: {b: [] for b in batches} for p in DTYPES}
    gen = torch.Generator().manual_seed(0)
    images = {b: torch.randn(b, 3, size, size, generator=gen).to(device) for b in batches}
    for r in range(rounds):  # interleaved: a change in the machine's load hits both precisions alike
        for p, dtype in DTYPES.items():
            gemm[p].append(gemm_tflops(dtype, device, n, seconds))
            for b in batches:
                forward[p][b].append(b * _timed_rate(lambda: models[p].extract(images[b]), device, seconds))
        print(f"  round {r + 1}/{rounds}: GEMM fp32 {gemm['fp32'][-1]:.3f}, bf16 {gemm['bf16'][-1]:.3f} TFLOP/s",
              flush=True)
    ref, low = models["fp32"].extract(images[max(batches)]), models["bf16"].extract(images[max(batches)])
    cos = torch.nn.functional.cosine_similarity(ref.float(), low.float(), dim=1)
    roof = {p: float(np.median(v)) for p, v in gemm.items()}
    rows = []
    for b in batches:
        base = float(np.median(forward["fp32"][b]))
        for p in DTYPES:
            ips = float(np.median(forward[p][b]))
            tflops = ips * flops / 1e12
            rows.append({"precision": p, "batch": b, "images_per_s": ips, "runs_images_per_s": forward[p][b],
                         "tflops": tflops, "share_of_gemm": tflops / roof[p], "share_of_fp32_gemm": tflops / roof["fp32"],
                         "vs_fp32": ips / base})
    return {"device": device, "device_name": device_name(device), "backbone": backbone, "random_init": random_init,
            "image_size": size, "gemm_size": n, "rounds": rounds, "torch_threads": torch.get_num_threads(),
            "gemm_tflops": roof, "gemm_runs_tflops": gemm, "bf16_vs_fp32_gemm": roof["bf16"] / roof["fp32"],
            "gflops_per_image": flops / 1e9, "forward": rows, "bf16_cos_min": float(cos.min()),
            "bf16_cos_mean": float(cos.mean())}


def to_markdown(r: Dict[str, Any]) -> str:
    g = r["gemm_tflops"]
    lines = [
        f"**Roofline** — {r['device_name']} ({r['device']}, {r['torch_threads']} threads): GEMM {r['gemm_size']}² "
        f"fp32 {g['fp32']:.3f} TFLOP/s, bf16 {g['bf16']:.3f} TFLOP/s ({r['bf16_vs_fp32_gemm']:.2f}× fp32), "
        f"median of {r['rounds']} interleaved rounds. Backbone {r['backbone']} "
        f"({'random' if r['random_init'] else 'pretrained'} weights), {r['image_size']} px, "
        f"{r['gflops_per_image']:.2f} GFLOP per image (matmuls, counted analytically).",
        "",
        "| precision | batch | images/s | × fp32 | TFLOP/s | share of its GEMM rate |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["forward"]:
        lines.append(f"| {row['precision']} | {row['batch']} | {row['images_per_s']:.2f} | {row['vs_fp32']:.2f} | "
                     f"{row['tflops']:.3f} | {100 * row['share_of_gemm']:.0f}% |")
    lines += ["", f"bf16 features vs fp32: cosine per image min {r['bf16_cos_min']:.6f}, "
                  f"mean {r['bf16_cos_mean']:.6f}.", ""]
    return "\n".join(lines)
