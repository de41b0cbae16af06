"""Stage one: extract frozen-backbone features for a set of images into an HDF5 cache.

    list images -> load backbone -> open/create cache (fingerprint checked) -> plan
    -> reader (DataLoader workers) -> mapper (backbone) -> writer (background thread) -> summary

The plan is what makes reruns cheap and kills harmless: an image is extracted
only when it has no row yet, its file changed (size or mtime), its row fails
its checksum (a damaged cache is repaired, not reported cached), or it failed
before and ``retry_failed`` is set. Rows are committed batch by batch, so a
killed run, or one stopped by a full disk, resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mirip.atomic import write_atomic
from mirip.devices import PRECISIONS
from mirip.feature_spec import EXTRACT_POOLINGS
from mirip.features.cache import CacheError, FeatureCache
from mirip.features.distributed import DistContext, StopRequested, leftover_parts, merge_parts, part_path
from mirip.features.mapper import Mapper, Normalizer
from mirip.features.reader import ImageFileDataset, ReadBatch, collate, list_images, source_facts
from mirip.features.writer import CacheWriter, WriteJob
from mirip.fingerprint import ENVIRONMENT_FIELDS, make_fingerprint
from mirip.ml import compiled
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.preprocessing import RESIZE_MODES, Preprocessor

FEATURE_DTYPES = ("float32", "float16")
Item = Tuple[str, int, int]  # (relative path, size, mtime_ns)


@dataclass
class ExtractConfig:
    """Every choice of an extraction run; saved as JSON beside the cache (``<cache>.json``)."""

    image_dir: str
    metadata: Optional[str] = None
    output: Optional[str] = None  # default: cache_dir/<backbone>-<size>px-<pooling>-<hash8>.h5
    filename_column: str = "filename"
    backbone: str = "facebook/dinov2-large"
    random_init: bool = False
    image_size: int = 768
    resize_mode: str = "pad"
    pooling: Union[str, List[str]] = "cls"  # a list (cls, mean, std) with ``layers`` makes a feature bank
    layers: Optional[List[int]] = None  # None: the last block only (-1); 1-based, or negative from the last
    precision: Optional[str] = None  # None: bf16 on CUDA, fp32 on CPU
    batch_size: int = 32
    num_workers: Optional[int] = None  # None: from the CPU count
    device: Optional[str] = None
    feature_dtype: str = "float32"
    views: int = 0
    retry_failed: bool = False
    overwrite: bool = False
    strict: bool = False
    cache_dir: str = "cache"
    progress: bool = True
    tier_column: Optional[str] = None  # checked in the metadata when set (scripts/extract.py: "tier")
    encoding: Optional[str] = None  # of the metadata CSV; None: UTF-8, else CP949 with a notice
    allow_outside_links: bool = False  # follow symbolic links resolving outside image_dir
    max_image_pixels: Optional[int] = None  # None: mirip.preprocessing.MAX_IMAGE_PIXELS
    verify: bool = True  # check every cached row's checksum first and re-extract the damaged ones
    # How the backbone runs; none of it changes the numbers beyond the precision's tolerance or the fingerprint.
    compile: str = "auto"  # off / auto (CUDA only, from the break-even image count on) / on
    sdpa_backend: str = "auto"  # auto (torch's own choice; measured when compiling on CUDA), flash, cudnn, ...
    compile_backend: str = "inductor"  # torch.compile backend (tests use "eager": tracing without code generation)

    def __post_init__(self):
        checks = [
            (self.image_size >= 14, f"image_size must be >= 14, got {self.image_size}"),
            (self.resize_mode in RESIZE_MODES, f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}"),
            (all(p in EXTRACT_POOLINGS for p in self.poolings) and len(self.poolings) > 0,
             f"pooling must be one or more of {EXTRACT_POOLINGS}, got {self.pooling!r}"),
            (self.layers is None or (len(self.layers) > 0 and all(int(l) != 0 for l in self.layers)),
             f"layers must be non-zero block indices (1-based, or negative from the last), got {self.layers!r}"),
            (self.precision is None or self.precision in PRECISIONS,
             f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.num_workers is None or self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.feature_dtype in FEATURE_DTYPES, f"feature_dtype must be one of {FEATURE_DTYPES}, got {self.feature_dtype!r}"),
            (self.views >= 0, f"views must be >= 0, got {self.views}"),
            (self.compile in compiled.COMPILE_MODES,
             f"compile must be one of {compiled.COMPILE_MODES}, got {self.compile!r}"),
            (self.sdpa_backend in compiled.SDPA_CHOICES,
             f"sdpa_backend must be one of {compiled.SDPA_CHOICES}, got {self.sdpa_backend!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def poolings(self) -> List[str]:
        return [self.pooling] if isinstance(self.pooling, str) else list(self.pooling)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def workers(self, device: str) -> int:
        if self.num_workers is not None:
            return self.num_workers
        cpus = os.cpu_count() or 1
        # On CPU the backbone needs the cores itself; on a GPU, decoding is the CPU's only job.
        return min(16, max(1, cpus - 1)) if device.startswith("cuda") else min(2, max(0, cpus // 2))


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
    paths_repaired: List["PathRepair"] = field(default_factory=list)  # damaged path entries given their path back

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
        lines.append(f"speed: {self.images_per_s:.1f} images/s over {self.seconds:.1f} s "
                     f"(read wait {self.read_s:.1f} s, infer {self.infer_s:.1f} s, write {self.write_s:.1f} s"
                     + (f", {self.world_size} ranks" if self.world_size > 1 else "") + ")")
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


# --- pieces of the run ---------------------------------------------------------------------------
def fingerprint_hash(fingerprint: dict) -> str:
    meaning = {k: v for k, v in fingerprint.items() if k not in ENVIRONMENT_FIELDS}
    return hashlib.sha256(json.dumps(meaning, sort_keys=True).encode()).hexdigest()[:8]


def default_output(fingerprint: dict, cache_dir: str = "cache") -> str:
    """``cache/dinov2-large-768px-cls-1a2b3c4d.h5``: readable, and distinct for every fingerprint."""
    short = os.path.basename(str(fingerprint["backbone"]).rstrip("/")) or "backbone"
    pooling = str(fingerprint["pooling"]).replace(",", "+")
    blocks = set(fingerprint.get("feature_entry_blocks") or [])
    layers = f"-{len(blocks)}L" if len(blocks) > 1 else ""
    name = f"{short}-{fingerprint['image_size']}px-{pooling}{layers}-{fingerprint_hash(fingerprint)}.h5"
    return os.path.join(cache_dir, name)


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


def write_config_json(config: ExtractConfig, output: str, fingerprint: dict, last_run: Optional[dict] = None) -> str:
    """``<cache>.json``: the run's config and the fingerprint; after a run also ``last_run`` (how it ran)."""
    path = output + ".json"
    record = {"config": config.to_dict(), "fingerprint": fingerprint}
    if last_run is not None:
        record["last_run"] = last_run
    write_atomic(path, json.dumps(record, indent=2, default=str))
    return path


