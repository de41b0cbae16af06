"""Training one group of a sweep: K stacked heads, one pass over the same batches per epoch.

The loop is the Trainer's (``mirip.training.trainer``, whose docstring states the
training-step contract) with a K axis: the same pairs per epoch, the same batches,
the same step, validation scoring each val image once, best = strictly higher
val accuracy, early stopping per head. A head that stops leaves the stack: the
stack is rebuilt from the heads still training, so its compute is not spent
on heads whose result is already fixed.

The step runs eagerly, or (``training.head_step``: ``static`` / ``graph``, ``graph`` by
default on CUDA) over static batch buffers with the capturable batched AdamW, replayed
from a CUDA graph on a GPU (``mirip.training.static_step``). Dropout masks are drawn
outside the captured step, from each head's own RNG stream as before, into a static
buffer: the same masks, so the same numbers as the eager step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mirip.training.head_config import HeadConfig
from mirip.training.stacked_heads import StackedHeads, build_head, clip_grad_norm_per_head
from mirip.training.stacked_optim import make_optimizer
from mirip.training.checkpoint_state import HISTORY_KEYS
from mirip.training.config import TrainingConfig
from mirip.training.static_step import StaticStep, persistent_grads, resolve_step_mode, zero_grads_

SCORE_BATCH = 4096


@dataclass
class HeadOutcome:
    """What one head of a group ended with: its best epoch's weights and optimizer state, and its history."""

    config: HeadConfig
    best_epoch: int  # 1-based (epochs completed when the best val accuracy was reached), as the Trainer counts
    best_val_acc: float
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    state: Dict[str, torch.Tensor]  # RankingHead.head_state_dict() form, CPU
    optimizer_state: dict  # torch AdamW state_dict form for that head alone, at the best epoch
    scheduler_state: dict
    rng_state: Dict[str, object]  # as the Trainer checkpoints it: {"torch": ..., "cuda": [...]}
    history: Dict[str, List[float]] = field(default_factory=dict)
    wall_time_s: float = 0.0

    @property
    def head_config(self) -> dict:
        return {"input_dim": int(self.state["projector.net.0.weight"].shape[1]), "hidden_dim": self.config.hidden_dim,
                "projector_output_dim": self.config.projector_dim, "dropout": float(self.config.dropout),
                "margin": float(self.config.margin)}


@dataclass
class HeadStart:
    """Where a head resumes: what a resumable checkpoint (``last.pt``) holds of it, after ``epochs_done`` epochs.

    The best epoch's weights come back (``best_state``); its optimizer state and RNG do not (a checkpoint keeps
    them only for the last epoch), so a resumed head's outcome carries them only if a later epoch is best."""

    epochs_done: int
    state: Dict[str, torch.Tensor]
    optimizer_state: dict
    scheduler_state: dict
    rng_state: Dict[str, object]
    history: Dict[str, List[float]]
    best_acc: float
    best_epoch: int
    bad_epochs: int
    best_state: Optional[Dict[str, torch.Tensor]] = None


class _Head:
    """Book-keeping of one head while it trains (its slot in the stack changes when others leave)."""

    def __init__(self, config: HeadConfig, cpu_rng: torch.Tensor):
        self.config = config
        self.cpu_rng = cpu_rng  # the CPU RNG state after init: where a single run's CPU stream stands
        self.history: Dict[str, List[float]] = {k: [] for k in HISTORY_KEYS}
        self.best_acc = -math.inf
        self.best_loss = math.nan
        self.best_epoch = 0
        self.bad_epochs = 0
        self.improved = False  # in the epoch just recorded
        self.best: Optional[dict] = None

    def resume(self, start: HeadStart) -> None:
        self.history = {k: list(start.history.get(k, [])) for k in HISTORY_KEYS}
        self.best_acc, self.best_epoch, self.bad_epochs = float(start.best_acc), int(start.best_epoch), \
            int(start.bad_epochs)
        val_loss = self.history["val_loss"]
        self.best_loss = val_loss[self.best_epoch - 1] if 0 < self.best_epoch <= len(val_loss) else math.nan
        if start.best_state:
            self.best = {"state": {k: v.detach().to("cpu", copy=True) for k, v in start.best_state.items()},
                         "optimizer": {}, "scheduler": {}, "rng": {}}


