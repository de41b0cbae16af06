"""A fixed-seed train and sweep on a synthetic two-entry bank, reduced to the numbers they produce.

``tests/data/golden_runs.json`` first held these numbers as computed before stage two's modules were reorganised
(issue 21); it was re-recorded (issue 27) when the score-offset parameters stopped learning from rounding noise,
an intended change of every result, on the CI machine kind (AMD EPYC, AVX2; its kernel fingerprint is stored
with the numbers). The train numbers were re-recorded once more (issue 28) when ``train.py`` moved from the
Trainer to the stacked engine the sweep uses (one head): the same step in another kernel order, so its weights,
losses and calibration moved by float rounding (at most 1.3e-5 relative, most under 3e-7; accuracies, best
epoch and every sweep number unchanged); tests/training/test_head_fit.py checks the two paths agree. ``tests/training/test_golden_runs.py`` recomputes them with the code as it is now. Regenerate only
for an intended change of results:

    python tests/_golden_runs.py --write
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from unittest import mock

import numpy as np
import pandas as pd
import torch

from _kernel_fingerprint import kernel_fingerprint

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden_runs.json")


TRAINING = dict(max_epochs=3, pairs_per_epoch=256, eval_pairs=200, batch_size=16, learning_rate=3e-3, device="cpu",
                seed=5)


def _bank(directory: str, nudged: bool = False):
    """A two-entry bank: cls@-1 wide and weakly informative, std@-1 small and informative (so per-entry
    scaling matters), 96 images over four tiers. ``nudged``: every feature one float32 step up, standing in
    for another CPU's last-bit rounding."""
    from mirip.store.cache import write_cache

    rng = np.random.default_rng(7)
    n, dim = 96, 6
    tiers = np.array(list("SABC"))[np.arange(n) % 4]
    rank = np.array([{"S": 3, "A": 2, "B": 1, "C": 0}[t] for t in tiers], dtype=np.float32)
    cls = rng.normal(size=(n, dim)).astype(np.float32) * 3.0
    cls[:, 0] += 0.8 * rank
    std = (rng.normal(size=(n, dim)) * 0.05).astype(np.float32)
    std[:, 1] += 0.06 * rank
    names = [f"img_{i:03d}.png" for i in range(n)]
    fp = {"feature_dim": 2 * dim, "feature_dtype": "float32", "feature_entries": ["cls@-1", "std@-1"],
          "feature_entry_dims": [dim, dim], "feature_entry_blocks": [2, 2], "backbone_layers": 2}
    cache = os.path.join(directory, "bank.h5")
    features = np.concatenate([cls, std], axis=1)
    if nudged:
        features = np.nextafter(features, np.float32(np.inf))
    write_cache(cache, fp, names, features)
    meta = os.path.join(directory, "metadata.csv")
    pd.DataFrame({"filename": names, "tier": tiers}).to_csv(meta, index=False)
    return cache, meta


def _state(path: str) -> dict:
    from mirip.store.checkpoint import load_checkpoint_file

    return {k: v.detach().cpu().contiguous() for k, v in load_checkpoint_file(path)["model_state_dict"].items()}


def _state_sha(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].numpy().tobytes())
    return h.hexdigest()


def _state_summary(state: dict) -> dict:
    """Per tensor, its sum and 2-norm in float64: what a tolerance can compare where the hash cannot."""
    return {k: [float(v.double().sum()), float(v.double().norm())] for k, v in sorted(state.items())}


def _floats(obj):
    """Metrics as plain JSON values; floats kept exactly (repr round-trips)."""
    if isinstance(obj, dict):
        return {str(k): _floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_floats(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def train_run(cache: str, meta: str, output_dir: str) -> dict:
    """The golden single run (``mirip.training.run.train``'s result) on a bank from ``_bank``, without its plots."""
    from mirip.training.config import TrainingConfig
    from mirip.training.run import train
    from mirip.training.run_config import RunConfig

    cfg = RunConfig(features=cache, metadata=meta, output_dir=output_dir, margin=0.5, hidden_dim=16, projector_dim=8,
                    feature="cls@-1+std@-1", training=TrainingConfig(**TRAINING))
    # The two PNGs are three quarters of the run's time and none of its numbers.
    with mock.patch("mirip.training.run._save_plots"):
        return train(cfg, progress=False, log=lambda msg: None)


def compute() -> dict:
    from mirip.sweep.grid import SweepGrid
    from mirip.sweep.settings import SweepSettings
    from mirip.sweep.runner import run_sweep
    from mirip.training.config import TrainingConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache, meta = _bank(tmp)
            result = train_run(cache, meta, os.path.join(tmp, "run"))
            run = {"test": {k: result["model"][k] for k in ("accuracy", "spearman", "kendall", "total_pairs")},
                   "baseline": result["linear_baseline"]["accuracy"], "best_epoch": result["best_epoch"],
                   "history": {k: v for k, v in result["history"].items()},
                   "calibration": result["calibration"]}
            best = _state(os.path.join(tmp, "run", "best.pt"))
            run.update(best_state=_state_sha(best), best_weights=_state_summary(best))
            settings = SweepSettings(features=cache, metadata=meta, output_dir=os.path.join(tmp, "sweep"),
                                     training=TrainingConfig(**{**TRAINING, "learning_rate": 1e-4}))
            grid = SweepGrid(margin=(0.5, 1.0), hidden_dim=(16,), projector_dim=(8,), learning_rate=(3e-3,),
                             seed=(5, 6), feature=("cls@-1", "cls@-1+std@-1"))
            swept = run_sweep(grid, settings, progress=False, log=lambda msg: None)
            table = swept["results"].sort_values("config_id")
            sweep = {}
            for row in table.itertuples():
                state = _state(os.path.join(tmp, "sweep", row.checkpoint))
                sweep[row.config_id] = {"val_acc": row.val_acc, "test_acc": row.test_acc, "spearman": row.spearman,
                                        "best_epoch": int(row.best_epoch), "state": _state_sha(state),
                                        "weights": _state_summary(state)}
    finally:
        torch.set_num_threads(threads)
    return _floats({"fingerprint": kernel_fingerprint(), "train": run, "sweep": sweep})


if __name__ == "__main__":
    # Run as a script, tests/ comes first on sys.path and an installed mirip (another checkout's) could answer.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if "--write" not in sys.argv:
        print(json.dumps(compute(), indent=1))
    else:
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(compute(), f, indent=1, sort_keys=True)
        print(f"wrote {GOLDEN}")
