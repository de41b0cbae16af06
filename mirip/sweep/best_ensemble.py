"""``sweep.py --save-ensemble``: the sweep's winner retrained as one ensemble checkpoint of its seeds.

A sweep's seeds each have their own split, so its heads cannot be averaged as one ensemble: their test
drawings differ. The ensemble is therefore trained afresh, as ``train.py --ensemble K`` trains one
(``mirip.training.ensemble_training``): K = the number of the sweep's seeds, on the split of the sweep's
first seed (the first value of ``--seeds``), members on seeds first..first+K-1 (so member 0 is the sweep's
head for that seed, trained again). It goes to ``<output-dir>/best_ensemble/`` (best.pt, scorable by
score.py with ``score_std``, and its reports); best.json's ``ensemble`` records it and the equivalent
``train.py --ensemble K`` command. A rerun keeps the ensemble while the winner and K are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from mirip.common.atomic import write_atomic
from mirip.common.plain import json_safe
from mirip.sweep.grid import HYPERPARAMETERS, SweepConfigError, SweepGrid
from mirip.sweep.report import to_argv
from mirip.sweep.settings import SweepSettings
from mirip.training.ensemble_training import ensemble_summary, train_ensemble
from mirip.training.head_config import HeadConfig
from mirip.training.run_config import RunConfig

ENSEMBLE_DIR = "best_ensemble"
WINNER_FILE = "sweep_winner.json"  # which winner the directory's ensemble was trained for


@dataclass(frozen=True)
class EnsemblePlan:
    """The ensemble a finished sweep saves: what trains, where, and the train.py command equal to it."""

    run_config: RunConfig
    members: int
    seeds: List[int]
    train_argv: List[str]

    @property
    def output_dir(self) -> str:
        return self.run_config.output_dir

    def record(self) -> Dict[str, Any]:
        return {"config_id": HeadConfig(**{**self.head_fields(), "seed": self.seeds[0]}).config_id,
                "members": self.members, "train_argv": self.train_argv}

    def head_fields(self) -> Dict[str, Any]:
        rc = self.run_config
        return {"margin": rc.margin, "hidden_dim": rc.hidden_dim, "projector_dim": rc.projector_dim,
                "learning_rate": rc.training.learning_rate, "dropout": rc.dropout,
                "weight_decay": rc.training.weight_decay, "feature": rc.feature}


def check_ensemble_request(grid: SweepGrid) -> None:
    """Refuse ``--save-ensemble`` before any training when the sweep cannot give it two members, or its heads
    train on judged pairs (an ensemble run does not)."""
    if grid.judgment_weight != (None,):
        raise SweepConfigError("--save-ensemble: an ensemble does not train on --judgments (train.py --ensemble "
                               "refuses them too); sweep the judgment weight without --save-ensemble")
    if len(grid.seed) < 2:
        raise SweepConfigError(f"--save-ensemble trains one member per sweep seed and an ensemble needs at least 2; "
                               f"got --seeds {' '.join(map(str, grid.seed))}")


def plan_best_ensemble(best: Dict[str, Any], settings: SweepSettings, grid: SweepGrid) -> EnsemblePlan:
    """The ensemble of ``best`` (best.json's record): K = len(grid.seed) members from the first seed's split."""
    check_ensemble_request(grid)
    first, members = int(grid.seed[0]), len(grid.seed)
    config = best["config"]
    head = HeadConfig(**{k: config[k] for k in HYPERPARAMETERS if k in config}, seed=first)
    out = os.path.join(settings.output_dir, ENSEMBLE_DIR)
    rc = settings.run_config(head)
    # A multi-cache sweep's winner trains on its own cache (best.json's train options name it).
    rc = dataclasses.replace(rc, features=best["train_options"]["features"], output_dir=out,
                             training=dataclasses.replace(rc.training, checkpoint_dir=out))
    options = {k: v for k, v in best["train_options"].items() if k != "folds"}  # train.py's --folds is another thing
    options["seed"] = first
    argv = to_argv(options) + ["--ensemble", str(members)]
    return EnsemblePlan(rc, members, list(range(first, first + members)), argv)


def _kept(plan: EnsemblePlan) -> Optional[Dict[str, Any]]:
    """The test_metrics.json of an ensemble already trained here for this winner and K, else None."""
    marker = os.path.join(plan.output_dir, WINNER_FILE)
    metrics = os.path.join(plan.output_dir, "test_metrics.json")
    if not all(os.path.isfile(p) for p in (marker, metrics, os.path.join(plan.output_dir, "best.pt"))):
        return None
    with open(marker) as f:
        if json.load(f) != json_safe(plan.record()):
            return None
    with open(metrics) as f:
        return json.load(f)


def save_best_ensemble(best: Dict[str, Any], settings: SweepSettings, grid: SweepGrid, *, progress: bool = True,
                       log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train (or keep) the winner's ensemble, print where it is and its test figures, and add it to best.json;
    returns best.json's ``ensemble`` record."""
    plan = plan_best_ensemble(best, settings, grid)
    result = _kept(plan)
    if result is None:
        log(f"ensemble of the best configuration: {plan.members} members (seeds {plan.seeds[0]}..{plan.seeds[-1]}) "
            f"on seed {plan.seeds[0]}'s split, into {plan.output_dir}")
        if os.path.exists(os.path.join(plan.output_dir, WINNER_FILE)):
            os.remove(os.path.join(plan.output_dir, WINNER_FILE))  # stale until the new ensemble is written
        result = train_ensemble(plan.run_config, plan.members, overwrite=True, progress=progress, log=log)
        write_atomic(os.path.join(plan.output_dir, WINNER_FILE), json.dumps(json_safe(plan.record()), indent=2))
    else:
        log(f"ensemble of the best configuration: kept from an earlier run in {plan.output_dir}")
    log(ensemble_summary(result, plan.output_dir))
    record = _record(plan, result)
    best_path = os.path.join(settings.output_dir, "best.json")
    with open(best_path) as f:
        stored = json.load(f)
    stored["ensemble"] = record
    write_atomic(best_path, json.dumps(json_safe(stored), indent=2))
    return record


def _record(plan: EnsemblePlan, result: Dict[str, Any]) -> Dict[str, Any]:
    model = result.get("model") or {}
    return {
        "directory": plan.output_dir,
        "checkpoint": os.path.join(plan.output_dir, "best.pt"),
        "members": plan.members,
        "member_seeds": result.get("seeds", plan.seeds),
        "split_seed": plan.seeds[0],
        "how": "the sweep's seeds each have their own split, so the winner is retrained as one ensemble: "
               "K = the number of sweep seeds, on the first sweep seed's split, members on seeds first..first+K-1",
        "val_accuracy": result.get("val_accuracy"),
        "member_val_accuracy": result.get("member_val_accuracy"),
        "test_accuracy": model.get("accuracy"),
        "test_spearman": model.get("spearman"),
        "train_argv": plan.train_argv,
        "train_command": "python scripts/train.py " + " ".join(plan.train_argv + ["--output-dir", plan.output_dir]),
    }