class HeadEpoch:
    """One head right after an epoch (validated, its schedule stepped): what a checkpoint of it needs.

    The state accessors copy on first call and keep the copy: a caller that writes no checkpoint this epoch pays
    nothing, and one that writes several (best.pt, checkpoint_epoch_N.pt, last.pt) copies each state once."""

    def __init__(self, group: "_Group", slot: int):
        self._group, self._slot = group, slot
        self._head = group.heads[group.slots[slot]]
        self._copies: Dict[str, object] = {}
        self.config = self._head.config
        self.history = self._head.history
        self.epochs_done = len(self._head.history["train_loss"])
        self.improved = self._head.improved
        self.best_acc, self.best_epoch, self.bad_epochs = self._head.best_acc, self._head.best_epoch, \
            self._head.bad_epochs
        self.stopped_early = 0 < group.tc.early_stopping_patience <= self._head.bad_epochs

    def _once(self, name: str, make):
        if name not in self._copies:
            self._copies[name] = make()
        return self._copies[name]

    def state(self) -> Dict[str, torch.Tensor]:
        return self._once("state", lambda: self._group.model.head_state_dict(self._slot))

    def best_state(self) -> Optional[Dict[str, torch.Tensor]]:
        return (self._head.best or {}).get("state")

    def optimizer_state(self) -> dict:
        return self._once("optimizer", lambda: self._group.opt.head_optimizer_state(self._slot))

    def scheduler_state(self) -> dict:
        return self._once("scheduler", lambda: self._group.opt.head_scheduler_state(self._slot))

    def rng_state(self) -> Dict[str, object]:
        return self._once("rng", lambda: _rng_snapshot(self._group.model, self._slot, self._head, self._group.dev))


def _stack(heads: Sequence[_Head], models: Sequence, rng_states, tc: TrainingConfig, optimizer: Optional[str],
           capturable: bool = False):
    model = StackedHeads(models, rng_states)
    opt = make_optimizer(model, [h.config.learning_rate for h in heads], [h.config.weight_decay for h in heads],
                         tc.scheduler_t_max, tc.scheduler_eta_min, kind=optimizer, capturable=capturable)
    return model, opt


def group_step_mode(training: TrainingConfig, device: str, optimizer: Optional[str]) -> str:
    """``eager``, ``static`` or ``graph`` for a group: ``auto`` falls back to eager when a non-batched optimizer
    was asked for (only the batched one can be captured); an explicit static/graph with one is an error."""
    mode = resolve_step_mode(getattr(training, "head_step", "auto"), device)
    if mode != "eager" and (optimizer or "auto") not in ("auto", "batched"):
        if (getattr(training, "head_step", "auto") or "auto") == "auto":
            return "eager"
        raise ValueError(f"head_step {mode!r} needs the batched optimizer, not {optimizer!r}")
    return mode


class _GroupStep:
    """The stacked step over static buffers (``mirip.training.static_step``): what a CUDA graph captures."""

    def __init__(self, model: StackedHeads, opt, features: torch.Tensor, clip: float, graphs: bool):
        self.model, self.opt = model, opt
        persistent_grads(model.stacked)
        dev = model.device
        self.loss_sum = torch.zeros(model.k, device=dev)
        self.correct = torch.zeros(model.k, device=dev, dtype=torch.long)
        self.dropout = any(p > 0 for p in model.dropouts)
        params, on = list(model.stacked), [True] * model.k

        def step(bufs) -> None:
            index = bufs["index"]
            n = index.shape[1]
            x = features.index_select(0, index[:2].reshape(-1)).float()  # first rows then second rows
            labels = index[2]
            scores = model(x, dropout_scale=bufs.get("scale"))
            s1, s2 = scores[:, :n], scores[:, n:]
            losses = model.pair_losses(s1, s2, labels)
            zero_grads_(params)
            losses.sum().backward()
            clip_grad_norm_per_head(params, clip)
            opt.step(on)
            self.loss_sum.add_(losses.detach() * n)
            self.correct.add_((torch.sign(s1.detach() - s2.detach()) == labels.to(s1.dtype)).sum(dim=1))

        def buffers(n: int):
            bufs = {"index": torch.zeros(3, n, dtype=torch.long, device=dev)}
            if self.dropout:
                bufs["scale"] = torch.zeros(model.k, 2 * n, model.hidden_dim, device=dev)  # both halves
            return bufs

        self.static = StaticStep(step, buffers, str(dev), graphs=graphs)

    def epoch(self, train_data) -> int:
        """One epoch's steps; returns the pairs seen. No host sync inside."""
        self.loss_sum.zero_()
        self.correct.zero_()
        index = train_data.epoch_index().to(self.model.device)
        total, size = index.shape[1], train_data.batch_size
        for start in range(0, total, size):
            n = min(size, total - start)
            bufs = self.static.buffers(n)
            bufs["index"].copy_(index[:, start:start + n])
            if self.dropout:
                # Outside the captured step: each head's own RNG stream, as the eager step draws it.
                bufs["scale"].copy_(self.model._dropout_scale(2 * n))
            self.static.run(n)
        return total


