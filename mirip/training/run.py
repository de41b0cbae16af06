"""A training run on cached features, start to finish: what ``scripts/train.py`` and ``scripts/evaluate.py`` call.

    metadata.csv + cache.h5 -> split by image -> FeaturePairDataset per split
    -> Trainer.fit (best.pt, last.pt) -> score-to-tier calibration on the val split (into best.pt, last.pt)
    -> best head + ridge baseline on the test pairs
    -> config.json, history.json, test_metrics.json, curves.png, calibration.png

Every choice lives in one ``RunConfig`` (data paths, split, head dims, and a
``TrainingConfig``), saved as ``config.json`` beside the run and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch

from mirip.atomic import output_directory, write_atomic
from mirip.calibration import (CalibrationError, OrdinalCalibration, ScoreReference, fit_ordinal, from_checkpoint,
                               make_score_reference, save_calibration_plot)
from mirip.checkpoint import load_checkpoint_file, save_checkpoint_file
from mirip.devices import resolve_device
from mirip.features.cache import CacheError, open_cache
from mirip.feature_spec import FEATURE_NORMS, canonical_spec, checkpoint_feature_spec
from mirip.fingerprint import (ENVIRONMENT_FIELDS, LAYOUT_FIELDS, RANDOM_WEIGHTS_NOTE, FingerprintMismatch,
                               check_fingerprint, weights_summary)
from mirip.metadata_csv import csv_lines, read_metadata_csv
from mirip.ml.ranking_model import RankingHead
from mirip.paths import normalize_relpath
from mirip.plain import json_safe
from mirip.tiers import tier_ranks
from mirip.training.baseline import RidgeBaseline
from mirip.training.config import TrainingConfig
from mirip.training.datasets.data_splitter import DataSplitter
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.evaluator import Evaluator, format_metrics, score_images
from mirip.training.run_data import (SPLITS, exclusion_note, failed_images, scaled_features, split_names,
                                     split_positions, write_excluded)
from mirip.training.metrics import distinct_pairs, score_metrics
from mirip.training.trainer import Trainer, history_to_json

OUTPUT_FILES = ("best.pt", "last.pt", "config.json", "history.json", "test_metrics.json", "curves.png",
                "calibration.png")


@dataclass
class DataSettings:
    """What a run or a sweep trains on: the cache, the metadata and its columns, the split, the output."""

    features: str
    metadata: str
    output_dir: str
    filename_column: str = "filename"
    tier_column: str = "tier"
    train_ratio: float = 0.8
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    stratify: bool = True
    encoding: Optional[str] = None  # of the metadata CSV; None: UTF-8, else CP949 with a notice
    # Rows whose images extraction recorded as unreadable are left out (mirip.training.run_data); True refuses.
    strict_images: bool = False


@dataclass
class RunConfig(DataSettings):
    """Everything that defines a run; ``training.checkpoint_dir`` is the output directory."""

    margin: float = 1.0
    hidden_dim: int = 512
    projector_dim: int = 256
    dropout: float = 0.1
    ridge_alpha: Optional[float] = None  # None: chosen on the val split
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # The feature spec (mirip.features.spec): which cached entries the head sees, in order. None: the cache's
    # default (its only entry, else cls@-1); a run resolves it and saves the canonical spec in config.json.
    feature: Optional[str] = None
    feature_norm: str = "auto"  # per-entry scaling: auto (entry when the spec has several entries), entry, none

    def __post_init__(self):
        if isinstance(self.training, dict):
            self.training = TrainingConfig.from_dict(self.training)
        if self.feature is not None:
            self.feature = canonical_spec(self.feature)
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {', '.join(FEATURE_NORMS)}, got {self.feature_norm!r}")
        for name in ("hidden_dim", "projector_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.margin < 0:
            raise ValueError(f"margin must be non-negative, got {self.margin}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        try:
            self.splitter()
        except AssertionError as exc:  # the seed's DataSplitter asserts; a run reports it as bad input
            raise ValueError(str(exc)) from None

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["training"] = self.training.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "RunConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def splitter(self) -> DataSplitter:
        return DataSplitter(self.train_ratio, self.val_ratio, self.test_ratio, seed=self.training.seed,
                            stratify_column=self.tier_column if self.stratify else None,
                            group_column=self.filename_column)

    def make_head(self, input_dim: int) -> RankingHead:
        """The head, initialised from ``torch.manual_seed(training.seed)`` (the training-step contract)."""
        torch.manual_seed(self.training.seed)
        return RankingHead(input_dim, self.projector_dim, self.margin, self.hidden_dim, self.dropout)


# --- data ----------------------------------------------------------------------------------------
def read_metadata(path: str, filename_column: str = "filename", tier_column: str = "tier",
                  encoding: Optional[str] = None) -> pd.DataFrame:
    """The metadata CSV, checked: columns present, tiers valid, each image named once.

    Image paths are normalised exactly as extraction normalises them (``./a.png`` -> ``a.png``), so every
    name finds its cached row.
    """
    meta = read_metadata_csv(path, encoding, dtype={filename_column: str})
    for col in (filename_column, tier_column):
        if col not in meta.columns:
            raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, meta.columns))})")
    if meta.empty:
        raise ValueError(f"{path}: no rows")
    lines = csv_lines(meta) or {}

    def at(rows) -> str:  # file lines (header = line 1), as an editor shows them
        return ", ".join(f"line {lines[r]}" if r in lines else f"data row {r} (0-based)" for r in rows)

    blank = meta.index[meta[filename_column].isna()].tolist()
    if blank:
        raise ValueError(f"{path}: empty {filename_column!r} on {at(blank[:20])}"
                         + (f" ... ({len(blank)} in all)" if len(blank) > 20 else ""))
    meta[filename_column] = [normalize_relpath(name, f"{path}, {at([row])}, column {filename_column!r}")
                             for row, name in meta[filename_column].items()]
    try:
        tier_ranks(meta, tier_column, lines=csv_lines(meta))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    dup = meta[meta[filename_column].duplicated(keep=False)]
    if len(dup):
        shown = "; ".join(f"{name} on {at(g.index)}" for name, g in list(dup.groupby(filename_column))[:5])
        raise ValueError(f"{path}: images listed more than once ({shown}); each image needs exactly one row")
    return meta


@dataclass
class RunData:
    """The metadata, the features of its rows (loaded once, in metadata order) and the split."""

    metadata: pd.DataFrame
    features: torch.Tensor  # (N, D) on the CPU, the cache's dtype
    ranks: np.ndarray
    names: list
    fingerprint: Dict[str, Any]
    splits: Dict[str, np.ndarray]  # split -> row positions into metadata / features
    split_info: Dict[str, Any]
    spec: str = "cls@-1"  # the canonical feature spec the columns of ``features`` follow
    entry_dims: List[int] = field(default_factory=list)  # width of each spec entry, in order
    feature_norm: str = "none"  # resolved: entry or none
    feature_scales: Optional[List[float]] = None  # per spec entry, applied to ``features`` (None: unscaled)
    excluded: Dict[str, str] = field(default_factory=dict)  # name -> reason: rows left out, unreadable images


def resolve_spec(cache_path: str, spec: Optional[str] = None) -> str:
    """The canonical spec a run on ``cache_path`` uses (``None``: the cache's default); refuses an entry the
    cache lacks, listing the entries it holds, before any training."""
    with open_cache(cache_path) as cache:
        spec = canonical_spec(spec) if spec else cache.default_spec
        cache.entry_slices(spec)
        return spec


def load_bank_features(cache_path: str, names: list, spec: Optional[str] = None,
                       expected_fingerprint: Optional[Dict[str, Any]] = None, ignore_layout: bool = False
                       ) -> Tuple[torch.Tensor, Dict[str, Any], str, List[int]]:
    """(features of ``names`` in that order with the spec's columns, the cache's fingerprint, the canonical spec,
    the spec's entry dims). Refuses a fingerprint mismatch (``ignore_layout``: only fields that change what an
    entry means, for a head read from another cache), an entry the cache lacks, and lists missing images."""
    with open_cache(cache_path) as cache:
        if expected_fingerprint is not None:
            ignore = ENVIRONMENT_FIELDS + (LAYOUT_FIELDS if ignore_layout else ())
            cache.check_fingerprint(expected_fingerprint, ignore=ignore)
        spec = canonical_spec(spec) if spec else cache.default_spec
        dims = [s.stop - s.start for s in cache.entry_slices(spec)]
        rows = cache.rows_for(names)
        return torch.from_numpy(cache.features(rows, spec=spec)), cache.fingerprint, spec, dims


def load_features(cache_path: str, names: list, expected_fingerprint: Optional[Dict[str, Any]] = None,
                  spec: Optional[str] = None) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The cached features of ``names`` in that order (the spec's columns; default: the cache's default spec);
    refuses a fingerprint mismatch and lists missing images."""
    features, fingerprint, _, _ = load_bank_features(cache_path, names, spec, expected_fingerprint)
    return features, fingerprint


def load_run_data(cfg: RunConfig, expected_fingerprint: Optional[Dict[str, Any]] = None,
                  scales: Optional[List[float]] = None, fit_scales: bool = True, ignore_layout: bool = False) -> RunData:
    """Metadata, the spec's features and the split. Per-entry scales are fitted on the train split when the
    resolved ``feature_norm`` is ``entry`` (or taken from ``scales``, e.g. a checkpoint's, with ``fit_scales=False``)."""
    meta = read_metadata(cfg.metadata, cfg.filename_column, cfg.tier_column, cfg.encoding)
    excluded = failed_images(cfg.features, meta[cfg.filename_column].astype(str).tolist(), cfg.strict_images)
    splitter = cfg.splitter()
    by_split = split_names(meta, splitter, cfg.filename_column, excluded)
    meta = meta[~meta[cfg.filename_column].astype(str).isin(excluded)]
    names = meta[cfg.filename_column].astype(str).tolist()
    features, fingerprint, spec, dims = load_bank_features(cfg.features, names, cfg.feature, expected_fingerprint,
                                                           ignore_layout=ignore_layout)
    splits = split_positions(by_split, names)
    features, scales = scaled_features(features, dims, spec, cfg.feature_norm, splits["train"], scales, fit_scales)
    return RunData(meta, features, tier_ranks(meta, cfg.tier_column), names, fingerprint, splits,
                   splitter.get_split_info(), spec=spec, entry_dims=dims,
                   feature_norm="entry" if scales else "none", feature_scales=scales, excluded=excluded)


def feature_keys(data: RunData) -> Dict[str, Any]:
    """What a checkpoint records about its features beyond the fingerprint: spec, normalisation, scales."""
    return {"feature_spec": data.spec, "feature_norm": data.feature_norm, "feature_scales": data.feature_scales,
            "feature_entry_dims": list(data.entry_dims), "excluded_images": sorted(data.excluded)}


def split_dataset(data: RunData, split: str, features: torch.Tensor, tc: TrainingConfig, *, train: bool
                  ) -> Optional[FeaturePairDataset]:
    """The pairs of one split: fresh per epoch for training, fixed (epoch 0) for val/test; None if empty."""
    rows = data.splits[split]
    if len(rows) == 0:
        return None
    return FeaturePairDataset(
        features, data.ranks[rows], rows=rows, names=[data.names[i] for i in rows],
        num_pairs=tc.pairs_per_epoch if train else tc.eval_pairs, batch_size=tc.batch_size,
        seed=tc.seed, epoch=0, balance=tc.pair_balance, what=f"{split} split",
    )


def baseline_metrics(data: RunData, datasets: Dict[str, Optional[FeaturePairDataset]], split: str,
                     alpha: Optional[float]) -> Tuple[Dict[str, Any], float]:
    """Ridge fitted on the train split (alpha picked on val), scored on ``split``'s pairs."""
    train_rows = data.splits["train"]
    val = datasets.get("val")
    val_args = {}
    if alpha is None and val is not None:
        val_args = dict(val_features=data.features[data.splits["val"]], val_pairs=val.pair_arrays())
    ridge = RidgeBaseline.fit(data.features[train_rows], data.ranks[train_rows], alpha=alpha, **val_args)
    ds = datasets[split]
    scores = ridge.predict(data.features[data.splits[split]])
    return score_metrics(scores, ds.ranks, *ds.pair_arrays()), ridge.alpha


# --- outputs -------------------------------------------------------------------------------------
def write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(json_safe(obj), indent=2))


