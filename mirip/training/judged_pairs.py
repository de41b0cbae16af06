"""Teachers' judged pairs beside the tier pairs: training on them, and what a run reports about them.

Loss: the judged pairs go through the head's own margin ranking loss, the one the tier pairs train with,
so one step, one checkpoint format and the static/graph step serve both, and a run without judgments is
bit-for-bit the run it was. A tie enters as both orders at half weight each: under the margin loss that
pulls two scores to within one margin of each other and pushes no further, which is what "as good as each
other" means on a score axis. ``judgment_weight`` W is what one judged pair counts against one tier pair
of the epoch: each decisive pair is used floor(W) times per epoch plus once more with probability frac(W)
(drawn from seed and epoch), so its expected share of the loss is W times a tier pair's.

Images stay in their split: a judged pair whose drawings lie in different splits is not trained on, nor
evaluated, only counted; a pair inside val or test is held-out evidence ("agreement with judged pairs").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from mirip.common.judgments import read_judgments
from mirip.training.calibration import logistic_difference_cdf
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.judge_reliability import JudgeReliability, estimate_reliability
from mirip.training.metrics import spearman

# The demo data's latent quality column (mirip.demo.data): a known order to measure against.
REFERENCE_COLUMN = "latent_quality"
OUTCOME = {"a": 1.0, "b": 0.0, "tie": 0.5}


@dataclass
class JudgedPairs:
    """Judged pairs as positions into a list of drawings: ``outcome`` 1 when ``first`` won, 0 when ``second``
    did, 0.5 for a tie; ``judges`` the judge of each ('' when the file names none)."""

    first: np.ndarray
    second: np.ndarray
    outcome: np.ndarray
    judges: List[str]
    dropped: int = 0  # pairs naming a drawing the run left out (unreadable image)
    # Each pair's judge-reliability weight (mirip.training.judge_reliability), multiplying the judgment weight;
    # None: every pair at the judgment weight.
    reliability: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.first)

    def subset(self, keep: np.ndarray) -> "JudgedPairs":
        return JudgedPairs(self.first[keep], self.second[keep], self.outcome[keep],
                           [j for j, k in zip(self.judges, keep) if k], self.dropped,
                           None if self.reliability is None else self.reliability[keep])


def judged_positions(frame: pd.DataFrame, names: Sequence[str]) -> JudgedPairs:
    """A ``read_judgments`` frame as positions into ``names``; pairs naming anything else are dropped, counted."""
    at = {n: i for i, n in enumerate(names)}
    keep = np.array([a in at and b in at for a, b in zip(frame["a"], frame["b"])], dtype=bool)
    kept = frame[keep]
    return JudgedPairs(np.array([at[a] for a in kept["a"]], dtype=np.int64),
                       np.array([at[b] for b in kept["b"]], dtype=np.int64),
                       np.array([OUTCOME[w] for w in kept["winner"]], dtype=np.float64),
                       [str(j) for j in kept["judge"]], dropped=int((~keep).sum()))


def load_judged_pairs(path: str, names: Sequence[str], excluded: Sequence[str] = (),
                      encoding: Optional[str] = None) -> Tuple[JudgedPairs, int]:
    """(the file's pairs as positions into ``names``, the repeated pairs it holds). A drawing the run left out as
    unreadable (``excluded``) drops its pairs; any other unknown drawing is refused with the rest of the file's errors."""
    frame = read_judgments(path, encoding=encoding, known=set(names) | set(excluded))
    return judged_positions(frame, names), int(frame.attrs.get("repeats", 0))


def split_judged(pairs: JudgedPairs, splits: Mapping[str, np.ndarray], num_drawings: int
                 ) -> Tuple[Dict[str, JudgedPairs], int]:
    """({split: its pairs as positions into the split's rows}, pairs across splits, which no split gets)."""
    owner = np.full(num_drawings, -1)
    local = np.zeros_like(owner)
    names = list(splits)
    for k, split in enumerate(names):
        rows = np.asarray(splits[split], dtype=np.int64)
        owner[rows] = k
        local[rows] = np.arange(len(rows))
    same = (owner[pairs.first] == owner[pairs.second]) & (owner[pairs.first] >= 0)
    out = {}
    for k, split in enumerate(names):
        keep = same & (owner[pairs.first] == k)
        sub = pairs.subset(keep)
        sub.first, sub.second = local[sub.first], local[sub.second]
        out[split] = sub
    return out, int((~same).sum())


def expand_judged(pairs: JudgedPairs, weight: float, seed: int, epoch: int) -> Tuple[np.ndarray, ...]:
    """One epoch's judged training pairs as (first, second, labels ±1): decisive pairs at weight W, each tie as
    both orders at W/2, each times its judge's reliability weight when the pairs carry one; fractional weights
    by a draw from (seed, epoch)."""
    decisive = pairs.outcome != 0.5
    ties = ~decisive
    first = np.concatenate([pairs.first[decisive], pairs.first[ties], pairs.first[ties]])
    second = np.concatenate([pairs.second[decisive], pairs.second[ties], pairs.second[ties]])
    labels = np.concatenate([np.where(pairs.outcome[decisive] == 1.0, 1, -1), np.ones(ties.sum()),
                             -np.ones(ties.sum())]).astype(np.int64)
    weights = np.concatenate([np.full(decisive.sum(), weight), np.full(2 * ties.sum(), weight / 2)])
    if pairs.reliability is not None:
        r = pairs.reliability
        weights = weights * np.concatenate([r[decisive], r[ties], r[ties]])
    rng = np.random.default_rng([int(seed), int(epoch), 7])
    copies = np.floor(weights).astype(np.int64) + (rng.random(len(weights)) < weights - np.floor(weights))
    take = np.repeat(np.arange(len(weights)), copies)
    return first[take], second[take], labels[take]


class JudgedFeaturePairDataset(FeaturePairDataset):
    """``FeaturePairDataset``'s tier pairs plus the split's judged pairs (``expand_judged``), shuffled together
    per epoch from (seed, epoch). Without judged pairs it serves exactly the tier pairs."""

    def __init__(self, features: torch.Tensor, ranks, *, judged: JudgedPairs, weight: float = 1.0, **kwargs):
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"judgment weight must be a non-negative number, got {weight}")
        self.judged, self.weight = judged, float(weight)
        self._mixed: Optional[Tuple[int, Tuple[np.ndarray, ...]]] = None
        super().__init__(features, ranks, **kwargs)

    def pair_arrays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        epoch = self._pairs.epoch
        if self._mixed is None or self._mixed[0] != epoch:
            tier = (self._pairs.first, self._pairs.second, self._pairs.labels)
            judged = expand_judged(self.judged, self.weight, self._pairs.seed, epoch)
            order = np.random.default_rng([self._pairs.seed, epoch, 8]).permutation(len(tier[0]) + len(judged[0]))
            self._mixed = (epoch, tuple(np.concatenate([t, j])[order] for t, j in zip(tier, judged)))
        return self._mixed[1]

    @property
    def num_pairs(self) -> int:
        return len(self.pair_arrays()[0])

    def __len__(self) -> int:
        return math.ceil(self.num_pairs / self.batch_size)


