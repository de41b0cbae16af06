"""Device and precision choices shared by every stage."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: Optional[str] = None) -> str:
    """None picks CUDA when present; an explicit CUDA request without CUDA falls back to CPU loudly."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device={device!r} was requested but CUDA is not available; using CPU", stacklevel=3)
        return "cpu"
    return device


# (backbone, image size) when a command is given neither: the seed's setting on a GPU; on a CPU the large model
# at 768 px takes ~16 s per forward, so the small one at 224 px (as scripts/demo.sh uses) keeps a run to minutes.
DEVICE_DEFAULTS = {"cuda": ("facebook/dinov2-large", 768), "cpu": ("facebook/dinov2-small", 224)}


def device_defaults(device: str) -> tuple:
    """(backbone, image size) that ``scripts/extract.py`` and ``scripts/benchmark.py`` use on ``device``."""
    return DEVICE_DEFAULTS["cuda" if str(device).startswith("cuda") else "cpu"]


def default_precision(device: str) -> str:
    """bf16 autocast on a GPU (tensor cores, fp32 range); fp32 on CPU, where bf16 is slower on most chips."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype for a precision, or None for plain fp32."""
    return None if check_precision(precision) == "fp32" else _DTYPES[precision]


def device_type(device: str) -> str:
    return torch.device(device).type
