"""A training step over static batch buffers, replayed from a CUDA graph on a GPU.

A ranking-head step (forward, margin loss, backward, gradient clipping, AdamW) is a few
microseconds of arithmetic behind ~100 kernel launches: on a GPU the launches *are* the
step. Capturing the whole step once in a CUDA graph and replaying it turns those launches
into one. A graph replays fixed kernels on fixed memory, so everything the step touches
lives at a fixed address:

- the batch: static index / label buffers, refilled by one copy before each replay (the
  feature gather is inside the step, reading the dataset's matrix in place);
- the gradients: allocated once (zeros) and zeroed then accumulated into in place, never
  set to None, so every graph and any eager step share them;
- AdamW: ``capturable=True`` (its step counts and bias corrections live on the device) with
  the learning rate as a 0-d device tensor that the scheduler updates in place;
- the epoch's loss sum and correct count: device accumulators the step adds to.

``StaticStep`` runs one ``step_fn(buffers)``; modes (``TrainingConfig.head_step``):

    eager    the plain loop (the default wherever there is no GPU)
    static   the static-buffer step run eagerly: exactly what ``graph`` captures, checkable on a CPU
    graph    static, captured once per batch size after ``warmup`` eager runs and replayed (CUDA only)
    auto     eager everywhere for now (AUTO_MODE): graph on CUDA once the GPU suite has verified it

Warm-up runs are real training steps (nothing is thrown away) and a capture is followed
by its replay, so the sequence of updates is the eager one step for step.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import torch

STEP_MODES = ("auto", "eager", "static", "graph")
WARMUP_STEPS = 2  # eager runs per batch size before capture (lazy inits, cuBLAS workspaces, optimizer state)

Buffers = Dict[str, torch.Tensor]
# What ``auto`` means per device. The graph step equals the eager one on CPU (as the static step), but the
# captured graph has not yet been run on a GPU (scripts/gpu_check.py checks graph == eager there): until that
# check has passed on a real card, ``auto`` stays eager on CUDA too and ``graph`` is an explicit opt-in.
AUTO_MODE = {"cuda": "eager", "cpu": "eager"}


def resolve_step_mode(mode: Optional[str], device: str) -> str:
    """``auto`` -> ``eager`` (see AUTO_MODE); ``graph`` anywhere but CUDA is an error."""
    mode = mode or "auto"
    if mode not in STEP_MODES:
        raise ValueError(f"unknown head step mode {mode!r}; use one of {', '.join(STEP_MODES)}")
    cuda = str(device).startswith("cuda")
    if mode == "auto":
        return AUTO_MODE["cuda" if cuda else "cpu"]
    if mode == "graph" and not cuda:
        raise ValueError(f"head step mode 'graph' needs a CUDA device, got {device!r}; use 'static' to run the "
                         "same static-buffer step without a graph, or 'eager'")
    return mode


def persistent_grads(params) -> None:
    """Give every parameter a zero gradient tensor that stays put (a graph captures its address)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def zero_grads_(params) -> None:
    # In place, not set_to_none: backward then accumulates into the same tensors (0 + g == g exactly).
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_zero_(grads)


class StaticStep:
    """``step_fn`` over static buffers, one set per batch size; replayed from CUDA graphs when ``graphs``."""

    def __init__(self, step_fn: Callable[[Buffers], None], make_buffers: Callable[[int], Buffers], device: str,
                 graphs: bool, warmup: int = WARMUP_STEPS):
        if graphs and not str(device).startswith("cuda"):
            raise ValueError("CUDA graphs need a CUDA device")
        self.step_fn, self.make_buffers = step_fn, make_buffers
        self.device, self.graphs, self.warmup = str(device), bool(graphs), int(warmup)
        self._buffers: Dict[int, Buffers] = {}
        self._graphs: Dict[int, "torch.cuda.CUDAGraph"] = {}
        self._eager_runs: Dict[int, int] = {}
        self._pool = None  # one memory pool shared by the graphs of all batch sizes
        self.captures = 0
        self.replays = 0
        self.capture_error: Optional[str] = None

    def buffers(self, n: int) -> Buffers:
        if n not in self._buffers:
            self._buffers[n] = self.make_buffers(n)
        return self._buffers[n]

    def run(self, n: int) -> None:
        """One step on the buffers of batch size ``n`` (fill them first)."""
        bufs = self.buffers(n)
        if not self.graphs:
            self.step_fn(bufs)
            return
        graph = self._graphs.get(n)
        if graph is not None:
            graph.replay()
            self.replays += 1
            return
        if self._eager_runs.get(n, 0) < self.warmup:
            # Warm-up on a side stream, as torch.cuda.graphs asks: these are real steps of the run.
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.step_fn(bufs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._eager_runs[n] = self._eager_runs.get(n, 0) + 1
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                self.step_fn(bufs)  # recorded, not run
        except Exception as exc:  # noqa: BLE001 - any capture failure: train on, eagerly, and say so
            # Nothing ran during the failed capture (kernels are recorded, not executed), so this step
            # runs now; every later one runs eagerly on the same buffers: the same numbers, slower.
            self.graphs = False
            self.capture_error = f"{exc.__class__.__name__}: {exc}"
            warnings.warn(f"CUDA graph capture of the head step failed ({self.capture_error}); "
                          "continuing with the same step run eagerly", RuntimeWarning, stacklevel=2)
            torch.cuda.synchronize(self.device)
            self.step_fn(bufs)
            return
        self._pool = graph.pool()
        self._graphs[n] = graph
        self.captures += 1
        graph.replay()  # ... so this step's update happens now
        self.replays += 1
