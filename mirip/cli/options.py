"""Command-line options shared by the stage-two commands (train, sweep), so their flags cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings
from typing import Iterable, Mapping, Optional

from mirip.training.config import TrainingConfig
from mirip.training.datasets.pair_sampling import BALANCES
from mirip.training.static_step import STEP_MODES

TRAINING_HELP = {
    "learning_rate": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "batch_size": "pairs per optimisation step",
    "max_epochs": "maximum number of epochs",
    "gradient_clip_norm": "clip the gradient norm to this value",
    "early_stopping_patience": "stop after this many epochs without a better val accuracy (0: never)",
    "scheduler_t_max": "CosineAnnealingLR period in epochs",
    "scheduler_eta_min": "CosineAnnealingLR minimum learning rate",
    "save_every_n_epochs": "also keep checkpoint_epoch_N.pt every N epochs",
    "wandb_enabled": "log to Weights & Biases (needs `pip install wandb`)",
    "wandb_project": "wandb project name",
    "wandb_run_name": "wandb run name",
    "device": "cuda or cpu (cuda falls back to cpu with a warning when absent); default: cuda when available",
    "seed": "seed of the split, the head's init, dropout and every epoch's pairs",
    "pairs_per_epoch": "training pairs sampled afresh each epoch",
    "eval_pairs": "validation and test pairs (sampled once)",
    "pair_balance": "'tier_pair': pairs spread evenly over S-A, S-B, ..., B-C; 'uniform': over all cross-tier pairs",
    "num_workers": "DataLoader workers (image datasets only; cached features need none)",
    "head_step": "head step on cached features: auto (eager until the CUDA graph is verified on a GPU), eager, static (the "
                 "graph's static-buffer step without a graph) or graph",
}
CHOICES = {"pair_balance": BALANCES, "head_step": STEP_MODES}


def add_training_options(group, skip: Iterable[str] = ("checkpoint_dir",),
                         help_text: Optional[Mapping[str, str]] = None) -> None:
    """One option per TrainingConfig field (``--learning-rate``, ``--max-epochs``, ...), defaults from the
    dataclass, for train and sweep alike (``skip``: fields the command sets otherwise; ``help_text``: its own
    wording for some). ``--device`` defaults to None: cuda when available (``training_config``)."""
    hints = typing.get_type_hints(TrainingConfig)
    helps = {**TRAINING_HELP, **(help_text or {})}
    for f in dataclasses.fields(TrainingConfig):
        if f.name in skip:
            continue
        flag, kind, text = "--" + f.name.replace("_", "-"), hints[f.name], helps.get(f.name, f.name)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif f.name in CHOICES:
            group.add_argument(flag, choices=CHOICES[f.name], default=f.default, help=text)
        elif f.name == "device":
            group.add_argument(flag, default=None, help=text)
        else:
            base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
            group.add_argument(flag, type=base, default=f.default, metavar=base.__name__.upper(), help=text)


def training_values(args: argparse.Namespace, output_dir: str, skip: Iterable[str] = ("checkpoint_dir",)) -> dict:
    """The TrainingConfig fields the options of ``add_training_options`` set, the device resolved and the
    checkpoint directory the output directory."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig) if f.name not in skip}
    if values.get("device", "") is None:
        import torch

        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    values["checkpoint_dir"] = output_dir
    return values


def positive(kind=int):
    """An argparse type: a number of ``kind`` above zero; anything else is refused saying what was given."""
    what = "integer" if kind is int else "number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an' if kind is int else 'a'} {what}: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive {what}, got {value}")
        return value
    return parse


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


def add_strict_images_option(parser) -> None:
    """--strict-images: refuse metadata rows whose images extraction could not read, instead of leaving them out."""
    parser.add_argument("--strict-images", action="store_true",
                        help="refuse the run when the cache records any metadata image as unreadable (default: "
                             "leave those rows out, say how many, and list them in excluded_images.json)")


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
    data.add_argument("--group-column", default=None, metavar="COLUMN",
                      help="metadata column naming who or what a drawing belongs to (student, scene, class): every "
                           "drawing of a group lands in one split and the confidence intervals resample groups; "
                           "use it whenever one student or scene has several drawings (default: split by image)")
    add_strict_images_option(data)
    return data
