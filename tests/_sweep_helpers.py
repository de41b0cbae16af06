"""Synthetic caches and metadata for the sweep tests: tier-dependent features, written the way stage one writes them."""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import pandas as pd
import torch

from mirip.store.cache import write_cache

TIER_RANK = {"S": 3, "A": 2, "B": 1, "C": 0}


def write_synthetic(directory, n: int = 80, dim: int = 12, seed: int = 0, separation: float = 1.0) -> Tuple[str, str]:
    """(features.h5, metadata.csv): n images cycling through S/A/B/C, feature 0 shifted by the tier rank."""
    rng = np.random.default_rng(seed)
    tiers = np.array(list("SABC"))[np.arange(n) % 4]
    ranks = np.array([TIER_RANK[t] for t in tiers])
    features = rng.normal(size=(n, dim)).astype(np.float32)
    features[:, 0] += separation * ranks
    names = [f"img_{i:03d}.png" for i in range(n)]
    cache = write_cache(os.path.join(directory, "features.h5"), {"feature_dim": dim, "feature_dtype": "float32"},
                        names, features)
    meta = os.path.join(directory, "metadata.csv")
    pd.DataFrame({"filename": names, "tier": tiers}).to_csv(meta, index=False)
    return cache, meta


class one_thread:
    """Run with one intra-op thread (tiny tensors gain nothing from two, and lose a lot on a busy machine)."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
