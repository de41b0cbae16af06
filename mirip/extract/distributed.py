"""Extraction under ``torchrun``: one shard per rank, each written to its own part file, merged into one cache.

No feature tensor crosses ranks: parts go through the (shared) filesystem and
the process group only carries control messages (barriers, small objects), so
gloo serves on CPU and GPU machines alike and NCCL is not needed. For
multi-node runs the output directory must be on a filesystem every node sees.

A rank that cannot go on (a full disk: ``CacheWriteError``) must not leave the
others waiting at the next collective: it raises a stop flag in the process
group's store, which every rank checks between batches, and all ranks then
meet once (``settle``) to learn who failed and why. Every rank leaves with the
same one-line ``RankFailed`` (exit status 2 from ``scripts/extract.py``); each
rank's part file keeps its committed rows, and the next run merges them.
"""

from __future__ import annotations

import glob
import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch.distributed as dist

from mirip.extract.writer import CacheWriter, WriteJob
from mirip.store.cache import FeatureCache
from mirip.store.cache_errors import CacheError

T = TypeVar("T")
# A rank that finished its shard waits for the slowest one at the final barrier.
BARRIER_TIMEOUT = timedelta(hours=12)


class RankFailed(CacheError):
    """Raised on every rank when one or more ranks failed during their shard; ``failed`` is [(rank, error)]."""

    def __init__(self, message: str, failed: Sequence[Tuple[int, str]] = ()):
        super().__init__(message)
        self.failed = list(failed)


