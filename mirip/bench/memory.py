"""Peak memory of this process and its children (DataLoader workers), sampled in a thread from /proc.

RSS counts a shared page once per process that maps it; PSS splits it among them, so the PSS sum over a
parent and its forked workers is what they hold together.
"""

from __future__ import annotations

import os
import threading
from typing import List

def _proc_bytes(pid: int, filename: str, key: str) -> int:
    """A "Key:   N kB" line of /proc/<pid>/<filename>, in bytes (0 when the process or the line is gone)."""
    try:
        with open(f"/proc/{pid}/{filename}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_bytes(pid: int) -> int:
    return _proc_bytes(pid, "status", "VmRSS:")


def _pss_bytes(pid: int) -> int:
    # Proportional set size: each shared page divided among the processes mapping it. RSS counts a page
    # once per process, so a sum of RSS over forked workers counts the parent's pages once per worker.
    return _proc_bytes(pid, "smaps_rollup", "Pss:")


def _children(pid: int) -> List[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


class PeakRSS:
    """Samples the resident memory of this process plus its children (DataLoader workers) in a thread."""

    def __init__(self, interval: float = 0.05, pss_every: int = 10):
        self.interval, self.peak_main, self.peak_total = interval, 0, 0
        # Reading smaps_rollup walks the page tables: sampled every ``pss_every``-th tick only.
        self.pss_every, self.peak_pss_total, self.peak_workers = pss_every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pid, tick = os.getpid(), 0
        while not self._stop.is_set():
            main, children = _rss_bytes(pid), _children(pid)
            total = main + sum(_rss_bytes(c) for c in children)
            self.peak_main, self.peak_total = max(self.peak_main, main), max(self.peak_total, total)
            self.peak_workers = max(self.peak_workers, len(children))
            if tick % self.pss_every == 0:
                pss = _pss_bytes(pid) + sum(_pss_bytes(c) for c in children)
                self.peak_pss_total = max(self.peak_pss_total, pss)
            tick += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
