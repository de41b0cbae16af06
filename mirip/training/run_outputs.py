"""What a run writes beside its checkpoints: JSON files and the loss/accuracy curves.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import numpy as np

from mirip.common.atomic import write_atomic
from mirip.common.plain import json_safe


def write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(json_safe(obj), indent=2))


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