def _curves_title(backbone: Dict[str, Any]) -> Optional[str]:
    if backbone["backbone_weights"] != "random":
        return None
    return f"{backbone['backbone']}: RANDOM backbone weights (pipeline check, not a trained model)"


def save_curves(history: Dict[str, list], path: str, title: Optional[str] = None) -> bool:
    """Loss and accuracy per epoch as a PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split in ("train", "val"):
            values = history.get(f"{split}_{key}") or []
            if values:
                ax.plot(epochs[: len(values)], values, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("pairwise accuracy" if key == "acc" else "margin ranking loss")
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, color="#a00000")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --- calibration ---------------------------------------------------------------------------------
@dataclass
class HeadCalibration:
    """A head's score-to-tier calibration (val split) and training-split score reference, or why there is none."""

    calibration: Optional[OrdinalCalibration]
    score_reference: Optional[ScoreReference]
    note: Optional[str]
    scores: Dict[str, Tuple[np.ndarray, np.ndarray]]  # split -> (scores, ranks) of the splits scored

    def checkpoint_keys(self) -> Dict[str, Any]:
        """The plain-dict checkpoint keys: calibration, score_reference (None when absent) and calibration_note."""
        return {"calibration": self.calibration.to_dict() if self.calibration else None,
                "score_reference": self.score_reference.to_dict() if self.score_reference else None,
                "calibration_note": self.note}


