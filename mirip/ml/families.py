"""Backbone families: what mirip needs to know about each kind of vision transformer it can extract from.

A family is recognised by the ``model_type`` in a checkpoint's ``config.json`` and brings its own facts:
which transformers classes build its vision tower, how images are normalised, the patch size, the token
layout (CLS, register and patch tokens), which modules are its transformer blocks, which norm a block's
output goes through before pooling, and what ``cls`` means when the family has no CLS token.

Supported families (``SUPPORTED_MODEL_TYPES``):

- ``dinov2`` (the seed's): CLS + patches; ImageNet mean/std; position embeddings interpolate to any size.
- ``dinov2_with_registers``: CLS + 4 registers + patches; otherwise as DINOv2.
- ``dinov3_vit``: CLS + 4 registers + patches; RoPE, so any size works with no interpolation at all.
- ``siglip`` (also ``siglip_vision_model``; covers the fixed-resolution SigLIP2 checkpoints, which use the
  same ``model_type``): patches only, no CLS token. ``cls`` is the attention-pooling (MAP) head's output on
  the normed tokens, i.e. the image embedding SigLIP was trained with. Mean/std 0.5/0.5.
- ``clip`` (also ``clip_vision_model``): CLS + patches; OpenAI CLIP mean/std.

The final norm, per family (it turns a block's output into what the family's own output is made of):

- DINOv2 / registers / DINOv3: the model's last LayerNorm (``layernorm`` / ``norm``); transformers applies it
  to every token of ``last_hidden_state``, and DINOv2's linear evaluation pools after it.
- SigLIP: ``post_layernorm``, which transformers applies to every token before the attention-pooling head.
- CLIP: ``post_layernorm``. transformers' CLIP ``last_hidden_state`` is *not* post-layernormed; only the pooled
  CLS token is (``pooler_output = post_layernorm(last_hidden_state[:, 0])``). mirip applies ``post_layernorm``
  to every token (it is a per-token operation, so ``cls`` stays exactly ``pooler_output``) and ``mean``/``std``
  pool the normed patch tokens, as open_clip does with ``ln_post`` before token pooling. This keeps one rule
  for every family and every layer: pool ``final_norm(block output)``.

This module holds ``BackboneFamily`` (how mirip uses one kind of vision transformer) and ``TokenLayout``,
the registry of supported families (``FAMILIES``, ``family_for``, ``family_of``) and the block hooks;
building a family's model from its weights or config is ``mirip.ml.backbones``.

Loading refuses silent wrong results: an unknown ``model_type`` is refused naming the supported ones, and a
checkpoint whose weights do not load completely into the family's vision model is refused naming the missing
and unexpected weights. The text tower of a full CLIP/SigLIP checkpoint (and a DINO classifier head) is the
only thing allowed to go unused.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn


def _resolve(model: nn.Module, paths: Sequence[str], what: str) -> nn.Module:
    """The first attribute path that exists: transformers has moved vision towers in and out of wrappers
    (``CLIPVisionModel.vision_model.encoder`` in 4.x, ``CLIPVisionModel.encoder`` in 5.x)."""
    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise AttributeError(
        f"{type(model).__name__} has no {what} at any of {', '.join(paths)}; this transformers version lays the "
        "model out differently from the ones mirip knows (5.x)"
    )


def _size_pair(value) -> Tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


@dataclass(frozen=True)
class TokenLayout:
    """Where a backbone's tokens are: ``[CLS?][registers...][patches...]`` along the sequence axis.

    ``num_prefix_tokens`` counts everything before the first patch token (CLS and registers).
    ``cls_index`` is None for a family without a CLS token (SigLIP).
    """

    num_prefix_tokens: int
    cls_index: Optional[int]
    num_register_tokens: int
    patch_size: int

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, P, D): the patch tokens only (CLS and registers dropped)."""
        return tokens[:, self.num_prefix_tokens:]

    def to_dict(self) -> dict:
        return {"num_prefix_tokens": self.num_prefix_tokens,
                "cls_index": -1 if self.cls_index is None else self.cls_index,
                "num_register_tokens": self.num_register_tokens, "patch_size": self.patch_size}


