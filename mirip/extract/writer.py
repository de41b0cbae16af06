"""Writer: commits feature rows to the cache from a background thread, so HDF5 I/O never stalls the GPU.

Each batch is flushed before the next one is taken (``FeatureCache.append``
commits by its row counter), which is what makes ``kill -9`` at any moment safe.
The bounded queue gives back-pressure instead of unbounded memory if the disk
is slower than the backbone.

The first write error (a full disk, say) stops the writer: later jobs are
dropped, the file is closed by the cache (committed rows intact), and the
error, a ``CacheWriteError`` that says how many rows are committed, is raised
once in the pipeline's thread by the next ``put()`` or by ``close()``.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from mirip.store.cache import FeatureCache
from mirip.store.cache_errors import CacheError

Failure = Tuple[str, int, int]  # (reason, size, mtime_ns)


@dataclass
class WriteJob:
    paths: List[str]
    sizes: List[int]
    mtimes: List[int]
    features: Optional[np.ndarray]  # (B, D)
    views: Optional[np.ndarray]  # (B, K, D) or None
    failed: Dict[str, Failure]


class CacheWriter:
    """``put(job)`` from the pipeline; ``close()`` drains the queue and re-raises any write error."""

    def __init__(self, cache: FeatureCache, max_pending: int = 8):
        self.cache = cache
        self.failures: Dict[str, Failure] = cache.failure_records()
        self.appended = self.replaced = 0
        self.write_s = 0.0
        self._queue: "queue.Queue[Optional[WriteJob]]" = queue.Queue(maxsize=max_pending)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="mirip-cache-writer", daemon=True)
        self._thread.start()

    def put(self, job: WriteJob) -> None:
        self._raise_error()
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        error = self._error
        if error is None:
            return
        if isinstance(error, CacheError):  # already says what failed and what is committed
            raise error
        raise RuntimeError(f"writing {self.cache.path} failed: {error}") from error

    def _run(self) -> None:
        try:  # HDF5 prints its error stack from threads h5py has not silenced; the error is raised instead
            from h5py._errors import silence_errors
            silence_errors()
        except ImportError:
            pass
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue  # keep draining so put() never blocks forever after a failure
            t0 = time.perf_counter()
            try:
                self.write(job)
            except BaseException as exc:  # surfaced to the pipeline thread by put()/close()
                self._error = exc
            self.write_s += time.perf_counter() - t0
            _pause_for_tests(self.cache)

    def write(self, job: WriteJob) -> None:
        """Changed images replace their rows; new ones are appended; failures are recorded after the rows."""
        _fail_for_tests(self.cache)
        if job.paths:
            rows = [self.cache.row_of(p) for p in job.paths]
            old = [i for i, r in enumerate(rows) if r is not None]
            new = [i for i, r in enumerate(rows) if r is None]
            pick = lambda a, idx: None if a is None else a[idx]  # noqa: E731
            if old:
                self.cache.replace([rows[i] for i in old], job.features[old],
                                   [job.sizes[i] for i in old], [job.mtimes[i] for i in old], views=pick(job.views, old))
                self.replaced += len(old)
            if new:
                self.cache.append([job.paths[i] for i in new], job.features[new],
                                  [job.sizes[i] for i in new], [job.mtimes[i] for i in new], views=pick(job.views, new))
                self.appended += len(new)
        recovered = [p for p in job.paths if p in self.failures]
        if job.failed or recovered:
            for p in recovered:
                del self.failures[p]
            self.failures.update(job.failed)
            # Sorted: the failure list of a cache does not depend on batch order or on how many ranks wrote it.
            self.cache.set_failures(dict(sorted(self.failures.items())))


def _fail_for_tests(cache: FeatureCache) -> None:
    """Test-only: with MIRIP_TEST_WRITE_ERROR="RANK:ROWS", the process of that torchrun rank (0 without torchrun)
    meets a full disk once its cache holds ROWS committed rows: the write fails through the cache's own error
    path (``FeatureCache.guarded_write``), exactly as an ENOSPC from HDF5 would."""
    spec = os.environ.get("MIRIP_TEST_WRITE_ERROR")
    if spec:
        rank, rows = spec.split(":", 1)
        if int(os.environ.get("RANK", "0")) == int(rank) and cache.num_rows >= int(rows):
            def fail() -> None:
                raise OSError(errno.ENOSPC, "No space left on device (MIRIP_TEST_WRITE_ERROR)")
            cache.guarded_write(fail)


def _pause_for_tests(cache: FeatureCache) -> None:
    """Test-only: with MIRIP_TEST_PAUSE_WRITER="ROWS:FLAG", once ROWS rows are committed the writer writes the
    committed count to the file FLAG and stops for good, so a kill -9 test kills at a known state, not a race."""
    spec = os.environ.get("MIRIP_TEST_PAUSE_WRITER")
    if spec:
        rows, flag = spec.split(":", 1)
        if cache.num_rows >= int(rows):
            with open(flag, "w") as f:
                f.write(str(cache.num_rows))
            while True:
                time.sleep(60)