def calibrate_head(model: torch.nn.Module, datasets: Dict[str, Optional[FeaturePairDataset]], device: str,
                   splits: Tuple[str, ...] = ("train", "val", "test")) -> HeadCalibration:
    """Fit the ordinal calibration on the val split's scores and take the train split's score quantiles."""
    scores = {s: (score_images(model, datasets[s], device), datasets[s].ranks)
              for s in splits if datasets.get(s) is not None}
    reference = (make_score_reference(*scores["train"], split="train", names=datasets["train"].names)
                 if "train" in scores else None)
    if "val" not in scores:
        return HeadCalibration(None, reference, "no validation split, so no score-to-tier calibration "
                               "(tier predictions need val_ratio > 0)", scores)
    try:
        calibration = fit_ordinal(*scores["val"], fitted_on="val")
    except CalibrationError as exc:
        return HeadCalibration(None, reference, f"no score-to-tier calibration: {exc}", scores)
    notes = []
    absent = [t for t, n in calibration.tier_counts.items() if n == 0]
    if absent:
        notes.append(f"tier(s) {', '.join(absent)} absent from the validation split: their probabilities are "
                     "not calibrated")
    if calibration.slope <= 0:
        notes.append("on the validation split higher scores go with worse tiers (calibration slope "
                     f"{calibration.slope:.4g} <= 0): the head has not learned the tiers")
    return HeadCalibration(calibration, reference, "; ".join(notes) or None, scores)


