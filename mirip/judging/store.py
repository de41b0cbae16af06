"""The judges' database: one SQLite row per judgment, in WAL mode, committed before the page moves on.

Why SQLite: a school's judging is a handful of teachers each answering about one pair a second, far below the
thousands of small transactions a second SQLite sustains on one disk, and it needs no server to run. WAL lets
the export read while judges write; ``synchronous=FULL`` makes a commit survive a power cut, so the page's
"saved" means saved. Several processes may share the file (a busy timeout waits for the writer's lock).
"""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

# The judged-pairs file the training side reads (mirip/common/judgments.py's JUDGMENT_COLUMNS), in this order.
EXPORT_COLUMNS = ("a", "b", "winner", "judge", "time")
WINNERS = ("a", "b", "tie")

SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    judge TEXT NOT NULL,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie')),
    shown_at REAL NOT NULL,
    answered_at REAL NOT NULL,
    offer TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS judgments_by_judge ON judgments (judge, id);
"""


class JudgmentError(ValueError):
    """A judgment the database refuses (a replayed offer, an unknown winner)."""


@dataclass(frozen=True)
class Judgment:
    id: int
    judge: str
    a: str
    b: str
    winner: str
    shown_at: float
    answered_at: float
    offer: str


class JudgmentStore:
    """The judgments of one SQLite file; safe to share between the server's threads (one connection, a lock)."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"the folder of the judgments database {self.path} does not exist")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0, isolation_level=None)
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise JudgmentError(f"{self.path} is not a usable judgments database: {exc}") from None
        if str(mode).lower() != "wal":
            raise JudgmentError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); put it on a local disk")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, judge: str, a: str, b: str, winner: str, shown_at: float, offer: str,
            answered_at: Optional[float] = None) -> Judgment:
        """Record one judgment and commit it (durably) before returning; a replayed ``offer`` is refused."""
        if winner not in WINNERS:
            raise JudgmentError(f"winner must be one of {', '.join(WINNERS)}, got {winner!r}")
        answered = time.time() if answered_at is None else float(answered_at)
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT INTO judgments (judge, a, b, winner, shown_at, answered_at, offer) VALUES (?,?,?,?,?,?,?)",
                    (judge, a, b, winner, float(shown_at), answered, offer))
            except sqlite3.IntegrityError:
                raise JudgmentError(f"offer {offer} was already answered") from None
        return Judgment(cur.lastrowid, judge, a, b, winner, float(shown_at), answered, offer)

    def undo_last(self, judge: str) -> Optional[Judgment]:
        """Delete the judge's latest judgment and return it (None when they have none)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT * FROM judgments WHERE judge = ? ORDER BY id DESC LIMIT 1",
                                       (judge,)).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM judgments WHERE id = ?", (row[0],))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else Judgment(*row)

    def all(self) -> List[Judgment]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM judgments ORDER BY id").fetchall()
        return [Judgment(*r) for r in rows]

    def pairs_by_judge(self) -> Dict[str, List[Tuple[str, str]]]:
        out: Dict[str, List[Tuple[str, str]]] = {}
        with self._lock:
            for judge, a, b in self._db.execute("SELECT judge, a, b FROM judgments ORDER BY id"):
                out.setdefault(judge, []).append((a, b))
        return out


def export_rows(judgments: Sequence[Judgment]) -> List[dict]:
    """The training file's rows: a, b (paths relative to the image folder), winner, judge, time (UTC, ISO 8601)."""
    return [{"a": j.a, "b": j.b, "winner": j.winner, "judge": j.judge,
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(j.answered_at))} for j in judgments]


def export_csv_text(judgments: Sequence[Judgment]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(export_rows(judgments))
    return buf.getvalue()
