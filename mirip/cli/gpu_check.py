"""Measure every GPU speed figure beside its baseline in one run; write gpu_suite.json + gpu_suite.md.

On the GPU (one device call; DINOv2-large at 768 px, bf16, random weights):

    python scripts/gpu_check.py --random-init --output-dir docs/gpu-$(date +%F)

With little device time, order the sections by priority and give a budget: no section after the first
starts once it is spent, and those left are recorded as skipped (unmeasured):

    python scripts/gpu_check.py --random-init --max-seconds 420 \
        --only head_step,training,backbone,full_image,end_to_end,sweep,extraction --output-dir docs/gpu-$(date +%F)

On a CPU, every branch with a tiny backbone (a smoke run; the figures mean nothing):

    python scripts/gpu_check.py --quick --device cpu --backbone path/to/tiny-dinov2 --image-size 28 \\
        --compile-backend eager --output-dir runs/gpu-check

Sections (--only): backbone, head_step, training, sweep, full_image, end_to_end, extraction. Each is
written as soon as it finishes, so a run cut short keeps what it measured. Exit status 1 when a section
failed or a numerics check (compiled vs eager, graph vs eager, no host sync in an epoch) did not hold.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from mirip.bench import gpu_report, gpu_suite
from mirip.cli.options import DefaultsHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--output-dir", default="runs/gpu-check", help="where gpu_suite.json and gpu_suite.md go")
    gpu_suite.add_arguments(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = gpu_suite.run(args, args.output_dir)
    except ValueError as exc:
        parser.error(str(exc))
    print()
    print(gpu_suite.to_markdown(report))
    print(f"wrote {args.output_dir}/gpu_suite.json and gpu_suite.md")
    return 0 if gpu_report.all_ok(report) else 1

