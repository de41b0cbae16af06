"""Tiny offline checkpoints of every backbone family, saved like hub downloads (save_pretrained)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

# model_type -> (model class, config kwargs). Three blocks, so "first", "middle" and "last" differ.
_VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
TINY_FAMILIES = {
    "dinov2": ("Dinov2Model", "Dinov2Config", dict(_VIT, mlp_ratio=2, patch_size=14, image_size=28)),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                              dict(_VIT, mlp_ratio=2, patch_size=14, image_size=28, num_register_tokens=4)),
    "dinov3_vit": ("DINOv3ViTModel", "DINOv3ViTConfig",
                   dict(_VIT, intermediate_size=64, patch_size=14, image_size=28, num_register_tokens=4)),
    "siglip_vision_model": ("SiglipVisionModel", "SiglipVisionConfig",
                            dict(_VIT, intermediate_size=64, patch_size=14, image_size=28)),
    "clip_vision_model": ("CLIPVisionModel", "CLIPVisionConfig",
                          dict(_VIT, intermediate_size=64, patch_size=14, image_size=28)),
}

# Written out by hand (not from the library): tokens before the first patch token, per family.
PREFIX_TOKENS = {"dinov2": 1, "dinov2_with_registers": 5, "dinov3_vit": 5, "siglip_vision_model": 0,
                 "clip_vision_model": 1, "siglip": 0, "clip": 1}

_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
             max_position_embeddings=16)


def _distinct_norms(model: nn.Module) -> nn.Module:
    # Freshly built LayerNorms are all weight 1, bias 0, hence interchangeable; give each its own values so a
    # test can tell which norm a feature went through (CLIP's pre_layrnorm vs post_layernorm, say).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model


def save_tiny(directory, model_type: str, seed: int = 0) -> str:
    """A tiny vision-only model of ``model_type`` with fixed random weights, saved to ``directory``."""
    model_cls, config_cls, kwargs = TINY_FAMILIES[model_type]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    _distinct_norms(getattr(transformers, model_cls)(config)).eval().save_pretrained(directory)
    return str(directory)


def save_tiny_full(directory, model_type: str, seed: int = 0) -> str:
    """A tiny dual-tower checkpoint (``clip`` or ``siglip``): vision and text weights in one file."""
    vision = dict(TINY_FAMILIES[f"{model_type}_vision_model"][2])
    torch.manual_seed(seed)
    if model_type == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=_TEXT,
                                                               projection_dim=16))
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=_TEXT))
    _distinct_norms(model).eval().save_pretrained(directory)
    return str(directory)