def judged_training_set(train: FeaturePairDataset, judged: JudgedPairs, weight: float) -> JudgedFeaturePairDataset:
    """The train split's dataset with its judged pairs mixed in (same features, rows, pairs and seed)."""
    return JudgedFeaturePairDataset(
        train.features, train.ranks, judged=judged, weight=weight, rows=train.rows.cpu().numpy(),
        names=train.names, num_pairs=train._pairs.num_pairs, batch_size=train.batch_size, seed=train._pairs.seed,
        epoch=train.epoch, balance=train._pairs.balance, what=train.what, check_finite=False)


# --- what a run reports ------------------------------------------------------------------------------
def judged_hits(scores: np.ndarray, pairs: JudgedPairs) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, hit) of the decisive judged pairs: 1 where the score order agrees with the judged winner,
    0 where it does not, 1/2 for a score tie."""
    decisive = pairs.outcome != 0.5
    first, second = pairs.first[decisive], pairs.second[decisive]
    diff = scores[first] - scores[second]
    won = np.where(pairs.outcome[decisive] == 1.0, 1.0, -1.0)
    return first, second, np.where(diff == 0, 0.5, (np.sign(diff) == won).astype(float))


def judged_agreement(scores: np.ndarray, pairs: JudgedPairs) -> Dict[str, Any]:
    """How often the score order agrees with the judged winner, over decisive pairs (a score tie counts half);
    ties between drawings are counted, not scored."""
    hits = judged_hits(scores, pairs)[2]
    return {"pairs": int(len(hits)), "ties": int(len(pairs) - len(hits)),
            "agreement": float(hits.mean()) if len(hits) else None}


def within_tier_spearman(scores: np.ndarray, ranks: np.ndarray, reference: np.ndarray) -> Dict[str, Any]:
    """Spearman of the scores with a known order, over all drawings and within each tier (tiers of 3 or more
    drawings); ``within`` is the tiers' mean weighted by their sizes."""
    scores, ranks, reference = map(np.asarray, (scores, ranks, reference))
    by_tier, sizes = {}, {}
    for r in sorted(set(ranks.tolist()), reverse=True):
        mask = ranks == r
        if mask.sum() >= 3:
            by_tier[int(r)] = float(spearman(scores[mask], reference[mask]))
            sizes[int(r)] = int(mask.sum())
    total = sum(sizes.values())
    within = sum(by_tier[r] * sizes[r] for r in by_tier) / total if total else None
    return {"overall": float(spearman(scores, reference)), "within": within, "by_tier": by_tier}


