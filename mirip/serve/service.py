"""What the endpoints share: the heads once loaded, the batcher that feeds them, the loading state."""

from __future__ import annotations

import dataclasses
import resource
import threading
import time
from typing import Callable, Optional

import torch

from mirip.serve.batcher import DynamicBatcher
from mirip.serve.config import ServeConfig
from mirip.serve.heads import HeadSet
from mirip.serve.uploads import RequestError


class Service:
    """Loads the heads (``load``, once, possibly in a thread), then scores through one ``DynamicBatcher``."""

    def __init__(self, config: ServeConfig, load: Callable[[], HeadSet],
                 on_failed: Optional[Callable[[str], None]] = None):
        self.config, self._load, self._on_failed = config, load, on_failed
        self.heads: Optional[HeadSet] = None
        self.batcher: Optional[DynamicBatcher] = None
        self.preprocessor = None  # set with the heads
        self.error: Optional[str] = None
        self.started = time.time()
        self.load_seconds: Optional[float] = None
        self.model_lock = threading.Lock()  # scoring batches and explanations take turns on the backbone
        self._arriving, self._arriving_lock = 0, threading.Lock()  # images uploaded, not yet in the queue

    def load(self) -> None:
        t0 = time.perf_counter()
        try:
            heads = self._load()
        except BaseException as exc:  # reported by /health; the process stays up to say why
            self.error = f"{exc.__class__.__name__}: {exc}"
            if self._on_failed is not None:
                self._on_failed(self.error)
            return
        cfg = self.config

        def run(batch):
            with self.model_lock:
                return heads.score_batch(batch)

        self.batcher = DynamicBatcher(run, cfg.max_batch_size, cfg.batch_timeout_ms / 1000.0, cfg.max_queue,
                                      expecting=lambda: self._arriving)
        # Uploads decode with the primary head's preprocessing and the service's pixel limit.
        self.preprocessor = dataclasses.replace(heads.preprocessor, max_pixels=cfg.max_image_pixels)
        self.heads, self.load_seconds = heads, time.perf_counter() - t0

    def ready(self) -> HeadSet:
        if self.heads is None:
            raise RequestError(503, "the model is still loading" if self.error is None
                               else f"the model failed to load: {self.error}",
                               state="failed" if self.error else "loading")
        return self.heads

    def arriving(self, n: int) -> None:
        """``n`` more (or, negative, fewer) images are on their way to the batcher."""
        with self._arriving_lock:
            self._arriving += n

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


def memory(device) -> dict:
    """What this replica holds: peak resident memory, and on CUDA the peak allocated by torch."""
    out = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # Linux: KiB
    if str(device).startswith("cuda"):
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out
