"""A training run on cached features, start to finish: what ``scripts/train.py`` and ``scripts/evaluate.py`` call.

    metadata.csv + cache.h5 -> split by image -> FeaturePairDataset per split
    -> HeadFit.fit (the stacked engine with one head; best.pt, last.pt)
    -> score-to-tier calibration on the val split (into best.pt, last.pt)
    -> best head + ridge baseline on the test pairs
    -> config.json, history.json, test_metrics.json, curves.png, calibration.png

Every choice lives in one ``RunConfig`` (data paths, split, head dims, and a
``TrainingConfig``), saved as ``config.json`` beside the run and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from mirip.common.atomic import output_directory
from mirip.common.devices import resolve_device
from mirip.common.feature_spec import checkpoint_feature_spec
from mirip.store.cache import open_cache
from mirip.store.checkpoint import load_checkpoint_file
from mirip.store.fingerprint import (ENVIRONMENT_FIELDS, LAYOUT_FIELDS, RANDOM_WEIGHTS_NOTE, check_fingerprint,
                                     weights_summary)
from mirip.training.baseline import RidgeBaseline
from mirip.training.bootstrap import BootstrapConfig, add_intervals
from mirip.training.calibration import from_checkpoint
from mirip.training.calibration_fit import save_calibration_plot
from mirip.training.checkpoint_state import history_to_json
from mirip.training.config import TrainingConfig
from mirip.training.datasets.group_split import describe_gap
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.ensemble import EnsembleHead, checkpoint_members, uncertainty_report
from mirip.training.evaluator import Evaluator, format_metrics
from mirip.training.folds import cross_validate
from mirip.training.head_fit import HeadFit
from mirip.training.head_calibration import (HeadCalibration, IN_SAMPLE, attach_calibration, calibrate_head,
                                             calibration_title)
from mirip.training.judged_pairs import (all_scores, attach_judgments, judged_summary, judgments_report,
                                         reference_report)
from mirip.training.metrics import distinct_pairs, score_metrics
from mirip.training.run_config import RunConfig
from mirip.training.run_data import (RunData, SPLITS, exclusion_note, feature_keys, load_run_data, resolve_spec,
                                     split_dataset, write_excluded)
from mirip.training.run_intervals import add_judged_intervals, bootstrap_config, head_intervals, split_units
from mirip.training.run_outputs import curves_title, quality_warnings, save_curves, small_split_warning, write_json
from mirip.training.typicality import attach_typicality, typicality_for_datasets, typicality_from_checkpoint

OUTPUT_FILES = ("best.pt", "last.pt", "config.json", "history.json", "test_metrics.json", "curves.png",
                "calibration.png")


def baseline_metrics(data: RunData, datasets: Dict[str, Optional[FeaturePairDataset]], split: str,
                     alpha: Optional[float], boot: Optional[BootstrapConfig] = None, units=None,
                     unit_name: str = "image") -> Tuple[Dict[str, Any], float]:
    """Ridge fitted on the train split (alpha picked on val), scored on ``split``'s pairs (with ``boot``, their
    intervals too)."""
    train_rows = data.splits["train"]
    val = datasets.get("val")
    val_args = {}
    if alpha is None and val is not None:
        val_args = dict(val_features=data.features[data.splits["val"]], val_pairs=val.pair_arrays())
    ridge = RidgeBaseline.fit(data.features[train_rows], data.ranks[train_rows], alpha=alpha, **val_args)
    ds = datasets[split]
    scores = ridge.predict(data.features[data.splits[split]])
    metrics = score_metrics(scores, ds.ranks, *ds.pair_arrays())
    if boot is not None:
        add_intervals(metrics, boot, scores, ds.ranks, ds.pair_arrays(), units, unit_name=unit_name)
    return metrics, ridge.alpha


# Settings a resumed run may change: they do not alter what the epochs already run computed.
RESUMABLE_CHANGES = ("output_dir", "encoding", "bootstrap_resamples", "interval_level", "training.checkpoint_dir",
                     "training.max_epochs", "training.device",
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
    saved = {"feature_norm": "auto", "strict_images": False, "judgments": None, "judgment_weight": 1.0,
             "judge_reliability": False,
             "group_column": None, "folds": 0, **saved}
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


def _prepare_output(cfg: RunConfig, resume: bool, overwrite: bool) -> Tuple[RunConfig, str]:
    """Check what the output directory holds against resume/overwrite, create it; the config with the
    checkpoints pointed there, and the path of last.pt."""
    out = cfg.output_dir
    last = os.path.join(out, "last.pt")
    if not resume and not overwrite and any(os.path.exists(os.path.join(out, f)) for f in ("best.pt", "last.pt")):
        raise FileExistsError(f"{out} already holds a run (best.pt / last.pt); pass --resume to continue it, "
                              "--overwrite to start over, or choose another output directory")
    if resume and cfg.folds:
        raise ValueError("--resume does not continue a cross-validated run (--folds); start it again with --overwrite")
    if resume and not os.path.isfile(last):
        raise FileNotFoundError(f"cannot resume: {last} does not exist")
    os.makedirs(out, exist_ok=True)
    tc = dataclasses.replace(cfg.training, checkpoint_dir=out)
    return dataclasses.replace(cfg, training=tc), last


def _run_inputs(cfg: RunConfig, resume: bool, last: str, log: Callable[[str], None]) -> tuple:
    """(config with its spec resolved, run data, device, features on it, datasets per split, split sizes)."""
    tc = cfg.training
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
    if data.split_info.get("group_balance"):
        log(describe_gap(data.split_info["group_balance"], cfg.group_column))
    if data.excluded:
        log(exclusion_note(data.excluded, write_excluded(cfg.output_dir, data.excluded)))
    return cfg, data, device, features, datasets, sizes


def _fit(cfg: RunConfig, data: RunData, features, datasets, *, resume: bool, last: str, progress: bool,
         log: Callable[[str], None]) -> tuple:
    """Build the head, write config.json, train (resuming from last.pt if asked), write history.json;
    (head, trainer, history, backbone summary)."""
    out, tc = cfg.output_dir, cfg.training
    backbone = weights_summary(data.fingerprint)
    if backbone["backbone_weights"] == "random":
        log(f"NOTE: {backbone['backbone']} {RANDOM_WEIGHTS_NOTE}")
    # config.json loads back as a RunConfig (unknown keys are ignored); the backbone line is for readers.
    write_json(os.path.join(out, "config.json"), {**cfg.to_dict(), "features_backbone": backbone})
    trainer = HeadFit(cfg.head_config(), features.shape[1], tc, fingerprint=data.fingerprint,
                      extra={"run_config": cfg.to_dict(), **feature_keys(data)}, progress=progress)
    if resume:
        trainer.load_checkpoint(last)
        log(f"resuming from {last} after epoch {trainer.epoch}")
    history = trainer.fit(datasets["train"], datasets["val"])
    write_json(os.path.join(out, "history.json"), history_to_json(history))
    return trainer.model, trainer, history, backbone


def _calibrate_checkpoints(model, trainer: HeadFit, datasets, device, out: str, last: str,
                           log: Callable[[str], None]) -> HeadCalibration:
    """Each checkpoint gets the calibration of its own head: last.pt the last epoch's, best.pt the best's.
    Leaves the best head in ``model`` and returns its calibration."""
    if os.path.isfile(last):
        attach_calibration(last, calibrate_head(model, datasets, device, splits=("train", "val")))
    trainer.restore_best()
    calibrated = calibrate_head(model, datasets, device)
    if os.path.isfile(os.path.join(out, "best.pt")):
        attach_calibration(os.path.join(out, "best.pt"), calibrated)
    typical, typical_note = typicality_for_datasets(datasets)
    for path in (last, os.path.join(out, "best.pt")):
        if os.path.isfile(path):
            attach_typicality(path, typical, typical_note)
    if typical is not None:
        log(f"typicality (Mahalanobis on the head's input features, {typical.num_train} training drawings): "
            f"unusual below a typicality of {typical.threshold:.0%} "
            "(log-normal tail of the validation distances)")
    if calibrated.calibration is not None:
        cal = calibrated.calibration
        log(f"calibration (val split, {cal.num_images} images): slope {cal.slope:.4f}, tier boundaries on the "
            "score axis C|B {:.4f}, B|A {:.4f}, A|S {:.4f}".format(*cal.boundaries()))
    if calibrated.note:
        log(f"NOTE: {calibrated.note}")
    return calibrated


def _test_report(cfg: RunConfig, data: RunData, datasets, model, device, trainer: HeadFit,
                 calibrated: HeadCalibration, sizes: Dict[str, int], backbone: Dict[str, Any],
                 log: Callable[[str], None]) -> Dict[str, Any]:
    """The run's result: training outcome, calibration, and the best head and ridge baseline on the test split."""
    result: Dict[str, Any] = {"best_epoch": trainer.best_epoch, "best_accuracy": trainer.best_accuracy,
                              "epochs_run": trainer.epoch, "stopped_early": trainer.stopped_early,
                              "split_sizes": sizes, "split": "test", "features_backbone": backbone,
                              "val_evidence": pair_evidence(datasets["val"]),
                              "calibration": calibrated.checkpoint_keys()["calibration"],
                              "calibration_note": calibrated.note,
                              "feature_spec": data.spec, "feature_norm": data.feature_norm,
                              "excluded_images": data.excluded}
    if data.split_info.get("group_balance"):
        result["split_balance"] = {"group_column": cfg.group_column, **data.split_info["group_balance"]}
    if datasets["test"] is None:
        log("no test split (test_ratio is 0): nothing to report on held-out data")
        result.update(model=None, linear_baseline=None)
    else:
        boot, (units, unit_name) = bootstrap_config(cfg), split_units(data, "test", cfg.group_column)
        result["model"] = head_intervals(
            Evaluator(model, device, calibration=calibrated.calibration).evaluate_detailed(datasets["test"]),
            model, datasets["test"], device, calibrated.calibration, units, unit_name, boot)
        result["linear_baseline"], result["ridge_alpha"] = baseline_metrics(
            data, datasets, "test", cfg.ridge_alpha, boot if boot.resamples else None, units, unit_name)
        log(format_metrics(result["model"], result["linear_baseline"],
                           title=f"test split (best epoch {trainer.best_epoch}):"))
    result["warnings"] = quality_warnings(result["model"], result["linear_baseline"], sizes.get("val"))
    small = small_split_warning(sizes.get("val"), (result["val_evidence"] or {}).get("distinct_pairs"))
    result["warnings"] += [small] if small else []
    for warning in result["warnings"]:
        log(f"WARNING: {warning}")
    return result


