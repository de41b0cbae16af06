"""Extraction under ``torchrun``: one shard per rank, each written to its own part file, merged into one cache.

No feature tensor crosses ranks: parts go through the (shared) filesystem and
the process group only carries control messages (barriers, small objects), so
gloo serves on CPU and GPU machines alike and NCCL is not needed. For
multi-node runs the output directory must be on a filesystem every node sees.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, List, Mapping, Optional, TypeVar

import numpy as np
import torch.distributed as dist

from mirip.features.cache import FeatureCache
from mirip.features.writer import CacheWriter, WriteJob

T = TypeVar("T")
# A rank that finished its shard waits for the slowest one at the final barrier.
BARRIER_TIMEOUT = timedelta(hours=12)


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
