"""Which pair a judge sees next: the ``PairSource`` protocol, a default that needs no model, and one that asks
the suggestion engine (mirip/judging/suggest.py) over a trained head's scores.

The rules every source keeps (``PairBook.eligible``): a judge never sees a pair they already judged or skipped;
a pair offered to one judge is offered to no other until it is answered, skipped or abandoned; a pair is
judged by at most ``max_judges_per_pair`` judges. Re-judging: a pair someone already judged stays open to the
other judges, but only comes first when nothing fresher is worth more. Under the model that is
``suggest_pairs``' value, whose need factor ``1 / (1 + (c_a + c_b) / 2)`` falls with every judgment of either
drawing (a pair judged once is worth at most half an unjudged pair of equally unsure, unjudged drawings);
without a model, unjudged pairs always come before judged ones. Either way a pair is asked again only after
the fresher pairs near it, up to the cap.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Protocol, Sequence, Set, Tuple

import numpy as np

from mirip.judging.suggest import DEFAULT_WINDOW, suggest_pairs

Pair = Tuple[int, int]
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

    def barred(self, judge: str) -> Set[Pair]:
        """The pairs ``judge`` may not be offered now: judged or skipped by them, full, or offered to another."""
        full = {p for p, c in self.pair_counts.items() if c >= self.max_judges_per_pair}
        busy = {p for p, who in self.offered.items() if who != judge}
        return self.judged.get(judge, set()) | self.skipped.get(judge, set()) | full | busy

    def left(self, judge: str) -> int:
        """Pairs this judge could still be asked (all pairs, less those judged, skipped, full or busy)."""
        n = len(self.names)
        return n * (n - 1) // 2 - len(self.barred(judge))


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
    """The pairs ``suggest_pairs`` values most for ``judge`` (the model's uncertainty under the calibration, the
    ensemble members' disagreement, the need of the least-judged drawings), every pair ``PairBook.barred`` for
    the judge passed to it as already judged. Its candidates are each drawing's ``window`` neighbours in score
    order; when those are spent for this judge, the window widens once (x4), then ``FewestJudgedPairs`` answers.

    ``scores``: (N,) or (members, N); ``probability``: score difference -> P(a better), as ``suggest_pairs``."""

    def __init__(self, book: PairBook, scores, probability: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                 seed: Optional[int] = None, window: int = DEFAULT_WINDOW):
        scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
        if scores.ndim != 2 or scores.shape[1] != len(book.names):
            raise ValueError(f"scores of shape {scores.shape} for {len(book.names)} drawings")
        self.book, self.scores, self.probability, self.window = book, scores, probability, int(window)
        self.rng = np.random.default_rng(seed)
        self.fallback = FewestJudgedPairs(book, seed)

    def next_pairs(self, judge: str, n: int) -> List[Pair]:
        barred = [frozenset(p) for p in self.book.barred(judge)]
        found: List[Pair] = []
        for window in (self.window, 4 * self.window):
            picks = suggest_pairs(self.scores, self.book.drawing_counts, barred, n, probability=self.probability,
                                  rng=self.rng, window=window)
            found = [ordered(i, j) for i, j, _, _ in picks]
            if len(found) == n or window >= len(self.book.names) - 1:
                return found
        more = [p for p in self.fallback.next_pairs(judge, n) if p not in found]
        return found + more[: n - len(found)]
