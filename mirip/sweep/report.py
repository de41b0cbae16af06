"""The sweep's reports: results.csv, summary.md (mean +- std over seeds), best.json and heatmap.png.

The winner is chosen on mean *validation* accuracy over seeds; test accuracy is
reported beside it and never consulted when choosing.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from mirip.common.atomic import write_atomic_with
from mirip.sweep.grid import HYPERPARAMETERS

METRICS = ("val_acc", "test_acc", "spearman")


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def aggregate(rows: pd.DataFrame, extra_keys: Sequence[str] = ()) -> pd.DataFrame:
    """One row per grid point: mean and std over seeds (and folds) of each metric, best first by mean val accuracy.

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
        # A cross-validated sweep has one row per fold: the mean and std run over folds and seeds together.
        rec["seed_list"] = sorted({int(s) for s in g["seed"]})
        rec["seeds"] = len(rec["seed_list"])
        if "fold" in g.columns:
            rec["folds"] = int(g["fold"].nunique())
        for m in METRICS:
            vals = g[m].to_numpy(dtype=np.float64)
            rec[f"{m}_mean"], rec[f"{m}_std"] = float(np.mean(vals)), _std(vals)
        if "val_acc_low" in g.columns:  # results from before intervals lack them
            for end in ("low", "high"):
                ends = g[f"val_acc_{end}"].to_numpy(dtype=np.float64)
                rec[f"val_acc_{end}_mean"] = float(np.nanmean(ends)) if np.isfinite(ends).any() else float("nan")
        if "val_judged_agreement" in g.columns:  # a sweep with judgments
            for split in ("val", "test"):
                vals = g[f"{split}_judged_agreement"].to_numpy(dtype=np.float64)
                rec[f"{split}_judged_agreement_mean"] = float(np.nanmean(vals)) if np.isfinite(vals).any() \
                    else float("nan")
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
    judged = "val_judged_agreement_mean" in table.columns
    over = "folds and seeds" if "folds" in table.columns else "seeds"
    lines += [
        f"Sorted by mean validation pairwise accuracy (best first); ± is the standard deviation over {over}.",
        "",
    ] + ([tie_note(table), ""] if tie_note(table) else []) + ([
        "Judgment weight: what one teacher-judged pair counts against one tier pair in training (0: judged pairs "
        "reported, not trained on); val judged agreement: how often the head orders the judged pairs inside the "
        "val split as the judges did (mean over seeds; ties between drawings not scored).", ""] if judged else []) + [
        "| rank | " + ("cache | " if cache else "") + "features | margin | hidden | proj | lr | dropout | wd | "
        + ("judgment weight | " if judged else "") + "seeds | val acc | "
        + ("val judged agreement | " if judged else "") + "test acc | Spearman | best epoch |",
        "| ---: | " + ("--- | " if cache else "") + "--- | ---: | ---: | ---: | ---: | ---: | ---: | "
        + ("---: | " if judged else "") + "---: | --- | " + ("---: | " if judged else "") + "--- | --- | ---: |",
    ]
    for i, r in table.iterrows():
        lines.append(
            f"| {i + 1} | " + (f"`{r['cache']}` | " if cache else "") + f"`{r.get('feature')}` | {r['margin']:g} | {int(r['hidden_dim'])} | {int(r['projector_dim'])} | "
            f"{r['learning_rate']:g} | {r['dropout']:g} | {r['weight_decay']:g} | "
            + (f"{r['judgment_weight']:g} | " if judged else "") + f"{int(r['seeds'])} | "
            f"{_pm(r['val_acc_mean'], r['val_acc_std'])} | "
            + (f"{_pm(r['val_judged_agreement_mean'], float('nan'))} | " if judged else "")
            + f"{_pm(r['test_acc_mean'], r['test_acc_std'])} | "
            f"{_pm(r['spearman_mean'], r['spearman_std'])} | {r['best_epoch_mean']:.1f} |"
        )
    return "\n".join(lines) + "\n"


TIE_DECIMALS = 4  # accuracies are shown to 4 decimals: values a reader cannot tell apart there are a tie
TIE_BREAK = ("the unrounded mean validation accuracy, then the order of results.csv (the order they were "
             "trained in); test accuracy is never consulted")


