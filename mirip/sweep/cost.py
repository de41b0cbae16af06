"""What a sweep will cost, from its first timed epoch: one line before the long part starts.

Heads of one group train over the same batches, so an epoch costs about the sum of its heads'
multiply-adds; a head's share is its parameter count (the first layer dominates). The estimate
assumes every head runs all its epochs: early stopping can only make the sweep shorter.
"""

from __future__ import annotations

import time
from typing import Iterable, Optional


def head_size(input_dim: int, hidden_dim: int, projector_dim: int) -> int:
    """Weights of one head (Projector's two layers and the score layer): its per-pair cost, up to a constant."""
    return input_dim * hidden_dim + hidden_dim * projector_dim + projector_dim


def estimate_seconds(first_epoch_s: float, first_epoch_size: int, sizes: Iterable[int], epochs: int) -> float:
    """Seconds for every head of ``sizes`` to run ``epochs`` epochs, at the rate of the first timed epoch
    (``first_epoch_size``: the summed head sizes of the group that ran it)."""
    return first_epoch_s / max(first_epoch_size, 1) * sum(sizes) * epochs


class EpochTimer:
    """Times one epoch of the first group: its second when it has one (the first carries the group's setup
    and one-off warm-up), else its first."""

    def __init__(self, max_epochs: int):
        self.max_epochs = max_epochs
        self.t = time.perf_counter()
        self.done = False

    def epoch_end(self, epoch: int) -> Optional[float]:
        """Seconds the timed epoch took, once, when ``epoch`` (0-based) is it; None otherwise."""
        now = time.perf_counter()
        took = now - self.t
        self.t = now
        if self.done or epoch != min(1, self.max_epochs - 1):
            return None
        self.done = True
        return took


def format_duration(seconds: float) -> str:
    """A rough duration as people say it: '40 s', '12 min', '14 h', '3.5 days'."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        hours = seconds / 3600
        return f"{hours:.1f} h" if hours < 10 else f"{round(hours)} h"
    return f"{seconds / 86400:.1f} days"


def cost_line(heads: int, epochs: int, seconds: float, device: str) -> str:
    where = "this GPU" if device.startswith("cuda") else "this CPU"
    line = f"cost: {heads} head(s) x {epochs} epochs: about {format_duration(seconds)} on {where}"
    if seconds > 15 * 60:
        line += (" (less if early stopping ends heads sooner). Ctrl-C stops cleanly and keeps finished "
                 "configurations; fewer grid values, --max-epochs or --pairs-per-epoch make it shorter")
    return line
