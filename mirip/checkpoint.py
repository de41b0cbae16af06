"""Checkpoint files: plain dicts of tensors and Python values, written atomically, read without unpickling code.

Keys (format 1): format_version, mirip_version, model_state_dict (head only:
projector.* and score_head.*), optimizer_state_dict, scheduler_state_dict,
epoch, accuracy, config (TrainingConfig as a dict), head (RankingHead.head_config()),
fingerprint (the feature fingerprint the head was trained on, or None),
backbone (BackboneInfo as a dict, or None); trainers may add more plain keys.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Union

import torch

from mirip.atomic import write_atomic_with

CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is unreadable, truncated, or would need arbitrary code to load."""


def save_checkpoint_file(path: Union[str, os.PathLike], payload: Dict[str, Any]) -> None:
    """Write ``payload`` so that a reader sees either the old file or the complete new one, never half."""
    write_atomic_with(path, lambda f: torch.save(payload, f))


def load_checkpoint_file(path: Union[str, os.PathLike], map_location: Any = "cpu") -> Dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain values only; anything else is refused."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load checkpoint {path}: it needs arbitrary unpickling (code could run), "
            f"which mirip never does. Only checkpoints written by mirip load. Detail: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a torch file ({exc})") from exc
    if not isinstance(payload, dict) or "model_state_dict" not in payload:
        raise CheckpointError(f"{path} is not a mirip checkpoint (no model_state_dict)")
    return payload