def attach_calibration(path: str, calibrated: HeadCalibration) -> None:
    """Add the calibration keys to a checkpoint file (atomically; everything else is kept)."""
    ckpt = load_checkpoint_file(path)
    ckpt.update(calibrated.checkpoint_keys())
    save_checkpoint_file(path, ckpt)


IN_SAMPLE = {"all": "all images include the training images (the head was fitted on them) and the validation "
                     "images (the calibration was fitted on them)",
             "train": "the head was trained on the train split",
             "val": "the calibration was fitted on the val split"}


def _calibration_title(backbone: Dict[str, Any]) -> str:
    base = "score-to-tier calibration, fitted on the validation split"
    if backbone["backbone_weights"] == "random":
        return f"{base}: RANDOM backbone weights (pipeline check, not a trained model)"
    return base


# Settings a resumed run may change: they do not alter what the epochs already run computed.
RESUMABLE_CHANGES = ("output_dir", "encoding", "training.checkpoint_dir", "training.max_epochs", "training.device",
                     "training.wandb_enabled", "training.wandb_project", "training.wandb_run_name")


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_resume_config(saved: Optional[Dict[str, Any]], cfg: "RunConfig", path: str,
                         saved_spec: Optional[str] = None) -> None:
    """A resumed run must be the same run: refuse settings that differ from the checkpoint's, naming them."""
    if not saved:
        return
    # A run from before feature specs trained on the spec its checkpoint implies, with no normalisation.
    saved = {"feature_norm": "auto", "strict_images": False, **saved}
    if not saved.get("feature"):
        saved["feature"] = saved_spec
    old, new = _flat(saved), _flat(cfg.to_dict())
    diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)}
    if diff:
        shown = "; ".join(f"{k}: the checkpoint has {a!r}, this command asks for {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume {path} with different settings: {shown}; to fix: repeat the original "
                         "command, or start a new run in another output directory")


