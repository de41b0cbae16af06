"""One head fitted on cached features by the stacked engine, with the Trainer's checkpoints: ``train.py``'s run.

``train.py`` (and each of its ``--folds``) trains through ``mirip.training.stacked_training.train_group`` with
one head, the engine that also trains ``--ensemble`` members and every head of a sweep: the step, the gradient
clipping, the learning-rate schedule and early stopping exist once for all of them. The seed's ``Trainer``
stays the library's single-model API and the full-image trainer; the engine with one head ends exactly where
the Trainer ends on the same data (tests/training/test_head_fit.py), and both write the same checkpoint format,
so a ``last.pt`` of either resumes in the other.

Files, as the Trainer writes them (``TrainingConfig.checkpoint_dir``): ``best.pt`` when an epoch improves
(without the resume-only keys), ``checkpoint_epoch_{n}.pt`` every ``save_every_n_epochs``, ``last.pt`` after
every epoch.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from mirip.common.devices import resolve_device
from mirip.ml.ranking_model import RankingHead
from mirip.store.checkpoint import head_checkpoint, load_checkpoint_file, save_checkpoint_file
from mirip.training.checkpoint_state import HISTORY_KEYS, RESUME_ONLY_KEYS, plain_lrs
from mirip.training.config import TrainingConfig
from mirip.training.head_config import HeadConfig
from mirip.training.stacked_training import HeadEpoch, HeadStart, train_group
from mirip.training.static_step import resolve_step_mode
from mirip.training.trainer import check_config, start_wandb


def head_start(ckpt: Dict[str, Any], path: str) -> HeadStart:
    """Where a resumable checkpoint (a ``last.pt``, the Trainer's or this module's) left its head."""
    if not ckpt.get("optimizer_state_dict") or not ckpt.get("scheduler_state_dict"):
        raise ValueError(f"{path} holds no optimizer or scheduler state (best.pt leaves them to last.pt), so the "
                         "run cannot continue exactly where it stood; resume from the run's last.pt")
    epoch = int(ckpt.get("epoch", 0))
    return HeadStart(
        epochs_done=epoch, state=ckpt["model_state_dict"], optimizer_state=ckpt["optimizer_state_dict"],
        scheduler_state=ckpt["scheduler_state_dict"], rng_state=ckpt.get("rng_state") or {},
        history=ckpt.get("history") or {}, best_acc=float(ckpt.get("best_accuracy", ckpt.get("accuracy", -math.inf))),
        best_epoch=int(ckpt.get("best_epoch", epoch)), bad_epochs=int(ckpt.get("epochs_without_improvement", 0)),
        best_state=ckpt.get("best_state_dict"))


class HeadFit:
    """``fit`` a head of ``head`` (dims, margin, dropout, lr, weight decay, seed) on ``input_dim``-d features.

    After ``fit``: ``model`` holds the last epoch's weights (``restore_best`` puts the best epoch's back), and
    ``history``, ``epoch``, ``best_accuracy``, ``best_epoch``, ``stopped_early`` read as the Trainer's do.
    ``fingerprint`` and ``extra`` go into every checkpoint, as the Trainer's."""

    def __init__(self, head: HeadConfig, input_dim: int, config: TrainingConfig, *,
                 fingerprint: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None,
                 progress: bool = True, log: Optional[Callable[[str], None]] = None):
        check_config(config)
        self.head, self.input_dim, self.config = head, int(input_dim), config
        self.device = resolve_device(config.device)
        self.fingerprint = dict(fingerprint) if fingerprint is not None else None
        self.extra = dict(extra or {})
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg))
        self.start: Optional[HeadStart] = None
        self.model: Optional[RankingHead] = None
        self.history: Dict[str, List[float]] = {k: [] for k in HISTORY_KEYS}
        self.epoch = 0
        self.best_accuracy = -math.inf
        self.best_epoch = 0
        self.stopped_early = False
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        self._wandb = start_wandb(config) if config.wandb_enabled else None

    def head_dims(self) -> Dict[str, Any]:
        """The checkpoint's ``head`` entry (``RankingHead.head_config()`` form)."""
        h = self.head
        return {"input_dim": self.input_dim, "hidden_dim": h.hidden_dim, "projector_output_dim": h.projector_dim,
                "dropout": float(h.dropout), "margin": float(h.margin)}

    def new_model(self, state: Optional[Dict[str, torch.Tensor]] = None) -> RankingHead:
        h = self.head
        model = RankingHead(self.input_dim, h.projector_dim, h.margin, h.hidden_dim, h.dropout)
        if state:
            model.load_head_state_dict(state)
        return model.to(self.device)

    def load_checkpoint(self, path: str) -> Dict[str, Any]:
        """Continue the run of a resumable checkpoint: ``fit`` then goes on as the uninterrupted run would."""
        ckpt = load_checkpoint_file(path, map_location="cpu")
        self.start = head_start(ckpt, path)
        self.epoch, self.best_epoch = self.start.epochs_done, self.start.best_epoch
        self.best_accuracy = self.start.best_acc
        self.history = {k: list(self.start.history.get(k, [])) for k in HISTORY_KEYS}
        self.best_state = self.start.best_state
        if self.fingerprint is None and ckpt.get("fingerprint") is not None:
            self.fingerprint = dict(ckpt["fingerprint"])
        return ckpt

    def fit(self, train_data, val_data=None) -> Dict[str, List[float]]:
        """Train up to ``max_epochs`` (after a loaded checkpoint, from where it stopped); returns the history."""
        cfg = self.config
        bar = tqdm(total=cfg.max_epochs, initial=self.epoch, desc="train", unit="epoch", disable=not self.progress,
                   dynamic_ncols=True)
        last = {"state": self.start.state if self.start else None, "t0": time.perf_counter()}

        def after_epoch(heads: List[HeadEpoch]) -> None:
            h = heads[0]
            last["state"] = h.state()
            self._record(h, val_data is not None)
            stats = {"train/loss": h.history["train_loss"][-1], "train/acc": h.history["train_acc"][-1],
                     "lr": h.history["lr"][-1], "epoch_time_s": time.perf_counter() - last["t0"]}
            if val_data is not None:
                stats.update({"val/loss": h.history["val_loss"][-1], "val/acc": h.history["val_acc"][-1]})
            if self._wandb is not None:
                self._wandb.log(stats, step=self.epoch)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items() if k != "epoch_time_s"})
            if h.stopped_early:
                self.log(f"early stopping after epoch {self.epoch}: no improvement in "
                         f"{cfg.early_stopping_patience} epochs (best {self.best_accuracy:.4f} at epoch "
                         f"{self.best_epoch})")
            last["t0"] = time.perf_counter()

        # The fused AdamW a single run has always used, unless a static or graph step asks for the batched one.
        eager = resolve_step_mode(cfg.head_step, self.device) == "eager"
        try:
            outcome, = train_group([self.head], train_data, val_data, cfg, self.device,
                                   optimizer="fused" if eager else None, after_epoch=after_epoch,
                                   starts=[self.start] if self.start else None)
        finally:
            bar.close()
        self.stopped_early = outcome.stopped_early
        self.best_state = outcome.state or self.best_state
        self.model = self.new_model(last["state"])
        if self._wandb is not None:
            self._wandb.summary["best_accuracy"] = self.best_accuracy
        return self.history

    def restore_best(self) -> None:
        """Put the best epoch's weights into ``model``."""
        if self.best_state:
            self.model.load_head_state_dict(self.best_state)

    def _record(self, h: HeadEpoch, validated: bool) -> None:
        self.history = {k: list(v) for k, v in h.history.items()}
        self.epoch, self.best_accuracy, self.best_epoch = h.epochs_done, h.best_acc, h.best_epoch
        score = (h.history["val_acc"] if validated else h.history["train_acc"])[-1]
        directory = self.config.checkpoint_dir
        if not directory:
            return
        if h.improved:
            self._save(os.path.join(directory, "best.pt"), h, score, resumable=False)
        if self.epoch % self.config.save_every_n_epochs == 0:
            self._save(os.path.join(directory, f"checkpoint_epoch_{self.epoch}.pt"), h, score)
        self._save(os.path.join(directory, "last.pt"), h, score)

    def _save(self, path: str, h: HeadEpoch, accuracy: float, resumable: bool = True) -> None:
        """The Trainer's checkpoint of this head after ``h.epochs_done`` epochs (``Trainer.save_checkpoint``)."""
        payload = head_checkpoint(
            state=h.state(), optimizer_state=plain_lrs(h.optimizer_state()),
            scheduler_state=plain_lrs(h.scheduler_state()), epoch=h.epochs_done, accuracy=accuracy,
            config=self.config.to_dict(), head=self.head_dims(), fingerprint=self.fingerprint, backbone=None,
            history=h.history, best_accuracy=h.best_acc, best_epoch=h.best_epoch,
            epochs_without_improvement=h.bad_epochs, best_state=h.best_state(), rng_state=h.rng_state())
        if not resumable:
            for key in RESUME_ONLY_KEYS:
                del payload[key]
        payload.update(self.extra)
        save_checkpoint_file(path, payload)
