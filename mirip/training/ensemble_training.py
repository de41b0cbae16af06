"""``train.py --ensemble K``: K heads on seeds seed..seed+K-1, one split, one pass per epoch, one checkpoint.

The heads share the run's split and its batches (the split and the pairs come from the run's seed, as a
single run's do); each member's seed sets its initial weights and dropout stream, so member 0 is the head
``train.py`` without ``--ensemble`` trains. They train stacked (``mirip.training.stacked_training.train_group``), each
keeping its own best epoch and early stopping. The score is the members' mean: the calibration and the
score reference are fitted on it, the test figures are its. The checkpoint format is
``mirip.training.ensemble``'s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List

from mirip.common.atomic import output_directory
from mirip.common.devices import resolve_device
from mirip.store.checkpoint import head_checkpoint, save_checkpoint_file
from mirip.store.fingerprint import RANDOM_WEIGHTS_NOTE, weights_summary
from mirip.training.stacked_training import HeadOutcome, train_group
from mirip.training.head_config import HeadConfig
from mirip.training.calibration_fit import save_calibration_plot
from mirip.training.checkpoint_state import history_to_json
from mirip.training.ensemble import EnsembleHead, ensemble_keys, format_uncertainty, head_from_state, uncertainty_report
from mirip.training.evaluator import Evaluator, format_metrics
from mirip.training.head_calibration import calibrate_head, calibration_title
from mirip.training.run import baseline_metrics
from mirip.training.run_config import RunConfig
from mirip.training.run_data import SPLITS, exclusion_note, feature_keys, load_run_data, resolve_spec, split_dataset, \
    write_excluded
from mirip.training.run_outputs import quality_warnings, write_json
from mirip.training.trainer import check_config
from mirip.training.typicality import typicality_for_datasets, typicality_keys

ENSEMBLE_FILES = ("best.pt", "config.json", "history.json", "test_metrics.json", "calibration.png")


def train_ensemble(cfg: RunConfig, members: int, *, overwrite: bool = False, progress: bool = True,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train ``members`` heads together and write one ensemble checkpoint (best.pt) with its reports."""
    if members < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {members}; without --ensemble one head trains")
    if cfg.judgments:
        raise ValueError("--ensemble does not train on --judgments; train without one of them")
    with output_directory(cfg.output_dir):
        return _train(cfg, members, overwrite, progress, log)


def _inputs(cfg: RunConfig, overwrite: bool, log: Callable[[str], None]) -> tuple:
    out = cfg.output_dir
    if not overwrite and any(os.path.exists(os.path.join(out, f)) for f in ("best.pt", "last.pt")):
        raise FileExistsError(f"{out} already holds a run (best.pt / last.pt); pass --overwrite to start over, "
                              "or choose another output directory")
    check_config(cfg.training)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, checkpoint_dir=out),
                              feature=resolve_spec(cfg.features, cfg.feature))
    data = load_run_data(cfg)
    device = resolve_device(cfg.training.device)
    features = data.features.to(device)
    datasets = {s: split_dataset(data, s, features, cfg.training, train=(s == "train")) for s in SPLITS}
    for split, ratio in (("train", "train_ratio"), ("val", "val_ratio")):
        if datasets[split] is None:
            raise ValueError(f"the {split} split is empty; an ensemble needs one (raise {ratio})")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "last.pt")):
        os.remove(os.path.join(out, "last.pt"))  # a replaced single run's: not this ensemble's
    sizes = {s: int(len(data.splits[s])) for s in SPLITS}
    log(f"data: {len(data.names)} images, {features.shape[1]}-d features (spec {data.spec}) | "
        + " | ".join(f"{s} {n}" for s, n in sizes.items()) + f" | device {device}")
    if data.excluded:
        log(exclusion_note(data.excluded, write_excluded(out, data.excluded)))
    return cfg, data, str(device), datasets, sizes


def _fit(cfg: RunConfig, members: int, datasets, device: str, progress: bool,
         log: Callable[[str], None]) -> List[HeadOutcome]:
    tc = cfg.training
    configs = [HeadConfig(cfg.margin, cfg.hidden_dim, cfg.projector_dim, tc.learning_rate, cfg.dropout,
                          tc.weight_decay, tc.seed + i, feature=cfg.feature) for i in range(members)]

    def on_epoch(epoch: int, training: int) -> None:
        if progress:
            log(f"epoch {epoch + 1}/{tc.max_epochs}: {training} of {members} heads still training")
    return train_group(configs, datasets["train"], datasets["val"], tc, device, on_epoch=on_epoch,
                       seeds_may_differ=True)


