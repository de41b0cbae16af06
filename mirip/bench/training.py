"""Benchmark of stage two: the Trainer's pairs/s against a bare training loop, and the wall time of a full run.

    bare loop   gather two feature batches by index, forward, MarginRankingLoss, backward, AdamW step
                (fused AdamW, as the Trainer uses)
    Trainer     Trainer.train_epoch over a FeaturePairDataset: the same work plus gradient clipping
                and on-device loss/accuracy bookkeeping

Both run on the same in-memory (N, D) features, the same pairs, batch size and
head, alternating, ``--training-repeats`` times; the medians give the ratio
(goal >= 0.9). Then ``Trainer.fit`` runs the seed's training budget - 100
epochs x 10,000 pairs at batch 32 with D = 1024 - including validation every
epoch and best/last checkpoints, and its wall time is recorded (goal on the
2-core CPU: under 2 minutes); ``train.py``'s own path (``HeadFit``: the stacked engine with one head) runs
the same budget right after, for the ratio. Standalone::

    python -m mirip.bench.training --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from mirip.common.devices import resolve_device
from mirip.common.machine import sync
from mirip.ml.ranking_model import RankingHead
from mirip.training.config import TrainingConfig
from mirip.training.datasets.pair_sampling import sample_pairs
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.head_config import HeadConfig
from mirip.training.head_fit import HeadFit
from mirip.training.trainer import Trainer

GOAL_RATIO = 0.9
GOAL_FULL_RUN_S = 120.0
# (full default, --quick default)
DEFAULTS = {
    "images": (5000, 1000),
    "dim": (1024, 1024),
    "pairs": (10_000, 4_000),  # --quick: a smoke run that fits the 2-core CPU's few minutes with the rest
    "epochs": (100, 2),
    "batch_size": (32, 32),
    "throughput_pairs": (20_000, 6_400),
    "repeats": (5, 3),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training: stage-two Trainer vs bare loop, and a full run")
    g.add_argument("--training-images", type=int, default=None, help="synthetic images (5000; --quick 1000)")
    g.add_argument("--training-dim", type=int, default=None, help="feature dim D (1024)")
    g.add_argument("--training-pairs", type=int, default=None, help="pairs per epoch of the full run (10000; --quick 4000)")
    g.add_argument("--training-epochs", type=int, default=None, help="epochs of the full run (100; --quick 2)")
    g.add_argument("--training-batch-size", type=int, default=None, help="pairs per step (32)")
    g.add_argument("--training-throughput-pairs", type=int, default=None,
                   help="pairs per timed pass of the throughput comparison (20000; --quick 6400)")
    g.add_argument("--training-repeats", type=int, default=None, help="alternating timed passes of each (5; --quick 3)")
    g.add_argument("--training-static-arm", action="store_true",
                   help="also time the Trainer's static-buffer head step (head_step static on CPU, graph on CUDA) "
                        "in the same alternating rounds")
    g.add_argument("--training-threads", type=int, default=None,
                   help="torch CPU threads for this benchmark (default: torch's own choice). On a small, busy CPU "
                        "1 avoids threads spin-waiting on each other")


def _opt(args: argparse.Namespace, name: str) -> int:
    value = getattr(args, f"training_{name}", None)
    return int(value) if value is not None else DEFAULTS[name][1 if getattr(args, "quick", False) else 0]



def _head(dim: int, seed: int, device: str) -> RankingHead:
    torch.manual_seed(seed)
    return RankingHead(dim).to(device)


def _bare_pass(model: RankingHead, opt: torch.optim.Optimizer, feats: torch.Tensor, first: torch.Tensor,
               second: torch.Tensor, labels: torch.Tensor, batch_size: int, device: str) -> Tuple[float, float]:
    """The minimal loop: index, forward, loss, backward, step. Returns pairs/s by wall clock and by CPU time."""
    model.train()
    loss_fn = torch.nn.MarginRankingLoss(margin=model.margin)
    labels_f = labels.float()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, len(labels), batch_size):
        s1, s2 = model(feats[first[s:s + batch_size]], feats[second[s:s + batch_size]])
        loss = loss_fn(s1.reshape(-1), s2.reshape(-1), labels_f[s:s + batch_size])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return len(labels) / (time.perf_counter() - t0), len(labels) / (time.process_time() - c0)


def _trainer_pass(trainer: Trainer, dataset: FeaturePairDataset, device: str) -> Tuple[float, float]:
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train_epoch(dataset)  # ends in a .item(): synchronised
    return dataset.num_pairs / (time.perf_counter() - t0), dataset.num_pairs / (time.process_time() - c0)


def run(args: argparse.Namespace) -> Dict:
    device = resolve_device(getattr(args, "device", None))
    threads_before = torch.get_num_threads()
    if getattr(args, "training_threads", None):
        torch.set_num_threads(int(args.training_threads))
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads_before)


def _static_arm(static: List[tuple], static_mode: str, bare_med: float, bare_cpu: float) -> Optional[Dict]:
    """The static/graph-step Trainer's figures against the bare loop's; None when that arm did not run."""
    if not static:
        return None
    st_med = statistics.median(o[0] for o in static)
    st_cpu = statistics.median(o[1] for o in static)
    return {"head_step": static_mode, "pairs_per_s": [o[0] for o in static], "median": st_med,
            "ratio": st_med / bare_med, "cpu_median": st_cpu, "ratio_cpu_time": st_cpu / bare_cpu,
            "meets_goal": st_med / bare_med >= GOAL_RATIO}


def _throughput(args: argparse.Namespace, feats: torch.Tensor, ranks: np.ndarray, device: str) -> Dict:
    """Pairs/s of the Trainer's epoch against a bare loop: same features, pairs, batch size and head init."""
    dim, batch = _opt(args, "dim"), _opt(args, "batch_size")
    tp_pairs, repeats = _opt(args, "throughput_pairs"), _opt(args, "repeats")
    cfg = TrainingConfig(device=device, batch_size=batch, pairs_per_epoch=tp_pairs, checkpoint_dir="", seed=0)
    dataset = FeaturePairDataset(feats, ranks, num_pairs=tp_pairs, batch_size=batch, seed=0)
    first, second, labels = (torch.from_numpy(a).to(device) for a in sample_pairs(ranks, tp_pairs, seed=0, epoch=0))
    bare_model = _head(dim, 0, device)
    # The same optimizer the Trainer builds (fused AdamW): the ratio measures the Trainer's overhead, nothing else.
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 fused=True)
    trainer = Trainer(_head(dim, 0, device), cfg, progress=False)
    static_mode = "graph" if device.startswith("cuda") else "static"
    static_trainer = (Trainer(_head(dim, 0, device), dataclasses.replace(cfg, head_step=static_mode), progress=False)
                      if getattr(args, "training_static_arm", False) else None)
    _bare_pass(bare_model, bare_opt, feats, first[:batch * 20], second[:batch * 20], labels[:batch * 20], batch, device)
    warm = FeaturePairDataset(feats, ranks, num_pairs=batch * 20, batch_size=batch)
    for t in (trainer, static_trainer):
        if t is not None:
            _trainer_pass(t, warm, device)  # warm-up
    bare, ours, static = [], [], []
    for _ in range(repeats):  # alternating, so drifting machine load hits both alike
        bare.append(_bare_pass(bare_model, bare_opt, feats, first, second, labels, batch, device))
        ours.append(_trainer_pass(trainer, dataset, device))
        if static_trainer is not None:
            static.append(_trainer_pass(static_trainer, dataset, device))
    # Wall clock is what a user waits; CPU time (process_time) is what the work costs, and stays meaningful
    # when other processes share the cores (on a GPU the CPU time is mostly launch overhead).
    bare_med, ours_med = statistics.median(b[0] for b in bare), statistics.median(o[0] for o in ours)
    bare_cpu, ours_cpu = statistics.median(b[1] for b in bare), statistics.median(o[1] for o in ours)
    return {
        "pairs_per_pass": tp_pairs, "repeats": repeats,
        "bare_pairs_per_s": [b[0] for b in bare], "trainer_pairs_per_s": [o[0] for o in ours],
        "bare_median": bare_med, "trainer_median": ours_med, "ratio": ours_med / bare_med,
        "bare_cpu_median": bare_cpu, "trainer_cpu_median": ours_cpu, "ratio_cpu_time": ours_cpu / bare_cpu,
        "goal_ratio": GOAL_RATIO, "meets_goal": ours_med / bare_med >= GOAL_RATIO,
        "trainer_head_step": trainer.step_mode, "static_arm": _static_arm(static, static_mode, bare_med, bare_cpu),
    }


