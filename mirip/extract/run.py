"""Stage one: extract frozen-backbone features for a set of images into an HDF5 cache.

    list images -> load backbone -> open/create cache (fingerprint checked) -> plan
    -> reader (DataLoader workers) -> mapper (backbone) -> writer (background thread) -> summary

Pieces: ``config`` (ExtractConfig), ``plan`` (which images to extract, path repair, the completeness
check), ``pipeline`` (the batches: reader -> mapper -> writer), ``summary`` (the report). This module opens
the cache and runs them in order (per rank under torchrun).

The plan is what makes reruns cheap and kills harmless: an image is extracted
only when it has no row yet, its file changed (size or mtime), its row fails
its checksum (a damaged cache is repaired, not reported cached), or it failed
before and ``retry_failed`` is set. Rows are committed batch by batch, so a
killed run, or one stopped by a full disk, resumes where it stopped. A rerun
with nothing to do (``nothing_to_do``) is told so by the cache alone, without
loading the backbone.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

import torch
import transformers

import mirip

from mirip.common.atomic import write_atomic
from mirip.common.devices import PRECISIONS, check_precision, default_precision, precision_choice, resolve_device
from mirip.extract.distributed import DistContext, StopRequested, leftover_parts, merge_parts, part_path
from mirip.store.cache import FeatureCache
from mirip.store.cache_errors import CacheError
from mirip.extract.config import ExtractConfig, Item
from mirip.extract.pipeline import RunStats, run_pipeline
from mirip.extract.plan import PathRepair, Plan, make_plan, repair_path_list, verify_complete
from mirip.extract.reader import list_images, source_facts
from mirip.extract.summary import ExtractSummary
from mirip.ml import compiled
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.openvino_engine import attach_openvino
from mirip.ml.preprocessing import Preprocessor
from mirip.store.fingerprint import ENVIRONMENT_FIELDS, make_fingerprint

__all__ = ["fingerprint_hash", "default_output", "write_config_json", "open_for_append", "build_models", "prepare_backbone", "extract_features", "nothing_to_do"]


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


def choose_precision(config: ExtractConfig) -> Tuple[ExtractConfig, str]:
    """(config with its precision decided, why). ``--precision`` wins; without it, an existing ``--output`` cache
    keeps the precision it was made in (one cache, one precision: a mixed append is refused naming the field),
    else the device's default (``mirip.common.devices.precision_choice``: bf16 on a CPU with AMX/AVX512-BF16)."""
    if config.precision is None and config.output and os.path.isfile(config.output) and not config.overwrite:
        try:
            with FeatureCache.open(config.output, "r") as cache:
                stored = cache.fingerprint.get("precision")
        except (OSError, ValueError):
            stored = None  # an unreadable cache is reported by the run itself, with its own message
        if stored in PRECISIONS:
            return (dataclasses.replace(config, precision=stored),
                    f"the precision {config.output} was made in (--precision or --overwrite to change it)")
    precision, why = precision_choice(resolve_device(config.device), config.precision)
    return dataclasses.replace(config, precision=precision), why


def build_models(config: ExtractConfig, device: Optional[str]) -> Tuple[DINOv2FeatureExtractor, Preprocessor]:
    """The run's extractor (with ``config.engine`` attached) and preprocessing."""
    pooling = config.pooling if isinstance(config.pooling, str) else list(config.pooling)
    openvino = config.engine == "openvino"  # converts an fp32 torch copy; the plugin runs config.precision
    extractor = DINOv2FeatureExtractor(config.backbone, device=device, random_init=config.random_init,
                                       pooling=pooling, precision="fp32" if openvino else config.precision,
                                       layers=None if config.layers is None else [int(l) for l in config.layers])
    # Refused here, before any image is read, if the backbone cannot take this size.
    extractor.check_image_size(config.image_size)
    preprocessor = extractor.preprocessor(config.image_size, config.resize_mode, max_pixels=config.max_image_pixels)
    if openvino:
        attach_openvino(extractor, config.image_size, config.engine_cache, config.precision)
    return extractor, preprocessor


def idle_compile_info(config: ExtractConfig) -> compiled.CompileInfo:
    """What a run with no image to extract says about compiling: nothing was compiled, and why."""
    return compiled.CompileInfo(False, "nothing to extract in this run",
                                sdpa_backend=None if config.sdpa_backend == "auto" else config.sdpa_backend,
                                backend=config.compile_backend)


