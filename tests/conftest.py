"""Shared fixtures: a tiny offline DINOv2 saved to a temp dir, synthetic images and features."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

# mutmut runs the tests once in its own process, then forks it for each mutant: an OpenMP thread team
# started before the fork deadlocks the first parallel torch op in the child. One thread under mutmut.
torch.set_num_threads(1 if "MUTANT_UNDER_TEST" in os.environ else 2)



def pytest_configure(config):
    # Registered here, not in pyproject: naming the class there would import transformers
    # (and read HF_HUB_OFFLINE) before this file sets the offline environment.
    config.addinivalue_line("filterwarnings", "ignore::mirip.ml.backbones.RandomWeightsWarning")


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=28)


def save_tiny_backbone(directory, seed: int = 0) -> str:
    """A tiny DINOv2 with fixed random weights, saved like a hub download."""
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**TINY)).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-dinov2"))


def make_image(path, size=(40, 30), seed=0, mode="RGB", fmt=None):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return str(path)


@pytest.fixture
def image_dir(tmp_path):
    """Eight small RGB images with a metadata frame of two per tier."""
    import pandas as pd

    d = tmp_path / "images"
    d.mkdir()
    rows = []
    for i, tier in enumerate("SSAABBCC"):
        make_image(d / f"img_{i}.png", seed=i)
        rows.append({"filename": f"img_{i}.png", "tier": tier})
    return d, pd.DataFrame(rows)


# The CPU default precision follows the chip (bf16 with AMX / AVX512-BF16): pinned to "no bf16 units" here, and
# inherited by the scripts tests run as subprocesses, so no test's numbers depend on the machine it runs on.
# tests/common/test_devices.py lifts it to mock the probe both ways.
os.environ.setdefault("MIRIP_CPU_BF16", "0")


@pytest.fixture(scope="module")
def scored_folder(tiny_backbone, tmp_path_factory):
    """8 tiered images with their checkpoint and one broken file (score.py's tests and the compiled runs')."""
    from _inference_helpers import make_cache_and_checkpoint, make_tiered_images, torch_threads

    tmp_path = tmp_path_factory.mktemp("scored")
    d = tmp_path / "images"
    meta = make_tiered_images(d)
    with torch_threads(1):
        _, ckpt, _, _ = make_cache_and_checkpoint(tiny_backbone, str(d), list(meta["filename"]), str(tmp_path))
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (d / "readme.txt").write_text("not an image, not listed")
    meta_path = tmp_path / "metadata.csv"
    meta.to_csv(meta_path, index=False)
    return d, meta, ckpt, meta_path


@pytest.fixture(scope="module")
def trained(tiny_backbone, tmp_path_factory):
    """8 tiered images, their feature cache and a checkpoint trained on it (``make_cache_and_checkpoint``'s
    tuple); one per test module."""
    from _inference_helpers import make_cache_and_checkpoint, make_tiered_images, torch_threads

    root = tmp_path_factory.mktemp("trained")
    meta = make_tiered_images(root / "images")
    with torch_threads(1):
        return make_cache_and_checkpoint(tiny_backbone, str(root / "images"), list(meta["filename"]), str(root))
