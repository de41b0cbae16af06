"""Trainer: fits a ranking head on cached features, or the full-image model on image pairs, with the same code.

Training-step contract. ``train.py`` (``mirip.training.head_fit``), ``--ensemble`` and sweeps train heads on cached
features with the stacked engine (``mirip.training.stacked_training``), which reproduces this step to float rounding
(the same epochs, pairs, accuracies and RNG streams; tests/training/test_head_fit.py); the Trainer is the seed's
single-model API and the full-image trainer:

- Head init is the caller's: ``torch.manual_seed(config.seed)`` right before building
  the ``RankingHead``. The Trainer never re-initialises the model.
- Epoch ``e`` (0-based): training pairs are ``sample_pairs(train_ranks, pairs_per_epoch,
  seed=config.seed, epoch=e, balance=pair_balance)`` (the Trainer calls ``set_epoch(e)``
  on the loader's dataset, or on the loader itself); batches are consecutive chunks of
  ``batch_size`` in that order, the last partial batch kept. Validation pairs are
  sampled once, ``epoch=0`` and ``config.seed``, from the val split.
- Step: ``model.train()``; ``s1, s2 = model(f1, f2)``; ``loss = model.compute_loss(s1, s2,
  labels)``; ``optimizer.zero_grad(set_to_none=True)``; ``loss.backward()``;
  ``clip_grad_norm_(trainable params, gradient_clip_norm)``; ``optimizer.step()`` (``mirip.training.optim_step``:
  the same arithmetic bit for bit, with less Python per step). The head's two score-offset parameters get an
  exactly zero gradient (``RankingHead``: the pairwise loss cannot see a common shift of the scores).
  Optimizer: ``AdamW(trainable params, lr=learning_rate, weight_decay=weight_decay,
  fused=True)`` (``make_optimizer``), torch defaults otherwise; the fused kernel computes
  the same update as the default for-loop one (to float rounding) and is ~10x faster
  on CPU for a 1024-d head, where the per-tensor loop dominated the step.
  Scheduler: ``CosineAnnealingLR(T_max=scheduler_t_max, eta_min=scheduler_eta_min)``,
  stepped once per epoch after training.
- Head step mode (``config.head_step``, ``mirip.training.static_step``): on a ``FeaturePairDataset`` whose
  features sit on the training device, ``static`` / ``graph`` run this same step over static buffers (the
  batch gathered inside the step, gradients zeroed in place instead of set to None, AdamW with
  ``capturable=True`` and its lr a device tensor); ``graph`` (the default on CUDA) replays it from a CUDA
  graph. Results equal the eager step's to float rounding. Eager is the default everywhere else, and always
  for the full-image model.
- A pair is correct when ``sign(s1 - s2) == label`` (a tie is wrong). The epoch's train
  loss is the mean over batches weighted by batch size (= the mean over pairs).
- After each epoch: validate (``model.eval()``, no grad). Best = strictly higher val
  accuracy (the first epoch is always best). Early stopping after
  ``early_stopping_patience`` epochs without improvement (0 disables it). Without a val
  loader the train accuracy plays that role.
- Dropout draws from the global torch RNG and nothing else may during training: pair
  order comes from ``sample_pairs``, and a ``FeaturePairDataset`` is iterated directly
  (a ``DataLoader`` would draw a base seed from the global RNG on every epoch).

Checkpoints (``mirip.store.checkpoint`` keys) hold the head-only state dict, optimizer and
scheduler state, the feature fingerprint and backbone info, the config, and what an
exact resume needs: epochs done, history, best accuracy and epoch, the early-stopping
counter and the torch RNG states. ``fit`` after ``load_checkpoint`` continues exactly
as an uninterrupted run would (the checkpoint section of ``Trainer``; the history keys and the state helpers are ``mirip.training.checkpoint_state``).
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from mirip.common.devices import resolve_device
from mirip.store.checkpoint import head_checkpoint, load_checkpoint_file, save_checkpoint_file
from mirip.training.checkpoint_state import HISTORY_KEYS, RESUME_ONLY_KEYS, head_state, plain_lrs
from mirip.training.config import TrainingConfig
from mirip.training.optim_step import clip_and_step
from mirip.training.static_step import StaticStep, persistent_grads, resolve_step_mode, zero_grads_


def check_config(config: TrainingConfig) -> None:
    """Reject settings that would fail (or silently do nothing) deep inside a run."""
    positive = ("learning_rate", "batch_size", "max_epochs", "scheduler_t_max", "save_every_n_epochs",
                "pairs_per_epoch", "eval_pairs")
    for name in positive:
        if not getattr(config, name) > 0:
            raise ValueError(f"TrainingConfig.{name} must be positive, got {getattr(config, name)!r}")
    for name in ("weight_decay", "gradient_clip_norm", "early_stopping_patience", "scheduler_eta_min", "num_workers"):
        if getattr(config, name) < 0:
            raise ValueError(f"TrainingConfig.{name} must be non-negative, got {getattr(config, name)!r}")


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Tell the loader's dataset (or the loader itself) which epoch's pairs to serve."""
    for target in (getattr(loader, "dataset", None), loader):
        if target is not None and callable(getattr(target, "set_epoch", None)):
            target.set_epoch(epoch)
            return