def judges_report(scores: np.ndarray, pairs: JudgedPairs,
                  probability: Callable[[np.ndarray], np.ndarray]) -> Dict[str, Dict[str, Any]]:
    """Per judge: pairs judged, agreement with the model's order, agreement with other judges on the same pairs,
    and misfit - the mean squared standardised residual (y - p)^2 / (p (1 - p)) of the judge's decisive choices
    under the model's P(first better), the outfit mean-square CJ tools report (about 1 fits; well above 1: the
    judge disagrees with the scale more than chance explains)."""
    keys = [frozenset((int(a), int(b))) for a, b in zip(pairs.first, pairs.second)]
    winners = [int(a) if o == 1.0 else int(b) if o == 0.0 else None
               for a, b, o in zip(pairs.first, pairs.second, pairs.outcome)]
    by_pair: Dict[frozenset, List[Tuple[str, Optional[int]]]] = defaultdict(list)
    for key, judge, winner in zip(keys, pairs.judges, winners):
        by_pair[key].append((judge, winner))
    p = np.clip(probability(scores[pairs.first] - scores[pairs.second]), 1e-6, 1 - 1e-6)
    report = {}
    for judge in sorted(set(pairs.judges)):
        mine = np.array([j == judge for j in pairs.judges])
        decisive = mine & (pairs.outcome != 0.5)
        y = pairs.outcome[decisive]
        model = judged_agreement(scores, pairs.subset(mine))["agreement"]
        agree = [winners[i] == other for i in np.flatnonzero(decisive) for who, other in by_pair[keys[i]]
                 if who != judge and other is not None]
        residual = (y - p[decisive]) ** 2 / (p[decisive] * (1 - p[decisive]))
        report[judge or "(unnamed)"] = {
            "pairs": int(mine.sum()), "agreement_with_model": model,
            "agreement_with_judges": float(np.mean(agree)) if agree else None, "shared_judgments": len(agree),
            "misfit": float(residual.mean()) if len(residual) else None}
    return report


# --- a training run with judgments --------------------------------------------------------------------
@dataclass
class RunJudgments:
    """A run's judged pairs: all of them (positions into the run's drawings), per split, and the counts."""

    pairs: JudgedPairs
    by_split: Dict[str, JudgedPairs]
    info: Dict[str, Any]


def weigh_by_reliability(train_pairs: JudgedPairs, train_ranks: np.ndarray) -> JudgeReliability:
    """Fit the judges' reliabilities on the train split's judged pairs alone (positions into the train rows, whose
    tiers anchor the fit), set each pair's weight by its judge (in place); the fit."""
    fit = estimate_reliability(train_pairs.first, train_pairs.second, train_pairs.outcome, train_pairs.judges,
                               train_ranks)
    train_pairs.reliability = fit.pair_weights(train_pairs.judges)
    return fit


def attach_judgments(path: str, weight: float, data, datasets: Dict[str, Optional[FeaturePairDataset]],
                     encoding: Optional[str] = None, log: Callable[[str], None] = print,
                     reliability: bool = False) -> RunJudgments:
    """Read the run's judgments, split them by the run's split, mix the train split's into its pairs (in
    ``datasets``, in place; with ``reliability``, each weighted by its judge's fitted reliability) and say in one
    line what was used and what was not."""
    pairs, repeats = load_judged_pairs(path, data.names, list(data.excluded), encoding)
    by_split, across = split_judged(pairs, data.splits, len(data.names))
    fit = weigh_by_reliability(by_split["train"], data.ranks[data.splits["train"]]) if reliability else None
    if datasets.get("train") is not None and weight > 0:
        datasets["train"] = judged_training_set(datasets["train"], by_split["train"], weight)
    info = {"file": path, "weight": float(weight), "pairs": len(pairs) + pairs.dropped, "repeated_pairs": repeats,
            "across_splits": across, "with_unreadable_images": pairs.dropped,
            "per_split": {s: len(p) for s, p in by_split.items()}}
    if fit is not None:
        info["judge_reliability"] = fit.report()
    log(f"judgments: {info['pairs']} judged pairs from {path} ({repeats} repeats kept as evidence) | "
        + " | ".join(f"{s} {n}" for s, n in info["per_split"].items())
        + f" | {across} across splits, not used" + (f" | {pairs.dropped} with unreadable images" if pairs.dropped else "")
        + f" | weight {weight:g} per judged pair" + (" x its judge's reliability weight" if fit else "")
        + " (margin loss, ties as both orders at half weight)")
    if fit is not None:
        log(fit.summary())
    return RunJudgments(pairs, by_split, info)


