"""Suggest the next pairs of drawings worth a teacher's judgment, from a trained head's scores.

Example, from the repository root:

    python scripts/suggest_pairs.py --checkpoint runs/demo/best.pt --features cache/features.h5 \\
        --metadata data/demo/metadata.csv --judgments judged.csv --count 50 --output pairs.csv
"""

from __future__ import annotations

import argparse
import sys
import time

from mirip.cli.options import DefaultsHelpFormatter, add_encoding_option, plain_warnings, positive
from mirip.judging.next_pairs import SuggestConfig, suggest_from_files
from mirip.judging.suggest import SPREAD_COMPONENTS, SUGGEST_WINDOW
from mirip.store.cache_errors import CacheError
from mirip.store.checkpoint import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Choose the pairs of drawings whose order the model is least sure of (P(a better) from the "
                    "checkpoint's calibration; with several checkpoints, also where they disagree), favouring the "
                    "drawings with the fewest judgments, never a pair already judged, no drawing more than its "
                    "share. Writes a judgments CSV (a,b,winner,judge,time) with the winner blank for the teacher "
                    "to fill in (a, b or tie), plus p_a_better and the reason; train.py --judgments reads it back.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, nargs="+", metavar="PT",
                        help="best.pt of a run; several: an ensemble whose members' disagreement counts too")
    parser.add_argument("--features", required=True, metavar="H5", help="the feature cache the drawings were extracted into")
    parser.add_argument("--metadata", required=True, metavar="CSV", help="the drawings to choose among (one row each)")
    parser.add_argument("--judgments", default=None, metavar="CSV",
                        help="pairs already judged: never suggested again, and their drawings count as judged")
    parser.add_argument("--count", type=positive(), default=50, help="how many pairs to suggest")
    parser.add_argument("--output", required=True, metavar="CSV", help="where to write the pairs")
    parser.add_argument("--window", type=positive(), default=SUGGEST_WINDOW,
                        help="candidates: each drawing with this many neighbours either side in score order")
    parser.add_argument("--spread-components", type=int, default=SPREAD_COMPONENTS, metavar="K",
                        help="favour pairs far apart on the features' top K principal axes, so the judgments "
                             "cover the feature space (0: the model's uncertainty and the judgment counts alone)")
    parser.add_argument("--seed", type=int, default=0, help="breaks ties and picks which drawing is shown as a")
    parser.add_argument("--filename-column", default="filename", help="metadata column with the image path")
    parser.add_argument("--tier-column", default="tier", help="metadata column with the tier (S/A/B/C)")
    add_encoding_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plain_warnings()
    cfg = SuggestConfig(checkpoints=args.checkpoint, features=args.features, metadata=args.metadata,
                        output=args.output, judgments=args.judgments, count=args.count, window=args.window,
                        components=args.spread_components,
                        seed=args.seed, filename_column=args.filename_column, tier_column=args.tier_column,
                        encoding=args.encoding)
    start = time.perf_counter()
    try:
        summary = suggest_from_files(cfg)
    except (ValueError, FileNotFoundError, CacheError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['pairs']} pairs over {summary['drawings']} drawings (at most {summary['most_per_drawing']} "
          f"per drawing) to {summary['output']} in {time.perf_counter() - start:.1f} s; fill in the winner column "
          "(a, b or tie) and pass the file to train.py --judgments")
    return 0
