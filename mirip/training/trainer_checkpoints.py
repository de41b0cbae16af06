"""The Trainer's checkpoints: what one holds (``save_checkpoint``), which files ``fit`` writes after an epoch,
and how ``load_checkpoint`` restores a run so that ``fit`` continues exactly as an uninterrupted run would.

``TrainerCheckpoints`` is a base class of ``mirip.training.trainer.Trainer`` (the import path for all of it):
its methods work on the Trainer's model, optimizer, scheduler and loop state.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from mirip.ml.ranking_model import HEAD_PREFIXES
from mirip.store.checkpoint import head_checkpoint, load_checkpoint_file, save_checkpoint_file


HISTORY_KEYS = ("train_loss", "val_loss", "train_acc", "val_acc", "lr")
# What only resuming a run reads: left out of best.pt (``save_checkpoint(resumable=False)``).
RESUME_ONLY_KEYS = ("optimizer_state_dict", "scheduler_state_dict", "best_state_dict")


_LR_KEYS = ("lr", "initial_lr", "base_lrs", "_last_lr")


def plain_lrs(state: Any) -> Any:
    """An optimizer / scheduler state dict with tensor learning rates as floats (checkpoints stay plain)."""
    if isinstance(state, dict):
        return {k: ([float(x) for x in v] if k in _LR_KEYS and isinstance(v, list)
                    else float(v) if k in _LR_KEYS and torch.is_tensor(v) else plain_lrs(v))
                for k, v in state.items()}
    if isinstance(state, list):
        return [plain_lrs(v) for v in state]
    return state


def head_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The head-only state dict (projector.*, score_head.*) a checkpoint stores."""
    if hasattr(model, "head_state_dict"):
        return model.head_state_dict()
    return {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}


def history_to_json(history: Dict[str, List[float]]) -> Dict[str, List[Optional[float]]]:
    """History with NaN/inf as null, so the JSON is standard."""
    return {k: [None if not np.isfinite(v) else float(v) for v in vals] for k, vals in history.items()}