def _checkpoint(cfg: RunConfig, data, outcomes: List[HeadOutcome], calibrated, typical, note: str,
                val_accuracy: float) -> Dict[str, Any]:
    first = outcomes[0]
    return head_checkpoint(
        state=first.state, optimizer_state=first.optimizer_state, scheduler_state=first.scheduler_state,
        epoch=first.best_epoch, accuracy=val_accuracy, config=cfg.training.to_dict(), head=first.head_config,
        fingerprint=data.fingerprint, backbone=None,
        history={k: v[:first.best_epoch] for k, v in first.history.items()}, best_accuracy=val_accuracy,
        best_epoch=first.best_epoch, epochs_without_improvement=0, best_state=first.state,
        rng_state=first.rng_state, run_config=cfg.to_dict(), **feature_keys(data),
        **ensemble_keys([o.state for o in outcomes], [o.config.seed for o in outcomes],
                        [o.best_val_acc for o in outcomes]),
        **calibrated.checkpoint_keys(), **typicality_keys(typical, note))


def _train(cfg: RunConfig, members: int, overwrite: bool, progress: bool, log: Callable[[str], None]
           ) -> Dict[str, Any]:
    cfg, data, device, datasets, sizes = _inputs(cfg, overwrite, log)
    out = cfg.output_dir
    backbone = weights_summary(data.fingerprint)
    if backbone["backbone_weights"] == "random":
        log(f"NOTE: {backbone['backbone']} {RANDOM_WEIGHTS_NOTE}")
    write_json(os.path.join(out, "config.json"), {**cfg.to_dict(), "features_backbone": backbone,
                                                  "ensemble": members})
    outcomes = _fit(cfg, members, datasets, device, progress, log)
    heads = [head_from_state(o.head_config, o.state).to(device) for o in outcomes]
    ensemble = EnsembleHead(heads)
    calibrated = calibrate_head(ensemble, datasets, device)
    typical, note = typicality_for_datasets(datasets)
    val = uncertainty_report(heads, datasets["val"], device)
    save_checkpoint_file(os.path.join(out, "best.pt"),
                         _checkpoint(cfg, data, outcomes, calibrated, typical, note, val["accuracy"]))
    write_json(os.path.join(out, "history.json"), {"members": [
        {"seed": o.config.seed, "best_epoch": o.best_epoch, **history_to_json(o.history)} for o in outcomes]})
    result: Dict[str, Any] = {
        "ensemble": members, "seeds": [o.config.seed for o in outcomes],
        "member_best_epochs": [o.best_epoch for o in outcomes],
        "member_val_accuracy": [o.best_val_acc for o in outcomes], "val_accuracy": val["accuracy"],
        "epochs_run": max(o.epochs_run for o in outcomes), "split_sizes": sizes, "split": "test",
        "features_backbone": backbone, "calibration": calibrated.checkpoint_keys()["calibration"],
        "calibration_note": calibrated.note, "typicality_note": note, "feature_spec": data.spec,
        "feature_norm": data.feature_norm, "excluded_images": data.excluded, "model": None, "linear_baseline": None}
    if datasets["test"] is not None:
        result["model"] = Evaluator(ensemble, device, calibration=calibrated.calibration).evaluate_detailed(
            datasets["test"])
        result["linear_baseline"], result["ridge_alpha"] = baseline_metrics(data, datasets, "test", cfg.ridge_alpha)
        result["uncertainty"] = uncertainty_report(heads, datasets["test"], device, typical)
        log(format_metrics(result["model"], result["linear_baseline"], title=f"test split (ensemble of {members}):"))
        log(format_uncertainty(result["uncertainty"]))
    result["warnings"] = quality_warnings(result["model"], result["linear_baseline"], sizes.get("val"))
    for warning in result["warnings"] + [n for n in (calibrated.note, note) if n]:
        log(f"NOTE: {warning}")
    write_json(os.path.join(out, "test_metrics.json"), result)
    if calibrated.calibration is not None and save_calibration_plot(
            os.path.join(out, "calibration.png"), calibrated.calibration,
            {s: calibrated.scores[s] for s in ("val", "test") if s in calibrated.scores},
            title=calibration_title(backbone)):
        result["calibration_plot"] = os.path.join(out, "calibration.png")
    return result


def ensemble_summary(result: Dict[str, Any], output_dir: str) -> str:
    """The closing lines of ``train.py --ensemble K``."""
    lines = [f"ensemble of {result['ensemble']} heads (seeds {result['seeds'][0]}..{result['seeds'][-1]}), best "
             f"epochs {result['member_best_epochs']}; val accuracy {result['val_accuracy']:.4f} (members "
             + ", ".join(f"{a:.4f}" for a in result["member_val_accuracy"]) + ")"]
    model = result.get("model")
    if model is not None:
        lines.append(f"test pairwise accuracy {model['accuracy']:.4f} on {model['num_images']} images (ridge "
                     f"baseline {result['linear_baseline']['accuracy']:.4f}), Spearman {model['spearman']:.4f}")
    lines.append(f"outputs in {output_dir}: " + ", ".join(
        f for f in ENSEMBLE_FILES if os.path.exists(os.path.join(output_dir, f))))
    return "\n".join(lines)
