"""The backbone families mirip supports (``FAMILIES``), each a ``BackboneFamily`` with its own facts, and the
lookup of a config's ``model_type`` (``family_for``), which refuses any other naming the supported ones.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import nn

from mirip.ml.family_adapter import BackboneFamily


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's preprocessing (clip/clip.py `_transform`), also in every openai/clip-* preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP / SigLIP2 map pixels to [-1, 1] (big_vision `value_range(-1, 1)`).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class UnsupportedBackboneError(ValueError):
    """The checkpoint's ``model_type`` is not one mirip can extract features from."""


_DINO_IGNORABLE = ("classifier.",)

FAMILIES: Dict[str, BackboneFamily] = {f.name: f for f in (
    BackboneFamily(
        name="dinov2", title="DINOv2",
        model_types=("dinov2",), vision_model_types=("dinov2",),
        config_class_name="Dinov2Config", model_class_name="Dinov2Model",
        full_config_class_name=None, full_model_class_name=None,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, has_cls_token=True,
        cls_meaning="the CLS token",
        position_embeddings="interpolated",
        block_paths=("encoder.layer",), norm_paths=("layernorm",),
        ignorable_unexpected=_DINO_IGNORABLE,
    ),
    BackboneFamily(
        name="dinov2_with_registers", title="DINOv2 with registers",
        model_types=("dinov2_with_registers",), vision_model_types=("dinov2_with_registers",),
        config_class_name="Dinov2WithRegistersConfig", model_class_name="Dinov2WithRegistersModel",
        full_config_class_name=None, full_model_class_name=None,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, has_cls_token=True,
        cls_meaning="the CLS token (register tokens are excluded from every pooling)",
        position_embeddings="interpolated",
        block_paths=("encoder.layer",), norm_paths=("layernorm",),
        ignorable_unexpected=_DINO_IGNORABLE,
    ),
    BackboneFamily(
        name="dinov3_vit", title="DINOv3 ViT",
        model_types=("dinov3_vit",), vision_model_types=("dinov3_vit",),
        config_class_name="DINOv3ViTConfig", model_class_name="DINOv3ViTModel",
        full_config_class_name=None, full_model_class_name=None,
        # LVD-1689M weights use ImageNet statistics (dinov3 README); the SAT-493M satellite weights differ.
        mean=IMAGENET_MEAN, std=IMAGENET_STD, has_cls_token=True,
        cls_meaning="the CLS token (register tokens are excluded from every pooling)",
        position_embeddings="rope",
        block_paths=("model.layer", "layer"), norm_paths=("norm",),
        ignorable_unexpected=_DINO_IGNORABLE,
    ),
    BackboneFamily(
        name="siglip", title="SigLIP / SigLIP2 vision tower",
        model_types=("siglip", "siglip_vision_model"), vision_model_types=("siglip_vision_model",),
        config_class_name="SiglipVisionConfig", model_class_name="SiglipVisionModel",
        full_config_class_name="SiglipConfig", full_model_class_name="SiglipModel",
        mean=SIGLIP_MEAN, std=SIGLIP_STD, has_cls_token=False,
        cls_meaning=("SigLIP has no CLS token: cls is its attention-pooling (MAP) head applied to the normed "
                     "tokens, i.e. the image embedding it was trained with (at layers other than the last, the "
                     "same head on that layer's normed tokens)"),
        position_embeddings="interpolated-on-request",
        block_paths=("encoder.layers", "vision_model.encoder.layers"),
        norm_paths=("post_layernorm", "vision_model.post_layernorm"),
        head_paths=("head", "vision_model.head"),
        ignorable_unexpected=("text_model.", "logit_scale", "logit_bias"),
        forward_kwargs={"interpolate_pos_encoding": True},
    ),
    BackboneFamily(
        name="clip", title="CLIP vision tower",
        model_types=("clip", "clip_vision_model"), vision_model_types=("clip_vision_model",),
        config_class_name="CLIPVisionConfig", model_class_name="CLIPVisionModel",
        full_config_class_name="CLIPConfig", full_model_class_name="CLIPModel",
        mean=CLIP_MEAN, std=CLIP_STD, has_cls_token=True,
        cls_meaning=("the CLS token after post_layernorm (transformers' pooler_output, before the text-aligned "
                     "projection)"),
        position_embeddings="interpolated-on-request",
        block_paths=("encoder.layers", "vision_model.encoder.layers"),
        norm_paths=("post_layernorm", "vision_model.post_layernorm"),
        ignorable_unexpected=("text_model.", "text_projection.", "visual_projection.", "logit_scale"),
        forward_kwargs={"interpolate_pos_encoding": True},
    ),
)}


SUPPORTED_MODEL_TYPES: Tuple[str, ...] = tuple(t for f in FAMILIES.values() for t in f.model_types)

_HINTS = {
    "siglip2": "NaFlex SigLIP2 checkpoints (model_type siglip2) are not supported; the fixed-resolution SigLIP2 "
               "checkpoints (e.g. google/siglip2-so400m-patch16-512) use model_type siglip and are.",
    "dinov3_convnext": "DINOv3 ConvNeXt backbones have no transformer tokens to pool; use a dinov3 ViT.",
}


def family_for(model_type: Optional[str]) -> BackboneFamily:
    """The family of a config ``model_type``; anything else is refused, naming what is supported."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    hint = _HINTS.get(str(model_type), "")
    raise UnsupportedBackboneError(
        f"unsupported backbone model_type {model_type!r}; mirip extracts features from "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}" + (f". {hint}" if hint else "")
    )


def family_of(model: nn.Module) -> BackboneFamily:
    return family_for(getattr(model.config, "model_type", None))