def open_for_append(output: str, fingerprint: dict, overwrite: bool) -> FeatureCache:
    """Create the cache, or open it for appending after checking that every fingerprint field matches."""
    if overwrite or not os.path.exists(output):
        for part in leftover_parts(output):
            os.remove(part)
        return FeatureCache.create(output, fingerprint, overwrite=overwrite)
    cache = FeatureCache.open(output, "a")
    try:
        # Versions count too: rows from another torch/transformers could differ in the last bits.
        cache.check_fingerprint(fingerprint, ignore=())
    except ValueError as exc:
        cache.close()
        raise CacheError(f"{exc}. Refusing to append; pass --overwrite to start over, "
                         "or a different --output for these settings") from None
    return cache


@dataclass
class RunStats:
    extracted: int = 0
    failed: Dict[str, str] = field(default_factory=dict)
    read_s: float = 0.0
    infer_s: float = 0.0
    write_s: float = 0.0
    seconds: float = 0.0
    startup_s: float = 0.0  # until the first batch arrives (worker start-up, first decode)
    compile: Dict[str, object] = field(default_factory=dict)  # this rank's CompileInfo.to_dict()


def _make_loader(items: Sequence[Item], extractor: DINOv2FeatureExtractor, preprocessor: Preprocessor,
                 config: ExtractConfig) -> Tuple[DataLoader, Optional[Normalizer]]:
    """The reader over ``items``, and the GPU-side normaliser when the pixels it ships are 8-bit."""
    cuda = str(extractor.device).startswith("cuda")
    workers = config.workers(str(extractor.device))
    # On a GPU, workers ship 8-bit pixels and the GPU normalises them (4x less data to move and pin).
    dataset = ImageFileDataset(config.image_dir, items, preprocessor, config.views, uint8=cuda)
    normalizer = Normalizer(preprocessor.mean, preprocessor.std, str(extractor.device)) if cuda else None
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                        pin_memory=cuda, prefetch_factor=2 if workers else None)
    return loader, normalizer


