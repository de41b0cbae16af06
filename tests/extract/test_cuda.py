"""Stage one on a GPU: the CUDA path (uint8 pixels, pinned memory, GPU normalisation, async copies back)
gives the same features as the CPU path. Skipped where there is no GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _extract_helpers import extract, make_images, reference_features
from mirip.store.cache import open_cache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_fp32_features_match_the_cpu_reference(tmp_path, tiny_backbone, workers):
    d = tmp_path / "images"
    names = make_images(d, 10)
    (d / "broken.png").write_bytes(b"not a png")
    summary = extract(d, tmp_path / "f.h5", tiny_backbone, device="cuda", precision="fp32", num_workers=workers,
                      batch_size=4, views=1)
    assert (summary.extracted, list(summary.failed)) == (10, ["broken.png"])
    with open_cache(str(tmp_path / "f.h5")) as cache:
        assert cache.paths == names
        np.testing.assert_allclose(cache.features(), reference_features(tiny_backbone, [d / n for n in names]),
                                   atol=1e-4, rtol=1e-4)
        assert cache.views().shape == (10, 1, 32)


def test_cuda_bf16_features_are_close_to_fp32(tmp_path, tiny_backbone):
    d = tmp_path / "images"
    names = make_images(d, 8)
    extract(d, tmp_path / "bf16.h5", tiny_backbone, device="cuda", precision="bf16", num_workers=2)
    with open_cache(str(tmp_path / "bf16.h5")) as cache:
        got, ref = cache.features(), reference_features(tiny_backbone, [d / n for n in names])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99, cos