# --- the run -------------------------------------------------------------------------------------
def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Split, train, keep the best head, evaluate it and the ridge baseline on the test split, write the outputs.

    A run that fails before writing anything leaves no (empty) output directory behind.
    """
    with output_directory(cfg.output_dir):
        return _train(cfg, resume=resume, overwrite=overwrite, progress=progress, log=log)


def _train(cfg: RunConfig, *, resume: bool, overwrite: bool, progress: bool, log: Callable[[str], None]
           ) -> Dict[str, Any]:
    out = cfg.output_dir
    last = os.path.join(out, "last.pt")
    if not resume and not overwrite and any(os.path.exists(os.path.join(out, f)) for f in ("best.pt", "last.pt")):
        raise FileExistsError(f"{out} already holds a run (best.pt / last.pt); pass --resume to continue it, "
                              "--overwrite to start over, or choose another output directory")
    if resume and not os.path.isfile(last):
        raise FileNotFoundError(f"cannot resume: {last} does not exist")
    os.makedirs(out, exist_ok=True)
    tc = dataclasses.replace(cfg.training, checkpoint_dir=out)
    cfg = dataclasses.replace(cfg, training=tc)

    saved = load_checkpoint_file(last) if resume else {}
    cfg = dataclasses.replace(cfg, feature=resolve_spec(cfg.features, cfg.feature))
    if resume:
        _check_resume_config(saved.get("run_config"), cfg, last, checkpoint_feature_spec(saved))
    expected = saved.get("fingerprint")
    data = load_run_data(cfg, expected_fingerprint=expected)
    device = resolve_device(tc.device)
    features = data.features.to(device)  # the whole matrix, once
    datasets = {s: split_dataset(data, s, features, tc, train=(s == "train")) for s in SPLITS}
    if datasets["train"] is None:
        raise ValueError("the train split is empty; raise train_ratio")
    sizes = {s: int(len(data.splits[s])) for s in SPLITS}
    log(f"data: {len(data.names)} images, {features.shape[1]}-d features ({data.features.dtype}; spec {data.spec}"
        + (", per-entry scaling" if data.feature_scales else "") + ") | "
        + " | ".join(f"{s} {n}" for s, n in sizes.items()) + f" | device {device}")
    if data.excluded:
        log(exclusion_note(data.excluded, write_excluded(out, data.excluded)))

    model = cfg.make_head(features.shape[1])
    backbone = weights_summary(data.fingerprint)
    if backbone["backbone_weights"] == "random":
        log(f"NOTE: {backbone['backbone']} {RANDOM_WEIGHTS_NOTE}")
    # config.json loads back as a RunConfig (unknown keys are ignored); the backbone line is for readers.
    write_json(os.path.join(out, "config.json"), {**cfg.to_dict(), "features_backbone": backbone})
    trainer = Trainer(model, tc, fingerprint=data.fingerprint, extra={"run_config": cfg.to_dict(), **feature_keys(data)},
                      progress=progress)
    if resume:
        trainer.load_checkpoint(last)
        log(f"resuming from {last} after epoch {trainer.epoch}")
    history = trainer.fit(datasets["train"], datasets["val"])
    write_json(os.path.join(out, "history.json"), history_to_json(history))
    # Each checkpoint gets the calibration of its own head: last.pt the last epoch's, best.pt the best's.
    if os.path.isfile(last):
        attach_calibration(last, calibrate_head(model, datasets, device, splits=("train", "val")))
    trainer.restore_best()
    calibrated = calibrate_head(model, datasets, device)
    if os.path.isfile(os.path.join(out, "best.pt")):
        attach_calibration(os.path.join(out, "best.pt"), calibrated)
    if calibrated.calibration is not None:
        cal = calibrated.calibration
        log(f"calibration (val split, {cal.num_images} images): slope {cal.slope:.4f}, tier boundaries on the "
            "score axis C|B {:.4f}, B|A {:.4f}, A|S {:.4f}".format(*cal.boundaries()))
    if calibrated.note:
        log(f"NOTE: {calibrated.note}")

    result: Dict[str, Any] = {"best_epoch": trainer.best_epoch, "best_accuracy": trainer.best_accuracy,
                              "epochs_run": trainer.epoch, "stopped_early": trainer.stopped_early,
                              "split_sizes": sizes, "split": "test", "features_backbone": backbone,
                              "val_evidence": pair_evidence(datasets["val"]),
                              "calibration": calibrated.checkpoint_keys()["calibration"],
                              "calibration_note": calibrated.note,
                              "feature_spec": data.spec, "feature_norm": data.feature_norm,
                              "excluded_images": data.excluded}
    if datasets["test"] is None:
        log("no test split (test_ratio is 0): nothing to report on held-out data")
        result.update(model=None, linear_baseline=None)
    else:
        result["model"] = Evaluator(model, device, calibration=calibrated.calibration).evaluate_detailed(
            datasets["test"])
        result["linear_baseline"], result["ridge_alpha"] = baseline_metrics(data, datasets, "test", cfg.ridge_alpha)
        log(format_metrics(result["model"], result["linear_baseline"],
                           title=f"test split (best epoch {trainer.best_epoch}):"))
    write_json(os.path.join(out, "test_metrics.json"), result)
    if save_curves(history, os.path.join(out, "curves.png"), title=_curves_title(backbone)):
        result["curves"] = os.path.join(out, "curves.png")
    if calibrated.calibration is not None and save_calibration_plot(
            os.path.join(out, "calibration.png"), calibrated.calibration,
            {s: calibrated.scores[s] for s in ("val", "test") if s in calibrated.scores},
            title=_calibration_title(backbone)):
        result["calibration_plot"] = os.path.join(out, "calibration.png")
    result["history"] = history
    return result


def pair_evidence(dataset: Optional[FeaturePairDataset]) -> Optional[Dict[str, int]]:
    """What a split's pair accuracy rests on: its images, the distinct pairs among the sampled ones, and those."""
    if dataset is None:
        return None
    first, second, _ = dataset.pair_arrays()
    return {"images": int(len(dataset.ranks)), "distinct_pairs": distinct_pairs(first, second),
            "sampled_pairs": int(len(first))}


