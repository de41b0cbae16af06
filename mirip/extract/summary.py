"""What an extraction run reports (``ExtractSummary``): counts, failures, timings, and its text form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from mirip.extract.plan import PathRepair
from mirip.ml import compiled


@dataclass
class ExtractSummary:
    output: str
    total: int
    extracted: int
    replaced: int  # of extracted: changed files whose rows were overwritten
    skipped_cached: int
    failed: Dict[str, str]  # this run: path -> reason
    known_failed: Dict[str, str]  # failed in an earlier run, not retried
    seconds: float
    read_s: float
    infer_s: float
    write_s: float
    rows: int  # rows in the cache after the run
    world_size: int = 1
    entries: List[str] = field(default_factory=list)  # the bank's entries, in column order
    size_bytes: int = 0  # the cache file's size on disk after the run
    skipped_links: Dict[str, str] = field(default_factory=dict)  # path -> why the directory walk left it out
    repaired: int = 0  # of extracted: rows that failed their checksum, re-extracted
    verified: Optional[int] = None  # rows whose checksums were verified before the run (None: not verified)
    damaged_unlisted: List[str] = field(default_factory=list)  # damaged rows this run could not re-extract
    compile: Dict[str, object] = field(default_factory=dict)  # rank 0's CompileInfo: compiled or not, and why
    compile_ranks: List[Dict[str, object]] = field(default_factory=list)  # every rank's, under torchrun
    paths_repaired: List[PathRepair] = field(default_factory=list)  # damaged path entries given their path back
    backbone_loaded: bool = True  # False: every listed image was cached already, so the backbone was not needed

    @property
    def images_per_s(self) -> float:
        return (self.extracted + len(self.failed)) / self.seconds if self.seconds > 0 else 0.0

    @property
    def all_failed(self) -> Dict[str, str]:
        return {**self.known_failed, **self.failed}

    def to_text(self) -> str:
        per_image = f", {self.size_bytes / self.rows / 1024:.1f} KiB per image" if self.rows else ""
        lines = [
            f"cache: {self.output} ({self.rows} rows, {self.size_bytes / 2**20:.1f} MiB on disk{per_image})",
            f"feature bank: {len(self.entries)} entr{'y' if len(self.entries) == 1 else 'ies'}: {', '.join(self.entries)}",
            f"images listed: {self.total}",
            f"  extracted:            {self.extracted} ({self.replaced} changed files re-extracted)",
            f"  skipped, cached:      {self.skipped_cached}",
            f"  failed:               {len(self.failed)}",
        ]
        if self.verified or self.repaired or self.damaged_unlisted:  # nothing to say about a new cache
            lines.insert(1, f"checksums: {self.verified} cached rows verified, {self.repaired} damaged row(s) "
                            "re-extracted" + (f", {len(self.damaged_unlisted)} damaged row(s) of images not listed "
                                              f"in this run, still refused: {', '.join(self.damaged_unlisted[:10])}"
                                              if self.damaged_unlisted else ""))
        if self.paths_repaired:
            lines.insert(2 if self.verified or self.repaired or self.damaged_unlisted else 1,
                         f"path list: {len(self.paths_repaired)} damaged entr"
                         f"{'y' if len(self.paths_repaired) == 1 else 'ies'} given their path back from the images "
                         "listed, their rows re-extracted: " + "; ".join(r.describe() for r in self.paths_repaired[:10])
                         + (f" ... ({len(self.paths_repaired)} in all)" if len(self.paths_repaired) > 10 else ""))
        lines += _listing(self.failed)
        if self.skipped_links:
            lines.append(f"  symbolic links skipped: {len(self.skipped_links)}")
            lines += _listing(self.skipped_links)
        if self.known_failed:
            lines.append(f"  failed before, skipped: {len(self.known_failed)} (pass --retry-failed to try again)")
            lines += _listing(self.known_failed)
        if self.extracted or self.failed:
            lines.append(f"speed: {self.images_per_s:.1f} images/s over {self.seconds:.1f} s "
                         f"(read wait {self.read_s:.1f} s, infer {self.infer_s:.1f} s, write {self.write_s:.1f} s"
                         + (f", {self.world_size} ranks" if self.world_size > 1 else "") + ")")
        else:
            lines.append("nothing to extract: every listed image is in the cache already"
                         + ("" if self.backbone_loaded else " (the backbone was not loaded)"))
        if self.compile:
            lines.append(compiled.describe(self.compile))
            if self.world_size > 1:
                done = [r for r in self.compile_ranks if r.get("compiled")]
                seconds = [r["compile_seconds"] for r in done if r.get("compile_seconds") is not None]
                lines.append(f"  each rank decides for its own shard: {len(done)} of {self.world_size} compiled"
                             + (f" (compile up to {max(seconds):.1f} s)" if seconds else ""))
        return "\n".join(lines)


def _listing(failures: Dict[str, str], limit: int = 100) -> List[str]:
    lines = [f"    {p}: {r}" for p, r in sorted(failures.items())[:limit]]
    if len(failures) > limit:
        lines.append(f"    ... and {len(failures) - limit} more (every one is in the cache's /failed group)")
    return lines
