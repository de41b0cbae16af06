"""Every figure of the GPU speed goals, each beside its baseline, from one run (``scripts/gpu_check.py``).

Sections (``--only``), each written to ``gpu_suite.json`` as soon as it finishes, so a run
stopped by a time limit keeps what it measured:

    backbone     bare backbone images/s: eager vs compiled (static shapes) with the SDPA backend chosen by
                 measurement; compile time apart; break-even image count; compiled-vs-eager features
    head_step    ms per head step (batch 32, 1024->512->256->1): eager vs the static step (a CUDA graph on
                 CUDA); graph-vs-eager numerics over several epochs; no host sync inside an epoch (CUDA)
    training     Trainer.fit, E epochs x P pairs with validation: graph vs eager (eager over fewer epochs)
    sweep        16 stacked heads vs 16 sequential Trainer runs (mirip.bench.sweep)
    full_image   ms per pair at batch 2 (one image each side): eager vs compiled ("reduce-overhead": CUDA
                 graphs); numerics
    end_to_end   end-to-end / two-stage training time (PerformanceBenchmarks.training_time_estimate), with the
                 two-stage time also from the eager head step and from the compiled backbone
    extraction   pipeline / bare ratio and peak RSS at each size (mirip.bench.extraction), eager and compiled
    serve        the HTTP service under load (mirip.bench.serve): requests/s and p50/p95/p99 at concurrency 1
                 and 8 beside in-process scoring; the seed's online goal is p99 <= 100 ms at concurrency 8

The sections are in ``mirip.bench.gpu_sections``, the goal table and markdown in ``mirip.bench.gpu_report``.

On a CPU the same code runs with a tiny backbone (``--quick``): the graph becomes the static-buffer step
run eagerly, "reduce-overhead" becomes the default compile mode; figures from a CPU say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from typing import Any, Callable, Dict

from mirip.common.atomic import write_atomic
from mirip.common.devices import default_precision, resolve_device
from mirip.common.machine import machine_info
from mirip.bench.gpu_report import summary, to_markdown
from mirip.bench.gpu_sections import (DEFAULTS, backbone_section, end_to_end_section, extraction_section,
                                      full_image_section, head_step_section, serve_section, sweep_section,
                                      training_section)

SECTIONS = ("backbone", "head_step", "training", "sweep", "full_image", "end_to_end", "extraction", "serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("gpu suite")
    g.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    g.add_argument("--backbone", default=None, help="hub id or local directory (default: dinov2-large on CUDA)")
    g.add_argument("--random-init", action="store_true", help="random weights of the backbone's architecture")
    g.add_argument("--image-size", type=int, default=None, help="pixels, square (768 on CUDA, 224 on CPU)")
    g.add_argument("--precision", default=None, help="bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run of every branch")
    g.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (tests use 'eager': tracing without code generation)")
    g.add_argument("--compile-mode", default=None, help="torch.compile mode for the bare backbone (default)")
    g.add_argument("--pair-compile-mode", default=None,
                   help="torch.compile mode for full-image scoring (default: reduce-overhead on CUDA)")
    g.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: no section after the first starts after this many seconds (those left are "
                        "recorded as skipped); with a device lent for minutes, one call then returns what fitted instead of "
                        "being killed mid-section. Order --only by priority")
    g.add_argument("--extract-sizes", type=int, nargs="+", default=None,
                   help="pipeline sizes N (each run also measures N/4): peak RSS must stay flat (2000; quick 16)")
    for name in DEFAULTS:
        g.add_argument("--" + name.replace("_", "-"), type=int, default=None, dest=name,
                       help=f"default {DEFAULTS[name][0]} on a GPU, {DEFAULTS[name][1]} with --quick")


RUNNERS = {"backbone": backbone_section, "head_step": head_step_section, "training": training_section,
           "sweep": sweep_section, "full_image": full_image_section, "end_to_end": end_to_end_section,
           "extraction": extraction_section, "serve": serve_section}


def run(args: argparse.Namespace, output_dir: str, log: Callable[[str], None] = print) -> Dict[str, Any]:
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    args.device = resolve_device(args.device)
    cuda = args.device.startswith("cuda")
    args.precision = args.precision or default_precision(args.device)
    args.backbone = args.backbone or ("facebook/dinov2-large" if cuda else "facebook/dinov2-small")
    args.image_size = args.image_size or (768 if cuda else 224)
    os.makedirs(output_dir, exist_ok=True)
    report: Dict[str, Any] = {"machine": machine_info(args.device), "backbone": args.backbone,
                              "weights": "random" if args.random_init else "pretrained", "precision": args.precision,
                              "image_size": args.image_size, "quick": args.quick, "sections": {}, "failed": []}
    ctx: Dict[str, Any] = {}
    report["skipped"] = []
    budget = getattr(args, "max_seconds", None)
    started = time.perf_counter()
    for i, name in enumerate(wanted):
        elapsed = time.perf_counter() - started
        if budget is not None and i > 0 and elapsed >= budget:  # the first section always runs
            report["sections"][name] = {"skipped": f"time budget: {elapsed:.0f} s of --max-seconds {budget:g} used"}
            report["skipped"].append(name)
            log(f"[{name}] skipped: time budget")
            continue
        log(f"[{name}] running ...")
        t0 = time.perf_counter()
        try:
            result = RUNNERS[name](args, ctx)
        except Exception as exc:  # one broken section must not lose the others' figures
            result = {"error": f"{exc.__class__.__name__}: {exc}", "traceback": traceback.format_exc()}
            report["failed"].append(name)
            log(f"[{name}] FAILED: {result['error']}")
        result["section_seconds"] = time.perf_counter() - t0
        report["sections"][name] = result
        _write(report, output_dir)  # after every section: a run killed by a time limit keeps what it measured
        log(f"[{name}] done in {result['section_seconds']:.1f} s")
    _write(report, output_dir)
    return report


def _write(report: Dict[str, Any], output_dir: str) -> None:
    report["summary"] = summary(report)
    write_atomic(os.path.join(output_dir, "gpu_suite.json"), json.dumps(report, indent=2, default=str))
    write_atomic(os.path.join(output_dir, "gpu_suite.md"), to_markdown(report))


