"""Ablation sweep over margin, dims, learning rate, dropout and weight decay: many heads trained together.

Example, from the repository root:

    python scripts/sweep.py --features cache/features.h5 --metadata data/metadata.csv \\
        --output-dir runs/sweep-margin --margin 0.1 0.5 1.0 --hidden-dim 256 512 --projector-dim 64 128 --seeds 0 1 2

Several caches of the same images (other backbones or image sizes) become one more axis, each trained on
the same splits and reported side by side:

    python scripts/sweep.py --features cache/dinov2-large.h5 cache/siglip-so400m.h5 --metadata data/metadata.csv \\
        --output-dir runs/backbones --seeds 0 1 2

Ctrl-C (or SIGTERM) stops it cleanly, keeping every finished configuration; run the same command again
to continue: finished configurations are skipped.

On a 2-core CPU, a sweep sized for minutes (12 heads, 20 epochs of 2,000 pairs; 39 s on 500 images of 384-d
features, measured 2026-12-05):

    python scripts/sweep.py --features cache/features.h5 --metadata data/metadata.csv --output-dir runs/sweep \\
        --margin 0.5 1.0 --hidden-dim 256 --projector-dim 128 --learning-rate 1e-3 3e-4 --seeds 0 1 2 \\
        --max-epochs 20 --pairs-per-epoch 2000
"""

from __future__ import annotations

import argparse
import signal
import sys

import torch

from mirip.cli.options import (DefaultsHelpFormatter, add_data_options, add_training_options, plain_warnings,
                               training_values)
from mirip.common.devices import resolve_device
from mirip.common.feature_spec import FEATURE_NORMS
from mirip.store.cache_errors import CacheError
from mirip.store.checkpoint import CheckpointError
from mirip.sweep.best_ensemble import check_ensemble_request, save_best_ensemble
from mirip.sweep.grid import SweepConfigError, SweepGrid
from mirip.sweep.multi import run_multi_sweep
from mirip.sweep.report import tie_note
from mirip.sweep.runner import OUTPUT_FILES, run_sweep
from mirip.sweep.settings import GRID_FIELDS, SweepSettings
from mirip.training.stacked_optim import OPTIMIZERS
from mirip.sweep.threads import choose_threads
from mirip.training.config import TrainingConfig