def _compact(model: StackedHeads, opt, keep: List[int]) -> tuple:
    """A new stack of heads ``keep`` that continues exactly where they were: weights, moments, steps, lrs, RNG."""
    models = [model.to_ranking_head(k).to(model.device) for k in keep]
    new_model = StackedHeads(models, [model.rng_states[k] for k in keep])
    return new_model, opt.select(new_model, keep)


@torch.no_grad()
def _validate(model: StackedHeads, dataset) -> tuple:
    """(loss (K,), accuracy (K,)) of every head on the dataset's fixed pairs, each image scored once."""
    model.eval()
    scores = torch.cat([model(f.to(model.device)) for _, f in dataset.image_batches(SCORE_BATCH)], dim=1)
    first, second, labels = (torch.from_numpy(a).to(model.device) for a in dataset.pair_arrays())
    s1, s2 = scores[:, first], scores[:, second]
    loss = model.pair_losses(s1, s2, labels)
    correct = (torch.sign(s1 - s2) == labels.to(s1.dtype)).sum(dim=1)
    return loss, correct.to(torch.float64) / labels.shape[0]


def _build_heads(configs: Sequence[HeadConfig], input_dim: int, dev: torch.device) -> tuple:
    """(book-keeping, models, dropout RNG states) for the configs, each head seeded as a single run seeds it."""
    heads, models, rngs = [], [], []
    for cfg in configs:
        model_k, rng_k, cpu_k = build_head(input_dim, cfg.projector_dim, cfg.margin, cfg.hidden_dim, cfg.dropout,
                                           cfg.seed, dev)
        heads.append(_Head(cfg, cpu_k))
        models.append(model_k)
        rngs.append(rng_k)
    return heads, models, rngs


def _eager_epoch(model: StackedHeads, opt, train_data, dev: torch.device, clip: float) -> tuple:
    """One epoch of eager steps: (loss sum (K,), correct (K,), pairs seen)."""
    k = model.k
    loss_sum = torch.zeros(k, device=dev)
    correct = torch.zeros(k, device=dev, dtype=torch.long)
    seen = 0
    all_on = [True] * k
    for f1, f2, labels in train_data:
        f1, f2, labels = f1.to(dev), f2.to(dev), labels.to(dev)
        n = labels.shape[0]
        scores = model(torch.cat([f1, f2], dim=0))
        s1, s2 = scores[:, :n], scores[:, n:]
        losses = model.pair_losses(s1, s2, labels)
        model.zero_grad(set_to_none=True)
        # Heads share no parameters: the gradient of the sum is each head's own loss gradient.
        losses.sum().backward()
        clip_grad_norm_per_head(model.stacked, clip)
        opt.step(all_on)
        loss_sum += losses.detach() * n
        correct += (torch.sign(s1.detach() - s2.detach()) == labels.to(s1.dtype)).sum(dim=1)
        seen += n
    return loss_sum, correct, seen


