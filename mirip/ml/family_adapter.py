"""``BackboneFamily``: how mirip uses one kind of vision transformer (its classes, token layout, blocks, final
norm, what ``cls`` means), and ``TokenLayout``, where its tokens lie. The families themselves are listed in
``mirip.ml.family_registry``; ``mirip.ml.families`` describes each and is the import path for all of it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

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