class _HandOver:
    """Waits for one batch's features and gives them, with the batch's failures, to the writer."""

    def __init__(self, writer: CacheWriter, stats: RunStats, bar, views: int):
        self.writer, self.stats, self.bar, self.views = writer, stats, bar, views

    def __call__(self, batch: ReadBatch, pending) -> None:
        feats = pending.result() if pending is not None else None
        per_view = None
        if feats is not None and self.views:
            feats = feats.reshape(len(batch.paths), 1 + self.views, -1)
            feats, per_view = feats[:, 0], feats[:, 1:]
        self.writer.put(WriteJob(batch.paths, batch.sizes, batch.mtimes, feats, per_view, batch.failed))
        self.stats.failed.update({p: r for p, (r, _, _) in batch.failed.items()})
        self.bar.update(len(batch))


def _run_batches(batches, mapper: Mapper, hand_over: _HandOver, stats: RunStats,
                 should_stop: Optional[Callable[[], bool]], start: float) -> None:
    """Read, map and hand over every batch, one batch in flight on the backbone while the previous is handed over."""
    previous = None
    while True:
        if should_stop is not None and should_stop():
            if previous is not None:
                hand_over(*previous)  # its features are computed already: commit them too
            raise StopRequested("another rank asked every rank to stop")
        t0 = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        stats.read_s += t1 - t0
        if previous is None and batch is not None:
            stats.startup_s = t1 - start
        if batch is None:
            break
        pending = mapper(batch.pixels) if batch.pixels is not None else None
        if previous is not None:
            hand_over(*previous)  # waits for the previous batch only, while this one runs
        previous = (batch, pending)
        stats.infer_s += time.perf_counter() - t1
    if previous is not None:
        t1 = time.perf_counter()
        hand_over(*previous)
        stats.infer_s += time.perf_counter() - t1


def run_pipeline(items: Sequence[Item], cache: FeatureCache, extractor: DINOv2FeatureExtractor,
                 preprocessor: Preprocessor, config: ExtractConfig, progress: bool = True,
                 should_stop: Optional[Callable[[], bool]] = None) -> RunStats:
    """reader -> mapper -> writer over ``items``; the writer commits to ``cache``. ``should_stop`` is asked
    before each batch (under torchrun: has another rank failed?); when it says so, the batches handed over so
    far are committed and ``StopRequested`` is raised."""
    stats = RunStats()
    if not items:
        return stats
    loader, normalizer = _make_loader(items, extractor, preprocessor, config)
    mapper, writer = Mapper(extractor, normalizer), CacheWriter(cache)
    bar = tqdm(total=len(items), unit="img", desc="extract", disable=not progress, dynamic_ncols=True)
    hand_over = _HandOver(writer, stats, bar, config.views)
    start = time.perf_counter()
    batches = iter(loader)
    try:
        _run_batches(batches, mapper, hand_over, stats, should_stop, start)
    finally:
        bar.close()
        writer.close()
    stats.seconds = time.perf_counter() - start
    stats.extracted, stats.write_s = writer.appended + writer.replaced, writer.write_s
    return stats


def build_models(config: ExtractConfig, device: Optional[str]) -> Tuple[DINOv2FeatureExtractor, Preprocessor]:
    pooling = config.pooling if isinstance(config.pooling, str) else list(config.pooling)
    extractor = DINOv2FeatureExtractor(config.backbone, device=device, random_init=config.random_init,
                                       pooling=pooling, precision=config.precision,
                                       layers=None if config.layers is None else [int(l) for l in config.layers])
    # Refused here, before any image is read, if the backbone cannot take this size.
    extractor.check_image_size(config.image_size)
    preprocessor = extractor.preprocessor(config.image_size, config.resize_mode, max_pixels=config.max_image_pixels)
    return extractor, preprocessor


