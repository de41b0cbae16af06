"""The judging desk: offers pairs to judges, takes their answers into the database, undoes, skips.

One lock around the in-memory book (counts, offers) keeps two judges from being offered the same pair; the
database write happens before an answer returns, so what the page shows next is already saved.
"""

from __future__ import annotations

import csv
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from mirip.judging.pairs import FewestJudgedPairs, PairBook, PairSource, ordered
from mirip.judging.store import JudgmentError, JudgmentStore

CHOICES = ("a", "b", "tie", "skip")
OFFER_TTL_S = 600.0  # an offer left unanswered this long (a closed tab) goes back to the pool


class DeskError(Exception):
    """A request the desk refuses; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Offer:
    id: str
    judge: str
    left: int
    right: int
    shown_at: float


def read_judges(path: str) -> Dict[str, str]:
    """token -> judge name from a ``name,token`` CSV; every problem names the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"judges file not found: {path}")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"name", "token"} <= {f.strip() for f in reader.fieldnames}:
            raise ValueError(f"{path}: the header must name the columns name,token (got {reader.fieldnames})")
        tokens: Dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            name, token = (row.get("name") or "").strip(), (row.get("token") or "").strip()
            if not name or len(token) < 8:
                raise ValueError(f"{path} line {line}: each judge needs a name and a token of 8+ characters")
            if token in tokens:
                raise ValueError(f"{path} line {line}: token of {name!r} is also {tokens[token]!r}'s")
            tokens[token] = name
    if not tokens:
        raise ValueError(f"{path}: no judges listed")
    return tokens


class JudgingDesk:
    """Pairs for judges out of ``source`` over ``book``, answers into ``store``."""

    def __init__(self, store: JudgmentStore, book: PairBook, source: Optional[PairSource] = None,
                 image_dir: str = ".", judges: Optional[Dict[str, str]] = None):
        self.store, self.book = store, book
        self.source = source if source is not None else FewestJudgedPairs(book)
        self.image_dir = os.path.realpath(image_dir)
        self.judges = dict(judges or {})
        self.offers: Dict[str, Offer] = {}
        self.open: Dict[str, str] = {}  # judge -> their one open offer id
        self.unknown = 0  # stored judgments of drawings no longer in the metadata
        self._lock = threading.Lock()
        for judge, pairs in store.pairs_by_judge().items():
            for a, b in pairs:
                if a in book.index and b in book.index:
                    book.record(judge, book.index[a], book.index[b])
                else:
                    self.unknown += 1

    def judge_of(self, token: Optional[str]) -> Optional[str]:
        for known, name in self.judges.items():  # compared one by one, in constant time each
            if token is not None and secrets.compare_digest(known.encode(), token.encode()):
                return name
        return None

    def image_path(self, judge: str, index: int) -> str:
        """The file of drawing ``index``, only when it is in the judge's open offer."""
        offer = self.offers.get(self.open.get(judge, ""))
        if offer is None or index not in (offer.left, offer.right):
            raise DeskError(404, f"drawing {index} is not in your current pair")
        return os.path.join(self.image_dir, self.book.names[index])

    def next(self, judge: str) -> dict:
        with self._lock:
            self._release(judge)
            return self._offer_next(judge)

    def answer(self, judge: str, offer_id: str, choice: str) -> dict:
        if choice not in CHOICES:
            raise DeskError(400, f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self._lock:
            offer = self._open_offer(judge, offer_id)
            pair = ordered(offer.left, offer.right)
            if choice == "skip":
                self.book.skipped.setdefault(judge, set()).add(pair)
            else:
                names = self.book.names
                try:
                    self.store.add(judge, names[offer.left], names[offer.right], choice, offer.shown_at, offer.id)
                except JudgmentError as exc:
                    raise DeskError(409, str(exc)) from None
                self.book.record(judge, offer.left, offer.right)
            self._release(judge)
            return self._offer_next(judge)

    def undo(self, judge: str) -> dict:
        """Delete the judge's last judgment and offer that pair again."""
        with self._lock:
            last = self.store.undo_last(judge)
            self._release(judge)
            if last is None:
                return {**self._offer_next(judge), "undone": None}
            index = self.book.index
            undone = {"a": last.a, "b": last.b, "offer": last.offer}
            if last.a in index and last.b in index:
                left, right = index[last.a], index[last.b]
                self.book.record(judge, left, right, delta=-1)
                if self.book.eligible(judge, ordered(left, right)):
                    return {**self._make_offer(judge, left, right), "undone": undone}
            return {**self._offer_next(judge), "undone": undone}

    def _open_offer(self, judge: str, offer_id: str) -> Offer:
        offer = self.offers.get(offer_id) if isinstance(offer_id, str) else None
        if offer is None:
            raise DeskError(409, "this pair is not open (unknown, already answered or expired); ask for the next one")
        if offer.judge != judge:
            raise DeskError(403, "this pair was offered to another judge")
        return offer

    def _release(self, judge: str) -> None:
        offer = self.offers.pop(self.open.pop(judge, ""), None)
        if offer is not None:
            self.book.offered.pop(ordered(offer.left, offer.right), None)

    def _expire(self) -> None:
        now = time.time()
        for judge in [j for j, o in self.open.items() if now - self.offers[o].shown_at > OFFER_TTL_S]:
            self._release(judge)

    def _offer_next(self, judge: str) -> dict:
        self._expire()
        pairs = self.source.next_pairs(judge, 1)
        if not pairs:
            return self._status(judge, None)
        i, j = pairs[0]
        left, right = (i, j) if np.random.random() < 0.5 else (j, i)  # which side a drawing is on: no pattern
        return self._make_offer(judge, left, right)

    def _make_offer(self, judge: str, left: int, right: int) -> dict:
        offer = Offer(secrets.token_urlsafe(12), judge, left, right, time.time())
        self.offers[offer.id] = offer
        self.open[judge] = offer.id
        self.book.offered[ordered(left, right)] = judge
        return self._status(judge, offer)

    def _status(self, judge: str, offer: Optional[Offer]) -> dict:
        names = self.book.names
        pair = None if offer is None else {
            "offer": offer.id, "a": {"id": offer.left, "name": names[offer.left]},
            "b": {"id": offer.right, "name": names[offer.right]}}
        # No per-session count here: the page counts what it answered itself, since it opened.
        return {"judge": judge, "pair": pair, "judged_total": len(self.book.judged.get(judge, ())),
                "left": self.book.left(judge)}


def drawings_under(image_dir: str, names: Sequence[str], where: str) -> List[str]:
    """The drawings' relative paths, each checked to be a file inside ``image_dir`` (no path escapes it)."""
    root = os.path.realpath(image_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    out = []
    for line, name in enumerate(names, start=2):
        full = os.path.realpath(os.path.join(root, str(name)))
        if os.path.commonpath([root, full]) != root:
            raise ValueError(f"{where} line {line}: {name!r} points outside the image folder {image_dir}")
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{where} line {line}: {name!r} is not a file under {image_dir}")
        out.append(str(name))
    return out
