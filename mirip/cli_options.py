"""Command-line options shared by the stage-two commands (train, sweep), so their flags cannot drift apart."""

from __future__ import annotations

import argparse
import sys
import warnings


def plain_warnings() -> None:
    """Warnings as the commands' other notes, ``warning: <message>`` on stderr: not Python's default of the
    library's file and line, then a raw source line a user cannot act on."""
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001 (warnings' signature)
        print(f"warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after each option's help, once: not when the help already states its default
    (``default: cuda when available``), and not for an unset (None) default or an on/off flag, where it says nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text.lower() or action.default is None or isinstance(action, argparse._StoreTrueAction):
            return text
        return super()._get_help_string(action)


def add_encoding_option(parser) -> None:
    """--encoding: the metadata CSV's text encoding (every script that reads metadata has it)."""
    parser.add_argument("--encoding", default=None, metavar="NAME",
                        help="text encoding of the metadata CSV (default: UTF-8 with or without BOM, else CP949 "
                             "with a notice, as Korean Excel saves it)")


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
    add_encoding_option(data)
    data.add_argument("--train-ratio", type=float, default=0.8, help="share of images for training")
    data.add_argument("--val-ratio", type=float, default=0.1,
                      help="share of images for validation (early stopping and model selection)")
    data.add_argument("--test-ratio", type=float, default=0.1, help="share of images for the final test")
    data.add_argument("--stratify", action=argparse.BooleanOptionalAction, default=True,
                      help="keep tier proportions equal across splits")
    return data