def _save_plots(result: Dict[str, Any], out: str, history, calibrated: HeadCalibration,
                backbone: Dict[str, Any]) -> None:
    """curves.png and calibration.png; each path goes into ``result`` when the plot was written."""
    if save_curves(history, os.path.join(out, "curves.png"), title=curves_title(backbone)):
        result["curves"] = os.path.join(out, "curves.png")
    if calibrated.calibration is not None and save_calibration_plot(
            os.path.join(out, "calibration.png"), calibrated.calibration,
            {s: calibrated.scores[s] for s in ("val", "test") if s in calibrated.scores},
            title=calibration_title(backbone)):
        result["calibration_plot"] = os.path.join(out, "calibration.png")


def _train(cfg: RunConfig, *, resume: bool, overwrite: bool, progress: bool, log: Callable[[str], None]
           ) -> Dict[str, Any]:
    cfg, last = _prepare_output(cfg, resume, overwrite)
    out = cfg.output_dir
    cfg, data, device, features, datasets, sizes = _run_inputs(cfg, resume, last, log)
    judged = (attach_judgments(cfg.judgments, cfg.judgment_weight, data, datasets, cfg.encoding, log,
                               reliability=cfg.judge_reliability) if cfg.judgments else None)
    folds = cross_validate(cfg, data, features, progress=progress, log=log) if cfg.folds else None
    model, trainer, history, backbone = _fit(cfg, data, features, datasets, resume=resume, last=last,
                                             progress=progress, log=log)
    calibrated = _calibrate_checkpoints(model, trainer, datasets, device, out, last, log)
    result = _test_report(cfg, data, datasets, model, device, trainer, calibrated, sizes, backbone, log)
    _judged_results(result, cfg, judged, data, model, features, calibrated.calibration, log)
    if folds:
        result["cross_validation"] = {k: v for k, v in folds.items() if k != "table"}
    write_json(os.path.join(out, "test_metrics.json"), result)
    _save_plots(result, out, history, calibrated, backbone)
    result["history"] = history
    return result