class StopRequested(Exception):
    """Another rank raised the stop flag: this rank stops its shard (committed rows kept) and goes to ``settle``."""


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    # A CacheError already says what failed and what to do; anything else is named by its type too.
    return text if isinstance(exc, CacheError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "DistContext":
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain run is rank 0 of 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and give its result to every rank; its error is raised on every rank too
        (otherwise the other ranks would wait at the next barrier until the timeout)."""
        if not self.enabled:
            return fn()
        box: List[object] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            if self.is_main:
                raise value
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def gather(self, value: T) -> List[T]:
        if not self.enabled:
            return [value]
        out: List[object] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    # --- a rank that cannot go on ------------------------------------------------------------
    @staticmethod
    def _store():
        # The process group's own key-value store (torchrun's, or rank 0's TCPStore): reachable without a
        # collective, so a rank can look at it between batches without waiting for anyone.
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store: ranks still meet at settle(), only later
            return None

    @staticmethod
    def _stop_key() -> str:
        # One flag per launch and restart of a torchrun job (its store outlives a restarted worker group).
        return ("mirip/extract/stop/" + os.environ.get("TORCHELASTIC_RUN_ID", "") + "/"
                + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def request_stop(self, reason: str) -> None:
        """Tell every other rank, without waiting for them, that this rank cannot finish its shard."""
        store = self._store() if self.enabled else None
        if store is not None:
            try:
                store.set(self._stop_key(), f"rank {self.rank}: {reason}")
            except Exception:  # noqa: BLE001 - the others still learn it at settle()
                pass

    def stop_requested(self) -> bool:
        """Whether some rank has raised the stop flag (one store round trip; called between batches)."""
        store = self._store() if self.enabled else None
        if store is None:
            return False
        try:
            return bool(store.check([self._stop_key()]))
        except Exception:  # noqa: BLE001 - a store that cannot answer: carry on, settle() still tells
            return False

    def settle(self, value: T, error: Optional[BaseException] = None) -> List[T]:
        """Where every rank meets after its shard: every rank's ``value``, or, when any rank failed (``error``)
        or stopped, ``RankFailed`` on every rank naming the failed ranks and their errors.

        A rank whose own error is not a ``ValueError`` / ``OSError`` (a bug, say) re-raises it, traceback and
        all; the others report it in one line."""
        if not self.enabled:
            if error is not None:
                raise error
            return [value]
        if isinstance(error, StopRequested):
            outcome = ("stopped", None)
        elif error is not None:
            outcome = ("failed", _describe(error))
        else:
            outcome = ("ok", value)
        outcomes = self.gather(outcome)
        failed = [(r, text) for r, (status, text) in enumerate(outcomes) if status == "failed"]
        if not failed and all(status == "ok" for status, _ in outcomes):
            return [v for _, v in outcomes]
        _leave_on_our_own()
        self.barrier()  # no rank exits (and draws torchrun's SIGTERM to the rest) before every rank ignores it
        if error is not None and not isinstance(error, (StopRequested, ValueError, OSError)):
            raise error
        if not failed:
            raise RankFailed(f"extraction stopped on all {self.world_size} ranks at a stop request, but no rank "
                             "reported an error; rerun the same command to continue (committed rows are kept)")
        if len(failed) == 1:
            why = f"rank {failed[0][0]} of {self.world_size} failed: {failed[0][1]}"
        else:
            why = (f"ranks {', '.join(str(r) for r, _ in failed)} of {self.world_size} failed: "
                   + "; ".join(f"rank {r}: {text}" for r, text in failed))
        cause = None if isinstance(error, StopRequested) else error
        raise RankFailed(f"extraction stopped on all {self.world_size} ranks because {why}", failed) from cause


def _leave_on_our_own() -> None:
    """Every rank now knows the outcome and exits within moments with its own message and status. torchrun
    stops the remaining ranks with SIGTERM as soon as the first one exits, which would cut their message short
    and turn their exit status into -15: ignore it for the little time left."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def part_path(output: str, rank: int, world_size: int) -> str:
    return f"{output}.part-{rank:05d}-of-{world_size:05d}.h5"


def leftover_parts(output: str) -> List[str]:
    """Part files of ``output`` left by an interrupted distributed run (any world size)."""
    return sorted(glob.glob(glob.escape(output) + ".part-*-of-*.h5"))


def merge_parts(cache: FeatureCache, parts: List[str], order: Optional[Mapping[str, int]] = None,
                chunk: int = 4096) -> int:
    """Merge part caches into ``cache``: rows in ``order`` (path -> position; unknown paths last, by path), an
    already-cached path replacing its row, failures combined. Parts are deleted once merged. Returns rows merged.

    Safe to interrupt: a rerun merges the same parts again, replacing rows instead of duplicating them.
    """
    opened = [FeatureCache.open(p) for p in parts]
    try:
        for part in opened:
            part.check_fingerprint(cache.fingerprint, ignore=())
        order = order or {}
        rows = [(order.get(path, len(order)), path, k, r) for k, part in enumerate(opened) for r, path in enumerate(part.paths)]
        rows.sort()
        writer = CacheWriter(cache)
        for start in range(0, len(rows), chunk):
            block = rows[start:start + chunk]
            feats = np.empty((len(block), cache.dim), dtype=cache.dtype)
            views = np.empty((len(block), cache.num_views, cache.dim), dtype=cache.dtype) if cache.num_views else None
            sizes, mtimes = np.empty(len(block), np.int64), np.empty(len(block), np.int64)
            for k, part in enumerate(opened):
                mine = [i for i, (_, _, kk, _) in enumerate(block) if kk == k]
                if not mine:
                    continue
                src = [block[i][3] for i in mine]
                feats[mine] = part.features(src)
                if views is not None:
                    views[mine] = part.views(src)
                s, m = part.source_facts()
                sizes[mine], mtimes[mine] = s[src], m[src]
            writer.put(WriteJob([b[1] for b in block], sizes.tolist(), mtimes.tolist(), feats, views, {}))
        failed = {}
        for part in opened:
            failed.update(part.failure_records())
        if failed:
            writer.put(WriteJob([], [], [], None, None, failed))
        writer.close()
    finally:
        for part in opened:
            part.close()
    for p in parts:
        os.remove(p)
    return len(rows)
