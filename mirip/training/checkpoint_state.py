"""What a stage-two checkpoint's training state is made of: the history keys, the keys only a resume needs
(kept in ``last.pt``, not in the ``best.pt`` people ship), the head's state dict, and learning rates and
histories as plain values. ``mirip.training.trainer.Trainer`` writes and reads checkpoints with them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from mirip.ml.ranking_model import HEAD_PREFIXES

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