def evaluate_checkpoint(checkpoint: str, features: str, metadata: str, *, split: str = "all",
                        device: Optional[str] = None, eval_pairs: Optional[int] = None,
                        filename_column: Optional[str] = None, tier_column: Optional[str] = None,
                        encoding: Optional[str] = None, strict_images: bool = False) -> Dict[str, Any]:
    """Detailed metrics of a trained head on a cache + metadata: all of it, or one split of the run it came from.

    A split is rebuilt from the run config stored in the checkpoint, so ``split="test"`` reproduces the
    run's test pairs and numbers. The ridge baseline (fitted on the train split) comes along for splits.
    """
    ckpt = load_checkpoint_file(checkpoint)
    if ckpt.get("head") is None:
        raise ValueError(f"{checkpoint} has no head dims (key 'head'); it was not written by mirip's Trainer")
    run_cfg = ckpt.get("run_config") or {}
    tc = TrainingConfig.from_dict(ckpt.get("config") or {})
    if eval_pairs is not None:
        tc.eval_pairs = int(eval_pairs)
    filename_column = filename_column or run_cfg.get("filename_column", "filename")
    tier_column = tier_column or run_cfg.get("tier_column", "tier")
    spec = checkpoint_feature_spec(ckpt)
    cfg = RunConfig.from_dict({**run_cfg, "features": features, "metadata": metadata,
                               "output_dir": run_cfg.get("output_dir", ""), "training": tc.to_dict(),
                               "filename_column": filename_column, "tier_column": tier_column, "feature": spec,
                               "encoding": encoding, "strict_images": strict_images})
    if split != "all" and not run_cfg:
        raise ValueError(f"{checkpoint} holds no run config, so its {split} split cannot be rebuilt; use split='all'")
    with open_cache(features) as cache:
        fingerprint = cache.fingerprint
    if ckpt.get("fingerprint") is not None:
        # Layout fields (which entries a cache holds) may differ: the spec's entries are looked up by name.
        check_fingerprint(ckpt["fingerprint"], fingerprint, what=f"feature cache {features}",
                          ignore=ENVIRONMENT_FIELDS + LAYOUT_FIELDS, asker=f"checkpoint {checkpoint}",
                          fix="evaluate on the cache the checkpoint was trained on, or on one extracted with the "
                              "checkpoint's settings")
    else:
        warnings.warn(f"{checkpoint} records no feature fingerprint; cannot verify that {features} matches it")
    data = load_run_data(cfg, scales=ckpt.get("feature_scales"), fit_scales=False)
    if split == "all":
        data.splits = {"all": np.arange(len(data.names)), **data.splits}
    elif split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use all, train, val or test")
    dev = resolve_device(device or tc.device)
    head = RankingHead(**ckpt["head"])
    head.load_head_state_dict(ckpt["model_state_dict"])
    feats = data.features.to(dev)
    datasets = {s: split_dataset(data, s, feats, tc, train=False) for s in data.splits}
    if datasets[split] is None:
        raise ValueError(f"the {split} split is empty")
    calibration, _, why = from_checkpoint(ckpt, checkpoint)
    result: Dict[str, Any] = {"checkpoint": checkpoint, "split": split, "epoch": ckpt.get("epoch"),
                              "features_backbone": weights_summary(fingerprint), "feature_spec": spec,
                              "model": Evaluator(head, dev, calibration=calibration).evaluate_detailed(datasets[split]),
                              "excluded_images": data.excluded}
    if calibration is None:
        result["calibration_note"] = why
    else:
        result["calibration"] = calibration.to_dict()
        if split in ("all", "train", "val"):
            result["tier_figures_note"] = IN_SAMPLE[split] + ": these tier figures are in-sample; " \
                "the test split gives the held-out ones"
    if split != "all" and datasets["train"] is not None:
        result["linear_baseline"], result["ridge_alpha"] = baseline_metrics(
            data, datasets, split, cfg.ridge_alpha)
    return result


__all__ = ["RunConfig", "RunData", "read_metadata", "load_features", "load_bank_features", "resolve_spec",
           "feature_keys", "load_run_data", "split_dataset",
           "baseline_metrics", "train", "evaluate_checkpoint", "save_curves", "OUTPUT_FILES",
           "HeadCalibration", "calibrate_head", "attach_calibration",
           "CacheError", "FingerprintMismatch"]
