"""Evaluate a trained head on cached features: pairwise accuracy overall and per tier pair, Spearman, Kendall.

Example, from the repository root:

    python scripts/evaluate.py --checkpoint runs/demo/train/best.pt --features cache/features.h5 \\
        --metadata data/demo/metadata.csv --split test --json runs/demo/eval.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mirip.cli.options import (DefaultsHelpFormatter, add_encoding_option, add_strict_images_option, plain_warnings,
                               positive)
from mirip.store.cache_errors import CacheError
from mirip.store.checkpoint import CheckpointError
from mirip.store.fingerprint import RANDOM_WEIGHTS_NOTE
from mirip.training.ensemble import format_uncertainty
from mirip.training.evaluator import format_metrics
from mirip.training.run import evaluate_checkpoint
from mirip.training.run_data import exclusion_note
from mirip.training.run_outputs import write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Score every image of a metadata file once with a trained head and report pairwise accuracy "
                    "(overall and per tier pair), Spearman and Kendall correlation with the tiers; with the checkpoint's "
                    "score-to-tier calibration also tier accuracy, mean absolute tier error, the confusion matrix "
                    "and the expected calibration error. Whether uncertainty means something: accuracy on the more vs the less certain half of the pairs (an ensemble's score gap in score spreads; one head's score gap), an ensemble's members' accuracies, and the typicality of the drawings (with the checkpoint's typicality fit). The cache must have the fingerprint the head was "
                    "trained on and hold the entries of its feature spec (read from the checkpoint; no flag needed).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="PT", help="checkpoint from scripts/train.py (best.pt)")
    parser.add_argument("--features", required=True, metavar="H5", help="feature cache")
    parser.add_argument("--metadata", required=True, metavar="CSV", help="CSV with one row per image")
    parser.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                        help="evaluate every image of the metadata, or one split of the training run rebuilt "
                             "from the checkpoint (then the ridge baseline is shown beside it)")
    parser.add_argument("--eval-pairs", type=positive(), default=None,
                        help="number of pairs (default: the run's eval_pairs)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the run's device, cpu if no CUDA)")
    parser.add_argument("--filename-column", default=None, help="(default: the run's)")
    parser.add_argument("--tier-column", default=None, help="(default: the run's)")
    parser.add_argument("--group-column", default=None, metavar="COLUMN",
                        help="metadata column naming each drawing's student or scene: the confidence intervals "
                             "resample whole groups (default: the run's group column, else images). The split is "
                             "always rebuilt as the run made it")
    parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                        help="bootstrap resamples behind each figure's interval, 0 for none (default: the run's)")
    add_encoding_option(parser)
    add_strict_images_option(parser)
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the metrics as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plain_warnings()
    try:
        result = evaluate_checkpoint(args.checkpoint, args.features, args.metadata, split=args.split,
                                     device=args.device, eval_pairs=args.eval_pairs,
                                     filename_column=args.filename_column, tier_column=args.tier_column,
                                     encoding=args.encoding, strict_images=args.strict_images,
                                     group_column=args.group_column, bootstrap_resamples=args.bootstrap)
    except (ValueError, FileNotFoundError, CacheError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backbone = result.get("features_backbone") or {}
    if backbone.get("backbone_weights") == "random":
        print(f"NOTE: {backbone.get('backbone')} {RANDOM_WEIGHTS_NOTE}")
    if result.get("excluded_images"):
        where = f"{args.json} (key excluded_images)" if args.json else "the metrics JSON (--json PATH, key excluded_images)"
        print(exclusion_note(result["excluded_images"], where))
    print(format_metrics(result["model"], result.get("linear_baseline"),
                         title=f"{args.checkpoint} on the {args.split} split (epoch {result['epoch']}, "
                               f"features {result['feature_spec']}):"))
    print(format_uncertainty(result["uncertainty"]))
    for key in ("tier_figures_note", "calibration_note", "typicality_note"):
        if result.get(key):
            print(f"NOTE: {result[key]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0

