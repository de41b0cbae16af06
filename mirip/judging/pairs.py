"""Which pair a judge sees next: the ``PairSource`` protocol, a default that needs no model, and one that asks
the pairs a trained head is least sure about.

The rules every source keeps (``PairBook.eligible``): a judge never sees a pair they already judged or skipped;
a pair offered to one judge is offered to no other until it is answered, skipped or abandoned; a pair is
judged by at most ``max_judges_per_pair`` judges. Re-judging: a pair already judged by someone is offered to
another judge only when it still ranks first by the source's rule; since every judgment raises its two
drawings' counts, which both rules penalise, a judged pair comes back only once the fresher pairs near it
have been asked (in practice: after most pairs of the least-judged drawings), up to the cap.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Protocol, Sequence, Set, Tuple

import numpy as np

Pair = Tuple[int, int]
# How much one earlier judgment of either drawing weighs against certainty (|P(a better) - 0.5|) in
# ModelPairSource: ten judgments of a drawing outweigh a 0.2 difference in certainty.
FEWEST_WEIGHT = 0.02
NEIGHBOURS = 8  # a drawing is compared with the NEIGHBOURS nearest drawings in score order, the least certain
START_POOL = 16  # drawings the default source looks among first (grown when they run out of pairs): 120 pairs


def ordered(i: int, j: int) -> Pair:
    return (i, j) if i < j else (j, i)


class PairBook:
    """What the sources read: each drawing's and each pair's judgment counts, who judged or skipped what, and
    which pairs are offered right now. Not thread-safe: the judging desk holds its lock around every call."""

    def __init__(self, names: Sequence[str], max_judges_per_pair: int = 3):
        if len(names) < 2:
            raise ValueError(f"judging needs at least 2 drawings, got {len(names)}")
        if max_judges_per_pair < 1:
            raise ValueError(f"max_judges_per_pair must be >= 1, got {max_judges_per_pair}")
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.max_judges_per_pair = int(max_judges_per_pair)
        self.drawing_counts = np.zeros(len(self.names), dtype=np.int64)
        self.pair_counts: Dict[Pair, int] = {}
        self.judged: Dict[str, Set[Pair]] = {}
        self.skipped: Dict[str, Set[Pair]] = {}
        self.offered: Dict[Pair, str] = {}

    def record(self, judge: str, i: int, j: int, delta: int = 1) -> None:
        """A judgment of (i, j) by ``judge`` was stored (``delta=-1``: one was undone)."""
        pair = ordered(i, j)
        self.drawing_counts[list(pair)] += delta
        self.pair_counts[pair] = self.pair_counts.get(pair, 0) + delta
        mine = self.judged.setdefault(judge, set())
        (mine.add if delta > 0 else mine.discard)(pair)

    def eligible(self, judge: str, pair: Pair) -> bool:
        return (pair not in self.judged.get(judge, ())
                and pair not in self.skipped.get(judge, ())
                and self.offered.get(pair, judge) == judge
                and self.pair_counts.get(pair, 0) < self.max_judges_per_pair)

    def left(self, judge: str) -> int:
        """Pairs this judge could still be asked (all pairs, less those judged, skipped, full or busy)."""
        n = len(self.names)
        total = n * (n - 1) // 2
        full = {p for p, c in self.pair_counts.items() if c >= self.max_judges_per_pair}
        busy = {p for p, who in self.offered.items() if who != judge}
        gone = self.judged.get(judge, set()) | self.skipped.get(judge, set()) | full | busy
        return total - len(gone)


class PairSource(Protocol):
    """Where the page's pairs come from: up to ``n`` pairs, best first, each ``PairBook.eligible`` for ``judge``."""

    def next_pairs(self, judge: str, n: int) -> List[Pair]:
        ...


