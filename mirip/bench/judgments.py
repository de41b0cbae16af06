"""Simulated-teacher benchmark: do teachers' judged pairs teach the order within tiers, and do the suggested
pairs teach it with fewer judgments than random ones?

The world (synthetic cached features, not the demo images: a random-weight backbone's features of the demo
drawings carry no trace of their latent quality, and real DINOv2 weights cannot be fetched offline, so only
synthetic features give a known order the head can actually learn, in seconds per retrain):

    latent quality q ~ N(0, 1) per drawing; a style s ~ N(0, 1) the tier graders also reward;
    tier = quartile of q + STYLE * s   (S top, C bottom: tiers follow quality, blurred by style)
    features = q u + s v + noise, u, v random unit directions in D dimensions, unit noise per dimension

so a head trained on tiers alone learns q + STYLE * s, which is right across tiers and half wrong within
them. The teacher answers "is a better than b?" yes with probability sigmoid(SLOPE * (q_a - q_b)) (SLOPE
per standard deviation of q; no ties).

Both arms start from the same tier-trained head. A round adds one judgment per drawing (N/2 pairs) of the
pool (the drawings the teacher sees): ``active`` asks mirip.judging.suggest.suggest_pairs' picks under the
current head's scores, as suggest_pairs.py does by default (window SUGGEST_WINDOW, spread over the pool
features' top SPREAD_COMPONENTS principal axes: the features alone, never the quality), ``random`` asks uniformly random pairs not judged before; after each round the head
is retrained from scratch on tiers + all judgments so far (mirip.training.judged_pairs, as train.py does).
Spearman with q, overall and within tier, on the held-out drawings (the scorer's: primary) and on the pool
(the judged drawings' own scale, what a CJ tool reports), averaged over seeds.

With ``--judgments-noisy-judges K`` the run asks instead whether ``train.py --judge-reliability`` helps: each
round's pairs (uniformly random, unjudged) are shared at random among ``--judgments-judges`` judges, K of whom
answer at random (``--judgments-noisy-kind random``) or against the latent order (``contrary``: the teacher's
logistic with the slope negated), the rest as the teacher above. Two arms retrain on the same judged pairs,
from the same start, with the same seed and budget: ``plain`` (every pair at the judgment weight) and
``reliability`` (each pair times its judge's weight from a noisy Bradley-Terry fit of the pool's judgments
anchored at the pool's tiers - ``weigh_by_reliability``, as train.py fits the train split's). Standalone::

    python scripts/benchmark.py --only judgments --device cpu --threads 1   # about 3 minutes on 2 busy cores
    python -m mirip.bench.judgments --quick
    python scripts/benchmark.py --only judgments --judgments-noisy-judges 1 --judgments-noisy-kind contrary
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from mirip.judging.suggest import SPREAD_COMPONENTS, SUGGEST_WINDOW, spread_embedding, suggest_pairs
from mirip.ml.ranking_model import RankingHead
from mirip.training.config import TrainingConfig
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.judged_pairs import (JudgedPairs, all_scores, judged_training_set, weigh_by_reliability,
                                        within_tier_spearman)
from mirip.training.trainer import Trainer

STYLE = 0.8  # how much the tier graders reward a style that is not quality
REPORT_AT = (1, 2, 5, 10)  # judgments per drawing shown in the table
ACTIVE_FRACTION_GOAL = 0.6
NOISY_KINDS = ("random", "contrary")
# (full default, --quick default)
DEFAULTS = {"drawings": (600, 120), "dim": (64, 16), "rounds": (10, 2), "seeds": (3, 1), "epochs": (10, 3),
            "pairs": (2000, 300)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("judgments: simulated teacher, suggested pairs vs random pairs")
    g.add_argument("--judgments-drawings", type=int, default=None,
                   help="synthetic drawings, 3/4 judged pool, 1/4 held out (600; --quick 120)")
    g.add_argument("--judgments-dim", type=int, default=None, help="feature dim D (64; --quick 16)")
    g.add_argument("--judgments-rounds", type=int, default=None,
                   help="rounds of one judgment per drawing each (10; --quick 2)")
    g.add_argument("--judgments-seeds", type=int, default=None, help="worlds averaged over (3; --quick 1)")
    g.add_argument("--judgments-epochs", type=int, default=None, help="epochs per (re)training (10; --quick 3)")
    g.add_argument("--judgments-pairs", type=int, default=None, help="tier pairs per epoch (2000; --quick 300)")
    g.add_argument("--judgments-slope", type=float, default=3.0,
                   help="the teacher's logistic slope per standard deviation of latent quality")
    g.add_argument("--judgments-weight", type=float, default=1.0, help="judgment weight W (train.py's)")
    g.add_argument("--judgments-judges", type=int, default=3,
                   help="judges sharing each round's pairs at random (with --judgments-noisy-judges)")
    g.add_argument("--judgments-noisy-judges", type=int, default=0,
                   help="K > 0: K of the judges answer noisily (--judgments-noisy-kind), and the run compares "
                        "retraining without vs with train.py --judge-reliability's weights on the same random "
                        "pairs, instead of suggested vs random pairs")
    g.add_argument("--judgments-noisy-kind", choices=NOISY_KINDS, default="random",
                   help="random: a noisy judge flips a coin; contrary: answers against the latent order "
                        "(the teacher's logistic, slope negated)")
    g.add_argument("--judgments-png", default=None,
                   help="where the curve goes (default: judgments_curve.png in --output-dir)")


def _opt(args: argparse.Namespace, name: str) -> int:
    value = getattr(args, f"judgments_{name}", None)
    return int(value) if value is not None else DEFAULTS[name][1 if getattr(args, "quick", False) else 0]


def make_world(n: int, dim: int, seed: int) -> Dict[str, np.ndarray]:
    """Latent quality, tiers (3 = S ... 0 = C), features, and the pool / held-out split of one world."""
    rng = np.random.default_rng([seed, 32])
    q, s = rng.normal(size=n), rng.normal(size=n)
    graded = q + STYLE * s
    ranks = np.searchsorted(np.quantile(graded, [0.25, 0.5, 0.75]), graded)
    u, v = (d / np.linalg.norm(d) for d in rng.normal(size=(2, dim)))
    features = (np.outer(q, u) + np.outer(s, v) + rng.normal(size=(n, dim))).astype(np.float32)
    order = rng.permutation(n)
    cut = (3 * n) // 4
    return {"quality": q, "ranks": ranks.astype(np.int64), "features": features,
            "pool": np.sort(order[:cut]), "held_out": np.sort(order[cut:])}


def teacher(quality: np.ndarray, first: np.ndarray, second: np.ndarray, slope: float,
            rng: np.random.Generator) -> np.ndarray:
    """1.0 where the teacher prefers ``first``, 0.0 where ``second``: a logistic in the quality difference."""
    p = 1.0 / (1.0 + np.exp(-slope * (quality[first] - quality[second])))
    return (rng.random(len(p)) < p).astype(np.float64)


def train_scores(world, judged: Optional[JudgedPairs], weight: float, epochs: int, pairs: int,
                 seed: int) -> np.ndarray:
    """Scores of every drawing after training a fresh head on the pool's tiers (+ the judged pairs)."""
    feats = torch.from_numpy(world["features"])
    pool = world["pool"]
    torch.manual_seed(seed)
    head = RankingHead(feats.shape[1], projector_output_dim=32, margin=1.0, hidden_dim=64, dropout=0.1)
    cfg = TrainingConfig(learning_rate=1e-3, batch_size=64, max_epochs=epochs, scheduler_t_max=epochs,
                         early_stopping_patience=0, checkpoint_dir="", device="cpu", seed=seed,
                         pairs_per_epoch=pairs)
    data = FeaturePairDataset(feats, world["ranks"][pool], rows=pool, num_pairs=pairs, batch_size=cfg.batch_size,
                              seed=seed, check_finite=False, what="judged pool")
    if judged is not None and len(judged):
        data = judged_training_set(data, judged, weight)
    Trainer(head, cfg, progress=False, log=lambda m: None).fit(data)
    return all_scores(head, feats)


