"""How many intra-op threads a CPU sweep uses: no more than the cores other processes leave free.

A sweep's stacked heads run thousands of small ops per epoch, each a parallel region ending in a barrier.
When another process holds a core, the thread that lost it makes every other thread wait at each
barrier for a scheduler slice: on a 2-core machine with a competing process, two threads made the
demo's sweep 21x slower while one thread only shares a core (about 2x). Large GEMMs (extraction) hide
the barriers, small heads cannot, so a sweep takes the cores that are idle when it starts.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def idle_cores(cores: int, load: float) -> int:
    """Cores not taken by the 1-minute load average (at least one: the sweep has to run somewhere)."""
    return max(1, min(cores, int(cores - load + 0.5)))


def choose_threads(requested: Optional[int] = None) -> Tuple[int, str]:
    """(threads, why): ``requested`` when given, else the idle cores, never more than torch's own setting."""
    cores = usable_cores()
    if requested:
        return requested, f"{requested} thread(s) as asked ({cores} core(s) usable)"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return min(torch.get_num_threads(), cores), "load average unknown"
    threads = min(torch.get_num_threads(), idle_cores(cores, load))
    return threads, f"{threads} thread(s): {cores} core(s) usable, load average {load:.1f}"
