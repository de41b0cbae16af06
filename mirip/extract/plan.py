"""What an extraction run does to a cache before and after its batches: which listed images to extract now
(``make_plan``: new, changed, damaged or retried ones), damaged path entries given their path back
(``repair_path_list``), and the check that every listed image is accounted for afterwards (``verify_complete``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from mirip.extract.config import Item
from mirip.store.cache import FeatureCache
from mirip.store.cache_errors import CacheError


@dataclass
class Plan:
    """Which listed images to extract now, and why the others are skipped."""

    todo: List[Item]
    new: int = 0
    changed: int = 0
    retried: int = 0
    cached: int = 0  # unchanged rows, skipped
    repaired: int = 0  # rows failing their checksum, re-extracted
    damaged_unlisted: List[str] = field(default_factory=list)  # damaged rows of images not in this run's list
    known_failed: Dict[str, str] = field(default_factory=dict)  # failed before, unchanged, skipped
    had_row: set = field(default_factory=set)  # paths in todo whose (stale) row a success will overwrite

    @property
    def total(self) -> int:
        return len(self.todo) + self.cached + len(self.known_failed)


def make_plan(items: Sequence[Item], cache: FeatureCache, retry_failed: bool = False,
              damaged: Sequence[int] = ()) -> Plan:
    """``damaged``: rows failing their checksums (``FeatureCache.damaged_rows``), re-extracted whatever their facts."""
    index, (sizes, mtimes) = cache.index, cache.source_facts()
    failures = cache.failure_records()
    plan = Plan(todo=[])
    damaged = set(int(r) for r in damaged)
    listed = set()
    for rel, size, mtime in items:
        row, failed = index.get(rel), failures.get(rel)
        listed.add(rel)
        if row is not None and row in damaged:
            plan.todo.append((rel, size, mtime))
            plan.repaired += 1
        elif failed is not None and (failed[1], failed[2]) == (size, mtime) and not retry_failed:
            plan.known_failed[rel] = failed[0]
        elif failed is not None and (failed[1], failed[2]) == (size, mtime):
            plan.todo.append((rel, size, mtime))
            plan.retried += 1
        elif row is not None and (int(sizes[row]), int(mtimes[row])) == (size, mtime):
            plan.cached += 1
        else:
            plan.todo.append((rel, size, mtime))
            if row is None:
                plan.new += 1
            else:
                plan.changed += 1
        if row is not None and row not in damaged and plan.todo and plan.todo[-1][0] == rel:
            plan.had_row.add(rel)
    paths = cache.paths
    plan.damaged_unlisted = sorted(paths[r] for r in damaged if paths[r] not in listed)
    return plan


@dataclass
class PathRepair:
    """One row whose path entry failed its checksum, and the listed image it holds now."""

    row: int
    stored: str  # the damaged text as it was read
    path: str  # the image the row now belongs to (its features re-extracted)
    how: str  # "checksum": the stored checksum names it; "text": the text does (its checksum was the damaged
    #           part); "reused": neither tells, so a listed image without a row takes the row over

    def describe(self) -> str:
        why = {"checksum": "named by its stored checksum", "text": "named by the stored text",
               "reused": "its own image unknown, reused for an image without a row"}[self.how]
        return f"row {self.row} ({self.stored!r}) -> {self.path} ({why})"


def repair_path_list(cache: FeatureCache, listed: Sequence[str],
                     known_failed: Sequence[str] = ()) -> List[PathRepair]:
    """Give every row whose path fails its checksum a path from ``listed`` (this run's images) and mark it for
    re-extraction (``FeatureCache.rewrite_paths``); the good rows are untouched. CacheError, writing nothing,
    when some damaged row cannot be given any listed image.

    Only images without a good row can be a damaged row's: first the one whose CRC-32 is the row's stored path
    checksum (the text was damaged), else the stored text itself (the checksum was damaged). A row neither
    tells takes over such an image that would otherwise be appended as new (never one that failed before), so
    rerunning the command that made the cache always repairs it; its own image, if listed later, is new then.
    """
    if not cache.has_checksums:
        return []
    stored = cache.stored_paths()
    bad = cache.damaged_path_rows(stored)
    if not bad:
        return []
    bad_set = set(bad)
    held = {p for r, p in enumerate(stored) if r not in bad_set}
    free = [p for p in dict.fromkeys(listed) if p not in held]
    by_crc: Dict[int, List[str]] = {}
    for p in free:
        by_crc.setdefault(zlib.crc32(p.encode("utf-8")), []).append(p)
    taken: Dict[str, int] = {}
    out: Dict[int, PathRepair] = {}
    for r, crc in zip(bad, cache.stored_path_checksums(bad).tolist()):
        hits = [p for p in by_crc.get(int(crc), []) if p not in taken]
        if len(hits) == 1:
            out[r], taken[hits[0]] = PathRepair(r, stored[r], hits[0], "checksum"), r
    free_set = set(free)
    for r in bad:
        if r not in out and stored[r] in free_set and stored[r] not in taken:
            out[r], taken[stored[r]] = PathRepair(r, stored[r], stored[r], "text"), r
    failed = set(known_failed)
    spare = [p for p in free if p not in taken and p not in failed]
    rest = [r for r in bad if r not in out]
    for r, p in zip(rest, spare):
        out[r] = PathRepair(r, stored[r], p, "reused")
    unknown = rest[len(spare):]
    if unknown:
        shown = ", ".join(f"{r} ({stored[r]!r})" for r in unknown[:10]) + (
            f" ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
        raise CacheError(
            f"the path list of feature cache {cache.path} is damaged at row(s) {shown}, and which image these rows "
            f"belong to cannot be told: none of the {len(dict.fromkeys(listed))} images listed in this run matches "
            "their stored checksum, and every listed image already has a row to keep. Nothing was changed. Rerun "
            "with --metadata / --image-dir listing every image this cache was made from (the rows are then given "
            "their paths back and re-extracted), or --overwrite to re-extract the whole cache, or restore it from a "
            "backup")
    repairs = [out[r] for r in sorted(out)]
    cache.rewrite_paths([x.row for x in repairs], [x.path for x in repairs])
    return repairs


def verify_complete(cache: FeatureCache, items: Sequence[Item]) -> None:
    """After a run every listed image has a current row or a recorded failure (DINOv2's eval asserts the same)."""
    index, (sizes, mtimes) = cache.index, cache.source_facts()
    failures = cache.failure_records()
    missing = [rel for rel, size, mtime in items
               if rel not in failures and not (rel in index and (sizes[index[rel]], mtimes[index[rel]]) == (size, mtime))]
    if missing:
        raise CacheError(f"{cache.path} is incomplete after extraction: {len(missing)} image(s) have neither a "
                         f"current row nor a recorded failure, e.g. {missing[:5]}")
    if len(set(cache.paths)) != len(cache.paths):
        raise CacheError(f"{cache.path} holds duplicate rows")