@dataclass(frozen=True)
class BackboneFamily:
    """The facts about one transformers ``model_type`` family that extraction and full-image mode need."""

    name: str                                  # the canonical model_type ("siglip")
    title: str                                 # for --help and reports
    model_types: Tuple[str, ...]               # every config model_type recognised as this family
    vision_model_types: Tuple[str, ...]        # model_types of a vision-only config (others are full configs)
    config_class_name: str                     # transformers class of the vision config
    model_class_name: str                      # transformers class of the vision-only model
    full_config_class_name: Optional[str]      # dual-tower config (CLIPConfig) whose vision_config we take
    full_model_class_name: Optional[str]       # dual-tower model, only to count a shipped config's parameters
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    has_cls_token: bool
    cls_meaning: str                           # what `cls` pools to, in words (for --help)
    position_embeddings: str                   # "interpolated" | "rope" | "interpolated-on-request"
    block_paths: Tuple[str, ...]
    norm_paths: Tuple[str, ...]
    head_paths: Tuple[str, ...] = ()
    # Checkpoint weights allowed to stay unused: another tower of a dual-tower checkpoint, a classifier head.
    ignorable_unexpected: Tuple[str, ...] = ()
    forward_kwargs: Dict[str, object] = field(default_factory=dict)

    # -- classes and configs ---------------------------------------------------------------------------------
    @property
    def config_class(self):
        import transformers

        return getattr(transformers, self.config_class_name)

    @property
    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    def vision_config(self, config_or_dict):
        """The vision-tower config from a vision-only or a full (dual-tower) config, object or dict."""
        d = config_or_dict if isinstance(config_or_dict, dict) else config_or_dict.to_dict()
        if d.get("model_type") not in self.vision_model_types and "vision_config" in d:
            d = d["vision_config"]
        d = {k: v for k, v in d.items() if k not in ("transformers_version", "_name_or_path")}
        d.pop("model_type", None)
        return self.config_class(**d)

    # -- token layout and sizes ------------------------------------------------------------------------------
    def layout(self, config) -> TokenLayout:
        registers = int(getattr(config, "num_register_tokens", 0) or 0)
        has_cls = self.has_cls_token
        return TokenLayout(
            num_prefix_tokens=int(has_cls) + registers,
            cls_index=0 if has_cls else None,
            num_register_tokens=registers,
            patch_size=_size_pair(config.patch_size)[0],
        )

    def patch_size(self, config) -> int:
        return _size_pair(config.patch_size)[0]

    def native_image_size(self, config) -> int:
        return _size_pair(config.image_size)[0]

    def interpolates(self, model: nn.Module) -> bool:
        """Whether this model accepts image sizes other than its native one."""
        if self.position_embeddings in ("interpolated", "rope"):
            return True
        # CLIP/SigLIP interpolate only when asked; transformers versions without the argument cannot.
        return "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def check_image_size(self, model: nn.Module, height: int, width: Optional[int] = None) -> None:
        """Refuse an input size this backbone cannot take, naming the sizes it accepts."""
        width = height if width is None else width
        config = model.config
        p = self.patch_size(config)
        if height < p or width < p:
            raise ValueError(f"image size {height}x{width} is smaller than one {p}x{p} patch of this {self.title}; "
                             f"use at least {p} px (the native size is {self.native_image_size(config)})")
        if not self.interpolates(model):
            native = self.native_image_size(config)
            if (height, width) != (native, native):
                raise ValueError(
                    f"this {self.title} cannot interpolate its position embeddings in transformers "
                    f"{_transformers_version()}: it accepts only {native}x{native} images (got {height}x{width}); "
                    f"use --image-size {native}, or a transformers version whose {type(model).__name__}.forward "
                    "takes interpolate_pos_encoding")

    def forward(self, model: nn.Module, pixel_values: torch.Tensor):
        """Run the model on a batch at any supported size (asks CLIP/SigLIP to interpolate; at their native
        size that is the identity, so the numbers do not change)."""
        kwargs = dict(self.forward_kwargs) if self.interpolates(model) else {}
        return model(pixel_values=pixel_values, **kwargs)

    # -- modules ---------------------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> List[nn.Module]:
        """The transformer blocks in order (hook these to read intermediate layers)."""
        return list(_resolve(model, self.block_paths, "transformer blocks"))

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm a block's output goes through before pooling (see the module docstring, per family)."""
        return _resolve(model, self.norm_paths, "final norm")

    def cls(self, model: nn.Module, normed_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) normed tokens -> (B, D): the family's ``cls`` feature (see ``cls_meaning``)."""
        if self.has_cls_token:
            return normed_tokens[:, 0]
        try:
            head = _resolve(model, self.head_paths, "attention-pooling head")
        except AttributeError:
            head = None  # vision_use_head=False builds no head
        if head is None:
            raise ValueError(f"this {self.title} has no CLS token and no pooling head (vision_use_head is false); "
                             "use the mean or std pooling of the patch tokens instead of cls")
        return head(normed_tokens)

    def provides_cls(self, model: nn.Module) -> bool:
        """Whether ``cls`` exists for this model: a CLS token, or (SigLIP) an attention-pooling head."""
        if self.has_cls_token:
            return True
        try:
            return _resolve(model, self.head_paths, "attention-pooling head") is not None
        except AttributeError:
            return False

    def patch_tokens(self, model: nn.Module, normed_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, P, D): the patch tokens, without CLS and register tokens."""
        return self.layout(model.config).patch_tokens(normed_tokens)

    def describe(self, model: nn.Module) -> dict:
        """Plain facts for a fingerprint: family, normalisation, patch size, token layout, native size."""
        config = model.config
        return {
            "family": self.name,
            "model_type": str(getattr(config, "model_type", self.name)),
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std],
            "patch_size": self.patch_size(config),
            "native_image_size": self.native_image_size(config),
            "hidden_size": int(config.hidden_size),
            "num_blocks": len(self.blocks(model)),
            "token_layout": self.layout(config).to_dict(),
            "cls": "token" if self.has_cls_token else "attention_pool_head",
            "position_embeddings": self.position_embeddings,
        }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


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


__all__ = ["block_output", "tap_blocks"]


# -- hooks ---------------------------------------------------------------------------------------------------

def block_output(output) -> torch.Tensor:
    """A block's hidden states, whether it returns a tensor (transformers 5.x) or a tuple (4.x)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def tap_blocks(model: nn.Module, indices: Sequence[int],
               family: Optional[BackboneFamily] = None) -> Iterator[Dict[int, torch.Tensor]]:
    """Capture the raw outputs of chosen blocks during forward passes inside the ``with``.

    ``indices`` are Python indices into ``family.blocks(model)`` (0-based; negative from the end; a 1-based
    layer number L of the feature bank, ``--layers``, is ``L - 1``, and its negative ones are the same). Yields a
    dict filled by each forward, keyed by the indices as given; only the requested blocks are hooked, so no
    other layer's tokens are kept alive. Hooks are removed on exit, also on error.
    """
    family = family or family_of(model)
    blocks = family.blocks(model)
    n = len(blocks)
    for i in indices:
        if not -n <= int(i) < n:
            raise IndexError(f"block index {i} is out of range for a backbone with {n} blocks (use {-n}..{n - 1})")
    captured: Dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(key: int) -> Callable:
        def hook(_module, _inputs, output):
            captured[key] = block_output(output)
        return hook

    try:
        for i in indices:
            handles.append(blocks[int(i)].register_forward_hook(hook_for(i)))
        yield captured
    finally:
        for h in handles:
            h.remove()
