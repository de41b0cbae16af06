"""Backbone families: where a vision transformer keeps its blocks, its final norm, and which tokens are which.

The feature extractor only asks these questions, so a new family (DINOv2 with registers, DINOv3, SigLIP,
CLIP) is one more adapter here, registered by the config's ``model_type``, not a new extractor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn


@dataclass(frozen=True)
class TokenLayout:
    """Token positions in a block's output: ``cls_index`` (None: no CLS token), then registers, then patches."""

    cls_index: int = 0
    num_registers: int = 0

    @property
    def patch_start(self) -> int:
        """First patch token: after the CLS token (if any) and the register tokens."""
        return (0 if self.cls_index is None else 1) + self.num_registers


class BackboneFamily:
    """How to read one family's model; subclasses answer for their ``model_type``."""

    model_type: str = ""

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def token_layout(self, model: nn.Module) -> TokenLayout:
        raise NotImplementedError

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def block_output(self, output) -> torch.Tensor:
        """A block's forward output as the (B, T, H) token tensor (some versions return a tuple)."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def last_hidden(self, model_output) -> torch.Tensor:
        """The model's final, normed tokens (B, T, H)."""
        return model_output.last_hidden_state


class Dinov2Family(BackboneFamily):
    """transformers' Dinov2Model: ``encoder.layer[i]`` blocks, ``layernorm`` final norm, token 0 is CLS."""

    model_type = "dinov2"

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.encoder.layer

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.layernorm

    def token_layout(self, model: nn.Module) -> TokenLayout:
        return TokenLayout(cls_index=0, num_registers=0)


FAMILIES: Dict[str, BackboneFamily] = {"dinov2": Dinov2Family()}


def family_for(model: nn.Module) -> BackboneFamily:
    """The adapter for ``model`` by its config's ``model_type``; unknown types are refused by name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"no backbone family adapter for model_type {model_type!r}; known: "
                         f"{', '.join(sorted(FAMILIES))} (add one in mirip.ml.families)")
    return family


def register_family(family: BackboneFamily) -> None:
    FAMILIES[family.model_type] = family