def make_optimizer(params: List[torch.nn.Parameter], config: TrainingConfig,
                   capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel wherever every parameter allows it.

    ``capturable``: the form a CUDA graph can replay - step counts on the device and the lr a 0-d device tensor
    (the scheduler updates it in place, so a captured step sees each epoch's lr)."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if capturable:
        if not fused:
            raise ValueError("a capturable head step needs floating-point parameters on the CPU or CUDA")
        lr = torch.tensor(float(config.learning_rate), device=params[0].device)
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, fused=True, capturable=True)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                             fused=fused or None)


def batch_correct(score1: torch.Tensor, score2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of pairs with sign(score1 - score2) == label, as a 0-d tensor (no device sync)."""
    return (torch.sign(score1 - score2).reshape(-1) == labels.to(score1.dtype).reshape(-1)).sum()


def start_wandb(config: TrainingConfig):
    """A Weights & Biases run for ``config`` (its project, run name and settings)."""
    try:
        import wandb
    except ImportError as exc:
        raise ImportError(
            "wandb_enabled=True but wandb is not installed: `pip install wandb`, or turn wandb logging off"
        ) from exc
    return wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=config.to_dict())


class Trainer:
    """``Trainer(model, config)``: ``fit``, ``train_epoch``, ``validate``, ``save_checkpoint``, ``load_checkpoint``.

    ``fingerprint`` (the feature cache's fingerprint, None for full-image training) and
    ``extra`` (plain values, e.g. the run config) go into every checkpoint. With
    ``config.checkpoint_dir`` set (falsy disables files), ``fit`` writes ``best.pt``,
    ``last.pt`` and ``checkpoint_epoch_{n}.pt`` every ``save_every_n_epochs``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainingConfig,
        *,
        fingerprint: Optional[Dict[str, Any]] = None,
        extra: Optional[Dict[str, Any]] = None,
        progress: bool = True,
        log: Optional[Callable[[str], None]] = None,
    ):
        check_config(config)
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        if hasattr(model, "device"):
            model.device = self.device  # the full-image model keeps its own device attribute
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.step_mode = resolve_step_mode(config.head_step, self.device)
        if getattr(model, "feature_extractor", None) is not None:
            self.step_mode = "eager"  # full-image training: images, not a feature matrix, feed the step
        self.optimizer = make_optimizer(self.params, config, capturable=self.step_mode != "eager")
        self._static: Optional[StaticStep] = None
        self._static_key = None
        self._static_acc: Dict[str, torch.Tensor] = {}
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.scheduler_t_max, eta_min=config.scheduler_eta_min
        )
        self.fingerprint = dict(fingerprint) if fingerprint is not None else None
        self.extra = dict(extra or {})
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg))
        self.history: Dict[str, List[float]] = {k: [] for k in HISTORY_KEYS}
        self.epoch = 0  # epochs completed; fit continues from here
        self.best_accuracy = -math.inf
        self.best_epoch = 0  # 1-based epoch of the best model; 0 = none yet
        self.epochs_without_improvement = 0
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        self.stopped_early = False
        self._wandb = start_wandb(config) if config.wandb_enabled else None

    # --- one epoch ---------------------------------------------------------------------------
    def _to_device(self, batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x1, x2, labels = batch
        nb = self.device.startswith("cuda")
        return (x1.to(self.device, non_blocking=nb), x2.to(self.device, non_blocking=nb),
                torch.as_tensor(labels).to(self.device, non_blocking=nb))

    def _zero_grad(self) -> None:
        if self._static is not None:
            zero_grads_(self.params)  # a captured step holds the gradients' addresses: never free them
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def uses_static_step(self, dataloader: Iterable) -> bool:
        """Whether ``train_epoch`` runs the static-buffer step (or its CUDA graph) on this loader."""
        dataset = getattr(dataloader, "dataset", dataloader)
        features = getattr(dataset, "features", None)
        return (self.step_mode != "eager" and callable(getattr(dataset, "epoch_index", None))
                and isinstance(features, torch.Tensor) and features.device == torch.device(self.device))

    def _follow_backbone(self, dataloader: Iterable) -> None:
        # An image dataset left on its default (ImageNet) transform gets the trained backbone's own
        # normalisation before any image is read, so a SigLIP or CLIP model trains on the pixels it scores.
        dataset = getattr(dataloader, "dataset", dataloader)
        extractor = getattr(self.model, "feature_extractor", None)
        follow = getattr(dataset, "follow_backbone", None)
        if extractor is not None and callable(follow) and follow(extractor):
            t = dataset.transform
            self.log(f"image preprocessing follows the {extractor.family.title} backbone: {t.image_size} px, "
                     f"mean {list(t.mean)}, std {list(t.std)}, patch {t.patch_size}")

    def train_epoch(self, dataloader: Iterable) -> Tuple[float, float]:
        """One pass over the loader's batches; returns (mean loss over pairs, accuracy)."""
        self.model.train()
        self._follow_backbone(dataloader)
        if self.uses_static_step(dataloader):
            return self._train_epoch_static(getattr(dataloader, "dataset", dataloader))
        # The epoch's losses and scores are kept (detached views, no copies) and reduced once at the end: no
        # per-step bookkeeping kernels, and no CPU-GPU sync inside the epoch.
        losses: List[torch.Tensor] = []
        sizes: List[int] = []
        kept: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for batch in dataloader:
            x1, x2, labels = self._to_device(batch)
            s1, s2 = self.model(x1, x2)
            loss = self.model.compute_loss(s1, s2, labels)
            self._zero_grad()
            loss.backward()
            clip_and_step(self.optimizer, self.params, self.config.gradient_clip_norm)
            losses.append(loss.detach())
            sizes.append(labels.shape[0])
            kept.append((s1.detach(), s2.detach(), labels))
        seen = sum(sizes)
        if seen == 0:
            raise ValueError("the training loader yielded no batches")
        weights = torch.tensor(sizes, dtype=losses[0].dtype, device=losses[0].device)
        loss_sum = torch.dot(torch.stack(losses), weights)
        correct = batch_correct(*(torch.cat([k[i].reshape(-1) for k in kept]) for i in range(3)))
        return float(loss_sum) / seen, int(correct) / seen

    def static_step(self, features: torch.Tensor) -> StaticStep:
        """The static-buffer step over ``features`` (one per feature matrix: a graph captures its address)."""
        key = (features.data_ptr(), tuple(features.shape), features.dtype)
        if self._static is not None and self._static_key == key:
            return self._static
        persistent_grads(self.params)
        model, params, optimizer, clip = self.model, self.params, self.optimizer, self.config.gradient_clip_norm
        device = self.device
        acc = self._static_acc = {"loss_sum": torch.zeros((), device=device),
                                  "correct": torch.zeros((), device=device, dtype=torch.long)}

        def step(bufs: Dict[str, torch.Tensor]) -> None:
            # The Trainer's step (module docstring), every tensor at a fixed address.
            index = bufs["index"]
            x1 = features.index_select(0, index[0]).float()
            x2 = features.index_select(0, index[1]).float()
            labels = index[2]
            zero_grads_(params)
            s1, s2 = model(x1, x2)
            loss = model.compute_loss(s1, s2, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            acc["loss_sum"].add_(loss.detach() * index.shape[1])
            acc["correct"].add_(batch_correct(s1.detach(), s2.detach(), labels))

        def buffers(n: int) -> Dict[str, torch.Tensor]:
            return {"index": torch.zeros(3, n, dtype=torch.long, device=device)}

        self._static = StaticStep(step, buffers, device, graphs=self.step_mode == "graph")
        self._static_key = key
        return self._static

    def _train_epoch_static(self, dataset) -> Tuple[float, float]:
        stepper = self.static_step(dataset.features)
        acc = self._static_acc
        acc["loss_sum"].zero_()
        acc["correct"].zero_()
        index = dataset.epoch_index().to(self.device)  # (3, P): first rows, second rows, labels
        total, size = index.shape[1], dataset.batch_size
        if total == 0:
            raise ValueError("the training loader yielded no batches")
        # No host sync inside the loop: one copy into the static index buffer, then the (replayed) step.
        for start in range(0, total, size):
            n = min(size, total - start)
            stepper.buffers(n)["index"].copy_(index[:, start:start + n])
            stepper.run(n)
        return float(acc["loss_sum"]) / total, int(acc["correct"]) / total  # CPU-GPU sync point, once per epoch

    @torch.no_grad()
    def validate(self, dataloader: Iterable) -> Tuple[float, float]:
        """(mean loss over pairs, accuracy) in eval mode. Feature datasets score each image once."""
        self.model.eval()
        self._follow_backbone(dataloader)
        dataset = getattr(dataloader, "dataset", dataloader)
        if hasattr(dataset, "image_features") and hasattr(self.model, "get_score"):
            return self._validate_by_image(dataset)
        loss_sum, correct, seen = 0.0, 0, 0
        for batch in dataloader:
            x1, x2, labels = self._to_device(batch)
            s1, s2 = self.model(x1, x2)
            loss_sum += float(self.model.compute_loss(s1, s2, labels)) * labels.shape[0]
            correct += int(batch_correct(s1, s2, labels))
            seen += labels.shape[0]
        if seen == 0:
            raise ValueError("the validation loader yielded no batches")
        return loss_sum / seen, correct / seen

    def _validate_by_image(self, dataset) -> Tuple[float, float]:
        # Each image scored once, pairs read off the scores: identical numbers, far fewer forwards.
        scores = torch.cat([self.model.get_score(f.to(self.device)).reshape(-1)
                            for _, f in dataset.image_batches(4096)])
        first, second, labels = (torch.from_numpy(a).to(self.device) for a in dataset.pair_arrays())
        s1, s2 = scores[first], scores[second]
        loss = self.model.compute_loss(s1, s2, labels)
        return float(loss), int(batch_correct(s1, s2, labels)) / labels.shape[0]

    # --- the loop ----------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, val_loader: Optional[Iterable] = None) -> Dict[str, List[float]]:
        """Train up to ``max_epochs`` (continuing after a loaded checkpoint); returns the history."""
        cfg = self.config
        if 0 < cfg.early_stopping_patience <= self.epochs_without_improvement:
            self.stopped_early = True  # resumed from a run that had already stopped early
            return self.history
        if val_loader is not None:
            set_loader_epoch(val_loader, 0)  # validation pairs are fixed: epoch 0
        bar = tqdm(range(self.epoch, cfg.max_epochs), desc="train", unit="epoch", disable=not self.progress,
                   initial=self.epoch, total=cfg.max_epochs, dynamic_ncols=True)
        for epoch in bar:
            t0 = time.perf_counter()
            set_loader_epoch(train_loader, epoch)
            lr = float(self.optimizer.param_groups[0]["lr"])
            train_loss, train_acc = self.train_epoch(train_loader)
            if val_loader is not None:
                val_loss, val_acc = self.validate(val_loader)
                self.history["val_loss"].append(val_loss)
                self.history["val_acc"].append(val_acc)
            self.scheduler.step()
            self.history["train_loss"].append(train_loss)
            self.history["train_acc"].append(train_acc)
            self.history["lr"].append(lr)
            self.epoch = epoch + 1
            score = val_acc if val_loader is not None else train_acc
            improved = score > self.best_accuracy
            if improved:
                self.best_accuracy, self.best_epoch = score, self.epoch
                self.epochs_without_improvement = 0
                self.best_state = {k: v.detach().clone() for k, v in head_state(self.model).items()}
            else:
                self.epochs_without_improvement += 1
            self.stopped_early = 0 < cfg.early_stopping_patience <= self.epochs_without_improvement
            self._save_epoch_checkpoints(improved, score)
            stats = {"train/loss": train_loss, "train/acc": train_acc, "lr": lr,
                     "epoch_time_s": time.perf_counter() - t0}
            if val_loader is not None:
                stats.update({"val/loss": val_loss, "val/acc": val_acc})
            if self._wandb is not None:
                self._wandb.log(stats, step=self.epoch)
            bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items() if k != "epoch_time_s"})
            if self.stopped_early:
                self.log(f"early stopping after epoch {self.epoch}: no improvement in "
                         f"{cfg.early_stopping_patience} epochs (best {self.best_accuracy:.4f} at epoch {self.best_epoch})")
                break
        bar.close()
        if self._wandb is not None:
            self._wandb.summary["best_accuracy"] = self.best_accuracy
        return self.history

    # --- checkpoints -----------------------------------------------------------------------------------------
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
