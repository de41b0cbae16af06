"""The sweep's reports: results.csv, summary.md (mean +- std over seeds), best.json and heatmap.png.

The winner is chosen on mean *validation* accuracy over seeds; test accuracy is
reported beside it and never consulted when choosing.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
import pandas as pd

from mirip.atomic import write_atomic_with
from mirip.sweep.grid import HYPERPARAMETERS

METRICS = ("val_acc", "test_acc", "spearman")


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def aggregate(rows: pd.DataFrame, extra_keys: Sequence[str] = ()) -> pd.DataFrame:
    """One row per grid point: mean and std over seeds of each metric, best first by mean val accuracy.

    Ties in mean val accuracy keep grid order (a stable sort); test accuracy plays no part in the order.
    ``extra_keys`` are further axes (``cache`` in a multi-cache sweep), kept first in each row.
    """
    if rows.empty:
        raise ValueError("no finished configurations to summarise")
    # Tables from before feature specs lack "feature".
    keys = list(extra_keys) + [k for k in HYPERPARAMETERS if k in rows.columns]
    out = []
    for values, g in rows.groupby(keys, sort=False, dropna=False):
        rec: Dict[str, Any] = dict(zip(keys, values))
        rec["seeds"] = len(g)
        rec["seed_list"] = sorted(int(s) for s in g["seed"])
        for m in METRICS:
            vals = g[m].to_numpy(dtype=np.float64)
            rec[f"{m}_mean"], rec[f"{m}_std"] = float(np.mean(vals)), _std(vals)
        rec["best_epoch_mean"] = float(g["best_epoch"].mean())
        rec["wall_time_s_mean"] = float(g["wall_time_s"].mean())
        best_run = g.sort_values("val_acc", ascending=False, kind="stable").iloc[0]
        rec["best_seed"], rec["best_checkpoint"] = int(best_run["seed"]), str(best_run["checkpoint"])
        out.append(rec)
    table = pd.DataFrame(out)
    return table.sort_values("val_acc_mean", ascending=False, kind="stable").reset_index(drop=True)


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}")


def summary_markdown(table: pd.DataFrame, title: str = "Sweep summary", notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", ""]
    lines += [f"{n}" for n in notes] + ([""] if notes else [])
    # A multi-cache sweep has a cache column (the backbone / image size behind each row, listed in the notes).
    cache = "cache" in table.columns
    lines += [
        "Sorted by mean validation pairwise accuracy (best first); ± is the standard deviation over seeds.",
        "",
        "| rank | " + ("cache | " if cache else "") + "features | margin | hidden | proj | lr | dropout | wd | seeds | val acc | test acc | Spearman "
        "| best epoch |",
        "| ---: | " + ("--- | " if cache else "") + "--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- "
        "| --- | ---: |",
    ]
    for i, r in table.iterrows():
        lines.append(
            f"| {i + 1} | " + (f"`{r['cache']}` | " if cache else "") + f"`{r.get('feature')}` | {r['margin']:g} | {int(r['hidden_dim'])} | {int(r['projector_dim'])} | "
            f"{r['learning_rate']:g} | {r['dropout']:g} | {r['weight_decay']:g} | {int(r['seeds'])} | "
            f"{_pm(r['val_acc_mean'], r['val_acc_std'])} | {_pm(r['test_acc_mean'], r['test_acc_std'])} | "
            f"{_pm(r['spearman_mean'], r['spearman_std'])} | {r['best_epoch_mean']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def choose_best(table: pd.DataFrame) -> Dict[str, Any]:
    """The top row of ``aggregate``: highest mean validation accuracy (never test)."""
    row = table.iloc[0]
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def train_options(best: Dict[str, Any], fixed: Dict[str, Any]) -> Dict[str, Any]:
    """Options for ``scripts/train.py`` (argparse dests) that reproduce the winner's best seed."""
    opts = dict(fixed)
    for k in HYPERPARAMETERS:
        if k in best:
            opts[k] = best[k]
    opts["seed"] = int(best["best_seed"])
    return opts


def to_argv(options: Dict[str, Any]) -> List[str]:
    """``{"hidden_dim": 512, "stratify": True}`` -> ``["--hidden-dim", "512", "--stratify"]``."""
    argv: List[str] = []
    for k, v in options.items():
        if v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [flag, repr(v) if isinstance(v, float) else str(v)]
    return argv


def save_heatmap(table: pd.DataFrame, path: str, title: str = "") -> bool:
    """Mean val (and test) accuracy over margin x (hidden, projector) dims; False without matplotlib.

    Each cell shows the grid point chosen on val accuracy among the other hyperparameters
    (lr, dropout, weight decay); the test panel shows that same point's test accuracy.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # ``table`` is sorted best first, so the first row per cell is the val-chosen one. A multi-cache sweep gets
    # one row per (cache, margin), the caches side by side in the same panel.
    table = table.copy()
    table["_row"] = ([(str(c), float(m)) for c, m in zip(table["cache"], table["margin"])] if "cache" in table.columns
                     else [("", float(m)) for m in table["margin"]])
    cells = table.drop_duplicates(["_row", "hidden_dim", "projector_dim"], keep="first")
    margins = sorted(set(cells["_row"]))
    dims = sorted({(int(h), int(p)) for h, p in zip(cells["hidden_dim"], cells["projector_dim"])})
    panels = [("val_acc_mean", "validation (selection)"), ("test_acc_mean", "test (same points)")]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.3 * len(dims) * 2 + 2), max(3.0, 0.6 * len(margins) + 2)),
                             squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        grid = np.full((len(margins), len(dims)), np.nan)
        for _, r in cells.iterrows():
            grid[margins.index(r["_row"]), dims.index((int(r["hidden_dim"]), int(r["projector_dim"])))] = r[key]
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(dims)), [f"h{h}/p{p}" for h, p in dims], rotation=45, ha="right")
        ax.set_yticks(range(len(margins)), [f"{c} m{m:g}" if c else f"{m:g}" for c, m in margins])
        ax.set_xlabel("hidden / projector dim")
        ax.set_ylabel("cache, margin" if margins[0][0] else "margin")
        ax.set_title(f"pairwise accuracy, {label}")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, color="#a00000")
    fig.tight_layout()
    try:
        write_atomic_with(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return True
