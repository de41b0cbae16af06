"""Mapper: image batches in, feature rows out, with the GPU kept busy.

``DINOv2FeatureExtractor.extract`` already runs the frozen backbone under
``inference_mode`` and autocast. What the mapper adds is the overlap: the
features' copy back to the host is queued on the GPU right behind the forward
pass and only waited for one batch later, so the GPU works on batch i while
the host is still handing batch i-1 to the writer.
"""

from __future__ import annotations

from typing import Optional, Sequence

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


class Normalizer:
    """uint8 (B, 3, H, W) -> normalised float32 on the device: the last step of ``Preprocessor``, moved to the GPU."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: str):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.mean.device, non_blocking=True).float()
        return x.div_(255.0).sub_(self.mean).div_(self.std)


class Mapper:
    """Callable: (B, 3, H, W) CPU tensor (float, or uint8 with a ``normalizer``) -> PendingFeatures (B, D) float32."""

    def __init__(self, extractor: DINOv2FeatureExtractor, normalizer: Optional[Normalizer] = None):
        self.extractor, self.normalizer = extractor, normalizer
        self.cuda = torch.device(extractor.device).type == "cuda"

    def __call__(self, pixels: torch.Tensor) -> PendingFeatures:
        if self.normalizer is not None:
            pixels = self.normalizer(pixels)
        if not self.cuda:
            return PendingFeatures(self.extractor.extract(pixels), None)
        # Pinned source (from the DataLoader) + non_blocking: the upload overlaps the previous batch's compute.
        features = self.extractor.extract(pixels.to(self.extractor.device, non_blocking=True))
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        host.copy_(features, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingFeatures(host, event)