class FewestJudgedPairs:
    """No model: pairs among the drawings with the fewest judgments; fewest pair judgments, then fewest
    drawing judgments first, ties broken at random."""

    def __init__(self, book: PairBook, seed: Optional[int] = None):
        self.book, self.rng = book, np.random.default_rng(seed)

    def next_pairs(self, judge: str, n: int) -> List[Pair]:
        book, total = self.book, len(self.book.names)
        pool = min(total, START_POOL)
        while True:
            jitter = self.rng.random(total)
            drawings = np.lexsort((jitter, book.drawing_counts))[:pool]
            found = self._among(judge, drawings, n, jitter)
            if len(found) >= n or pool == total:
                return found
            pool = min(total, pool * 2)

    def _among(self, judge: str, drawings: np.ndarray, n: int, jitter: np.ndarray) -> List[Pair]:
        book, counts = self.book, self.book.drawing_counts
        keys = []
        for x, i in enumerate(drawings):
            for j in drawings[x + 1:]:
                pair = ordered(int(i), int(j))
                if book.eligible(judge, pair):
                    keys.append((book.pair_counts.get(pair, 0), counts[i] + counts[j], jitter[i] + jitter[j], pair))
        keys.sort()
        return [k[-1] for k in keys[:n]]


class ModelPairSource:
    """Pairs whose order the trained head is least sure of: smallest |P(a better) - 0.5| under the checkpoint's
    calibration, plus ``FEWEST_WEIGHT`` per earlier judgment of either drawing. Candidates are each drawing and
    its ``NEIGHBOURS`` nearest in score order (the least certain pairs by construction); when none of them is
    eligible the default source answers."""

    def __init__(self, book: PairBook, scores: Sequence[float], probability, seed: Optional[int] = None):
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(book.names),):
            raise ValueError(f"{scores.shape[0]} scores for {len(book.names)} drawings")
        self.book, self.scores, self.fallback = book, scores, FewestJudgedPairs(book, seed)
        order = np.argsort(scores, kind="stable")
        first, second = [], []
        for d in range(1, min(NEIGHBOURS, len(order) - 1) + 1):
            first.append(order[:-d])
            second.append(order[d:])
        i, j = np.concatenate(first), np.concatenate(second)
        self.i, self.j = np.minimum(i, j), np.maximum(i, j)
        self.p_a_better = np.asarray(probability(scores[self.i], scores[self.j]), dtype=np.float64)
        self.gap = np.abs(self.p_a_better - 0.5)

    def next_pairs(self, judge: str, n: int) -> List[Pair]:
        counts = self.book.drawing_counts
        key = self.gap + FEWEST_WEIGHT * (counts[self.i] + counts[self.j])
        found: List[Pair] = []
        for k in np.argsort(key, kind="stable"):
            pair = (int(self.i[k]), int(self.j[k]))
            if self.book.eligible(judge, pair):
                found.append(pair)
                if len(found) == n:
                    return found
        more = [p for p in self.fallback.next_pairs(judge, n) if p not in found]
        return found + more[: n - len(found)]


def checkpoint_scores(checkpoint: str, features: str, names: Sequence[str]):
    """(scores of ``names`` from the cache's features through the checkpoint's head, P(a better) as a function
    of two score arrays, a note when the checkpoint has no calibration)."""
    import torch

    from mirip.common.feature_spec import apply_entry_scales, checkpoint_feature_spec
    from mirip.ml.ranking_model import RankingHead
    from mirip.store.cache import FeatureCache
    from mirip.store.checkpoint import load_checkpoint_file
    from mirip.training.calibration import from_checkpoint, logistic_difference_cdf

    ckpt = load_checkpoint_file(checkpoint)
    if ckpt.get("head") is None:
        raise ValueError(f"{checkpoint} has no head dims (key 'head'); it was not written by mirip's Trainer")
    spec = checkpoint_feature_spec(ckpt)
    with FeatureCache.open(os.fspath(features)) as cache:
        rows = cache.rows_for(names)
        dims = [s.stop - s.start for s in cache.entry_slices(spec)]
        x = torch.from_numpy(np.asarray(cache.features(rows, spec=spec), dtype=np.float32))
    x = apply_entry_scales(x, dims, ckpt.get("feature_scales"))
    head = RankingHead(**ckpt["head"])
    head.load_head_state_dict(ckpt["model_state_dict"])
    head.eval()
    with torch.no_grad():
        scores = head.get_score(x).reshape(-1).double().numpy()
    calibration, _, why = from_checkpoint(ckpt, checkpoint)
    slope = calibration.slope if calibration is not None else 1.0

    def probability(sa, sb):
        return logistic_difference_cdf(slope * (np.asarray(sa) - np.asarray(sb)))

    return scores, probability, why