class _Group:
    """One group while it trains: the heads' book-keeping, the current stack and its optimizer, and which
    head sits in which slot of the stack (slots change when stopped heads leave)."""

    def __init__(self, configs: Sequence[HeadConfig], train_data, tc: TrainingConfig, device: str,
                 optimizer: Optional[str], starts: Optional[Sequence[HeadStart]] = None):
        self.tc, self.dev = tc, torch.device(device)
        self.t0 = time.perf_counter()
        self.heads, models, rngs = _build_heads(configs, int(train_data.features.shape[1]), self.dev)
        self.start_epoch = _resume(self.heads, models, rngs, starts, self.dev) if starts else 0
        self.mode = group_step_mode(tc, device, optimizer)
        self.feats = getattr(train_data, "features", None)
        # The static step needs the whole epoch's pair index and the features on the training device.
        self.static = (self.mode != "eager" and callable(getattr(train_data, "epoch_index", None))
                       and isinstance(self.feats, torch.Tensor) and self.feats.device == self.dev)
        self.model, self.opt = _stack(self.heads, models, rngs, tc, optimizer, capturable=self.static)
        if starts:
            self.opt.load_head_states([s.optimizer_state for s in starts], [s.scheduler_state for s in starts])
        self.group_step = self._new_group_step()
        self.slots = list(range(len(self.heads)))  # slot in the stack -> index into heads
        self.outcomes: Dict[int, HeadOutcome] = {}

    def _new_group_step(self) -> Optional[_GroupStep]:
        if not self.static:
            return None
        return _GroupStep(self.model, self.opt, self.feats, self.tc.gradient_clip_norm, self.mode == "graph")

    def train_epoch(self, train_data) -> tuple:
        """(loss sum (K,), correct (K,), pairs seen) of one epoch's steps."""
        self.model.train()
        if self.group_step is None:
            return _eager_epoch(self.model, self.opt, train_data, self.dev, self.tc.gradient_clip_norm)
        seen = self.group_step.epoch(train_data)
        return self.group_step.loss_sum, self.group_step.correct, seen

    def record(self, epoch: int, lrs: List[float], train_loss, train_acc, val_loss, val_acc) -> List[int]:
        """Append each head's epoch to its history, keep its best; returns the slots that stop early now.

        Without validation (``val_loss`` / ``val_acc`` None) the train accuracy picks the best epoch, as the
        Trainer does, and the history's val lists stay empty."""
        done: List[int] = []
        for slot, i in enumerate(self.slots):
            h = self.heads[i]
            values = (train_loss[slot], None if val_loss is None else val_loss[slot], train_acc[slot],
                      None if val_acc is None else val_acc[slot], lrs[slot])
            for key, value in zip(HISTORY_KEYS, values):
                if value is not None:
                    h.history[key].append(value)
            score, loss = (train_acc[slot], train_loss[slot]) if val_acc is None else (val_acc[slot], val_loss[slot])
            h.improved = score > h.best_acc
            if h.improved:
                h.best_acc, h.best_loss, h.best_epoch, h.bad_epochs = score, loss, epoch + 1, 0
                h.best = {
                    "state": self.model.head_state_dict(slot),
                    "optimizer": self.opt.head_optimizer_state(slot),
                    "scheduler": self.opt.head_scheduler_state(slot),
                    "rng": _rng_snapshot(self.model, slot, h, self.dev),
                }
            else:
                h.bad_epochs += 1
            if 0 < self.tc.early_stopping_patience <= h.bad_epochs:
                done.append(slot)
        return done

    def finish(self, i: int, epochs_run: int, stopped: bool, on_finished) -> None:
        h = self.heads[i]
        best = h.best or {}
        out = HeadOutcome(
            config=h.config, best_epoch=h.best_epoch, best_val_acc=float(h.best_acc), best_val_loss=float(h.best_loss),
            epochs_run=epochs_run, stopped_early=stopped, state=best.get("state", {}),
            optimizer_state=best.get("optimizer", {}), scheduler_state=best.get("scheduler", {}),
            rng_state=best.get("rng", {}), history=h.history, wall_time_s=time.perf_counter() - self.t0,
        )
        self.outcomes[i] = out
        if on_finished is not None:
            on_finished(out)

    def drop(self, done: List[int]) -> bool:
        """Rebuild the stack without the slots in ``done``; False when no head is left training."""
        keep = [s for s in range(len(self.slots)) if s not in done]
        if not keep:
            return False
        self.model, self.opt = _compact(self.model, self.opt, keep)
        self.slots = [self.slots[s] for s in keep]
        if self.group_step is not None:  # a new stack: new buffers, a new capture
            self.group_step = self._new_group_step()
        return True