def validation_ties(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``aggregate`` (best first) whose mean validation accuracy equals the winner's to
    ``TIE_DECIMALS`` decimals, the winner included: more than one row means the choice was a tie-break."""
    top = round(float(table["val_acc_mean"].iloc[0]), TIE_DECIMALS)
    return table[[round(float(v), TIE_DECIMALS) == top for v in table["val_acc_mean"]]]


def describe_config(row: Any) -> str:
    """``feature=cls@-1 margin=0.5 hidden=256 proj=128`` plus the other hyperparameters that vary."""
    names = {"hidden_dim": "hidden", "projector_dim": "proj", "learning_rate": "lr", "weight_decay": "wd"}
    keys = (["cache"] if "cache" in row else []) + [k for k in HYPERPARAMETERS if k in row]
    return " ".join(f"{names.get(k, k)}={row[k]:g}" if isinstance(row[k], float) else f"{names.get(k, k)}={row[k]}"
                    for k in keys)


def interval_note(table: pd.DataFrame, shown: int = 5) -> str:
    """One sentence when other configurations' mean validation accuracy lies inside the winner's 95% interval
    (bootstrap over the val drawings): validation does not show them to be worse; else ""."""
    if "val_acc_low_mean" not in table.columns or len(table) < 2:
        return ""
    low, high = float(table["val_acc_low_mean"].iloc[0]), float(table["val_acc_high_mean"].iloc[0])
    if not (low == low and high == high):
        return ""
    inside = table.iloc[1:][table["val_acc_mean"].iloc[1:] >= low]
    if inside.empty:
        return ""
    listed = "; ".join(describe_config(r) for _, r in inside.head(shown).iterrows())
    more = f" and {len(inside) - shown} more" if len(inside) > shown else ""
    return (f"{len(inside)} other configuration(s) have a mean val accuracy inside the winner's 95% interval "
            f"[{low:.2f}, {high:.2f}] ({listed}{more}): this validation split does not show them to be worse. "
            "Prefer the simplest of them, or decide with more validation drawings or more seeds.")


def tie_note(table: pd.DataFrame) -> str:
    """The winner's ties on validation: exact ones (how many, at what value, how they were broken) and those
    inside its interval, as sentences; "" when there are none."""
    return " ".join(n for n in (_exact_tie_note(table), interval_note(table)) if n)


def _exact_tie_note(table: pd.DataFrame) -> str:
    tied = validation_ties(table)
    if len(tied) < 2:
        return ""
    others = "; ".join(describe_config(r) for _, r in tied.iloc[1:].iterrows())
    return (f"The winner ties {len(tied) - 1} other configuration(s) at val {tied['val_acc_mean'].iloc[0]:.{TIE_DECIMALS}f} "
            f"({others}); the tie was broken by {TIE_BREAK}. Validation cannot tell these apart: "
            "a larger validation split, or more seeds, could.")


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



def best_record(best: Dict[str, Any], settings: Any, features: str, weights: Sequence[str], out: str,
                extra: Optional[Dict[str, Any]] = None, chosen_on: Optional[str] = None) -> Dict[str, Any]:
    """best.json: the winner's configuration and numbers, and the ``scripts/train.py`` command that retrains it
    on ``features`` (``settings``: the sweep's ``SweepSettings``). ``extra`` keys (a multi-cache sweep's cache,
    features and backbone) come right after ``chosen_on``."""
    fixed = {"features": features, "metadata": settings.metadata, **settings.fixed()}
    fixed.update({k: getattr(settings.training, k) for k in ("device", "save_every_n_epochs")})
    options = train_options(best, fixed)
    return {
        "chosen_on": chosen_on or "mean validation pairwise accuracy over seeds (test accuracy is reported, never used)",
        **({"folds": best["folds"]} if "folds" in best else {}),
        **(extra or {}),
        "backbone_weights": ", ".join(weights),
        "config": {k: best.get(k) for k in HYPERPARAMETERS},
        "seeds": best["seed_list"],
        **{k: best[k] for k in ("val_acc_mean", "val_acc_std", "test_acc_mean", "test_acc_std",
                                 "spearman_mean", "spearman_std")},
        "best_seed": best["best_seed"],
        "checkpoint": os.path.join(out, best["best_checkpoint"]),
        "train_options": options,
        "train_argv": to_argv(options),
        "train_command": "python scripts/train.py " + " ".join(
            to_argv(options) + ["--output-dir", os.path.join(out, "best-run")]),
    }

def save_heatmap(table: pd.DataFrame, path: str, title: str = "") -> bool:
    """Mean val and test accuracy over margin x (hidden, projector) dims, one row of panels per feature spec;
    False without matplotlib.

    Each cell shows the grid point chosen on val accuracy among the other hyperparameters (lr, dropout,
    weight decay) and its std over seeds; the test panel shows that same point's test accuracy.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = table.copy()
    # A multi-cache sweep gets one row per (cache, margin), the caches side by side in the same panel.
    table["_row"] = ([(str(c), float(m)) for c, m in zip(table["cache"], table["margin"])] if "cache" in table.columns
                     else [("", float(m)) for m in table["margin"]])
    table["_spec"] = [str(f) for f in table["feature"]] if "feature" in table.columns else ""
    # ``table`` is sorted best first, so the first row per cell is the val-chosen one.
    cells = table.drop_duplicates(["_spec", "_row", "hidden_dim", "projector_dim"], keep="first")
    specs = list(dict.fromkeys(cells["_spec"]))
    margins = sorted(set(cells["_row"]))
    dims = sorted({(int(h), int(p)) for h, p in zip(cells["hidden_dim"], cells["projector_dim"])})
    panels = [("val_acc", "validation (selection)"), ("test_acc", "test (same points)")]
    width = max(4.2, 1.15 * len(dims) + 2.6)
    fig, axes = plt.subplots(len(specs), 2, figsize=(2 * width, len(specs) * max(2.6, 0.55 * len(margins) + 2.0)),
                             squeeze=False, layout="constrained")
    for col, (key, label) in enumerate(panels):
        vmin, vmax = colour_range(cells[f"{key}_mean"].to_numpy(dtype=float), cells[f"{key}_std"].to_numpy(dtype=float))
        for row, spec in enumerate(specs):
            ax = axes[row][col]
            grid, spread = np.full((len(margins), len(dims)), np.nan), np.full((len(margins), len(dims)), np.nan)
            for _, r in cells[cells["_spec"] == spec].iterrows():
                at = margins.index(r["_row"]), dims.index((int(r["hidden_dim"]), int(r["projector_dim"])))
                grid[at], spread[at] = r[f"{key}_mean"], r[f"{key}_std"]
            im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
            ax.set_xticks(range(len(dims)), [f"h{h}/p{p}" for h, p in dims])
            ax.set_yticks(range(len(margins)), [f"{c} m{m:g}" if c else f"{m:g}" for c, m in margins])
            ax.set_xlabel("hidden / projector dim")
            ax.set_ylabel("cache, margin" if margins[0][0] else "margin")
            ax.set_title((f"features {spec}\n" if spec and spec != "None" else "") + f"pairwise accuracy, {label}",
                         fontsize=10)
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    text = f"{v:.3f}" + ("" if np.isnan(spread[i, j]) else f"\n± {spread[i, j]:.3f}")
                    ax.text(j, i, text, ha="center", va="center", fontsize=9, color=_text_colour(im, v))
        fig.colorbar(im, ax=list(axes[:, col]), fraction=0.046, label=f"mean {label.split(' ')[0]} accuracy")
    if title:
        fig.suptitle(title, color="#a00000")
    try:
        write_atomic_with(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return True


# The narrowest colour range: below it, differences of a fraction of a percent would fill the whole scale.
MIN_COLOUR_SPAN = 0.02


def colour_range(means: np.ndarray, stds: np.ndarray) -> tuple:
    """(vmin, vmax) for accuracies: the cells' range, widened to at least four seed stds (so noise between seeds
    cannot span the scale) and ``MIN_COLOUR_SPAN``, kept inside [0, 1]."""
    means = means[~np.isnan(means)]
    if not means.size:
        return 0.0, 1.0
    spread = float(np.nanmean(stds)) if np.isfinite(stds).any() else 0.0
    lo, hi = float(means.min()), float(means.max())
    span = min(1.0, max(hi - lo, 4 * spread, MIN_COLOUR_SPAN))
    centre = (lo + hi) / 2
    lo = min(max(0.0, centre - span / 2), 1.0 - span)
    return lo, lo + span


def _text_colour(image, value: float) -> str:
    """Black on light cells, white on dark ones (viridis runs from dark purple to light yellow)."""
    r, g, b, _ = image.cmap(image.norm(value))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