def _judged_results(result: Dict[str, Any], cfg: RunConfig, judged, data: RunData, model, features, calibration,
                    log: Callable[[str], None]) -> None:
    """The judged pairs' figures (when the run had judgments) and the reference order's (when the metadata has one)."""
    scores = all_scores(model, features)
    reference = reference_report(scores, data)
    if reference is not None:
        result["reference_order"] = reference
    if judged is not None:
        result["judgments"] = judgments_report(judged, scores, data, calibration)
        add_judged_intervals(result["judgments"], judged, scores, data, bootstrap_config(cfg), cfg.group_column)
        log(judged_summary(result["judgments"], reference))


def pair_evidence(dataset: Optional[FeaturePairDataset]) -> Optional[Dict[str, int]]:
    """What a split's pair accuracy rests on: its images, the distinct pairs among the sampled ones, and those."""
    if dataset is None:
        return None
    first, second, _ = dataset.pair_arrays()
    return {"images": int(len(dataset.ranks)), "distinct_pairs": distinct_pairs(first, second),
            "sampled_pairs": int(len(first))}


def _evaluation_config(ckpt: Dict[str, Any], checkpoint: str, features: str, metadata: str, split: str,
                       eval_pairs: Optional[int], filename_column: Optional[str], tier_column: Optional[str],
                       encoding: Optional[str], strict_images: bool) -> Tuple[RunConfig, TrainingConfig, str]:
    """The run config to rebuild the data with: the checkpoint's own, pointed at these files; and its spec."""
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
    return cfg, tc, spec