@torch.no_grad()
def all_scores(model, features: torch.Tensor, chunk: int = 65_536) -> np.ndarray:
    """The head's score of every row of ``features`` (eval mode)."""
    model.eval()
    return np.concatenate([model.get_score(features[s:s + chunk].float()).reshape(-1).double().cpu().numpy()
                           for s in range(0, features.shape[0], chunk)])


def judgments_report(judged: RunJudgments, scores: np.ndarray, data, calibration=None) -> Dict[str, Any]:
    """test_metrics.json's ``judgments``: agreement with the judged pairs of val and test (held out), within-tier
    Spearman with the metadata's reference order where it has one, and the judges (over all their pairs, the
    train split's included: in-sample for the model)."""
    slope = calibration.slope if calibration is not None else 1.0
    report: Dict[str, Any] = dict(judged.info)
    for split in ("val", "test"):
        rows = data.splits[split]
        if len(rows) == 0:
            continue
        report[f"{split}_agreement"] = judged_agreement(scores[rows], judged.by_split[split])
    report["judges"] = judges_report(scores, judged.pairs, lambda d: logistic_difference_cdf(slope * d))
    fitted = judged.info.get("judge_reliability")
    if fitted is not None:  # judges with no train-split pairs were not fitted, nor trained on
        for judge, row in report["judges"].items():
            row.update({"reliability_q": fitted.get(judge, {}).get("q"),
                        "reliability_weight": fitted.get(judge, {}).get("weight")})
    report["judges_note"] = ("misfit: mean squared standardised residual under the model's P(a better) "
                             + ("from the calibration's slope" if calibration is not None else
                                "with slope 1 (no calibration)")
                             + "; judges' pairs include the train split's (in-sample)")
    return report


def reference_report(scores: np.ndarray, data) -> Optional[Dict[str, Any]]:
    """Spearman with the metadata's reference order (``REFERENCE_COLUMN``), overall and within tier, on val
    and test; None when the metadata has no such column."""
    if REFERENCE_COLUMN not in data.metadata.columns:
        return None
    reference = pd.to_numeric(data.metadata[REFERENCE_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
    out = {}
    for split in ("val", "test"):
        rows = data.splits[split]
        if len(rows) >= 3 and np.isfinite(reference[rows]).all():
            out[split] = within_tier_spearman(scores[rows], data.ranks[rows], reference[rows])
    return out or None


def judged_summary(report: Dict[str, Any], reference: Optional[Dict[str, Any]]) -> str:
    """The run's closing line about its judgments."""
    parts = []
    for split in ("val", "test"):
        a = report.get(f"{split}_agreement")
        if a and a["agreement"] is not None:
            interval = (f" [{a['interval'][0]:.3f}, {a['interval'][1]:.3f}]" if a.get("interval") else "")
            parts.append(f"{split} agreement with judged pairs {a['agreement']:.3f}{interval} ({a['pairs']} pairs)")
    for split, r in (reference or {}).items():
        if r.get("within") is not None:
            parts.append(f"{split} within-tier Spearman with the reference order {r['within']:.3f}")
    worst = max(((j, r["misfit"]) for j, r in report["judges"].items() if r["misfit"] is not None),
                key=lambda x: x[1], default=None)
    if worst is not None and len(report["judges"]) > 1:
        parts.append(f"highest judge misfit {worst[0]} {worst[1]:.2f}")
    fitted = report.get("judge_reliability")
    if fitted:
        parts.append("judge reliability weights " + ", ".join(f"{j} {r['weight']:.2f} (q {r['q']:.2f})"
                                                             for j, r in fitted.items()))
    return "judgments: " + ("; ".join(parts) if parts else "no judged pairs within val or test")
