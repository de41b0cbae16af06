"""Train a ranking head on cached features (stage two) and report it on the held-out test split.

Example, from the repository root:

    python scripts/train.py --features cache/features.h5 --metadata data/demo/metadata.csv --output-dir runs/demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mirip.cli.options import (DefaultsHelpFormatter, add_data_options, add_training_options, plain_warnings,
                               positive, training_values)
from mirip.common.feature_spec import FEATURE_NORMS
from mirip.store.cache_errors import CacheError
from mirip.store.checkpoint import CheckpointError
from mirip.training.ensemble_training import ensemble_summary, train_ensemble
from mirip.training.bootstrap import with_interval
from mirip.training.config import TrainingConfig
from mirip.training.folds import FOLDS_FILE
from mirip.training.run import OUTPUT_FILES, train
from mirip.training.run_config import RunConfig

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the Projector + score head on cached DINOv2 features. Splits the metadata by image "
                    "(train/val/test), trains with early stopping on val accuracy, keeps the best head, and "
                    "prints its test-split metrics beside a ridge-regression baseline. Writes "
                    + ", ".join(OUTPUT_FILES) + " (curves.png needs matplotlib) into --output-dir.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_data_options(parser, "run directory for checkpoints and reports")
    model = parser.add_argument_group("model")
    model.add_argument("--feature", default=None, metavar="SPEC",
                       help="feature spec: which cached entries the head sees, concatenated, e.g. cls@-1, "
                            "'cls@-4,-3,-2,-1+mean@-1', 'mean@-1+std@-1' (default: the cache's only entry, else cls@-1)")
    model.add_argument("--feature-norm", choices=FEATURE_NORMS, default="auto",
                       help="per-entry scaling fitted on the train split (entry), or none; auto: entry when the "
                            "spec has several entries")
    model.add_argument("--margin", type=float, default=1.0, help="MarginRankingLoss margin")
    model.add_argument("--hidden-dim", type=positive(int), default=512, help="Projector hidden width")
    model.add_argument("--projector-dim", type=positive(int), default=256, help="Projector output (embedding) dim")
    model.add_argument("--dropout", type=float, default=0.1, help="Projector dropout")
    model.add_argument("--ridge-alpha", type=float, default=None, help="ridge strength of the linear baseline "
                       "(default: picked on the val split)")
    add_training_options(parser.add_argument_group("training (TrainingConfig)"))
    judged = parser.add_argument_group("teachers' judged pairs")
    judged.add_argument("--judgments", default=None, metavar="CSV",
                        help="judged pairs to train beside the tier pairs: a,b,winner (a, b or tie) or winner,loser, "
                             "optional judge and time; paths as in the metadata. A pair across splits is not used")
    judged.add_argument("--judgment-weight", type=float, default=1.0, metavar="W",
                        help="what one judged pair counts against one tier pair in an epoch's loss (a tie: W/2 "
                             "each way)")
    judged.add_argument("--judge-reliability", action="store_true",
                        help="also weigh each judged pair by its judge's reliability: a noisy Bradley-Terry fit on "
                             "the train split's judged pairs gives each judge q (1 always right, 0.5 a coin flip, "
                             "0 always against the order), shrunk toward the pool for judges with few judgments; "
                             "weight clip(2q-1, 0, 1). Unnamed judges are one judge")
    report = parser.add_argument_group("report")
    report.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples behind the confidence interval of every test figure (0: none)")
    report.add_argument("--interval-level", type=float, default=0.95, help="two-sided level of the intervals")
    report.add_argument("--folds", type=int, default=0, metavar="K",
                        help="first cross-validate: K heads, each trained on the non-test images but one fold and "
                             "scored on it (folds of whole groups with --group-column); prints mean +- std and the "
                             "fold table, writes folds.json and fold_<k>/; costs K extra trainings (0: none)")
    run = parser.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last.pt")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--ensemble", type=positive(int), default=1, metavar="K",
                     help="train K heads on seeds --seed..--seed+K-1 over the same split and batches, in one pass, "
                          "and save them as one checkpoint: scores are their mean, with score_std their spread "
                          "(writes best.pt, no last.pt: an ensemble run cannot --resume)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    training = training_values(args, args.output_dir)
    return RunConfig(
        features=args.features, metadata=args.metadata, output_dir=args.output_dir,
        filename_column=args.filename_column, tier_column=args.tier_column,
        train_ratio=args.train_ratio, val_ratio=args.val_ratio, test_ratio=args.test_ratio, stratify=args.stratify,
        group_column=args.group_column,
        encoding=args.encoding, strict_images=args.strict_images,
        margin=args.margin, hidden_dim=args.hidden_dim, projector_dim=args.projector_dim, dropout=args.dropout,
        ridge_alpha=args.ridge_alpha, training=TrainingConfig(**training), feature=args.feature,
        feature_norm=args.feature_norm, judgments=args.judgments, judgment_weight=args.judgment_weight,
        judge_reliability=args.judge_reliability,
        bootstrap_resamples=args.bootstrap, interval_level=args.interval_level, folds=args.folds,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plain_warnings()
    try:
        cfg = config_from_args(args)
        if args.ensemble > 1:
            if args.resume:
                raise ValueError("--resume continues a single head's run; an --ensemble run starts over")
            print(ensemble_summary(train_ensemble(cfg, args.ensemble, overwrite=args.overwrite,
                                                  progress=not args.no_progress), args.output_dir))
            return 0
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, CacheError, CheckpointError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, base = result.get("model"), result.get("linear_baseline")
    chooser = "val" if result["split_sizes"]["val"] else "train"
    val = result.get("val_evidence") if chooser == "val" else None
    on_val = f" on {val['distinct_pairs']} distinct pairs of {val['images']} images" if val else ""
    print(f"\nbest epoch {result['best_epoch']} of {result['epochs_run']} ({chooser} accuracy "
          f"{result['best_accuracy']:.4f}{on_val})" + (" - stopped early" if result["stopped_early"] else ""))
    if model is not None:
        ci, base_ci = model.get("intervals") or {}, base.get("intervals") or {}
        print(f"test pairwise accuracy {with_interval(model['accuracy'], ci.get('accuracy'))} on "
              f"{model['distinct_pairs']} distinct pairs of {model['num_images']} images (ridge baseline "
              f"{with_interval(base['accuracy'], base_ci.get('accuracy'))}), Spearman "
              f"{with_interval(model['spearman'], ci.get('spearman'))}, Kendall "
              f"{with_interval(model['kendall'], ci.get('kendall'))} ({model['num_images']} images)")
        if "tier_accuracy" in model:
            print(f"test tier accuracy {with_interval(model['tier_accuracy'], ci.get('tier_accuracy'))} (always "
                  f"{model['majority_tier']}: {model['majority_tier_accuracy']:.4f}), mean absolute tier error "
                  f"{model['tier_mae']:.4f}, expected calibration error "
                  f"{with_interval(model['calibration_error']['value'], ci.get('calibration_error'))}")
        if ci:
            print(f"[low, high]: {100 * ci['level']:g}% bootstrap intervals over {ci['units']} "
                  + ("images" if ci["unit"] == "image" else f"groups ({ci['unit'][6:]})"))
    cv = result.get("cross_validation")
    if cv:
        s = cv["summary"]
        print(f"cross-validated ({cv['folds']} folds, {cv['images']} non-test images): pairwise accuracy "
              f"{s['accuracy']['mean']:.4f} +- {s['accuracy']['std']:.4f}, Spearman {s['spearman']['mean']:.4f} "
              f"+- {s['spearman']['std']:.4f} (fold table in {Path(args.output_dir) / FOLDS_FILE})")
    print(f"outputs in {args.output_dir}: " + ", ".join(
        f for f in OUTPUT_FILES + (FOLDS_FILE,) if (Path(args.output_dir) / f).exists()))
    return 0