def _full_run(args: argparse.Namespace, feats: torch.Tensor, ranks: np.ndarray, device: str) -> Dict:
    """Wall and CPU seconds of a whole Trainer.fit: validation every epoch, a checkpoint at the end."""
    n, dim, batch = _opt(args, "images"), _opt(args, "dim"), _opt(args, "batch_size")
    pairs, epochs = _opt(args, "pairs"), _opt(args, "epochs")
    val_rows = np.arange(0, n, 10)
    train_rows = np.setdiff1d(np.arange(n), val_rows)
    full_cfg = TrainingConfig(device=device, batch_size=batch, max_epochs=epochs, pairs_per_epoch=pairs,
                              eval_pairs=pairs, early_stopping_patience=0, scheduler_t_max=epochs, seed=0,
                              save_every_n_epochs=max(epochs, 1))
    train_ds = FeaturePairDataset(feats, ranks[train_rows], rows=train_rows, num_pairs=pairs, batch_size=batch, seed=0)
    val_ds = FeaturePairDataset(feats, ranks[val_rows], rows=val_rows, num_pairs=pairs, batch_size=batch, seed=0)
    timings = {}
    for arm in ("trainer", "head_fit"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = dataclasses.replace(full_cfg, checkpoint_dir=tmp)
            if arm == "trainer":
                fitter = Trainer(_head(dim, 0, device), cfg, progress=False, log=lambda m: None)
            else:
                fitter = HeadFit(HeadConfig(1.0, 512, 256, cfg.learning_rate, 0.1, cfg.weight_decay, 0), dim, cfg,
                                 progress=False, log=lambda m: None)
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fitter.fit(train_ds, val_ds)
            sync(device)
            timings[arm] = (time.perf_counter() - t0, time.process_time() - c0)
    (wall, cpu), (hf_wall, hf_cpu) = timings["trainer"], timings["head_fit"]
    return {
        "epochs": epochs, "pairs_per_epoch": pairs, "val_pairs": pairs, "wall_s": wall, "cpu_s": cpu,
        "s_per_epoch": wall / max(epochs, 1), "pairs_per_s": epochs * pairs / wall,
        "head_fit_wall_s": hf_wall, "head_fit_cpu_s": hf_cpu, "head_fit_over_trainer_wall": hf_wall / wall,
        "goal_s": GOAL_FULL_RUN_S if epochs == 100 and pairs == 10_000 else None,
        "meets_goal": wall < GOAL_FULL_RUN_S if epochs == 100 and pairs == 10_000 else None,
    }


def _run(args: argparse.Namespace, device: str) -> Dict:
    n, dim, batch = _opt(args, "images"), _opt(args, "dim"), _opt(args, "batch_size")
    gen = torch.Generator().manual_seed(0)
    ranks = np.repeat(np.arange(4)[::-1], n // 4 + 1)[:n].astype(np.int64)
    feats = (torch.randn(n, dim, generator=gen) + torch.from_numpy(ranks).float()[:, None] * 0.05).to(device)
    throughput = _throughput(args, feats, ranks, device)
    full_run = _full_run(args, feats, ranks, device)
    return {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "images": n, "dim": dim, "batch_size": batch, "head": RankingHead(dim).head_config(),
        "throughput": throughput,
        "full_run": full_run,
    }


def to_markdown(result: Dict) -> str:
    tp, fr = result["throughput"], result["full_run"]
    lines = [
        "### training (stage two)",
        "",
        f"Device {result['device']} ({result['torch_threads']} torch threads, load {result['load_average_1min']}), "
        f"{result['images']} images x D={result['dim']}, batch {result['batch_size']}, head "
        f"{result['head']['hidden_dim']}/{result['head']['projector_output_dim']}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| bare fwd+bwd+AdamW loop | {tp['bare_median']:,.0f} pairs/s (median of {tp['repeats']}) |",
        f"| Trainer.train_epoch | {tp['trainer_median']:,.0f} pairs/s (median of {tp['repeats']}) |",
        f"| ratio Trainer / bare | {tp['ratio']:.3f} (goal >= {tp['goal_ratio']}: {'met' if tp['meets_goal'] else 'NOT met'}) |",
        f"| same, by CPU time | bare {tp['bare_cpu_median']:,.0f}, Trainer {tp['trainer_cpu_median']:,.0f} pairs/s: "
        f"ratio {tp['ratio_cpu_time']:.3f} |",
    ]
    st = tp.get("static_arm")
    if st:
        lines.append(f"| Trainer, {st['head_step']} head step | {st['median']:,.0f} pairs/s: ratio {st['ratio']:.3f} "
                     f"(by CPU time {st['ratio_cpu_time']:.3f}) |")
    lines += [
        f"| full run: {fr['epochs']} epochs x {fr['pairs_per_epoch']:,} pairs + val, checkpoints | "
        f"{fr['wall_s']:.1f} s wall, {fr['cpu_s']:.1f} s CPU ({fr['s_per_epoch']:.2f} s/epoch)"
        + (f"; goal < {fr['goal_s']:.0f} s: {'met' if fr['meets_goal'] else 'NOT met'}" if fr["goal_s"] else "")
        + " |",
        f"| same budget through train.py's path (HeadFit, stacked engine, one head) | {fr['head_fit_wall_s']:.1f} s "
        f"wall, {fr['head_fit_cpu_s']:.1f} s CPU: {fr['head_fit_over_trainer_wall']:.2f}x the Trainer's wall time |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    parser.add_argument("--json", default=None, help="also write the result here")
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run(args)
    print(to_markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