class TrainerCheckpoints:
    """The checkpoint methods of ``Trainer`` (which sets every attribute they use)."""

    def _save_epoch_checkpoints(self, improved: bool, accuracy: float) -> None:
        directory = self.config.checkpoint_dir
        if not directory:
            return
        if improved:
            self.save_checkpoint(os.path.join(directory, "best.pt"), self.epoch, accuracy, resumable=False)
        if self.epoch % self.config.save_every_n_epochs == 0:
            self.save_checkpoint(os.path.join(directory, f"checkpoint_epoch_{self.epoch}.pt"), self.epoch, accuracy)
        self.save_checkpoint(os.path.join(directory, "last.pt"), self.epoch, accuracy)

    def restore_best(self) -> None:
        """Put the best epoch's head weights back into the model (after ``fit``)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state, strict=False)

    def _backbone_info(self) -> Optional[Dict[str, Any]]:
        extractor = getattr(self.model, "feature_extractor", None)
        if extractor is None:
            return None
        info = dict(extractor.info.to_dict())
        info.update({"pooling": getattr(extractor, "pooling", None), "precision": getattr(extractor, "precision", None)})
        return info

    def save_checkpoint(self, filepath: str, epoch: int, accuracy: float, resumable: bool = True) -> None:
        """Write a weights-only-loadable checkpoint atomically; ``epoch`` is the number of epochs completed.

        ``resumable=False`` (best.pt: the file people ship) leaves out what only resuming needs and what would
        repeat the head: the optimizer and scheduler states (Adam's two moments are twice the head's size)
        and the best-so-far weights, which are this file's own weights. last.pt keeps them."""
        head = head_state(self.model)
        # A full-image model with an unfrozen backbone also trains backbone weights; keep them too.
        trainable_rest = {name: p.detach() for name, p in self.model.named_parameters()
                          if p.requires_grad and name not in head}
        payload = head_checkpoint(
            state=head, optimizer_state=plain_lrs(self.optimizer.state_dict()),
            scheduler_state=plain_lrs(self.scheduler.state_dict()), epoch=epoch, accuracy=accuracy,
            config=self.config.to_dict(),
            head=self.model.head_config() if hasattr(self.model, "head_config") else None,
            fingerprint=self.fingerprint, backbone=self._backbone_info(), history=self.history,
            best_accuracy=self.best_accuracy, best_epoch=self.best_epoch,
            epochs_without_improvement=self.epochs_without_improvement, best_state=self.best_state,
            rng_state={"torch": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
        if trainable_rest:
            payload["trainable_state_dict"] = trainable_rest
        if not resumable:
            for key in RESUME_ONLY_KEYS:
                del payload[key]
        payload.update(self.extra)
        save_checkpoint_file(filepath, payload)

    def load_checkpoint(self, filepath: str) -> Dict[str, Any]:
        """Restore model, optimizer, scheduler and loop state; ``fit`` then continues where it stopped."""
        ckpt = load_checkpoint_file(filepath, map_location=self.device)
        self._static, self._static_key = None, None  # loading replaces optimizer state a graph may have captured
        if hasattr(self.model, "load_head_state_dict"):
            self.model.load_head_state_dict(ckpt["model_state_dict"])
        else:
            self.model.load_state_dict(ckpt["model_state_dict"], strict=False)
        if ckpt.get("trainable_state_dict"):
            self.model.load_state_dict(ckpt["trainable_state_dict"], strict=False)
        if ckpt.get("optimizer_state_dict"):
            self._load_optimizer_state(ckpt["optimizer_state_dict"])
        elif "optimizer_state_dict" not in ckpt:
            warnings.warn(f"{filepath} holds no optimizer or scheduler state (best.pt leaves them to last.pt): "
                          "training goes on from its weights with a fresh optimizer and learning-rate schedule, "
                          "not exactly where that run stood; resume from last.pt for that", stacklevel=2)
        if ckpt.get("scheduler_state_dict"):
            self.scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        self.epoch = int(ckpt.get("epoch", 0))
        history = ckpt.get("history") or {}
        self.history = {k: list(history.get(k, [])) for k in HISTORY_KEYS}
        self.best_accuracy = float(ckpt.get("best_accuracy", ckpt.get("accuracy", -math.inf)))
        self.best_epoch = int(ckpt.get("best_epoch", self.epoch))
        self.epochs_without_improvement = int(ckpt.get("epochs_without_improvement", 0))
        best = ckpt.get("best_state_dict")
        self.best_state = {k: v.to(self.device) for k, v in best.items()} if best else copy.deepcopy(head_state(self.model))
        if self.fingerprint is None and ckpt.get("fingerprint") is not None:
            self.fingerprint = dict(ckpt["fingerprint"])
        rng = ckpt.get("rng_state") or {}
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        return ckpt

    def _load_optimizer_state(self, state: Dict[str, Any]) -> None:
        # The checkpoint's groups replace ours: keep this Trainer's kernel flags and its lr tensors (a captured
        # step reads those very tensors), taking only the values from the file.
        keep = [{k: g[k] for k in ("fused", "capturable", "foreach", "differentiable") if k in g}
                for g in self.optimizer.param_groups]
        lrs = [(g["lr"], g.get("initial_lr")) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, flags, (lr, initial) in zip(self.optimizer.param_groups, keep, lrs):
            group.update(flags)
            for key, tensor in (("lr", lr), ("initial_lr", initial)):
                if torch.is_tensor(tensor) and key in group:
                    tensor.fill_(float(group[key]))
                    group[key] = tensor
            if flags.get("capturable") or flags.get("fused"):
                for p in group["params"]:
                    st = self.optimizer.state.get(p, {})
                    if torch.is_tensor(st.get("step")):
                        st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
