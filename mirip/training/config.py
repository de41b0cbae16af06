"""TrainingConfig: every choice of a training run, saved beside it as config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass
class TrainingConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 32
    max_epochs: int = 100
    gradient_clip_norm: float = 1.0
    early_stopping_patience: int = 10
    scheduler_t_max: int = 100
    scheduler_eta_min: float = 1e-6
    checkpoint_dir: str = "./checkpoints"
    save_every_n_epochs: int = 5
    wandb_enabled: bool = False
    wandb_project: Optional[str] = None
    wandb_run_name: Optional[str] = None
    device: str = "cuda"
    seed: int = 42
    # Additions beyond the seed (stage two on cached features); defaults keep the seed's behaviour.
    pairs_per_epoch: int = 10_000  # training pairs sampled afresh each epoch
    eval_pairs: int = 10_000  # validation / test pairs, sampled once (epoch 0)
    pair_balance: str = "tier_pair"  # "tier_pair": even over S-A, S-B, ...; "uniform": over all cross-tier pairs
    num_workers: int = 0  # DataLoader workers for image-file datasets (features need none)
    # Head step on cached features (mirip.training.static_step): "auto" = eager until the CUDA graph is verified on a GPU;
    # "eager", "static" (the graph's static-buffer step run eagerly) or "graph".
    head_step: str = "auto"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainingConfig":
        """Build from a dict, ignoring keys this version does not know (newer runs stay readable)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "TrainingConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))
