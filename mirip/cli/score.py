"""Score drawings with a trained head in full-image mode (backbone + head), write a CSV and an HTML report.

Examples, from the repository root:

    python scripts/score.py --checkpoint runs/demo/train/best.pt data/demo/images --output scores.csv \\
        --html report.html --metadata data/demo/metadata.csv
    python scripts/score.py --checkpoint runs/demo/train/best.pt --compare a.jpg b.jpg
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import pandas as pd

from mirip.cli.options import DefaultsHelpFormatter, add_encoding_option, plain_warnings, positive
from mirip.common.devices import announce_precision, resolve_device
from mirip.common.metadata_csv import csv_lines, read_metadata_csv
from mirip.common.tiers import rank_to_tier, tier_ranks
from mirip.ml.openvino_engine import CACHE_ENV, ENGINES, INSTALL_HINT
from mirip.ml.preprocessing import ImageReadError
from mirip.scoring.inputs import match_paths, split_membership
from mirip.scoring.report_html import agreement_summary
from mirip.scoring.scorer import ScoreResult, Scorer, load_scorer
from mirip.store.checkpoint import CheckpointError
from mirip.store.fingerprint import FingerprintMismatch


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PathLike = Union[str, os.PathLike]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Score drawings with a trained ranking head in full-image mode. The backbone and preprocessing "
                    "are rebuilt from the checkpoint's feature fingerprint, so scores match those of the cached "
                    "features the head was trained on. Unreadable files are listed, not fatal.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("images", nargs="*", metavar="IMAGES_OR_DIRS",
                        help="image files and/or directories (searched recursively for image files)")
    parser.add_argument("--checkpoint", required=True, metavar="PT", help="checkpoint written by scripts/train.py")
    parser.add_argument("--output", default=None, metavar="CSV",
                        help="CSV with columns path, score, rank, weights (+ tier and split with --metadata), "
                             "predicted_tier, p_S, p_A, p_B, p_C, percentile when the checkpoint holds a "
                             "calibration, and error (why a file could not be read: its row has no score; empty "
                             "for scored rows); default scores.csv when scoring IMAGES_OR_DIRS")
    parser.add_argument("--compare", nargs=2, metavar=("FIRST", "SECOND"),
                        help="say which of two drawings is better, by how much, and the probability that the "
                             "first is better under the calibrated model")
    parser.add_argument("--html", metavar="HTML", help="also write a self-contained page of thumbnails by score")
    parser.add_argument("--explain", metavar="DIR", default=None,
                        help="also write, per image, where its score comes from: DIR/NAME.png (the drawing beside "
                             "it with a heatmap: red cells lift the score, blue drag it down, relative to a blank "
                             "page), DIR/NAME.npy (the raw patch-grid map, score units) and DIR/index.json; with "
                             "--html, clicking a thumbnail shows the overlay. Costs a backward pass per image")
    parser.add_argument("--metadata", metavar="CSV", help="CSV with a filename and a tier column: adds a tier "
                        "column, the tier agreement (printed and in the HTML report), and a split column saying "
                        "which drawings the checkpoint's run trained, calibrated or tested on")
    parser.add_argument("--run-metadata", metavar="CSV", default=None,
                        help="the metadata the checkpoint was trained on, when it is no longer at the path the "
                             "checkpoint records (needed to tell its training drawings apart)")
    parser.add_argument("--filename-column", default="filename", help="metadata column with the image path")
    parser.add_argument("--tier-column", default="tier", help="metadata column with the tier (S/A/B/C)")
    parser.add_argument("--group-column", default=None, metavar="COL",
                        help="metadata column naming each drawing's group (student, scene): the tier agreement's "
                             "interval then resamples whole groups, since drawings of one group are not "
                             "independent evidence")
    parser.add_argument("--bootstrap", type=positive(), default=1000, metavar="N",
                        help="bootstrap resamples behind the tier agreement's 95%% interval")
    add_encoding_option(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="autocast precision (default: bf16 on CUDA and on a CPU with AMX or AVX512-BF16, fp32 on other CPUs)")
    parser.add_argument("--backbone", metavar="DIR", default=None,
                        help="use this local backbone directory instead of the checkpoint's (announced)")
    parser.add_argument("--random-init", action="store_true",
                        help="use random backbone weights when the pretrained ones cannot be had (announced; "
                             "scores then carry no learned meaning)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="needed only for a checkpoint without a feature fingerprint; otherwise must match it")
    parser.add_argument("--compile", choices=("off", "on"), default="off",
                        help="torch.compile the backbone at one fixed batch size (--batch-size; 2 with --compare): "
                             "every batch is padded to it, and on CUDA mode reduce-overhead replays it as a CUDA "
                             "graph. Compiling costs time once per run, so it pays only for many images; its GPU "
                             "gain is unmeasured here. Scores equal eager ones within the precision's tolerance; "
                             "a feature spec reading intermediate blocks scores eager (said in the header)")
    parser.add_argument("--compile-backend", default="inductor", metavar="NAME",
                        help="torch.compile backend (inductor generates kernels; eager only traces, for testing)")
    parser.add_argument("--engine", choices=ENGINES, default="torch",
                        help="what runs the backbone + feature bank: torch (default), or openvino (CPU only; "
                             f'{INSTALL_HINT}): the same model converted once, its IR cached under ${CACHE_ENV} '
                             "(default ~/.cache/mirip/openvino), measured 1.6-3.7x torch fp32 on an AVX2 CPU with "
                             "features at cos >= 0.9999. Its precision is the plugin's default for the chip (bf16 "
                             "where the CPU has it, else f32) unless --precision says. --explain keeps torch: "
                             "explanations need the torch backbone's gradients")
    parser.add_argument("--engine-cache", metavar="DIR", default=None,
                        help=f"where --engine openvino keeps converted models (default ${CACHE_ENV} or "
                             "~/.cache/mirip/openvino)")
    parser.add_argument("--top", type=int, default=5, help="how many of the best and worst to print")
    parser.add_argument("--title", default=None, help="title of the HTML report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _print_header(scorer: Scorer) -> None:
    info = scorer.describe()
    print(f"model: {info['checkpoint']} (epoch {info['epoch']}, val accuracy {info['accuracy']})")
    print(f"  backbone {info['backbone']} | weights {info['weights']} | {info['image_size']} px {info['resize_mode']} "
          f"| features {info['feature_spec']} | {info['precision']} on {info['device']} ({info['engine']})")
    for note in scorer.notes:
        print(f"NOTE: {note}")
    if scorer.calibration is None:
        print(f"NOTE: {scorer.calibration_note}")
    if scorer.typicality is None:
        print(f"NOTE: {scorer.typicality_note}")
    if len(scorer.heads) > 1:
        print(f"ensemble of {len(scorer.heads)} heads: score = their mean, score_std = their spread")


def match_tiers(paths: Sequence[str], metadata: pd.DataFrame, roots: Sequence[str], filename_column: str,
                tier_column: str) -> Dict[str, str]:
    """path -> tier, matching metadata filenames relative to an input directory, else by unique basename."""
    if filename_column not in metadata.columns:
        raise ValueError(f"metadata has no filename column {filename_column!r} "
                         f"(columns: {', '.join(map(str, metadata.columns))})")
    tiers = [rank_to_tier(r) for r in tier_ranks(metadata, tier_column, lines=csv_lines(metadata))]
    by_name = dict(zip(map(str, metadata[filename_column]), tiers))
    return {p: by_name[name] for p, name in match_paths(paths, list(by_name), roots).items()}


def _frame(result: ScoreResult, weights: str, tiers: Optional[Dict[str, str]], scorer: Optional[Scorer] = None,
           splits: Optional[Dict[str, str]] = None) -> pd.DataFrame:
    """The scored drawings by rank, then one row per unreadable file (no score, rank or prediction; its
    reason in ``error``) so that every file asked for has a row."""
    rows = [{"path": p, "score": s, "rank": r, "weights": weights, "error": ""} for r, p, s in result.ranked()]
    rows += [{"path": p, "score": None, "rank": None, "weights": weights, "error": reason}
             for p, reason in result.failures]
    frame = pd.DataFrame(rows, columns=["path", "score", "rank", "weights", "error"])
    frame["score"] = frame["score"].astype("float64")
    frame["rank"] = frame["rank"].astype("Int64")  # an empty cell, not 1.000000, when unscored
    if tiers is not None:
        frame["tier"] = [tiers.get(p, "") for p in frame["path"]]
    if splits is not None:  # known, even when none of these drawings was in the run
        frame["split"] = [splits.get(p, "") for p in frame["path"]]
    extras = result.extras()
    for column in ("score_std", "typicality", "unusual"):
        if result.paths and column in extras[result.paths[0]]:
            frame[column] = [extras[p][column] if p in extras else None for p in frame["path"]]
    if scorer is not None and scorer.has_tiers:
        scored = frame[frame["error"] == ""]
        by_path = dict(zip(result.paths, range(len(result.paths))))

        def pick(col):
            return None if col is None else [col[by_path[p]] for p in scored["path"]]

        predicted = pd.DataFrame([t.as_row() for t in scorer.tiers_for_scores(
                                      list(scored["path"]), list(scored["score"]), pick(result.typicality),
                                      pick(result.member_scores))],
                                 columns=["predicted_tier", "p_S", "p_A", "p_B", "p_C", "percentile"],
                                 index=scored.index)
        frame = frame.join(predicted)
    return frame[[c for c in frame.columns if c != "error"] + ["error"]]


def _image_splits(scorer: Scorer, paths: Sequence[str], args: argparse.Namespace) -> Optional[Dict[str, str]]:
    """path -> the checkpoint's run split (train/val/test) of each scored drawing that was in the run (matched
    by name, as in the metadata); None when which drawings the run saw is unknown. Says how many were in it."""
    membership, note = split_membership(scorer.checkpoint, args.metadata, args.encoding,
                                        run_metadata=args.run_metadata)
    if not membership:
        print(f"NOTE: splits unknown: {note}; pass the run's metadata with --run-metadata. Figures computed on "
              "these images are labelled as possibly including training images")
        return None
    if note:
        print(f"NOTE: {note}")
    splits = {p: membership[name] for p, name in match_paths(paths, list(membership), args.images).items()}
    print(_overlap_line(splits, len(paths)))
    return splits


def _overlap_line(splits: Dict[str, str], scored: int) -> str:
    if not splits:
        return f"split: none of the {scored} scored drawings was in the checkpoint's run (matched by file name)"
    counts = ", ".join(f"{sum(1 for s in splits.values() if s == name)} {name}" for name in ("train", "val", "test"))
    return (f"split: {len(splits)} of the {scored} scored drawings were in the checkpoint's run ({counts}; "
            "matched by file name, column split); agreement figures leave out the train and val ones")


def _print_ranking(frame: pd.DataFrame, top: int) -> None:
    def show(part: pd.DataFrame) -> None:
        for row in part.itertuples():
            tier = f"  [{row.tier}]" if "tier" in frame.columns and row.tier else ""
            guess = (f"  predicted {row.predicted_tier} ({max(row.p_S, row.p_A, row.p_B, row.p_C):.0%})"
                     if "predicted_tier" in frame.columns else "")
            if guess and pd.notna(row.percentile):
                guess += f", percentile {row.percentile:.0f}"
            spread = f" ± {row.score_std:.4f}" if "score_std" in frame.columns else ""
            odd = ("  UNUSUAL: unlike the training drawings, tier probabilities pulled toward the base rates"
                   if "unusual" in frame.columns and row.unusual is True else "")
            print(f"  #{row.rank:<5d} {row.score:+.4f}{spread}  {row.path}{tier}{guess}{odd}")

    if len(frame) <= 2 * top:
        print(f"ranking ({len(frame)} images, best first):")
        show(frame)
        return
    print(f"top {top} of {len(frame)}:")
    show(frame.head(top))
    print(f"bottom {top}:")
    show(frame.tail(top))


def run_compare(scorer: Scorer, a: str, b: str) -> int:
    try:
        cmp = scorer.compare(a, b)
    except (FileNotFoundError, ImageReadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tiers = scorer.tiers_for_scores([a, b], [cmp.score_a, cmp.score_b]) if scorer.has_tiers else [None, None]
    width = max(len(a), len(b))
    for label, path, score, t in (("first ", a, cmp.score_a, tiers[0]), ("second", b, cmp.score_b, tiers[1])):
        extra = (f"  predicted tier {t.tier} (P {t.probabilities[t.tier]:.2f}), percentile {t.percentile:.1f}"
                 if t is not None and t.percentile is not None else "")
        print(f"{label} {path.ljust(width)}  score {score:+.4f}{extra}")
    if cmp.prediction == 0:
        print("tie: both drawings get the same score")
    else:
        worse = b if cmp.prediction == 1 else a
        print(f"better: {cmp.better} scores {cmp.margin:.4f} higher than {worse}")
    if cmp.prob_a_better is not None:
        print(f"P({a} is better than {b}) = {cmp.prob_a_better:.3f} under the trained model "
              "(latent quality = calibrated score + logistic noise)")
    else:
        print("no probability: the checkpoint holds no calibration")
    return 0


def find_images(inputs: Iterable[PathLike], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Tuple[List[str], List[str]]:
    """Expand files and directories (recursively, image extensions only, sorted) into image paths.

    Returns (images, missing): a named file is always included (so a broken one is reported, not skipped);
    a path that does not exist goes to ``missing``.
    """
    images: List[str] = []
    missing: List[str] = []
    seen = set()
    exts = tuple(e.lower() for e in extensions)
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = []
            for root, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in files if f.lower().endswith(exts) and not f.startswith(".")]
            candidates = sorted(found)
        elif os.path.exists(item):
            candidates = [item]
        else:
            missing.append(item)
            continue
        for c in candidates:
            if c not in seen:
                seen.add(c)
                images.append(c)
    return images, missing


def run_scoring(scorer: Scorer, args: argparse.Namespace) -> int:
    paths, missing = find_images(args.images)
    for m in missing:
        print(f"warning: {m} does not exist", file=sys.stderr)
    if not paths:
        print("error: no image files found in " + ", ".join(args.images), file=sys.stderr)
        return 1
    result = scorer.score_paths(paths, batch_size=args.batch_size, num_workers=args.num_workers,
                                progress=not args.no_progress)
    tiers, splits = None, None
    if args.metadata or args.run_metadata:
        tiers = _tiers(result, args) if args.metadata else None
        splits = _image_splits(scorer, result.paths, args)
    table = _frame(result, scorer.weights, tiers, scorer, splits)
    output = args.output or "scores.csv"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    table.to_csv(output, index=False, float_format="%.6f")
    frame = table[table["error"] == ""].drop(columns="error")
    if len(frame):
        _print_ranking(frame, args.top)
    if tiers:
        if args.group_column:
            frame = frame.assign(group=_groups(frame["path"], args))
        for line in agreement_summary(frame.to_dict("records"), splits is not None, resamples=args.bootstrap,
                                      group_key="group" if args.group_column else None,
                                      group_name=args.group_column):
            print(line)
    if result.failures:
        print(f"could not read {len(result.failures)} file(s):")
        for p, reason in result.failures:
            print(f"  {p}: {reason}")
    overlays = _write_explanations(scorer, result.paths, args) if args.explain else None
    if args.html:
        from mirip.scoring.report_html import write_html_report

        info = {k: v for k, v in scorer.describe().items() if v is not None}
        write_html_report(args.html, frame.to_dict("records"), title=args.title or "mirip scores", info=info,
                          notes=scorer.notes + ([scorer.calibration_note] if scorer.calibration_note else []),
                          failures=result.failures, progress=not args.no_progress,
                          calibration=scorer.calibration, splits_known=splits is not None, overlays=overlays)
    print(f"scored {len(frame)} of {len(paths)} images ({scorer.weights} backbone weights); wrote {output}"
          + (" (the unread ones too, each with its reason in column error)" if result.failures else "")
          + (f" and {args.html}" if args.html else ""))
    return 0 if len(frame) else 1


def _tiers(result: ScoreResult, args: argparse.Namespace) -> Dict[str, str]:
    try:
        meta = read_metadata_csv(args.metadata, args.encoding)
        tiers = match_tiers(result.paths, meta, args.images, args.filename_column, args.tier_column)
    except ValueError as exc:
        raise ValueError(f"metadata {args.metadata}: {exc}") from exc
    print(f"metadata: tiers for {len(tiers)} of {len(result.paths)} scored images")
    return tiers


def _groups(paths: Sequence[str], args: argparse.Namespace) -> List[str]:
    """Each scored drawing's group (``--group-column`` of the metadata), matched like its tier; a drawing the
    metadata does not name is a group of its own."""
    meta = read_metadata_csv(args.metadata, args.encoding)
    if args.group_column not in meta.columns:
        raise ValueError(f"metadata {args.metadata}: no column {args.group_column!r} (--group-column); its columns "
                         f"are {', '.join(map(str, meta.columns))}")
    group_of = dict(zip(meta[args.filename_column].astype(str), meta[args.group_column].astype(str)))
    names = match_paths(list(paths), list(group_of), args.images)
    return [group_of[names[p]] if p in names else f"(alone) {p}" for p in paths]


def _write_explanations(scorer: Scorer, paths: Sequence[str], args: argparse.Namespace) -> Dict[str, str]:
    """Attribution maps of the scored images into args.explain; returns path -> overlay PNG for the report."""
    from mirip.scoring.heatmap import save_explanations

    if args.engine != "torch":
        print(f"explanations run on torch (they need its gradients); the scores came from {args.engine}")
    result = scorer.explain(paths, batch_size=args.batch_size, num_workers=args.num_workers,
                            progress=not args.no_progress)
    rows = save_explanations(result, args.explain, roots=args.images)
    for p, reason in result.failures:
        print(f"  could not explain {p}: {reason}")
    kinds = {"exact" if r["exact"] else "first-order" for r in rows}
    print(f"explained {len(rows)} images ({', '.join(sorted(kinds)) or 'none'} per-patch maps of score - blank "
          f"page score); wrote {os.path.join(args.explain, '*.png')}, *.npy and index.json")
    return {r["path"]: r["png"] for r in rows}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    plain_warnings()
    if args.compare and args.images:
        parser.error("--compare A B scores two drawings; do not also pass IMAGES_OR_DIRS")
    if args.compare and (args.output or args.html or args.metadata or args.run_metadata or args.explain):
        parser.error("--output, --html, --metadata, --run-metadata and --explain apply to scoring IMAGES_OR_DIRS, "
                     "not to --compare")
    if args.group_column and not args.metadata:
        parser.error("--group-column names a column of --metadata; pass the metadata too")
    if not args.compare and not args.images:
        parser.error("give IMAGES_OR_DIRS to score, or --compare A B")
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.engine == "openvino" and args.compile == "on":
        parser.error("--compile on compiles the torch backbone; --engine openvino replaces it: pass one of them")
    if args.engine == "openvino" and args.precision == "fp16":
        parser.error("--engine openvino runs fp32 or bf16 (--precision), not fp16")
    try:
        scorer = load_scorer(args.checkpoint, backbone=args.backbone, random_init=True if args.random_init else None,
                             image_size=args.image_size, device=args.device, precision=args.precision,
                             engine=args.engine, engine_cache=args.engine_cache)
    except (FileNotFoundError, CheckpointError, FingerprintMismatch, OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.engine == "torch":  # openvino says its plugin's precision in its own line
        announce_precision(resolve_device(args.device), args.precision, features=scorer.fingerprint.get("precision"))
    _print_header(scorer)
    if args.compile == "on":
        from mirip.ml.compiled import CompileFailed, describe

        try:
            scorer.compile(2 if args.compare else args.batch_size, backend=args.compile_backend)
        except CompileFailed as exc:  # checked against eager before the first score: nothing was scored
            print(f"error: --compile on: {exc}. Run without --compile (eager)", file=sys.stderr)
            return 2
        print(describe(scorer.compile_info.to_dict()))
    if args.compare:
        return run_compare(scorer, *args.compare)
    try:
        return run_scoring(scorer, args)
    except (FileNotFoundError, ValueError) as exc:  # metadata problems: name the file/row/column
        print(f"error: {exc}", file=sys.stderr)
        return 2