def prepare_backbone(extractor: DINOv2FeatureExtractor, config: ExtractConfig, num_images: int) -> compiled.CompileInfo:
    """Compile the backbone for this process's ``num_images`` images, or say why it stays eager. Under
    torchrun every rank decides for its own shard and compiles its own copy (compiling is paid per process)."""
    if num_images == 0:
        return compiled.CompileInfo(False, "nothing to extract in this run",
                                    sdpa_backend=None if config.sdpa_backend == "auto" else config.sdpa_backend,
                                    backend=config.compile_backend)
    # Each loader batch holds batch_size images x (1 + views) views: the one shape compiled.
    return compiled.prepare_extractor(extractor, compile=config.compile, num_images=num_images,
                                      batch_size=config.batch_size * (1 + config.views), image_size=config.image_size,
                                      sdpa_backend=config.sdpa_backend, backend=config.compile_backend)


# --- the runner ----------------------------------------------------------------------------------
def extract_features(config: ExtractConfig) -> ExtractSummary:
    """Run stage one as configured (one process, or one rank of a ``torchrun`` job); returns the summary."""
    ctx = DistContext.from_env()
    # Bad metadata is reported before any backbone or GPU work.
    skipped: Dict[str, str] = {}
    paths = list_images(config.image_dir, config.metadata, config.filename_column, encoding=config.encoding,
                        tier_column=config.tier_column, allow_outside_links=config.allow_outside_links,
                        skipped=skipped)
    ctx.init()
    try:
        return dataclasses.replace(_extract(config, ctx, paths), skipped_links=skipped)
    finally:
        ctx.shutdown()


def _rank_device(config: ExtractConfig, ctx: DistContext) -> Optional[str]:
    """The device asked for; under torchrun on CUDA, this rank's own GPU (made the current one)."""
    device = config.device
    if ctx.enabled and torch.cuda.is_available() and (device is None or device == "cuda"):
        device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(device)
    return device


def _load_backbone(config: ExtractConfig, device: Optional[str]) -> Tuple[DINOv2FeatureExtractor, Preprocessor, dict]:
    """(extractor, preprocessor, fingerprint) for the run; an SDPA kernel the device cannot run is refused here."""
    extractor, preprocessor = build_models(config, device)
    # A named SDPA kernel this device cannot run is refused before any cache is touched.
    compiled.check_sdpa_backend(extractor, None if config.sdpa_backend == "auto" else config.sdpa_backend,
                                config.image_size)
    fingerprint = make_fingerprint(extractor, preprocessor, config.feature_dtype, config.views)
    return extractor, preprocessor, fingerprint


def _prepare_cache(config: ExtractConfig, output: str, fingerprint: dict, items: List[Item],
                   order: Dict[str, int]) -> Tuple[List[Item], Plan, Optional[int], List[PathRepair]]:
    """Open the main cache, repair its path list, merge leftover parts, record the config, plan the run:
    (items, plan, rows verified or None, path repairs)."""
    with open_for_append(output, fingerprint, config.overwrite) as cache:
        # Rows whose path entry is damaged get their path back from this run's images, then count as
        # damaged rows below: re-extracted, while every good row is kept (cheap: the path list is read anyway).
        repairs = repair_path_list(cache, [rel for rel, _, _ in items], cache.failures())
        merge_parts(cache, leftover_parts(output), order)
        # Guarded like every write: a disk already full says so in one line, with the reserve in place.
        cache.set_attribute("extract_config", json.dumps(config.to_dict()))
        write_config_json(config, output, fingerprint)
        # A full read of the cache: damage found here is re-extracted by this run, not reported cached.
        # (Without it, the rows given their path back above are still re-extracted.)
        damaged = cache.damaged_rows() if config.verify else [x.row for x in repairs]
        plan = make_plan(items, cache, config.retry_failed, damaged)
        return items, plan, (cache.num_rows if config.verify and cache.has_checksums else None), repairs


