"""What a run writes beside its checkpoints: JSON files and the loss/accuracy curves.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import numpy as np

from mirip.common.atomic import write_atomic
from mirip.common.plain import json_safe
from mirip.training.bootstrap import format_interval


def write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(json_safe(obj), indent=2))


CHANCE = 0.5  # pairwise accuracy of a coin toss: a head below it orders drawings backwards more often than not


def _figure(value: Any) -> Optional[float]:
    # NaN (a split without pairs) compares False both ways: nothing to warn about.
    return float(value) if isinstance(value, (int, float)) and value == value else None


def quality_warnings(model: Optional[Dict[str, Any]], baseline: Optional[Dict[str, Any]],
                     val_images: Optional[int] = None) -> List[str]:
    """What a run's test figures say is wrong with its head, each with what to try: pairwise accuracy below
    chance or below the ridge baseline, tier accuracy below always predicting the commonest tier."""
    if not model:
        return []
    out: List[str] = []
    acc, ridge = _figure(model.get("accuracy")), _figure((baseline or {}).get("accuracy"))
    ci, ridge_ci = (model.get("intervals") or {}).get("accuracy"), ((baseline or {}).get("intervals") or {}).get("accuracy")
    pairs = f"{model.get('distinct_pairs', model.get('total_pairs'))} distinct test pairs"
    if ci:
        level = f"{100 * model['intervals']['level']:g}% interval"
        pairs += f"; {level} of the head's accuracy {format_interval(ci)}" + (
            f", of the baseline's {format_interval(ridge_ci)}" if ridge_ci else "")
    if acc is not None and acc < CHANCE:
        maybe = " (its interval reaches chance: it may be noise)" if ci and ci[1] >= CHANCE else ""
        out.append(f"the head's test pairwise accuracy {acc:.4f} is below chance ({CHANCE}, {pairs}){maybe}: it orders "
                   "drawings backwards more often than not. Try: check that the tier column means S best ... C "
                   "worst; use features from pretrained backbone weights (not --random-init); a lower "
                   "--learning-rate or more --max-epochs; more images per tier")
    if acc is not None and ridge is not None and acc < ridge:
        out.append(f"the head's test pairwise accuracy {acc:.4f} is below the linear baseline's {ridge:.4f} (ridge "
                   f"regression on the same features, {pairs}): the MLP head is not earning its keep. Try: a smaller "
                   "head (--hidden-dim 128 --projector-dim 64), more --dropout or --weight-decay, a lower "
                   "--learning-rate, or compare settings with scripts/sweep.py")
    tier, majority = _figure(model.get("tier_accuracy")), _figure(model.get("majority_tier_accuracy"))
    if tier is not None and majority is not None and tier < majority:
        fitted = f" on {val_images} images" if val_images else ""
        out.append(f"the tier accuracy {tier:.4f} is below always predicting the commonest test tier "
                   f"({model.get('majority_tier')}: {majority:.4f}): the score-to-tier boundaries (fitted on the val "
                   f"split{fitted}) do not fit the test drawings. Try: a larger --val-ratio or more images per tier "
                   "for the calibration, and improve the pairwise accuracy first; until then, do not rely on the "
                   "predicted tiers")
    return out


SMALL_SPLIT_IMAGES = 30  # below this, a split's accuracy moves by several points per image: too coarse to pick epochs


def small_split_warning(val_images: Optional[int], val_pairs: Optional[int]) -> Optional[str]:
    """A warning when the split that chooses the epoch (and fits the calibration) is too small to trust."""
    if not val_images or val_images >= SMALL_SPLIT_IMAGES:
        return None
    return (f"the val split that chose the best epoch has only {val_images} images ({val_pairs} distinct pairs): "
            "its accuracy is noise at that size, so the chosen epoch (and the tier calibration fitted there) is "
            f"close to a guess. Try: a larger --val-ratio (at least {SMALL_SPLIT_IMAGES} images), or a fixed --max-epochs "
            "with --early-stopping-patience 0; and --folds 5 to see how far the figures move with the drawings "
            "chosen (cross-validation over every non-test image)")


def curves_title(backbone: Dict[str, Any]) -> Optional[str]:
    if backbone["backbone_weights"] != "random":
        return None
    return f"{backbone['backbone']}: RANDOM backbone weights (pipeline check, not a trained model)"


def save_curves(history: Dict[str, list], path: str, title: Optional[str] = None) -> bool:
    """Loss and accuracy per epoch as a PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split in ("train", "val"):
            values = history.get(f"{split}_{key}") or []
            if values:
                ax.plot(epochs[: len(values)], values, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("pairwise accuracy" if key == "acc" else "margin ranking loss")
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, color="#a00000")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
