"""Reproducibility: one call seeds every generator a run touches."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int = 42) -> None:
    """Seed Python, NumPy, torch (CPU and every CUDA device) and make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    # Deterministic kernels cost some speed; the seed's contract is identical results.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
