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

Where it lives: ``family_adapter`` (``BackboneFamily``, ``TokenLayout``), ``family_registry`` (``FAMILIES``,
``family_for``), ``family_loading`` (shipped configs, ``load_model``); this module holds the block hooks.

Loading refuses silent wrong results: an unknown ``model_type`` is refused naming the supported ones, and a
checkpoint whose weights do not load completely into the family's vision model is refused naming the missing
and unexpected weights. The text tower of a full CLIP/SigLIP checkpoint (and a DINO classifier head) is the
only thing allowed to go unused.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import nn

# The adapter class, the registry and the loaders live in modules of their own; every name is imported from here.
from mirip.ml.family_adapter import BackboneFamily
from mirip.ml.family_registry import family_of

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
