"""Benchmark of sweeps: K configurations trained stacked (one pass per group) against K sequential single runs.

    sequential  for each configuration: seed, build the head, Trainer.fit over the seed's
                FeaturePairDatasets (no checkpoint files), restore the best epoch, evaluate
                it on the test pairs - what K runs of scripts/train.py do after loading data
    sweep       for each (seed, hidden, projector) group: train_group over the same datasets
                (heads stacked, one pass per epoch), then evaluate each head's best epoch

Both arms run on the same in-memory (N, D) synthetic features, the same splits,
pairs, batch size, epochs and grid, with early stopping off so they do the same
number of steps; they alternate ``--sweep-repeats`` times and the medians give the
ratio (goal: <= 0.5 on the 2-core CPU, <= 0.1 on a GPU). The arms' results are
compared too: the val accuracies of every configuration must agree. Standalone::

    python -m mirip.bench.sweep --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from mirip.common.devices import resolve_device
from mirip.common.machine import sync
from mirip.ml.ranking_model import RankingHead
from mirip.training.stacked_training import train_group
from mirip.sweep.grid import SweepGrid, group_configs
from mirip.training.stacked_optim import OPTIMIZERS, default_optimizer
from mirip.training.config import TrainingConfig
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.evaluator import Evaluator
from mirip.training.trainer import Trainer

GOAL_CPU, GOAL_GPU = 0.5, 0.1
# (full default, --quick default)
DEFAULTS = {
    "images": (5000, 1000),
    "dim": (1024, 1024),
    "pairs": (2000, 512),
    "eval_pairs": (2000, 500),
    "epochs": (5, 2),
    "batch_size": (32, 32),
    "repeats": (2, 1),
}
DEFAULT_GRID = dict(margin=(0.1, 0.5, 1.0, 2.0), hidden_dim=(256, 512), projector_dim=(64, 128))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sweep: K stacked heads vs K sequential Trainer runs")
    g.add_argument("--sweep-images", type=int, default=None, help="synthetic images (5000; --quick 1000)")
    g.add_argument("--sweep-dim", type=int, default=None, help="feature dim D (1024)")
    g.add_argument("--sweep-pairs", type=int, default=None, help="training pairs per epoch (2000; --quick 512)")
    g.add_argument("--sweep-eval-pairs", type=int, default=None, help="val/test pairs (2000; --quick 500)")
    g.add_argument("--sweep-epochs", type=int, default=None, help="epochs per configuration (5; --quick 2)")
    g.add_argument("--sweep-batch-size", type=int, default=None, help="pairs per step (32)")
    g.add_argument("--sweep-repeats", type=int, default=None, help="alternating timed passes of each arm (2; --quick 1)")
    g.add_argument("--sweep-margins", type=float, nargs="+", default=None, help="grid margins (0.1 0.5 1.0 2.0)")
    g.add_argument("--sweep-hidden-dims", type=int, nargs="+", default=None, help="grid hidden dims (256 512)")
    g.add_argument("--sweep-projector-dims", type=int, nargs="+", default=None, help="grid projector dims (64 128)")
    g.add_argument("--sweep-learning-rates", type=float, nargs="+", default=None, help="grid learning rates (1e-4)")
    g.add_argument("--sweep-dropouts", type=float, nargs="+", default=None, help="grid dropouts (0.1)")
    g.add_argument("--sweep-optimizer", choices=OPTIMIZERS, default="auto",
                   help="the sweep arm's AdamW: fused (CPU default), batched (GPU default) or plain")
    g.add_argument("--sweep-threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 avoids spin-waiting on a small busy CPU)")


def _opt(args: argparse.Namespace, name: str) -> int:
    value = getattr(args, f"sweep_{name}", None)
    return int(value) if value is not None else DEFAULTS[name][1 if getattr(args, "quick", False) else 0]


def _grid(args: argparse.Namespace) -> SweepGrid:
    pick = lambda name, key, default: tuple(getattr(args, name, None) or default)  # noqa: E731
    return SweepGrid(
        margin=pick("sweep_margins", "margin", DEFAULT_GRID["margin"]),
        hidden_dim=pick("sweep_hidden_dims", "hidden_dim", DEFAULT_GRID["hidden_dim"]),
        projector_dim=pick("sweep_projector_dims", "projector_dim", DEFAULT_GRID["projector_dim"]),
        learning_rate=pick("sweep_learning_rates", "learning_rate", (1e-4,)),
        dropout=pick("sweep_dropouts", "dropout", (0.1,)),
        weight_decay=(0.01,), seed=(0,),
    )



def _data(n: int, dim: int, device: str):
    """Tier-dependent synthetic features (a learnable signal along one direction) and an 80/10/10 split."""
    rng = np.random.default_rng(0)
    ranks = np.arange(n) % 4
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    feats[:, 0] += 0.5 * ranks
    order = rng.permutation(n)
    cut1, cut2 = int(0.8 * n), int(0.9 * n)
    splits = {"train": np.sort(order[:cut1]), "val": np.sort(order[cut1:cut2]), "test": np.sort(order[cut2:])}
    return torch.from_numpy(feats).to(device), ranks, splits


def _datasets(feats, ranks, splits, tc: TrainingConfig) -> Dict[str, FeaturePairDataset]:
    return {s: FeaturePairDataset(feats, ranks[rows], rows=rows, batch_size=tc.batch_size, seed=tc.seed,
                                  num_pairs=tc.pairs_per_epoch if s == "train" else tc.eval_pairs,
                                  balance=tc.pair_balance, check_finite=False, what=f"{s} split")
            for s, rows in splits.items()}


def _sequential(configs, feats, ranks, splits, tc: TrainingConfig, device: str) -> Dict[str, dict]:
    out = {}
    for cfg in configs:
        c = dataclasses.replace(tc, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, seed=cfg.seed)
        ds = _datasets(feats, ranks, splits, c)  # each run builds its own pairs, as scripts/train.py does
        torch.manual_seed(cfg.seed)
        head = RankingHead(feats.shape[1], cfg.projector_dim, cfg.margin, cfg.hidden_dim, cfg.dropout)
        trainer = Trainer(head, c, progress=False, log=lambda m: None)
        trainer.fit(ds["train"], ds["val"])
        trainer.restore_best()
        test = Evaluator(head, device).evaluate_detailed(ds["test"])
        out[cfg.config_id] = {"val_acc": trainer.best_accuracy, "test_acc": test["accuracy"]}
    return out


def _sweep(configs, feats, ranks, splits, tc: TrainingConfig, device: str, optimizer: str) -> Dict[str, dict]:
    out = {}
    for key, group in group_configs(configs).items():
        ds = _datasets(feats, ranks, splits, dataclasses.replace(tc, seed=key[0]))
        for o in train_group(group, ds["train"], ds["val"], tc, device, optimizer=optimizer):
            head = RankingHead(**o.head_config)
            head.load_head_state_dict(o.state)
            test = Evaluator(head, device).evaluate_detailed(ds["test"])
            out[o.config.config_id] = {"val_acc": o.best_val_acc, "test_acc": test["accuracy"]}
    return out


def run(args: argparse.Namespace) -> dict:
    threads, before = getattr(args, "sweep_threads", None), torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)  # other benchmarks in the same process keep their own setting


def _run(args: argparse.Namespace) -> dict:
    device = resolve_device(getattr(args, "device", None))
    grid = _grid(args)
    configs = grid.configs()
    epochs = _opt(args, "epochs")
    tc = TrainingConfig(batch_size=_opt(args, "batch_size"), max_epochs=epochs, pairs_per_epoch=_opt(args, "pairs"),
                        eval_pairs=_opt(args, "eval_pairs"), early_stopping_patience=0, scheduler_t_max=epochs,
                        device=device, checkpoint_dir="")
    feats, ranks, splits = _data(_opt(args, "images"), _opt(args, "dim"), device)
    optimizer = getattr(args, "sweep_optimizer", None) or "auto"
    times: Dict[str, List[float]] = {"sequential": [], "sweep": []}
    results: Dict[str, Dict[str, dict]] = {}
    # Warm-up (allocator, kernels) outside the timings, on one small group.
    _sweep(configs[:1], feats, ranks, splits, dataclasses.replace(tc, max_epochs=1), device, optimizer)
    _sequential(configs[:1], feats, ranks, splits, dataclasses.replace(tc, max_epochs=1), device)
    for _ in range(_opt(args, "repeats")):
        for arm in ("sequential", "sweep"):
            sync(device)
            t0 = time.perf_counter()
            if arm == "sweep":
                results[arm] = _sweep(configs, feats, ranks, splits, tc, device, optimizer)
            else:
                results[arm] = _sequential(configs, feats, ranks, splits, tc, device)
            sync(device)
            times[arm].append(time.perf_counter() - t0)
    seq, swp = statistics.median(times["sequential"]), statistics.median(times["sweep"])
    val_diff = max(abs(results["sweep"][c.config_id]["val_acc"] - results["sequential"][c.config_id]["val_acc"])
                   for c in configs)
    test_diff = max(abs(results["sweep"][c.config_id]["test_acc"] - results["sequential"][c.config_id]["test_acc"])
                    for c in configs)
    on_gpu = device.startswith("cuda")
    goal = GOAL_GPU if on_gpu else GOAL_CPU
    ratio = swp / seq
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "configurations": len(configs),
        "groups": len(group_configs(configs)),
        "grid": grid.to_dict(),
        "images": int(feats.shape[0]), "dim": int(feats.shape[1]),
        "epochs": epochs, "pairs_per_epoch": tc.pairs_per_epoch, "eval_pairs": tc.eval_pairs,
        "batch_size": tc.batch_size, "repeats": len(times["sweep"]),
        "optimizer": default_optimizer(torch.device(device)) if optimizer == "auto" else optimizer,
        "sequential_s": times["sequential"], "sweep_s": times["sweep"],
        "sequential_median_s": seq, "sweep_median_s": swp,
        "ratio": ratio, "goal_ratio": goal, "meets_goal": ratio <= goal,
        "head_epochs_per_s": {"sequential": len(configs) * epochs / seq, "sweep": len(configs) * epochs / swp},
        "max_val_acc_diff": val_diff, "max_test_acc_diff": test_diff,
    }


def to_markdown(result: dict) -> str:
    g = result["grid"]
    grid = " x ".join(f"{k} {{{', '.join(f'{v:g}' for v in vals)}}}" for k, vals in g.items() if len(vals) > 1)
    lines = [
        "### Sweep: stacked heads vs sequential single runs",
        "",
        f"{result['configurations']} configurations ({grid}; {result['groups']} stacked groups), "
        f"{result['images']} synthetic images x {result['dim']}-d features, {result['epochs']} epochs x "
        f"{result['pairs_per_epoch']} pairs at batch {result['batch_size']}, {result['eval_pairs']} val/test pairs, "
        f"early stopping off; device {result['device']} ({result['threads']} CPU threads), "
        f"{result['optimizer']} AdamW in the sweep; "
        f"median of {result['repeats']} alternating pass(es).",
        "",
        "| arm | wall time (s) | head-epochs/s |",
        "| --- | ---: | ---: |",
        f"| {result['configurations']} sequential Trainer runs | {result['sequential_median_s']:.2f} | "
        f"{result['head_epochs_per_s']['sequential']:.2f} |",
        f"| one sweep (stacked) | {result['sweep_median_s']:.2f} | {result['head_epochs_per_s']['sweep']:.2f} |",
        "",
        f"Ratio sweep / sequential: **{result['ratio']:.3f}** (goal <= {result['goal_ratio']}: "
        f"{'met' if result['meets_goal'] else 'NOT met'}). Largest difference between the arms' results: "
        f"val accuracy {result['max_val_acc_diff']:.4f}, test accuracy {result['max_test_acc_diff']:.4f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
