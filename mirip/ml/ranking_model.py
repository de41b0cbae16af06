"""Pairwise ranking models: the head-only form on cached features, and the full-image form.

Both own ``projector`` and ``score_head`` as direct attributes, so a head's
state dict (``projector.*``, ``score_head.*``) moves between them unchanged.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.projector import Projector

HEAD_PREFIXES = ("projector.", "score_head.")
# The parameters that only shift every score by the same amount: the Projector's last LayerNorm bias (the score
# head is linear on it) and the score head's bias.
OFFSET_PARAMETERS = ("projector.net.5.bias", "score_head.0.bias")


def zero_offset_gradient(parameter: torch.Tensor) -> None:
    """Make the gradient reaching ``parameter`` exactly zero (see ``RankingHead``)."""
    parameter.register_hook(torch.zeros_like)


class RankingHead(nn.Module):
    """Projector + score head + margin ranking loss, taking ``(B, D)`` features.

    The loss sees score differences only, so the ``OFFSET_PARAMETERS`` get an exactly zero gradient (weight
    decay still applies). In floats their gradient is rounding noise (~1e-9) that AdamW, dividing by its own
    running size, turned into steps of ~lr: the scores' offset, and the calibration thresholds on that scale,
    followed the last bits of the CPU's kernels. (A ``copy.deepcopy`` of a module drops gradient hooks.)
    """

    def __init__(
        self,
        input_dim: int = 1024,
        projector_output_dim: int = 256,
        margin: float = 1.0,
        hidden_dim: int = 512,
        dropout: float = 0.1,
    ):
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be non-negative, got {margin}")
        self.input_dim, self.hidden_dim = int(input_dim), int(hidden_dim)
        self.projector_output_dim, self.dropout, self.margin = int(projector_output_dim), float(dropout), float(margin)
        self.projector = Projector(self.input_dim, self.hidden_dim, self.projector_output_dim, self.dropout)
        self.score_head = nn.Sequential(nn.Linear(self.projector_output_dim, 1))
        self.loss_fn = nn.MarginRankingLoss(margin=self.margin)
        params = dict(self.named_parameters())
        for name in OFFSET_PARAMETERS:
            zero_offset_gradient(params[name])

    def head_config(self) -> dict:
        """The dims that rebuild this head; stored in every checkpoint."""
        return {
            "input_dim": self.input_dim,
            "hidden_dim": self.hidden_dim,
            "projector_output_dim": self.projector_output_dim,
            "dropout": self.dropout,
            "margin": self.margin,
        }

    def head_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if k.startswith(HEAD_PREFIXES)}

    def load_head_state_dict(self, state: dict) -> None:
        head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
        missing = [k for k in self.head_state_dict() if k not in head]
        if missing:
            raise KeyError(f"head state dict lacks {missing[:4]}{'...' if len(missing) > 4 else ''}")
        self.load_state_dict(head, strict=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features for the head; the full-image model overrides this with the backbone."""
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected features of shape (B, {self.input_dim}), got {tuple(x.shape)}")
        return x

    def get_score(self, x: torch.Tensor) -> torch.Tensor:
        """Quality score, shape (B, 1)."""
        return self.score_head(self.projector(self.embed(x)))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x1.shape[0] != x2.shape[0]:
            raise ValueError(f"pair batches differ in size: {x1.shape[0]} vs {x2.shape[0]}")
        # One pass over both halves: half the kernel launches, same numbers.
        scores = self.get_score(torch.cat([x1, x2], dim=0))
        return scores[: x1.shape[0]], scores[x1.shape[0]:]

    def compute_loss(self, score1: torch.Tensor, score2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin ranking loss: mean(max(0, -label * (score1 - score2) + margin))."""
        labels = labels.to(device=score1.device, dtype=score1.dtype).reshape(-1)
        return self.loss_fn(score1.reshape(-1), score2.reshape(-1), labels)


class PairwiseRankingModel(RankingHead):
    """Full-image mode: a DINOv2 backbone followed by the ranking head; takes (B, 3, H, W) images."""

    def __init__(
        self,
        backbone_name: str = "facebook/dinov2-large",
        projector_output_dim: int = 256,
        freeze_backbone: bool = True,
        margin: float = 1.0,
        device: Optional[str] = None,
        *,
        hidden_dim: int = 512,
        dropout: float = 0.1,
        random_init: bool = False,
        pooling: str = "cls",
        precision: Optional[str] = None,
        feature_extractor: Optional[DINOv2FeatureExtractor] = None,
    ):
        extractor = feature_extractor or DINOv2FeatureExtractor(
            backbone_name, device=device, random_init=random_init, pooling=pooling, precision=precision,
            trainable=not freeze_backbone,
        )
        super().__init__(extractor.output_dim, projector_output_dim, margin, hidden_dim, dropout)
        self.feature_extractor = extractor
        self.freeze_backbone = freeze_backbone
        if not freeze_backbone:
            extractor.unfreeze()
        self.device = extractor.device
        self.to(self.device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor(images)

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return super().forward(img1, img2)
