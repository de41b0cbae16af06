"""Synthetic stage-two data: features with a known best pairwise accuracy, written as a real cache."""

from __future__ import annotations

import math
import os
from typing import Tuple

import numpy as np
import pandas as pd

from mirip.common.tiers import TIERS
from mirip.store.cache import write_cache


def fake_fingerprint(dim: int, **overrides) -> dict:
    fp = {"format_version": 1, "backbone": "synthetic", "pretrained": False, "feature_dim": dim,
          "feature_dtype": "float32", "image_size": 28, "pooling": "cls"}
    fp.update(overrides)
    return fp


def signal_direction(dim: int, direction_seed: int = 0) -> np.ndarray:
    """The unit direction that carries the tier signal in ``tiered_features``."""
    direction = np.random.default_rng([direction_seed, 7919]).normal(size=dim)
    return direction / np.linalg.norm(direction)


def tiered_features(per_tier: int = 50, dim: int = 16, separation: float = 1.0, noise: float = 1.0,
                    seed: int = 0, direction_seed: int = 0) -> Tuple[np.ndarray, np.ndarray, list]:
    """Features whose mean along one unit direction is ``separation * rank``, plus isotropic Gaussian noise.

    Returns (features (N, dim) float32, ranks (N,), tiers). Only that direction carries signal, so the
    Bayes-optimal score is the projection on it. The direction depends on ``direction_seed`` only, so
    sets drawn with different ``seed`` share it.
    """
    direction = signal_direction(dim, direction_seed)
    tiers = [t for t in TIERS for _ in range(per_tier)]
    ranks = np.array([3 - TIERS.index(t) for t in tiers], dtype=np.int64)
    rng = np.random.default_rng(seed)
    feats = rng.normal(scale=noise, size=(len(tiers), dim)) + np.outer(ranks * separation, direction)
    return feats.astype(np.float32), ranks, tiers


def best_pairwise_accuracy(separation: float, noise: float) -> float:
    """Bayes accuracy over pairs spread evenly across the six tier combinations.

    For tiers k apart, the projection difference is N(k * sep, 2 noise^2): P(correct) = Phi(k sep / (noise sqrt 2)).
    Combinations S-A, A-B, B-C are 1 apart, S-B, A-C 2 apart, S-C 3 apart.
    """
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    gaps = [1, 1, 1, 2, 2, 3]
    return sum(phi(k * separation / (noise * math.sqrt(2))) for k in gaps) / len(gaps)


def write_dataset(directory, per_tier: int = 50, dim: int = 16, separation: float = 1.0, noise: float = 1.0,
                  seed: int = 0, fingerprint: dict = None, dtype: str = "float32") -> Tuple[str, str]:
    """A cache + metadata.csv pair on disk; returns (cache path, metadata path)."""
    feats, _, tiers = tiered_features(per_tier, dim, separation, noise, seed)
    names = [f"img_{i:04d}.png" for i in range(len(tiers))]
    cache = os.path.join(directory, "features.h5")
    write_cache(cache, fingerprint or fake_fingerprint(dim, feature_dtype=dtype), names, feats.astype(dtype))
    meta = os.path.join(directory, "metadata.csv")
    pd.DataFrame({"filename": names, "tier": tiers}).to_csv(meta, index=False)
    return cache, meta


def single_thread():
    """Generator for an autouse fixture: tiny heads run fastest on one thread, and two threads on two busy
    cores can spin-wait 100x slower; the previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scenes(n_scenes=40, copies=4, dim=64, seed=0):
    """Copies of one scene are near-duplicates with the scene's tier; the tier signal shared across scenes
    is weak, so a head can score well on a test copy only by recognising its scene from train."""
    rng = np.random.default_rng(seed)
    tiers = [TIERS[s % 4] for s in range(n_scenes)]
    ranks = np.array([3 - TIERS.index(t) for t in tiers])
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    scene = rng.normal(scale=2.0, size=(n_scenes, dim)) + np.outer(0.4 * ranks, direction)
    feats = np.repeat(scene, copies, axis=0) + rng.normal(scale=0.2, size=(n_scenes * copies, dim))
    meta = pd.DataFrame({"filename": [f"s{s:02d}_c{c}.png" for s in range(n_scenes) for c in range(copies)],
                         "tier": np.repeat(tiers, copies), "scene": np.repeat([f"scene{s}" for s in range(n_scenes)],
                                                                                copies)})
    return feats.astype(np.float32), meta


def write_scenes(tmp_path, feats, meta):
    cache, csv = str(tmp_path / "f.h5"), str(tmp_path / "meta.csv")
    write_cache(cache, fake_fingerprint(feats.shape[1]), meta["filename"].tolist(), feats)
    meta.to_csv(csv, index=False)
    return cache, csv
