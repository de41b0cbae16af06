"""DINOv2FeatureExtractor: a frozen DINOv2 backbone that turns image batches into feature vectors."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from mirip.devices import autocast_dtype, check_precision, default_precision, device_type, resolve_device
from mirip.ml.backbones import BackboneInfo, load_backbone

POOLINGS = ("cls", "mean", "cls_mean")


def check_images(images: torch.Tensor, what: str = "images") -> None:
    """Reject anything but a float (B, 3, H, W) batch with a message that names the expected shape."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor of shape (B, 3, H, W), got dtype {images.dtype}")


@contextlib.contextmanager
def _no_tf32():
    """fp32 means fp32: cuDNN would otherwise run the patch-embedding conv in TF32 on a GPU."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


class DINOv2FeatureExtractor(nn.Module):
    """Frozen DINOv2: ``extract(images (B, 3, H, W)) -> (B, D)``.

    ``pooling`` picks the CLS token (default), the mean of the patch tokens, or both
    concatenated (``cls_mean``, 2 x hidden). ``precision`` defaults to bf16 autocast on
    CUDA and fp32 on CPU; outputs are always float32.
    """

    def __init__(
        self,
        model_name: str = "facebook/dinov2-large",
        device: Optional[str] = None,
        *,
        random_init: bool = False,
        pooling: str = "cls",
        precision: Optional[str] = None,
        trainable: bool = False,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        self.model_name = model_name
        self.device = resolve_device(device)
        self.pooling = pooling
        self.precision = check_precision(precision or default_precision(self.device))
        self.backbone, self.info = load_backbone(model_name, random_init=random_init)
        hidden = self.info.hidden_size
        self.output_dim = 2 * hidden if pooling == "cls_mean" else hidden
        self.frozen = True
        self.freeze()
        if trainable:
            self.unfreeze()
        elif self.precision == "bf16":
            self.backbone.to(torch.bfloat16)
        self.to(self.device)

    @property
    def backbone_info(self) -> BackboneInfo:
        return self.info

    @property
    def patch_size(self) -> int:
        return self.info.patch_size

    def freeze(self) -> None:
        self.frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def unfreeze(self) -> None:
        """Allow fine-tuning (``PairwiseRankingModel(freeze_backbone=False)``)."""
        self.frozen = False
        # Training needs fp32 master weights (a bf16 copy would already be rounded: build with trainable=True).
        self.backbone.float().requires_grad_(True)

    def train(self, mode: bool = True) -> "DINOv2FeatureExtractor":
        super().train(mode)
        if self.frozen:
            # A frozen backbone stays in eval mode even inside a model put in train mode.
            self.backbone.eval()
        return self

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        # Dinov2Model's last_hidden_state is already layer-normed; token 0 is CLS.
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            return hidden[:, 1:].mean(dim=1)
        return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1)

    @property
    def weight_dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def _autocast(self):
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return _no_tf32() if device_type(self.device) == "cuda" else contextlib.nullcontext()
        if self.weight_dtype == dtype:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type(self.device), dtype=dtype)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        images = images.to(self.device, dtype=self.weight_dtype, non_blocking=True)
        if not self.frozen:
            with self._autocast():
                return self._pool(self.backbone(pixel_values=images).last_hidden_state).float()
        with torch.inference_mode(), self._autocast():
            features = self._pool(self.backbone(pixel_values=images).last_hidden_state).float()
        # Cloning outside inference mode gives a normal tensor that a trainable head can use in autograd.
        return features.clone()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images)