def _extract_shard(config: ExtractConfig, ctx: DistContext, extractor: DINOv2FeatureExtractor,
                   preprocessor: Preprocessor, fingerprint: dict, output: str, shard: List[Item]) -> List[RunStats]:
    """Extract this rank's shard into its cache (the main one, or its part under torchrun); every rank's stats."""
    info = prepare_backbone(extractor, config, len(shard))  # before a cache is opened: a bad SDPA backend stops here
    target = part_path(output, ctx.rank, ctx.world_size) if ctx.enabled else output
    stats, error = None, None
    try:
        if ctx.enabled:
            cache = FeatureCache.create(target, fingerprint, overwrite=True)
        else:
            cache = open_for_append(output, fingerprint, overwrite=False)
        # Eager batches run under the SDPA backend asked for too; a compiled forward enters it itself.
        with cache, compiled.sdpa_context(info.sdpa_backend):
            stats = run_pipeline(shard, cache, extractor, preprocessor, config,
                                 progress=config.progress and ctx.is_main,
                                 should_stop=ctx.stop_requested if ctx.enabled else None)
        stats.compile = info.to_dict()
    except Exception as exc:  # noqa: BLE001 - under torchrun every rank must hear of it (settle re-raises)
        if not ctx.enabled:
            raise
        if not isinstance(exc, StopRequested):
            ctx.request_stop(str(exc))  # the others stop at their next batch instead of finishing their shards
        error = exc
    finally:
        compiled.uncompile(extractor)
    return ctx.settle(stats, error)  # every rank's stats, or RankFailed on every rank


def _finish_cache(config: ExtractConfig, ctx: DistContext, output: str, fingerprint: dict, items: List[Item],
                  order: Dict[str, int], all_stats: List[RunStats]) -> int:
    """Merge the ranks' parts, check every listed image is accounted for, record how the run ran; the rows."""
    with FeatureCache.open(output, "a") as cache:
        if ctx.enabled:
            merge_parts(cache, [part_path(output, r, ctx.world_size) for r in range(ctx.world_size)], order)
        verify_complete(cache, items)
        rows = cache.num_rows
    last_run = {"compile": all_stats[0].compile}
    if ctx.enabled:
        last_run["compile_per_rank"] = [s.compile for s in all_stats]
    write_config_json(config, output, fingerprint, last_run)
    return rows


def _extract(config: ExtractConfig, ctx: DistContext, paths: List[str]) -> ExtractSummary:
    extractor, preprocessor, fingerprint = _load_backbone(config, _rank_device(config, ctx))
    output = config.output or default_output(fingerprint, config.cache_dir)
    order = {p: i for i, p in enumerate(paths)}
    items = [(rel, *source_facts(config.image_dir, rel)) for rel in paths] if ctx.is_main else None
    # Rank 0 alone touches the main cache here; the others get the plan through the process group.
    items, plan, verified, repairs = ctx.on_main(lambda: _prepare_cache(config, output, fingerprint, items, order))
    shard = plan.todo[ctx.rank::ctx.world_size]
    all_stats = _extract_shard(config, ctx, extractor, preprocessor, fingerprint, output, shard)
    ctx.barrier()  # every part is complete and closed
    rows = ctx.on_main(lambda: _finish_cache(config, ctx, output, fingerprint, items, order, all_stats))
    failed: Dict[str, str] = {}
    for s in all_stats:
        failed.update(s.failed)
    return ExtractSummary(
        output=output, total=plan.total, extracted=sum(s.extracted for s in all_stats),
        replaced=len(plan.had_row - set(failed)), skipped_cached=plan.cached, failed=failed,
        known_failed=plan.known_failed, seconds=max(s.seconds for s in all_stats),
        read_s=max(s.read_s for s in all_stats), infer_s=max(s.infer_s for s in all_stats),
        write_s=max(s.write_s for s in all_stats), rows=rows, world_size=ctx.world_size,
        entries=list(extractor.entry_names), size_bytes=os.path.getsize(output) if os.path.exists(output) else 0,
        repaired=plan.repaired, verified=verified, damaged_unlisted=plan.damaged_unlisted, paths_repaired=repairs,
        compile=all_stats[0].compile, compile_ranks=[s.compile for s in all_stats] if ctx.enabled else [],
    )