def prepare_backbone(extractor: DINOv2FeatureExtractor, config: ExtractConfig, num_images: int) -> compiled.CompileInfo:
    """Compile the backbone for this process's ``num_images`` images, or say why it stays eager. Under
    torchrun every rank decides for its own shard and compiles its own copy (compiling is paid per process)."""
    if num_images == 0:
        return idle_compile_info(config)
    # Each loader batch holds batch_size images x (1 + views) views: the one shape compiled.
    return compiled.prepare_extractor(extractor, compile=config.compile, num_images=num_images,
                                      batch_size=config.batch_size * (1 + config.views), image_size=config.image_size,
                                      sdpa_backend=config.sdpa_backend, backend=config.compile_backend)


# --- the runner ----------------------------------------------------------------------------------
def extract_features(config: ExtractConfig) -> ExtractSummary:
    """Run stage one as configured (one process, or one rank of a ``torchrun`` job); returns the summary."""
    ctx = DistContext.from_env()
    resolved, _ = choose_precision(config)
    if resolved.precision != (config.precision or default_precision(resolve_device(config.device))):
        config = resolved  # the existing cache's precision, not the device's: the rerun check and backbone agree
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


# --- a rerun with nothing to do ------------------------------------------------------------------
# The choices that decide a cache's numbers (with the precision, resolved by device, and the versions, both
# checked against its fingerprint): a cache made with the same ones holds this run's features.
SAME_FEATURES = ("backbone", "random_init", "image_size", "resize_mode", "pooling", "layers", "feature_dtype",
                 "views", "max_image_pixels")


def _candidate_caches(config: ExtractConfig) -> List[str]:
    """The cache this run writes to: --output, or the default names under cache_dir that could be its."""
    if config.output:
        return [config.output] if os.path.isfile(config.output) else []
    short = os.path.basename(str(config.backbone).rstrip("/")) or "backbone"
    pattern = os.path.join(glob.escape(config.cache_dir), f"{glob.escape(short)}-{config.image_size}px-*.h5")
    return [p for p in sorted(glob.glob(pattern)) if not leftover_parts(p) and ".part-" not in p]


def _made_with_these_settings(cache: FeatureCache, config: ExtractConfig) -> bool:
    """Whether the cache itself records this run's feature settings, precision and versions."""
    try:
        stored = json.loads(cache.h5.attrs["extract_config"])
    except (KeyError, ValueError, TypeError):
        return False
    fp, now = cache.fingerprint, config.to_dict()
    precision = check_precision(config.precision or default_precision(resolve_device(config.device)))
    versions = {"mirip_version": mirip.__version__, "torch_version": str(torch.__version__),
                "transformers_version": transformers.__version__}
    return (isinstance(stored, dict) and all(stored.get(k) == now[k] for k in SAME_FEATURES)
            and fp.get("precision") == precision and all(fp.get(k) == v for k, v in versions.items()))


def _cached_summary(path: str, config: ExtractConfig, items: List[Item]) -> Optional[ExtractSummary]:
    """The summary of a run that would extract nothing from ``path``; None when anything is left to do there."""
    with FeatureCache.open(path, "r") as cache:
        if not _made_with_these_settings(cache, config):
            return None
        if cache.has_checksums and cache.damaged_path_rows(cache.stored_paths()):
            return None
        damaged = cache.damaged_rows() if config.verify else []
        plan = make_plan(items, cache, config.retry_failed, damaged)
        if plan.todo or plan.damaged_unlisted:
            return None
        rows, entries = cache.num_rows, list(cache.fingerprint.get("feature_entries") or [])
        verified = rows if config.verify and cache.has_checksums else None
    return ExtractSummary(output=path, total=plan.total, extracted=0, replaced=0, skipped_cached=plan.cached,
                          failed={}, known_failed=plan.known_failed, seconds=0.0, read_s=0.0, infer_s=0.0,
                          write_s=0.0, rows=rows, entries=entries, size_bytes=os.path.getsize(path),
                          verified=verified, compile=idle_compile_info(config).to_dict(), backbone_loaded=False)


def nothing_to_do(config: ExtractConfig, paths: List[str]) -> Optional[ExtractSummary]:
    """A rerun whose every image is already cached (and whose cache is sound) needs no backbone: its summary,
    read off the cache alone, or None when there is work, or doubt (another fingerprint, leftover parts)."""
    if config.overwrite:
        return None
    items = None
    for path in _candidate_caches(config):
        if leftover_parts(path):
            continue
        items = items or [(rel, *source_facts(config.image_dir, rel)) for rel in paths]
        try:
            done = _cached_summary(path, config, items)
        except (CacheError, OSError, ValueError, KeyError):
            continue  # an unreadable cache is the full run's to report, with the backbone loaded as before
        if done is not None:
            return done
    return None


def _extract(config: ExtractConfig, ctx: DistContext, paths: List[str]) -> ExtractSummary:
    done = None if ctx.enabled else nothing_to_do(config, paths)
    if done is not None:
        return done
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
