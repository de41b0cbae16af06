"""DINOv2FeatureExtractor: a frozen vision backbone that turns image batches into feature vectors.

The seed's name stays; the backbone may be any family in ``mirip.ml.families`` (DINOv2 by default, DINOv2 with
registers, DINOv3, SigLIP / SigLIP2, CLIP), recognised by its config's ``model_type``. All family-specific
reading (blocks, final norm, which tokens are CLS / registers / patches, SigLIP's pooling head) goes through
the family adapter, so this class has no per-family branches.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from mirip.common.devices import autocast_dtype, check_precision, default_precision, device_type, resolve_device
from mirip.common.feature_spec import (CLS_POOLINGS, Entry, FeatureSpec, FeatureSpecError, POOLINGS, bank_entries,
                                       entry_dim, parse_entry)
from mirip.ml.backbones import image_normalization, load_backbone
from mirip.ml.families import block_output, family_of
from mirip.ml.preprocessing import Preprocessor


class _StopForward(Exception):
    """Raised by the hook of the deepest requested block: the blocks after it would be wasted work."""


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
    """Frozen vision backbone (DINOv2 by default; any family of ``mirip.ml.families``):
    ``extract(images (B, 3, H, W)) -> (B, D)``.

    ``model_name`` is a hub id or local directory; its config's ``model_type`` picks the family. ``mean`` /
    ``std`` are the family's normalisation (or the directory's ``preprocessor_config.json``): images given to
    ``extract`` must be normalised with them (``mirip.ml.preprocessing.Preprocessor(mean=..., std=...)``).

    ``pooling`` picks the CLS token (default; SigLIP, which has none: its attention-pooling head's output;
    CLIP: the CLS token after ``post_layernorm``), the mean of the patch tokens, or both
    concatenated (``cls_mean``, 2 x hidden). ``precision`` defaults to bf16 on CUDA and on a
    CPU with AMX / AVX512-BF16, fp32 elsewhere (``mirip.common.devices.precision_choice``); outputs are float32.

    Feature bank: ``layers`` (block indices, 1-based or negative from the last) with ``pooling`` as a list
    of ``cls`` / ``mean`` / ``std`` gives one entry per (pooling, layer), pooling-major; ``entries``
    (``["cls@-4", "mean@-1"]`` or a ``FeatureSpec``) lists them explicitly in any order. ``extract``
    returns the entries concatenated in that order (``entry_names``, ``entry_dims``); ``extract_entries``
    returns them by name. Each selected block's output goes through the family's final norm before pooling;
    blocks are read by forward hooks and the forward stops after the deepest one (for DINOv2 ``cls@-1`` is
    ``last_hidden_state[:, 0]`` bit for bit).
    """

    def __init__(
        self,
        model_name: str = "facebook/dinov2-large",
        device: Optional[str] = None,
        *,
        random_init: bool = False,
        pooling: Union[str, Sequence[str]] = "cls",
        precision: Optional[str] = None,
        trainable: bool = False,
        layers: Optional[Sequence[int]] = None,
        entries: Optional[Union[str, FeatureSpec, Sequence[Union[str, Entry]]]] = None,
    ):
        super().__init__()
        entry_list = self._entries(pooling, layers, entries)
        self.model_name = model_name
        self.device = resolve_device(device)
        self.precision = check_precision(precision or default_precision(self.device))
        self.backbone, self.info = load_backbone(model_name, random_init=random_init)
        self.family = family_of(self.backbone)
        self.layout = self.family.layout(self.backbone.config)
        # The family's published statistics, or the checkpoint directory's own preprocessor_config.json.
        self.mean, self.std = image_normalization(self.family, self.info.name)
        self.num_layers = len(self.family.blocks(self.backbone))
        self._set_entries(entry_list, seed_pooling=pooling if isinstance(pooling, str) and layers is None
                          and entries is None else None)
        self._checked_size: Optional[tuple] = None
        self.entry_scales: Optional[List[float]] = None
        self._scale: Optional[torch.Tensor] = None
        # Another engine's bank (mirip.ml.openvino_engine): (B, 3, H, W) -> (B, D) unscaled, used by ``extract``
        # while frozen; None runs torch. Explanations run the torch backbone themselves either way.
        self.engine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.frozen = True
        self.freeze()
        if trainable:
            self.unfreeze()
        elif self.precision == "bf16":
            self.backbone.to(torch.bfloat16)
        self.to(self.device)

    def _set_entries(self, entry_list: List[Entry], seed_pooling: Optional[str] = None) -> None:
        """Which (pooling, block) entries ``extract`` returns, in order; checked against this backbone."""
        hidden = self.info.hidden_size
        try:
            blocks = [e.block(self.num_layers) for e in entry_list]
        except FeatureSpecError as exc:
            raise ValueError(f"{self.model_name}: {exc}") from None
        if any(e.pooling in CLS_POOLINGS for e in entry_list) and not self.family.provides_cls(self.backbone):
            raise ValueError(f"{self.model_name}: this {self.family.title} has no CLS token and no pooling head "
                             "(vision_use_head is false), so it has no cls feature; use mean or std pooling")
        self.entries: List[Entry] = entry_list
        self.entry_names: List[str] = [e.name for e in entry_list]
        self.entry_blocks: List[int] = blocks
        self.entry_dims: List[int] = [entry_dim(e.pooling, hidden) for e in entry_list]
        # ``pooling`` as the seed knows it for a single entry of the last block; the poolings used otherwise.
        self.pooling = seed_pooling or ",".join(dict.fromkeys(e.pooling for e in entry_list))
        self.output_dim = sum(self.entry_dims)

    def sharing_backbone(self, entries: Union[str, FeatureSpec, Sequence[Union[str, Entry]]]
                         ) -> "DINOv2FeatureExtractor":
        """Another extractor over this very backbone module (no second copy of its weights) that returns
        ``entries`` instead: several heads trained on one cache's bank, served from one loaded backbone. It
        starts with no entry scales; the backbone stays shared, so freezing one freezes both."""
        other = copy.copy(self)
        # nn.Module keeps children, parameters, buffers and hooks in dicts: give the copy its own dicts (the
        # backbone itself stays the same object), so setting attributes on one never changes the other.
        for key in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_hooks",
                    "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            if key in self.__dict__:
                other.__dict__[key] = copy.copy(self.__dict__[key])
        other._set_entries(self._entries("cls", None, entries))
        other._checked_size = None
        other.engine = None  # an engine computes this extractor's entries, not the other's
        other.set_entry_scales(None)
        return other

    @staticmethod
    def _entries(pooling, layers, entries) -> List[Entry]:
        if entries is not None:
            if layers is not None:
                raise ValueError("pass either entries or layers (with pooling), not both")
            if isinstance(entries, (str, FeatureSpec)):
                out = list(FeatureSpec.parse(entries).entries)
            else:
                out = [e if isinstance(e, Entry) else parse_entry(e) for e in entries]
            if not out or len({e.name for e in out}) != len(out):
                raise ValueError(f"entries must be a non-empty list of distinct POOLING@LAYER names, got {entries!r}")
            return out
        if isinstance(pooling, str):
            if pooling not in POOLINGS + ("std",):
                raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
            poolings = [pooling]
        else:
            poolings = list(pooling)
        try:
            return bank_entries(list(layers) if layers is not None else [-1], poolings)
        except FeatureSpecError as exc:
            raise ValueError(str(exc)) from None

    @property
    def patch_size(self) -> int:
        return self.info.patch_size

    def family_facts(self) -> dict:
        """Family, token layout and what ``cls`` means, for fingerprints (``BackboneFamily.describe``)."""
        return self.family.describe(self.backbone)

    def check_image_size(self, height: int, width: Optional[int] = None) -> None:
        """Refuse an input size this backbone cannot take (a fixed-size position table), naming the sizes it
        accepts; DINOv2 / DINOv3 take any size, CLIP / SigLIP interpolate their position embeddings."""
        self.family.check_image_size(self.backbone, height, width)

    def preprocessor(self, image_size: int = 768, resize_mode: str = "pad", **kwargs) -> Preprocessor:
        """The ``Preprocessor`` this backbone's inputs need: its family's mean/std and patch size.

        Extraction builds its preprocessing here and so does end-to-end training with a ``PairwiseDataset``
        left on its default transform, so a head never sees pixels normalised for another family. ``kwargs``
        go to ``Preprocessor`` (``max_pixels``, ``color_management``, ``draft``)."""
        return Preprocessor(image_size=int(image_size), resize_mode=resize_mode, mean=tuple(self.mean),
                            std=tuple(self.std), patch_size=self.patch_size, **kwargs)

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

    def _pool(self, normed: torch.Tensor, pooling: str) -> torch.Tensor:
        """One pooled vector per image from normed tokens (B, T, H); CLS and registers never enter mean/std.

        ``cls`` is the family's: the CLS token, or for SigLIP (no CLS token) its attention-pooling head.
        """
        if pooling == "cls":
            return self.family.cls(self.backbone, normed)
        patches = self.layout.patch_tokens(normed)
        if pooling == "mean":
            return patches.mean(dim=1)
        if pooling == "std":
            # Population std over the patch tokens, in fp32 (a difference of near-equal bf16 values loses it).
            return patches.float().std(dim=1, correction=0)
        return torch.cat([self.family.cls(self.backbone, normed), patches.mean(dim=1)], dim=1)

    def _forward_entries(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Run the backbone once; pool each requested block inside its hook, so no block's tokens outlive it.

        Every requested block, the last one included, is read the same way: its output through the family's
        final norm (for DINOv2 that is exactly ``last_hidden_state``; CLIP's ``last_hidden_state`` is not
        normed, and SigLIP's head would pool it), and the forward stops after the deepest one.
        """
        out: Dict[str, torch.Tensor] = {}
        wanted: Dict[int, List[Entry]] = {}
        for e, b in zip(self.entries, self.entry_blocks):
            wanted.setdefault(b, []).append(e)
        deepest = max(wanted)
        blocks, norm = self.family.blocks(self.backbone), self.family.final_norm(self.backbone)

        def hook_for(block: int):
            def hook(module, args, output):
                normed = norm(block_output(output))
                for e in wanted[block]:
                    out[e.name] = self._pool(normed, e.pooling)
                if block == deepest:
                    raise _StopForward
            return hook

        handles = [blocks[b - 1].register_forward_hook(hook_for(b)) for b in wanted]
        try:
            self.family.forward(self.backbone, images)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return out

    def set_entry_scales(self, scales: Optional[Sequence[float]]) -> None:
        """Multiply each entry by its scale in every ``extract`` (a head trained with per-entry normalisation
        sees the same inputs from images as from the cache); None removes the scaling."""
        if scales is None:
            self.entry_scales, self._scale = None, None
            return
        if len(scales) != len(self.entry_dims):
            raise ValueError(f"{len(scales)} entry scales for {len(self.entry_dims)} entries ({self.entry_names})")
        self.entry_scales = [float(x) for x in scales]
        self._scale = torch.cat([torch.full((d,), float(x), dtype=torch.float32)
                                 for d, x in zip(self.entry_dims, scales)])

    def bank_features(self, images: torch.Tensor) -> torch.Tensor:
        """The bank's entries side by side, unscaled, from images already on the device in the weights' dtype:
        the graph ``extract`` runs (and an engine such as OpenVINO converts)."""
        pooled = self._forward_entries(images)
        parts = [pooled[name].float() for name in self.entry_names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        features = self.bank_features(images)
        if self._scale is not None:
            features = features * self._scale.to(features.device)
        return features

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
        if tuple(images.shape[2:]) != self._checked_size:
            self.check_image_size(*images.shape[2:])
            self._checked_size = tuple(images.shape[2:])
        if self.engine is not None and self.frozen:
            features = self.engine(images)
            return features * self._scale if self._scale is not None else features
        images = images.to(self.device, dtype=self.weight_dtype, non_blocking=True)
        if not self.frozen:
            with self._autocast():
                return self._extract(images)
        with torch.inference_mode(), self._autocast():
            features = self._extract(images)
        # Cloning outside inference mode gives a normal tensor that a trainable head can use in autograd.
        return features.clone()

    def extract_entries(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``extract`` split back into its entries: {name: (B, dim)}."""
        features, out, start = self.extract(images), {}, 0
        for name, dim in zip(self.entry_names, self.entry_dims):
            out[name] = features[:, start:start + dim]
            start += dim
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images)
