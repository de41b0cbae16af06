"""Command-line options shared by the stage-two commands (train, sweep), so their flags cannot drift apart."""

from __future__ import annotations

import argparse


def add_data_options(parser: argparse.ArgumentParser, output_help: str,
                     features_help: str = "") -> argparse._ArgumentGroup:
    """--features, --metadata, --output-dir, the metadata columns and the split: what a run trains on.

    ``features_help`` (a sweep's) makes --features take one or more caches.
    """
    data = parser.add_argument_group("data")
    if features_help:
        data.add_argument("--features", required=True, nargs="+", metavar="H5", help=features_help)
    else:
        data.add_argument("--features", required=True, metavar="H5", help="feature cache written by scripts/extract.py")
    data.add_argument("--metadata", required=True, metavar="CSV", help="CSV with one row per image")
    data.add_argument("--output-dir", required=True, metavar="DIR", help=output_help)
    data.add_argument("--filename-column", default="filename",
                      help="metadata column with the image path (relative to the image directory, as in the cache)")
    data.add_argument("--tier-column", default="tier", help="metadata column with the tier (S/A/B/C)")
    data.add_argument("--train-ratio", type=float, default=0.8, help="share of images for training")
    data.add_argument("--val-ratio", type=float, default=0.1,
                      help="share of images for validation (early stopping and model selection)")
    data.add_argument("--test-ratio", type=float, default=0.1, help="share of images for the final test")
    data.add_argument("--stratify", action=argparse.BooleanOptionalAction, default=True,
                      help="keep tier proportions equal across splits")
    return data
