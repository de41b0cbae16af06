"""Checkpoint files: plain dicts of tensors and Python values, written atomically, read without unpickling code.

Keys (format 1): format_version, mirip_version, model_state_dict (head only:
projector.* and score_head.*), optimizer_state_dict, scheduler_state_dict,
epoch, accuracy, config (TrainingConfig as a dict), head (RankingHead.head_config()),
fingerprint (the feature fingerprint the head was trained on, or None),
backbone (BackboneInfo as a dict, or None); trainers may add more plain keys. The Trainer's best.pt leaves
out optimizer_state_dict, scheduler_state_dict and best_state_dict: only resuming reads them, from last.pt.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Union

import torch

import mirip
from mirip.common.atomic import write_atomic_with
from mirip.common.package import package_version

package_version()  # a folder shadowing the package fails here, named, not at the first checkpoint saved

CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is unreadable, truncated, or would need arbitrary code to load."""


def head_checkpoint(*, state: Dict[str, Any], optimizer_state: Any, scheduler_state: Any, epoch: int,
                    accuracy: float, config: Dict[str, Any], head: Any, fingerprint: Any, backbone: Any,
                    history: Dict[str, Any], best_accuracy: float, best_epoch: int, epochs_without_improvement: int,
                    best_state: Any, rng_state: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    """The checkpoint payload of a trained head: the format's keys (module docstring) in one place, for the
    Trainer and for every head of a sweep, then ``extra`` (run config, feature keys, calibration, ...)."""
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "mirip_version": mirip.__version__,
        "model_state_dict": state,
        "optimizer_state_dict": optimizer_state,
        "scheduler_state_dict": scheduler_state,
        "epoch": int(epoch),
        "accuracy": float(accuracy),
        "config": config,
        "head": head,
        "fingerprint": fingerprint,
        "backbone": backbone,
        "history": {k: list(v) for k, v in history.items()},
        "best_accuracy": float(best_accuracy),
        "best_epoch": int(best_epoch),
        "epochs_without_improvement": int(epochs_without_improvement),
        "best_state_dict": best_state,
        "rng_state": rng_state,
        **extra,
    }


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
