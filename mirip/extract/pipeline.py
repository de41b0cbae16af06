"""The batches of one extraction run: reader (DataLoader workers) -> mapper (backbone) -> writer (background
thread), with one batch on the backbone while the previous one is handed to the writer (``run_pipeline``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

from torch.utils.data import DataLoader
from tqdm import tqdm

from mirip.extract.config import ExtractConfig, Item
from mirip.extract.distributed import StopRequested
from mirip.extract.mapper import Mapper, Normalizer
from mirip.extract.reader import ImageFileDataset, ReadBatch, collate
from mirip.extract.writer import CacheWriter, WriteJob
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.preprocessing import Preprocessor
from mirip.store.cache import FeatureCache


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
