"""Mapper: image batches in, feature rows out, with the GPU kept busy.

``DINOv2FeatureExtractor.extract`` already runs the frozen backbone under
``inference_mode`` and autocast. What the mapper adds is the overlap: the
features' copy back to the host is queued on the GPU right behind the forward
pass and only waited for one batch later, so the GPU works on batch i while
the host is still handing batch i-1 to the writer.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from mirip.ml.feature_extractor import DINOv2FeatureExtractor


class PendingFeatures:
    """Features whose device-to-host copy may still be in flight; ``result()`` waits for it."""

    def __init__(self, host: torch.Tensor, event: Optional["torch.cuda.Event"]):
        self.host, self.event = host, event

    def result(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()  # CPU-GPU sync point, one batch behind the forward pass
        return self.host.numpy()


class Mapper:
    """Callable: (B, 3, H, W) CPU tensor -> PendingFeatures of shape (B, D), float32."""

    def __init__(self, extractor: DINOv2FeatureExtractor):
        self.extractor = extractor
        self.cuda = torch.device(extractor.device).type == "cuda"

    def __call__(self, pixels: torch.Tensor) -> PendingFeatures:
        if not self.cuda:
            return PendingFeatures(self.extractor.extract(pixels), None)
        # Pinned source (from the DataLoader) + non_blocking: the upload overlaps the previous batch's compute.
        features = self.extractor.extract(pixels.to(self.extractor.device, non_blocking=True))
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        host.copy_(features, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingFeatures(host, event)