DEFAULTS = TrainingConfig()
GRID_OPTIONS = (  # (flag, dest, type, default, help)
    ("--margin", "margin", float, [1.0], "MarginRankingLoss margins"),
    ("--hidden-dim", "hidden_dim", int, [512], "Projector hidden widths"),
    ("--projector-dim", "projector_dim", int, [256], "Projector output (embedding) dims"),
    ("--learning-rate", "learning_rate", float, [DEFAULTS.learning_rate], "AdamW learning rates"),
    ("--dropout", "dropout", float, [0.1], "Projector dropout rates"),
    ("--weight-decay", "weight_decay", float, [DEFAULTS.weight_decay], "AdamW weight decays"),
    ("--seeds", "seed", int, [DEFAULTS.seed], "seeds: each one its own split, init, dropout and pairs"),
    ("--judgment-weight", "judgment_weight", float, None, "what one judged pair counts against one tier pair, "
     "each weight its own group of heads (they see other pairs); needs --judgments; 0: judged pairs reported, not "
     "trained on (default with --judgments: 1)"),
    ("--feature", "feature", str, [None], "feature specs, e.g. cls@-1 'cls@-4,-3,-2,-1+mean@-1' 'mean@-1+std@-1': "
     "each its own group of heads (its own input dim); default: the cache's only entry, else cls@-1"),
)
SKIPPED = set(GRID_FIELDS) | {"checkpoint_dir"}  # grid axes, and the output directory is fixed
FIXED_HELP = {
    "batch_size": "pairs per optimisation step",
    "max_epochs": "maximum epochs per head",
    "gradient_clip_norm": "clip each head's gradient norm to this value",
    "early_stopping_patience": "stop a head after this many epochs without a better val accuracy (0: never)",
    "scheduler_t_max": "CosineAnnealingLR period in epochs",
    "scheduler_eta_min": "CosineAnnealingLR minimum learning rate",
    "save_every_n_epochs": "recorded in each checkpoint's config (a sweep keeps each head's best epoch only)",
    "wandb_enabled": "not supported by sweeps",
    "pairs_per_epoch": "training pairs sampled afresh each epoch (the same for every head of a seed)",
    "eval_pairs": "validation and test pairs (sampled once per seed)",
    "num_workers": "recorded only (cached features need no workers)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train one head per point of a hyperparameter grid on cached features. Heads that share "
                    "a seed and (hidden, projector) dims are stacked and trained together over the same batches; "
                    "each equals the same configuration trained alone by scripts/train.py. Writes "
                    + ", ".join(OUTPUT_FILES) + " (heatmap needs matplotlib) and one checkpoint per "
                    "configuration x seed into --output-dir. Rerun the same command to continue.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_data_options(parser, "sweep directory (results, checkpoints)", features_help=(
        "feature cache(s) written by scripts/extract.py. Several caches of the same images (made with other "
        "backbones or image sizes) become one more grid axis: the split is made once per seed from the metadata "
        "and is the same for every cache; each cache's sweep goes to <output-dir>/<cache file stem>/ and the "
        "top-level results.csv, summary.md, best.json and heatmap.png put the caches side by side"))
    grid = parser.add_argument_group("grid (one or more values each; the sweep is their product)")
    for flag, dest, kind, default, help_text in GRID_OPTIONS:
        grid.add_argument(flag, dest=dest, type=kind, nargs="+", default=default, metavar="SPEC" if dest == "feature" else kind.__name__.upper(),
                          help=help_text)
    fixed = parser.add_argument_group("fixed training settings (TrainingConfig; one value for every head)")
    add_training_options(fixed, skip=SKIPPED, help_text=FIXED_HELP)
    fixed.add_argument("--judgments", default=None, metavar="CSV",
                       help="teachers' judged pairs (a,b,winner or winner,loser; paths as in the metadata) trained "
                            "beside the tier pairs at each --judgment-weight, as train.py --judgments does; a pair "
                            "across splits is not used. results.csv and summary.md gain each head's agreement with "
                            "the judged pairs inside val and test")
    fixed.add_argument("--judge-reliability", action="store_true",
                       help="also weigh each judged pair by its judge's reliability, fitted on each split's train "
                            "judged pairs, as train.py --judge-reliability does (needs --judgments)")
    fixed.add_argument("--feature-norm", choices=FEATURE_NORMS, default="auto",
                       help="per-entry scaling of each spec, fitted on each seed's train split (entry) or none; "
                            "auto: entry for specs of several entries")
    run = parser.add_argument_group("run")
    run.add_argument("--folds", type=int, default=0, metavar="K",
                     help="cross-validate every configuration x seed: K heads, each validated on one of K folds of "
                          "the non-test images (whole groups with --group-column) and trained on the rest; "
                          "results.csv gets a fold column and configurations are ranked by their mean val accuracy "
                          "over folds and seeds; costs K times the training (0: one train/val split per seed)")
    run.add_argument("--optimizer", choices=OPTIMIZERS, default="auto",
                     help="how the stacked heads' AdamW runs: 'fused' (torch's fused kernel per head: one memory "
                          "pass, best on CPU), 'batched' (a few ops over all heads at once, best on GPU), 'plain' "
                          "(torch's single-tensor AdamW per head: a single run's exact arithmetic on CPU); the "
                          "results agree to rounding; auto picks by device")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads (default: the cores idle when the sweep starts, by the load average; "
                          "small stacked heads slow down many times over when their threads compete for cores)")
    run.add_argument("--overwrite", action="store_true",
                     help="delete the finished results of a sweep run in --output-dir with other settings and "
                          "start over (without it such a directory is refused; one where nothing had finished "
                          "starts over anyway)")
    run.add_argument("--save-ensemble", action="store_true",
                     help="after the sweep, train the best configuration as an ensemble of K = len(--seeds) heads "
                          "(seeds first..first+K-1 on the first seed's split, as train.py --ensemble K does) into "
                          "<output-dir>/best_ensemble/: one best.pt that score.py scores with score_std; best.json "
                          "records it and the equivalent train.py command")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def settings_from_args(args: argparse.Namespace) -> tuple:
    """(SweepGrid, SweepSettings); raises SweepConfigError on a bad grid before anything is read."""
    values = {dest: getattr(args, dest) for _, dest, *_ in GRID_OPTIONS}
    if values["judgment_weight"] is None:  # train.py's default weight with judgments; no axis without them
        values["judgment_weight"] = [1.0] if args.judgments else [None]
    grid = SweepGrid(**{dest: tuple(v) for dest, v in values.items()})
    if args.wandb_enabled:
        raise SweepConfigError("--wandb-enabled: wandb logging is not supported by sweeps (one run per head)")
    training = training_values(args, args.output_dir, skip=SKIPPED)
    settings = SweepSettings(
        features=args.features[0], metadata=args.metadata, output_dir=args.output_dir,
        filename_column=args.filename_column, tier_column=args.tier_column, train_ratio=args.train_ratio,
        val_ratio=args.val_ratio, test_ratio=args.test_ratio, stratify=args.stratify, group_column=args.group_column,
        encoding=args.encoding, strict_images=args.strict_images,
        training=TrainingConfig(**training), optimizer=args.optimizer, feature_norm=args.feature_norm,
        folds=args.folds, judgments=args.judgments, judge_reliability=args.judge_reliability,
    )
    settings.check_grid(grid.judgment_weight)
    return grid, settings


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # the same clean stop as Ctrl-C: finished configurations are kept


def _set_threads(args: argparse.Namespace, settings: SweepSettings) -> None:
    if resolve_device(settings.training.device) == "cpu":
        threads, why = choose_threads(args.threads)
        torch.set_num_threads(threads)
        print(f"threads: {why}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plain_warnings()
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        grid, settings = settings_from_args(args)
        if args.save_ensemble:
            check_ensemble_request(grid)
        _set_threads(args, settings)
        if len(args.features) > 1:
            result = run_multi_sweep(grid, settings, args.features, progress=not args.no_progress, log=print,
                                     overwrite=args.overwrite)
        else:
            result = run_sweep(grid, settings, progress=not args.no_progress, overwrite=args.overwrite)
        if args.save_ensemble and result.get("best"):
            result["best"]["ensemble"] = save_best_ensemble(result["best"], settings, grid,
                                                            progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, CacheError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\n{exc}" if str(exc) else "\ninterrupted before any configuration finished; nothing to keep",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    best = result.get("best")
    print(f"\n{result['trained']} configuration(s) trained, {result['skipped']} already done, "
          f"{result['wall_time_s']:.1f} s")
    if best:  # the sweep itself has said which configuration won ("best on validation: ...")
        summary = result.get("summary")
        if summary is not None and len(summary) and tie_note(summary):
            print(tie_note(summary))
        print(f"train it: {best['train_command']}")
        if "ensemble" in best:
            print(f"its ensemble: {best['ensemble']['checkpoint']} (train.py equivalent: "
                  f"{best['ensemble']['train_command']})")
    return 0