def _random_pairs(n: int, count: int, done: set, rng: np.random.Generator) -> List[tuple]:
    out: List[tuple] = []
    while len(out) < count:
        i, j = (int(x) for x in rng.choice(n, 2, replace=False))
        if frozenset((i, j)) not in done:
            done.add(frozenset((i, j)))
            out.append((i, j))
    return out


def _measure(world, scores: np.ndarray) -> Dict[str, dict]:
    out = {}
    for where in ("held_out", "pool"):
        rows = world[where]
        r = within_tier_spearman(scores[rows], world["ranks"][rows], world["quality"][rows])
        out[where] = {"overall": r["overall"], "within": r["within"]}
    return out


def run_arm(world, arm: str, start: np.ndarray, rounds: int, slope: float, weight: float, epochs: int,
            pairs: int, seed: int, log=print) -> List[Dict[str, dict]]:
    """The arm's measurements after each round (index k: k + 1 judgments per drawing)."""
    pool = world["pool"]
    n = len(pool)
    quality = world["quality"][pool]
    rng = np.random.default_rng([seed, 7 if arm == "active" else 11])
    first, second, outcome = np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    done: set = set()
    counts = np.zeros(n)
    scores, out = start, []
    embedding = spread_embedding(world["features"][pool], SPREAD_COMPONENTS) if arm == "active" else None
    for k in range(rounds):
        if arm == "active":
            picks = [(i, j) for i, j, _, _ in suggest_pairs(scores[pool], counts, done, n // 2, rng=rng,
                                                            window=SUGGEST_WINDOW, embedding=embedding)]
            done.update(frozenset(p) for p in picks)
        else:
            picks = _random_pairs(n, n // 2, done, rng)
        a, b = (np.array(x, dtype=np.int64) for x in zip(*picks))
        np.add.at(counts, np.concatenate([a, b]), 1)
        first, second = np.concatenate([first, a]), np.concatenate([second, b])
        outcome = np.concatenate([outcome, teacher(quality, a, b, slope, rng)])
        judged = JudgedPairs(first, second, outcome, [""] * len(first))
        scores = train_scores(world, judged, weight, epochs, pairs, seed)
        out.append(_measure(world, scores))
        log(f"  seed {seed} {arm}: {k + 1} judgment(s) per drawing ({len(first)} pairs), held-out within-tier "
            f"Spearman {out[-1]['held_out']['within']:.3f}")
    return out


def judge_names(judges: int, noisy: int, kind: str) -> List[str]:
    """The noisy judges first (``random1``, ``contrary1``, ...), then the teacher-like ones (``teacher1``, ...)."""
    return [f"{kind}{i + 1}" for i in range(noisy)] + [f"teacher{i + 1}" for i in range(judges - noisy)]


def judge_round(quality: np.ndarray, first: np.ndarray, second: np.ndarray, slope: float, names: List[str],
                noisy: int, kind: str, rng: np.random.Generator) -> tuple:
    """(outcomes, judge of each pair): the pairs dealt evenly at random among ``names``; the first ``noisy``
    answer by ``kind``, the others as ``teacher``."""
    who = rng.permutation(np.arange(len(first)) % len(names))
    honest = teacher(quality, first, second, slope, rng)
    if kind == "random":
        noise = (rng.random(len(first)) < 0.5).astype(np.float64)
    else:
        noise = teacher(quality, first, second, -slope, rng)
    return np.where(who < noisy, noise, honest), [names[w] for w in who]


RELIABILITY_ARMS = ("plain", "reliability")


def run_reliability_arms(world, rounds: int, slope: float, weight: float, epochs: int, pairs: int, seed: int,
                         names: List[str], noisy: int, kind: str, log=print) -> tuple:
    """({arm: measurements after each round}, the judges' fit after each round): both arms on the same random
    pairs and answers, the reliability arm's pairs weighted by their judge's fitted reliability."""
    pool = world["pool"]
    n = len(pool)
    quality, ranks = world["quality"][pool], world["ranks"][pool]
    rng = np.random.default_rng([seed, 13])
    first, second, outcome, who = np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), []
    done: set = set()
    out: Dict[str, list] = {arm: [] for arm in RELIABILITY_ARMS}
    fits = []
    for k in range(rounds):
        a, b = (np.array(x, dtype=np.int64) for x in zip(*_random_pairs(n, n // 2, done, rng)))
        answers, judges = judge_round(quality, a, b, slope, names, noisy, kind, rng)
        first, second = np.concatenate([first, a]), np.concatenate([second, b])
        outcome, who = np.concatenate([outcome, answers]), who + judges
        plain = JudgedPairs(first, second, outcome, list(who))
        weighted = JudgedPairs(first, second, outcome, list(who))
        fit = weigh_by_reliability(weighted, ranks)  # train.py's: fitted on the pool's judgments, its tiers anchor
        fits.append(fit.report())
        for arm, judged in zip(RELIABILITY_ARMS, (plain, weighted)):
            out[arm].append(_measure(world, train_scores(world, judged, weight, epochs, pairs, seed)))
        within = {arm: out[arm][-1]["held_out"]["within"] for arm in RELIABILITY_ARMS}
        log(f"  seed {seed}: {k + 1} judgment(s) per drawing, held-out within-tier Spearman plain "
            f"{within['plain']:.3f}, reliability {within['reliability']:.3f} | "
            + ", ".join(f"{j} q {r['q']:.2f}" for j, r in fits[-1].items()))
    return out, fits


def _mean(rows: List[List[Dict[str, dict]]], where: str, what: str) -> List[float]:
    return [float(np.mean([seed_rows[k][where][what] for seed_rows in rows])) for k in range(len(rows[0]))]


def _reaches(active: List[float], target: float) -> Optional[int]:
    """Judgments per drawing at which the active arm first reaches ``target``; None when it never does."""
    return next((k + 1 for k, v in enumerate(active) if v >= target), None)


def run(args: argparse.Namespace) -> dict:
    n, dim, rounds = _opt(args, "drawings"), _opt(args, "dim"), _opt(args, "rounds")
    seeds, epochs, pairs = _opt(args, "seeds"), _opt(args, "epochs"), _opt(args, "pairs")
    slope, weight = float(args.judgments_slope), float(args.judgments_weight)
    if n < 16 or rounds < 1 or seeds < 1:
        raise ValueError(f"--judgments-drawings must be >= 16, rounds and seeds >= 1 (got {n}, {rounds}, {seeds})")
    judges, noisy = int(getattr(args, "judgments_judges", 3)), int(getattr(args, "judgments_noisy_judges", 0))
    if noisy:
        if not 0 < noisy <= judges:
            raise ValueError(f"--judgments-noisy-judges must be between 0 and --judgments-judges ({judges}), "
                             f"got {noisy}")
        return run_reliability(args, n, dim, rounds, seeds, epochs, pairs, slope, weight, judges, noisy)
    t0 = time.perf_counter()
    starts, arms = [], {"active": [], "random": []}
    for seed in range(seeds):
        world = make_world(n, dim, seed)
        start = train_scores(world, None, weight, epochs, pairs, seed)
        starts.append(_measure(world, start))
        print(f"  seed {seed}: tiers alone, held-out within-tier Spearman {starts[-1]['held_out']['within']:.3f}",
              flush=True)
        for arm in arms:
            arms[arm].append(run_arm(world, arm, start, rounds, slope, weight, epochs, pairs, seed))
    result = {"drawings": n, "pool": len(world["pool"]), "held_out": len(world["held_out"]), "dim": dim,
              "rounds": rounds, "seeds": seeds, "epochs": epochs, "tier_pairs_per_epoch": pairs, "slope": slope,
              "weight": weight, "style": STYLE, "threads": torch.get_num_threads(),
              "wall_s": time.perf_counter() - t0, "curves": {}, "goals": {}}
    for where in ("held_out", "pool"):
        tiers = {w: float(np.mean([s[where][w] for s in starts])) for w in ("overall", "within")}
        curve = {arm: {w: _mean(rows, where, w) for w in ("overall", "within")} for arm, rows in arms.items()}
        target = curve["random"]["within"][-1]
        reached = _reaches(curve["active"]["within"], target)
        result["curves"][where] = {"tiers_alone": tiers, **curve}
        result["goals"][where] = {
            "beats_tiers_alone": max(curve["active"]["within"][-1], target) > tiers["within"],
            "random_final_within": target, "active_reaches_at": reached,
            "active_fraction": reached / rounds if reached is not None else None,
            "active_within_goal": reached is not None and reached / rounds <= ACTIVE_FRACTION_GOAL}
    png = getattr(args, "judgments_png", None) or os.path.join(getattr(args, "output_dir", "."), "judgments_curve.png")
    result["png"] = plot_curves(result, png)
    return result


def run_reliability(args: argparse.Namespace, n: int, dim: int, rounds: int, seeds: int, epochs: int, pairs: int,
                    slope: float, weight: float, judges: int, noisy: int) -> dict:
    """Plain vs reliability-weighted retraining on the same noisy judges' pairs, averaged over seeds."""
    kind = str(getattr(args, "judgments_noisy_kind", "random"))
    names = judge_names(judges, noisy, kind)
    t0 = time.perf_counter()
    starts, arms, fits = [], {arm: [] for arm in RELIABILITY_ARMS}, []
    for seed in range(seeds):
        world = make_world(n, dim, seed)
        starts.append(_measure(world, train_scores(world, None, weight, epochs, pairs, seed)))
        print(f"  seed {seed}: tiers alone, held-out within-tier Spearman {starts[-1]['held_out']['within']:.3f}",
              flush=True)
        measured, fitted = run_reliability_arms(world, rounds, slope, weight, epochs, pairs, seed, names, noisy, kind)
        for arm in RELIABILITY_ARMS:
            arms[arm].append(measured[arm])
        fits.append(fitted)
    result = {"mode": "judge_reliability", "judges": names, "noisy_judges": noisy, "noisy_kind": kind,
              "drawings": n, "pool": len(world["pool"]), "held_out": len(world["held_out"]), "dim": dim,
              "rounds": rounds, "seeds": seeds, "epochs": epochs, "tier_pairs_per_epoch": pairs, "slope": slope,
              "weight": weight, "style": STYLE, "threads": torch.get_num_threads(), "curves": {},
              "q": {j: {what: [float(np.mean([f[k][j][what] for f in fits])) for k in range(rounds)]
                        for what in ("q_fitted", "q", "weight")} for j in names},
              "q_by_seed": [[{j: r["q"] for j, r in f[k].items()} for k in range(rounds)] for f in fits]}
    for where in ("held_out", "pool"):
        tiers = {w: float(np.mean([s[where][w] for s in starts])) for w in ("overall", "within")}
        result["curves"][where] = {"tiers_alone": tiers, **{
            arm: {w: _mean(rows, where, w) for w in ("overall", "within")} for arm, rows in arms.items()}}
        # Seeds differ more than the arms may: the final round's difference seed by seed, same world and pairs.
        result.setdefault("final_within_gain_by_seed", {})[where] = [
            r[-1][where]["within"] - p[-1][where]["within"] for r, p in zip(arms["reliability"], arms["plain"])]
    result["wall_s"] = time.perf_counter() - t0
    png = getattr(args, "judgments_png", None) or os.path.join(getattr(args, "output_dir", "."),
                                                               f"judgments_reliability_{kind}.png")
    result["png"] = plot_curves(result, png)
    return result


_ARM_LABELS = {"active": "active pairs", "random": "random pairs", "plain": "unweighted",
               "reliability": "judge reliability weights"}


def plot_curves(result: dict, path: str) -> str:
    """Within-tier Spearman against judgments per drawing, both arms and tiers alone, held out and pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(0, result["rounds"] + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, where in zip(axes, ("held_out", "pool")):
        c = result["curves"][where]
        start = c["tiers_alone"]["within"]
        for arm, style in zip([a for a in c if a != "tiers_alone"], ("o-", "s--")):
            ax.plot(x, [start] + c[arm]["within"], style, label=_ARM_LABELS.get(arm, arm))
        ax.axhline(start, color="grey", lw=1, label="tiers alone")
        ax.set_title(f"{'held-out drawings' if where == 'held_out' else 'judged pool'}")
        ax.set_xlabel("judgments per drawing")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("within-tier Spearman with latent quality")
    axes[0].legend()
    noisy = (f", {result['noisy_judges']} of {len(result['judges'])} judges {result['noisy_kind']}"
             if result.get("mode") == "judge_reliability" else "")
    fig.suptitle(f"simulated teacher (slope {result['slope']:g}){noisy}, {result['drawings']} drawings, "
                 f"mean of {result['seeds']} seed(s)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _goal_line(result: dict, where: str) -> str:
    g = result["goals"][where]
    reach = (f"active reaches it at {g['active_reaches_at']} per drawing ({g['active_fraction']:.0%} of random's "
             f"judgments)" if g["active_reaches_at"] is not None else "active never reaches it")
    return (f"tiers + judgments beat tiers alone within tiers: {'met' if g['beats_tiers_alone'] else 'NOT met'}; "
            f"random's final within-tier Spearman {g['random_final_within']:.3f}, {reach}: goal <= "
            f"{ACTIVE_FRACTION_GOAL:.0%} {'met' if g['active_within_goal'] else 'NOT met'}")


def to_markdown(result: dict) -> str:
    if result.get("mode") == "judge_reliability":
        return reliability_markdown(result)
    shown = [k for k in REPORT_AT if k <= result["rounds"]]
    lines = ["### Judgments: simulated teacher, suggested pairs vs random pairs", "",
             f"{result['drawings']} synthetic drawings ({result['pool']} judged pool, {result['held_out']} held out), "
             f"{result['dim']}-d features, tiers = quartiles of quality + {result['style']} x style; teacher "
             f"P(a better) = sigmoid({result['slope']:g} x (q_a - q_b)); judgment weight {result['weight']:g}; "
             f"each round retrains from scratch ({result['epochs']} epochs x {result['tier_pairs_per_epoch']} tier "
             f"pairs + the judged pairs); mean of {result['seeds']} seed(s); {result['wall_s']:.0f} s wall, "
             f"{result['threads']} CPU threads.", "",
             "| drawings | arm | " + " | ".join(f"{k}/drawing within (overall)" for k in shown) + " |",
             "| --- | --- |" + " ---: |" * len(shown)]
    for where in ("held_out", "pool"):
        c = result["curves"][where]
        t = c["tiers_alone"]
        lines.append(f"| {where} | tiers alone | " + " | ".join(f"{t['within']:.3f} ({t['overall']:.3f})"
                                                                for _ in shown) + " |")
        for arm in ("active", "random"):
            lines.append(f"| {where} | {arm} | " + " | ".join(
                f"{c[arm]['within'][k - 1]:.3f} ({c[arm]['overall'][k - 1]:.3f})" for k in shown) + " |")
    lines += ["", f"Held-out (primary): {_goal_line(result, 'held_out')}.", "",
              f"Judged pool: {_goal_line(result, 'pool')}.", "", f"Curve: `{result['png']}`."]
    return "\n".join(lines) + "\n"


def reliability_markdown(result: dict) -> str:
    """The plain vs reliability-weighted table, the fitted q per judge, and whether the weights helped."""
    shown = [k for k in REPORT_AT if k <= result["rounds"]]
    lines = [f"### Judgments: {result['noisy_judges']} of {len(result['judges'])} judges {result['noisy_kind']}, "
             "retrained without vs with judge reliability weights", "",
             f"{result['drawings']} synthetic drawings ({result['pool']} judged pool, {result['held_out']} held out), "
             f"{result['dim']}-d features, tiers = quartiles of quality + {result['style']} x style; random pairs "
             f"dealt evenly among judges {', '.join(result['judges'])}; teacher-like judges answer "
             f"P(a better) = sigmoid({result['slope']:g} x (q_a - q_b)); judgment weight {result['weight']:g}; "
             f"each round retrains both arms from scratch ({result['epochs']} epochs x "
             f"{result['tier_pairs_per_epoch']} tier pairs + the judged pairs); mean of {result['seeds']} seed(s); "
             f"{result['wall_s']:.0f} s wall, {result['threads']} CPU threads.", "",
             "| drawings | arm | " + " | ".join(f"{k}/drawing within (overall)" for k in shown) + " |",
             "| --- | --- |" + " ---: |" * len(shown)]
    for where in ("held_out", "pool"):
        c = result["curves"][where]
        t = c["tiers_alone"]
        lines.append(f"| {where} | tiers alone | {t['within']:.3f} ({t['overall']:.3f}) |" + " |" * (len(shown) - 1))
        for arm in RELIABILITY_ARMS:
            lines.append(f"| {where} | {_ARM_LABELS[arm]} | " + " | ".join(
                f"{c[arm]['within'][k - 1]:.3f} ({c[arm]['overall'][k - 1]:.3f})" for k in shown) + " |")
    lines += ["", "| judge | " + " | ".join(f"q at {k}/drawing (weight)" for k in shown) + " |",
              "| --- |" + " ---: |" * len(shown)]
    for judge, q in result["q"].items():
        lines.append(f"| {judge} | " + " | ".join(f"{q['q'][k - 1]:.3f} ({q['weight'][k - 1]:.3f})"
                                                 for k in shown) + " |")
    lines.append("")
    for where in ("held_out", "pool"):
        gains = result["final_within_gain_by_seed"][where]
        lines.append(f"{where}: within-tier Spearman after {result['rounds']} per drawing, reliability weights minus "
                     f"unweighted {np.mean(gains):+.3f} (per seed {', '.join(f'{g:+.3f}' for g in gains)}; weights "
                     f"better in {sum(g > 0 for g in gains)} of {len(gains)}).")
    lines += ["", f"Curve: `{result['png']}`."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default="runs/benchmark")
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
