"""Helpers for the full-image tests: a cache made the way stage one makes it, and a checkpoint trained on it."""

from __future__ import annotations

import contextlib
import os
from typing import List, Sequence, Tuple

import numpy as np
import torch

from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.preprocessing import Preprocessor
from mirip.ml.ranking_model import RankingHead
from mirip.store.cache import write_cache
from mirip.store.checkpoint import save_checkpoint_file
from mirip.store.fingerprint import make_fingerprint

IMAGE_SIZE = 56
TIERS = "SSAABBCC"


def make_tiered_images(directory) -> "pd.DataFrame":
    """Eight small RGB images, two per tier, and their metadata frame (like conftest's image_dir, but any scope)."""
    import pandas as pd

    from conftest import make_image

    os.makedirs(directory, exist_ok=True)
    rows = []
    for i, tier in enumerate(TIERS):
        make_image(os.path.join(directory, f"img_{i}.png"), seed=i)
        rows.append({"filename": f"img_{i}.png", "tier": tier})
    return pd.DataFrame(rows)


@contextlib.contextmanager
def torch_threads(n: int):
    """Few threads keep tiny-model tests quick on a machine busy with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cached_features(extractor: DINOv2FeatureExtractor, preprocessor: Preprocessor, paths: Sequence[str]) -> np.ndarray:
    """One image at a time, exactly as the stage-one contract defines a cached feature."""
    return np.stack([extractor.extract(preprocessor(p)[None])[0].numpy() for p in paths])


def make_cache_and_checkpoint(
    backbone: str, image_dir: str, names: Sequence[str], out_dir: str, *, random_init: bool = False,
    pooling: str = "cls", image_size: int = IMAGE_SIZE, seed: int = 0,
) -> Tuple[str, str, RankingHead, List[str]]:
    """Write cache.h5 (+ a checkpoint.pt whose head was nudged off its init) and return both paths and the head."""
    extractor = DINOv2FeatureExtractor(backbone, device="cpu", random_init=random_init, pooling=pooling)
    preprocessor = Preprocessor(image_size=image_size)
    paths = [os.path.join(image_dir, n) for n in names]
    fingerprint = make_fingerprint(extractor, preprocessor)
    cache_path = write_cache(os.path.join(out_dir, "cache.h5"), fingerprint, list(names),
                             cached_features(extractor, preprocessor, paths))
    torch.manual_seed(seed)
    head = RankingHead(input_dim=extractor.output_dim, projector_output_dim=8, hidden_dim=16, dropout=0.0)
    with torch.no_grad():  # a non-trivial score head, so scores differ per image
        head.score_head[0].weight.normal_()
    head.eval()
    ckpt_path = os.path.join(out_dir, "best.pt")
    save_checkpoint_file(ckpt_path, {
        "format_version": 1,
        "model_state_dict": head.head_state_dict(),
        "optimizer_state_dict": {},
        "scheduler_state_dict": {},
        "epoch": 3,
        "accuracy": 0.75,
        "config": {},
        "head": head.head_config(),
        "fingerprint": fingerprint,
        "backbone": extractor.info.to_dict(),
    })
    return cache_path, ckpt_path, head, paths
