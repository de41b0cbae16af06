"""The Projector: an MLP from backbone features to a small embedding."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """Linear -> LayerNorm -> GELU -> Dropout -> Linear -> LayerNorm, as in the seed."""

    def __init__(self, input_dim: int = 1024, hidden_dim: int = 512, output_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        for label, dim in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("output_dim", output_dim)):
            if int(dim) <= 0:
                raise ValueError(f"Projector {label} must be positive, got {dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Projector dropout must be in [0, 1), got {dropout}")
        self.input_dim, self.hidden_dim, self.output_dim, self.dropout = input_dim, hidden_dim, output_dim, dropout
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
            nn.LayerNorm(output_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"Projector expects features of shape (B, {self.input_dim}), got {tuple(x.shape)}")
        return self.net(x)
