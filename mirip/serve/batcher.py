"""Dynamic batching: images from concurrent requests fused into one bounded backbone batch.

One worker thread owns the model. It takes the first waiting image, waits up to ``timeout_s`` for more
(or until ``max_batch_size``), runs the batch and hands each image its own result through a future. With
``expecting`` (how many images are on their way: uploaded, still decoding) it does not wait when the queue
is empty and nothing is on its way, so a lone request pays no batching delay. The
queue is bounded: a request whose images do not all fit is refused at once (``Overloaded``, 503 to the
client) rather than left to wait without bound, and a request's images are admitted all or none; one
larger than the whole queue is ``NeverFits`` (413), since a retry could never be admitted.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

_STOP = object()


class Overloaded(RuntimeError):
    """More images are waiting than the queue admits; the client should retry later."""


class NeverFits(ValueError):
    """One request brings more images than the whole queue holds: retrying would be refused forever."""


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    sizes: Dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it
    busy_s: float = 0.0

    def as_dict(self) -> dict:
        return {"batches": self.batches, "images": self.images, "busy_s": round(self.busy_s, 6),
                "mean_batch_size": self.images / self.batches if self.batches else None,
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class DynamicBatcher:
    """``submit(tensors)`` -> one future per tensor; ``fn(batch)`` returns one result per row of the batch."""

    def __init__(self, fn: Callable[[torch.Tensor], Sequence[Any]], max_batch_size: int = 16,
                 timeout_s: float = 0.01, max_queue: int = 256, name: str = "mirip-batcher",
                 expecting: Optional[Callable[[], int]] = None):
        if max_batch_size <= 0 or max_queue <= 0 or timeout_s < 0:
            raise ValueError("max_batch_size and max_queue must be positive and timeout_s non-negative")
        self.fn, self.max_batch_size, self.timeout_s, self.max_queue = fn, int(max_batch_size), float(timeout_s), \
            int(max_queue)
        self.expecting = expecting
        self.stats = BatchStats()
        self._queue: "queue.Queue" = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, tensors: Sequence[torch.Tensor]) -> List[Future]:
        with self._lock:
            if not self._thread.is_alive():
                raise RuntimeError("the batcher has stopped")
            if len(tensors) > self.max_queue:
                raise NeverFits(f"this request brings {len(tensors)} images and the queue holds {self.max_queue}")
            if self._waiting + len(tensors) > self.max_queue:
                raise Overloaded(f"{self._waiting} images are waiting and this request brings {len(tensors)}; "
                                 f"the queue holds {self.max_queue}")
            self._waiting += len(tensors)
            futures = [Future() for _ in tensors]
            for t, f in zip(tensors, futures):
                self._queue.put((t, f))
        return futures

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the worker."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _take(self) -> list:
        first = self._queue.get()
        if first is _STOP:
            return []
        batch = [first]
        deadline = time.monotonic() + self.timeout_s
        while len(batch) < self.max_batch_size:
            if self.expecting is not None and self._queue.empty() and self.expecting() <= 0:
                break  # nobody else is on the way: waiting would only add latency
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # stop after this batch
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            with self._lock:
                self._waiting -= len(batch)
            started = time.perf_counter()
            try:
                results = list(self.fn(torch.stack([t for t, _ in batch])))
                if len(results) != len(batch):
                    raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(batch)}")
            except BaseException as exc:  # the worker must outlive any one bad batch
                for _, f in batch:
                    f.set_exception(exc)
            else:
                for (_, f), r in zip(batch, results):
                    f.set_result(r)
            self.stats.busy_s += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.images += len(batch)
            self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