def train_group(
    configs: Sequence[HeadConfig],
    train_data,
    val_data,
    training: TrainingConfig,
    device: str = "cpu",
    *,
    optimizer: Optional[str] = None,
    on_epoch: Optional[Callable[[int, int], None]] = None,
    on_finished: Optional[Callable[[HeadOutcome], None]] = None,
    seeds_may_differ: bool = False,
    starts: Optional[Sequence[HeadStart]] = None,
    after_epoch: Optional[Callable[[List[HeadEpoch]], None]] = None,
) -> List[HeadOutcome]:
    """Train heads that share (seed, hidden_dim, projector_dim) together; one outcome per config, in input order.

    ``train_data`` / ``val_data`` are ``FeaturePairDataset``s (train: fresh pairs per ``set_epoch``; val: fixed
    pairs) built with the group's seed. ``training`` supplies everything but lr, weight decay and seed, which
    come from each config. ``on_epoch(epoch, heads_trained)`` runs after every epoch and
    ``on_finished(outcome)`` as soon as a head is done, so a caller can save it before the others finish.
    ``optimizer``: ``fused``, ``batched`` or ``plain`` (``mirip.training.stacked_optim.make_optimizer``); None picks by device.
    ``seeds_may_differ``: heads of different seeds share the caller's batches (an ensemble), each seed setting
    only its head's initial weights and dropout stream.
    ``val_data`` None: each head's train accuracy picks its best epoch (the Trainer's rule without a val loader).
    ``starts``: one ``HeadStart`` per config (all after the same number of epochs): the group continues from
    there exactly as the uninterrupted run would. ``after_epoch(heads)`` gets every head still training after
    each epoch (before stopped heads leave the stack), e.g. to write its checkpoints.
    """
    if not configs:
        return []
    keys = {c.shape_key[1:] if seeds_may_differ else c.shape_key for c in configs}
    if len(keys) != 1:
        raise ValueError(f"a group's configs must share seed, hidden_dim and projector_dim; got {sorted(keys)}")
    tc = training
    if starts is not None and len(starts) != len(configs):
        raise ValueError(f"need one start per config: {len(configs)} configs, {len(starts)} starts")
    group = _Group(configs, train_data, tc, device, optimizer, starts)
    patience = tc.early_stopping_patience
    if group.start_epoch >= tc.max_epochs or all(0 < patience <= h.bad_epochs for h in group.heads):
        for i, h in enumerate(group.heads):  # resumed after the end: nothing left to train
            group.finish(i, group.start_epoch, 0 < patience <= h.bad_epochs, on_finished)
        return [group.outcomes[i] for i in range(len(group.heads))]
    for epoch in range(group.start_epoch, tc.max_epochs):
        train_data.set_epoch(epoch)
        lrs = group.opt.lrs()
        loss_sum, correct, seen = group.train_epoch(train_data)
        if seen == 0:
            raise ValueError("the training data yielded no batches")
        val = _validate(group.model, val_data) if val_data is not None else None
        group.opt.epoch_end()
        # One device sync per epoch for all heads' numbers.
        train_loss_l, train_acc_l = (loss_sum / seen).tolist(), (correct.double() / seen).tolist()
        done = group.record(epoch, lrs, train_loss_l, train_acc_l, *((None, None) if val is None else
                                                                      (val[0].tolist(), val[1].tolist())))
        if after_epoch is not None:
            after_epoch([HeadEpoch(group, slot) for slot in range(len(group.slots))])
        for slot in done:
            group.finish(group.slots[slot], epoch + 1, True, on_finished)
        if on_epoch is not None:
            on_epoch(epoch, len(group.slots))
        if epoch + 1 == tc.max_epochs or (done and not group.drop(done)):
            break
    for i in group.slots:
        if i not in group.outcomes:
            group.finish(i, tc.max_epochs, False, on_finished)
    return [group.outcomes[i] for i in range(len(group.heads))]


def _resume(heads: Sequence[_Head], models: Sequence, rngs: List, starts: Sequence[HeadStart],
            dev: torch.device) -> int:
    """Put each start's weights, RNG and book-keeping into a freshly built head; returns the epochs done."""
    done = {int(s.epochs_done) for s in starts}
    if len(done) != 1:
        raise ValueError(f"heads resumed together must have run the same epochs, got {sorted(done)}")
    for i, (head, start) in enumerate(zip(heads, starts)):
        models[i].load_head_state_dict(start.state)
        rng = start.rng_state or {}
        if rng.get("torch") is not None:
            head.cpu_rng = rng["torch"].detach().cpu().clone()
            if dev.type != "cuda":
                rngs[i] = head.cpu_rng.clone()  # on a CPU the dropout stream is the CPU RNG
        cuda = rng.get("cuda") or []
        if dev.type == "cuda" and cuda:
            rngs[i] = cuda[dev.index or 0 if len(cuda) > (dev.index or 0) else 0].detach().cpu().clone()
        head.resume(start)
    return done.pop()


def _rng_snapshot(model: StackedHeads, slot: int, head: _Head, dev: torch.device) -> Dict[str, object]:
    """The RNG states a single run of this head would hold now (what the Trainer stores for an exact resume)."""
    state = model.rng_states[slot]
    if dev.type == "cuda":
        return {"torch": head.cpu_rng.clone(), "cuda": [state.clone()] if state is not None else []}
    return {"torch": (state if state is not None else head.cpu_rng).clone(), "cuda": []}
