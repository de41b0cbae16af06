"""Run mirip's benchmarks and write benchmark.json + benchmark.md.

Each benchmark is a module ``mirip.bench.<name>`` with ``add_arguments(parser)``,
``run(args) -> dict`` and ``to_markdown(result) -> str``. Examples:

    python scripts/benchmark.py --only full_image --backbone facebook/dinov2-large --random-init \\
        --image-size 768 --precision bf16 --device cuda --output-dir runs/bench
    python scripts/benchmark.py --random-init --quick      # CPU: DINOv2-small at 224 px, a few minutes
    python scripts/benchmark.py --only engines --random-init --device cpu   # torch vs OpenVINO, same run

Without --backbone / --image-size the defaults follow the device, as in the demo: DINOv2-large at 768 px on
a GPU, DINOv2-small at 224 px on a CPU. Results are written after every benchmark, so a stopped run keeps
what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

from mirip.cli.options import DefaultsHelpFormatter, plain_warnings
from mirip.common.atomic import write_atomic
from mirip.common.devices import PRECISIONS, announce_precision, device_defaults, resolve_device
from mirip.common.machine import machine_info

BENCHMARKS = ("roofline", "engines", "full_image", "extraction", "training", "sweep", "explain", "serve", "judgments")
# Run only when named in --only: engines converts the model to OpenVINO (an optional extra) and times every engine
# at four batch sizes, minutes on a CPU that a default run should not spend.
OPT_IN = ("engines",)


def load_benchmarks(names: Tuple[str, ...] = BENCHMARKS) -> Tuple[Dict[str, ModuleType], Dict[str, str]]:
    """Import ``mirip.bench.<name>`` for each name; one that does not exist (yet) is skipped with a reason."""
    modules, skipped = {}, {}
    for name in names:
        try:
            module = importlib.import_module(f"mirip.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"mirip.bench.{name}":
                skipped[name] = "module mirip.bench.%s does not exist" % name
            else:
                skipped[name] = f"cannot import: {exc}"
            continue
        except ImportError as exc:
            skipped[name] = f"cannot import: {exc}"
            continue
        missing = [f for f in ("add_arguments", "run", "to_markdown") if not hasattr(module, f)]
        if missing:
            skipped[name] = f"mirip.bench.{name} lacks {', '.join(missing)}"
        else:
            modules[name] = module
    return modules, skipped


def build_parser(modules: Dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run mirip's benchmarks (the machine's GEMM roofline in fp32 and bf16 with the backbone's "
                    "share of it, torch vs OpenVINO on the scoring model when asked for, full-image mode, stage-one "
                    "extraction, stage-two training, sweeps, attribution maps, "
                    "a simulated teacher's judgments) and write benchmark.json and benchmark.md (machine, device, "
                    "backbone, weights, precision, "
                    "image size, every figure, and whether the seed's 100 ms/pair and 12 GB requirements are met).",
        formatter_class=DefaultsHelpFormatter,
    )
    common = parser.add_argument_group("common")
    common.add_argument("--only", default=",".join(n for n in BENCHMARKS if n not in OPT_IN),
                        help="comma-separated benchmarks to run, from: " + ", ".join(BENCHMARKS)
                             + " (" + ", ".join(OPT_IN) + " only when named)")
    common.add_argument("--backbone", default=None,
                        help="hub id or local backbone directory (default: facebook/dinov2-large on CUDA, "
                             "facebook/dinov2-small on CPU)")
    common.add_argument("--random-init", action="store_true",
                        help="random weights of the same architecture: no download needed, real speed and memory")
    common.add_argument("--image-size", type=int, default=None,
                        help="input size in pixels, square (default: 768 on CUDA, 224 on CPU)")
    common.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="autocast precision (default: bf16 on CUDA and on a CPU with AMX or AVX512-BF16, fp32 on other CPUs)")
    common.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    common.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 keeps CPU figures stable on a busy machine")
    common.add_argument("--quick", action="store_true", help="tiny sizes and repeat counts: a smoke run for CPUs")
    common.add_argument("--output-dir", default="runs/benchmark", help="where benchmark.json and benchmark.md go")
    for module in modules.values():
        module.add_arguments(parser)
    return parser


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers), user + system."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _requirements_line(results: Dict[str, Any]) -> Optional[str]:
    full = results.get("full_image")
    if not isinstance(full, dict) or "report" not in full:
        return None
    r = full["report"]
    return (f"Seed requirements: {r['requirements']['max_inference_time_ms']:.0f} ms per pair — "
            f"{'met' if r['meets_inference_requirement'] else 'NOT met'} ({r['inference_time_ms']:.2f} ms); "
            f"{r['requirements']['max_memory_gb']:.0f} GB — "
            f"{'met' if r['meets_memory_requirement'] else 'NOT met'} ({r['memory_usage_gb']:.2f} GB at batch "
            f"{r['batch_size']}).")


def render_markdown(header: Dict[str, Any], results: Dict[str, Any], sections: Dict[str, str],
                    skipped: Dict[str, str]) -> str:
    rows = [("date (UTC)", header["machine"]["date"]), ("machine", header["machine"]["platform"]),
            ("CPU cores", header["machine"]["cpu_cores"]),
            ("load average at start", header["machine"]["load_average_1min"]), ("device", header["machine"]["device"]),
            ("device name", header["machine"]["device_name"]), ("backbone", header["backbone"]),
            ("weights", header["weights"]), ("precision", header["precision"]),
            ("image size", f"{header['image_size']} px"), ("quick", header["quick"]),
            ("torch CPU threads", header["cpu_threads"]),
            ("torch / transformers / mirip", f"{header['machine']['torch']} / {header['machine']['transformers']}"
                                             f" / {header['machine']['mirip']}")]
    lines = ["# mirip benchmarks", "", "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    requirement = _requirements_line(results)
    if requirement:
        lines += [requirement, ""]
    if header["weights"] == "random":
        lines += ["Backbone weights are RANDOM (same architecture, no download): timings and memory are real, "
                  "scores and accuracies are not.", ""]
    for name, text in sections.items():
        lines += [text.rstrip(), ""]
    for name, reason in skipped.items():
        lines += [f"- `{name}` skipped: {reason}"]
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(output_dir: str, header: Dict[str, Any], results: Dict[str, Any], sections: Dict[str, str],
                  skipped: Dict[str, str]) -> Tuple[str, str, str]:
    """benchmark.json and benchmark.md as they stand (written after every benchmark, atomically)."""
    json_path = os.path.join(output_dir, "benchmark.json")
    md_path = os.path.join(output_dir, "benchmark.md")
    write_atomic(json_path, json.dumps({**header, "results": results, "skipped": skipped}, indent=2, default=str))
    markdown = render_markdown(header, results, sections, skipped)
    if header.get("status") != "complete":
        markdown += (f"\nPARTIAL: {header['status']}; not run: {', '.join(header['pending']) or 'none'}.\n")
    write_atomic(md_path, markdown)
    return json_path, md_path, markdown


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted before any benchmark finished: nothing was written", file=sys.stderr)
        return 130


def _main(argv: Optional[List[str]]) -> int:
    modules, import_skips = load_benchmarks(BENCHMARKS)
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    plain_warnings()
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) in --only: {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.threads is not None:
        import torch

        if args.threads <= 0:
            parser.error(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    args.precision = announce_precision(args.device, args.precision)
    backbone, image_size = device_defaults(args.device)
    args.backbone = args.backbone or backbone
    args.image_size = args.image_size or image_size
    header = {"machine": machine_info(args.device), "backbone": args.backbone,
              "weights": "random" if args.random_init else "pretrained", "precision": args.precision,
              "image_size": args.image_size, "quick": args.quick, "only": wanted, "cpu_threads": _threads(),
              "status": "running", "pending": list(wanted)}
    print(f"mirip benchmarks on {header['machine']['device_name']} ({args.device}): {args.backbone} "
          f"({header['weights']} weights), {args.image_size} px, {args.precision}"
          + (", quick" if args.quick else ""))

    results: Dict[str, Any] = {}
    sections: Dict[str, str] = {}
    skipped = {n: r for n, r in import_skips.items() if n in wanted}
    failed = []
    start = time.perf_counter()
    for i, name in enumerate(wanted, 1):
        step = f"[{name}]"
        if name not in modules:
            print(f"{step} skipped: {skipped[name]}")
            header["pending"].remove(name)
            continue
        print(f"{step} running ({i} of {len(wanted)}) ...", flush=True)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        try:
            result = modules[name].run(args)
            sections[name] = modules[name].to_markdown(result)
        except KeyboardInterrupt:
            header["status"] = f"interrupted during {name}"
            if results:
                json_path, _, _ = write_outputs(args.output_dir, header, results, sections, skipped)
                saved = f"results of {', '.join(results)} are in {json_path}"
            else:
                saved = "no benchmark had finished, nothing was written"
            print(f"\ninterrupted: {saved}; to finish, run again with --only {','.join(header['pending'])}",
                  file=sys.stderr)
            return 130
        except Exception as exc:  # one broken benchmark must not lose the others' figures
            failed.append(name)
            result = {"error": f"{exc.__class__.__name__}: {exc}", "traceback": traceback.format_exc()}
            sections[name] = f"### {name}\n\nFAILED: {result['error']}\n"
            print(f"{step} FAILED: {result['error']}", file=sys.stderr)
        results[name] = result
        header["pending"].remove(name)
        if header["pending"]:
            json_path, _, _ = write_outputs(args.output_dir, header, results, sections, skipped)
        # CPU seconds beside wall seconds: on a busy machine the wall time says little about the work.
        print(f"{step} done in {time.perf_counter() - t0:.1f} s, {_cpu_seconds() - cpu0:.0f} CPU s "
              f"({time.perf_counter() - start:.0f} s so far)"
              + (f"; partial results in {json_path}" if header["pending"] else ""), flush=True)

    header["status"] = "complete"
    json_path, md_path, markdown = write_outputs(args.output_dir, header, results, sections, skipped)
    print()
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return 1 if failed else 0

