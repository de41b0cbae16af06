"""A trained head's score-to-tier calibration (fitted on the validation split) and its training-split
score reference, computed and written into its checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from mirip.store.checkpoint import load_checkpoint_file, save_checkpoint_file
from mirip.training.calibration import OrdinalCalibration
from mirip.training.calibration_fit import fit_ordinal
from mirip.training.calibration import CalibrationError
from mirip.training.calibration import ScoreReference
from mirip.training.calibration_fit import make_score_reference
from mirip.training.datasets.pairwise_dataset import FeaturePairDataset
from mirip.training.evaluator import score_images


@dataclass
class HeadCalibration:
    """A head's score-to-tier calibration (val split) and training-split score reference, or why there is none."""

    calibration: Optional[OrdinalCalibration]
    score_reference: Optional[ScoreReference]
    note: Optional[str]
    scores: Dict[str, Tuple[np.ndarray, np.ndarray]]  # split -> (scores, ranks) of the splits scored

    def checkpoint_keys(self) -> Dict[str, Any]:
        """The plain-dict checkpoint keys: calibration, score_reference (None when absent) and calibration_note."""
        return {"calibration": self.calibration.to_dict() if self.calibration else None,
                "score_reference": self.score_reference.to_dict() if self.score_reference else None,
                "calibration_note": self.note}


def calibrate_head(model: torch.nn.Module, datasets: Dict[str, Optional[FeaturePairDataset]], device: str,
                   splits: Tuple[str, ...] = ("train", "val", "test")) -> HeadCalibration:
    """Fit the ordinal calibration on the val split's scores and take the train split's score quantiles."""
    scores = {s: (score_images(model, datasets[s], device), datasets[s].ranks)
              for s in splits if datasets.get(s) is not None}
    reference = (make_score_reference(*scores["train"], split="train", names=datasets["train"].names)
                 if "train" in scores else None)
    if "val" not in scores:
        return HeadCalibration(None, reference, "no validation split, so no score-to-tier calibration "
                               "(tier predictions need val_ratio > 0)", scores)
    try:
        calibration = fit_ordinal(*scores["val"], fitted_on="val")
    except CalibrationError as exc:
        return HeadCalibration(None, reference, f"no score-to-tier calibration: {exc}", scores)
    notes = []
    absent = [t for t, n in calibration.tier_counts.items() if n == 0]
    if absent:
        notes.append(f"tier(s) {', '.join(absent)} absent from the validation split: their probabilities are "
                     "not calibrated")
    if calibration.slope <= 0:
        notes.append("on the validation split higher scores go with worse tiers (calibration slope "
                     f"{calibration.slope:.4g} <= 0): the head has not learned the tiers")
    return HeadCalibration(calibration, reference, "; ".join(notes) or None, scores)


def attach_calibration(path: str, calibrated: HeadCalibration) -> None:
    """Add the calibration keys to a checkpoint file (atomically; everything else is kept)."""
    ckpt = load_checkpoint_file(path)
    ckpt.update(calibrated.checkpoint_keys())
    save_checkpoint_file(path, ckpt)


IN_SAMPLE = {"all": "all images include the training images (the head was fitted on them) and the validation "
                     "images (the calibration was fitted on them)",
             "train": "the head was trained on the train split",
             "val": "the calibration was fitted on the val split"}


def calibration_title(backbone: Dict[str, Any]) -> str:
    base = "score-to-tier calibration, fitted on the validation split"
    if backbone["backbone_weights"] == "random":
        return f"{base}: RANDOM backbone weights (pipeline check, not a trained model)"
    return base