def _checked_cache_fingerprint(ckpt: Dict[str, Any], checkpoint: str, features: str) -> Dict[str, Any]:
    """The cache's fingerprint, checked against the checkpoint's (a warning when the checkpoint records none)."""
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
    return fingerprint


def _add_calibration(result: Dict[str, Any], calibration, why: Optional[str], split: str) -> None:
    if calibration is None:
        result["calibration_note"] = why
    else:
        result["calibration"] = calibration.to_dict()
        if split in ("all", "train", "val"):
            result["tier_figures_note"] = IN_SAMPLE[split] + ": these tier figures are in-sample; " \
                "the test split gives the held-out ones"


def evaluate_checkpoint(checkpoint: str, features: str, metadata: str, *, split: str = "all",
                        device: Optional[str] = None, eval_pairs: Optional[int] = None,
                        filename_column: Optional[str] = None, tier_column: Optional[str] = None,
                        encoding: Optional[str] = None, strict_images: bool = False,
                        group_column: Optional[str] = None, bootstrap_resamples: Optional[int] = None
                        ) -> Dict[str, Any]:
    """Detailed metrics of a trained head on a cache + metadata: all of it, or one split of the run it came from.

    Every figure comes with its bootstrap interval, resampling the groups of ``group_column`` (default: the
    run's) or the images; ``bootstrap_resamples`` 0 leaves them out.

    A split is rebuilt from the run config stored in the checkpoint, so ``split="test"`` reproduces the
    run's test pairs and numbers. The ridge baseline (fitted on the train split) comes along for splits.
    """
    ckpt = load_checkpoint_file(checkpoint)
    if ckpt.get("head") is None:
        raise ValueError(f"{checkpoint} has no head dims (key 'head'); it was not written by mirip's Trainer")
    cfg, tc, spec = _evaluation_config(ckpt, checkpoint, features, metadata, split, eval_pairs, filename_column,
                                       tier_column, encoding, strict_images)
    fingerprint = _checked_cache_fingerprint(ckpt, checkpoint, features)
    data = load_run_data(cfg, scales=ckpt.get("feature_scales"), fit_scales=False)
    if split == "all":
        data.splits = {"all": np.arange(len(data.names)), **data.splits}
    elif split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use all, train, val or test")
    dev = resolve_device(device or tc.device)
    members = [m.to(dev) for m in checkpoint_members(ckpt)]
    head = members[0] if len(members) == 1 else EnsembleHead(members)
    feats = data.features.to(dev)
    datasets = {s: split_dataset(data, s, feats, tc, train=False) for s in data.splits}
    if datasets[split] is None:
        raise ValueError(f"the {split} split is empty")
    calibration, _, why = from_checkpoint(ckpt, checkpoint)
    boot = bootstrap_config(cfg)
    if bootstrap_resamples is not None:
        boot = dataclasses.replace(boot, resamples=int(bootstrap_resamples))
    units, unit_name = split_units(data, split, group_column or cfg.group_column)
    metrics = Evaluator(head, dev, calibration=calibration).evaluate_detailed(datasets[split])
    result: Dict[str, Any] = {"checkpoint": checkpoint, "split": split, "epoch": ckpt.get("epoch"),
                              "features_backbone": weights_summary(fingerprint), "feature_spec": spec,
                              "model": head_intervals(metrics, head, datasets[split], dev, calibration, units,
                                                      unit_name, boot),
                              "excluded_images": data.excluded}
    _add_calibration(result, calibration, why, split)
    fit, result["typicality_note"] = typicality_from_checkpoint(ckpt, checkpoint)
    result["uncertainty"] = uncertainty_report(members, datasets[split], dev, fit)
    if split != "all" and datasets["train"] is not None:
        result["linear_baseline"], result["ridge_alpha"] = baseline_metrics(
            data, datasets, split, cfg.ridge_alpha, boot if boot.resamples else None, units, unit_name)
    return result


__all__ = ["baseline_metrics", "train", "evaluate_checkpoint", "OUTPUT_FILES"]
