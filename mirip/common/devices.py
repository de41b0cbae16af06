"""Device and precision choices shared by every stage."""

from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

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


# Overrides the CPU probe: "1" treats the CPU as bf16-capable, "0" as not. For a chip the probe misreads, and
# for test suites whose numbers must not depend on the chip they run on.
CPU_BF16_ENV = "MIRIP_CPU_BF16"


def cpu_bf16_support() -> Optional[str]:
    """The CPU's bf16 matrix units by name ("AMX", "AVX512-BF16"), or None where bf16 only runs emulated.

    DESIGN.md's figures for a 2-core Xeon with both (DINOv2-S/14 at 224 px, batch 8): bf16 2.7x fp32's
    throughput, features cos >= 0.99995; on a chip without them bf16 is emulated and slower (docs/benchmarks.md)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return f"{CPU_BF16_ENV}={forced}" if forced == "1" else None
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        try:
            if getattr(torch.cpu, probe)():
                return name
        except (AttributeError, RuntimeError):  # an older torch without the probe: assume no bf16 units
            continue
    return None


# Scoring follows the precision a head's features were made in: a head trained on fp32 features and scored in bf16
# changed 5% of the demo's predicted tiers (Spearman 0.994) although every feature kept cos >= 0.99996
# (docs/benchmarks.md, "Parity on the demo").
FOLLOWED_FEATURE_PRECISIONS = ("fp32", "bf16")


def precision_choice(device: str, requested: Optional[str] = None,
                     features: Optional[str] = None) -> Tuple[str, str]:
    """(precision, why): the request if any; else, when scoring a head, the precision its features were made in
    (``features``: fp32 or bf16); else bf16 autocast on a GPU (tensor cores, fp32 range), bf16 on a CPU with AMX
    or AVX512-BF16 (DESIGN.md: 2.7-3.6x fp32 there), fp32 on other CPUs, where bf16 is emulated and slower."""
    if requested is not None:
        return check_precision(requested), "asked for with --precision"
    if features in FOLLOWED_FEATURE_PRECISIONS:
        return features, ("the precision the checkpoint's features were made in, so its scores and tiers hold; "
                          "--precision to choose another")
    if str(device).startswith("cuda"):
        return "bf16", "default on a GPU (tensor cores)"
    units = cpu_bf16_support()
    if units:
        return "bf16", f"default on a CPU with bf16 matrix units ({units}); --precision fp32 for exact fp32"
    return "fp32", "default on a CPU without AMX or AVX512-BF16, where bf16 is slower than fp32"


def default_precision(device: str) -> str:
    """The precision a run on ``device`` gets when none is asked for (``precision_choice``)."""
    return precision_choice(device)[0]


_ANNOUNCED: set = set()


def announce_precision(device: str, requested: Optional[str] = None, print_fn=print,
                       features: Optional[str] = None) -> str:
    """``precision_choice``, said once per process and choice (a service loading several heads says it once)."""
    precision, why = precision_choice(device, requested, features)
    line = f"precision: {precision} on {device_type(device)} ({why})"
    if line not in _ANNOUNCED:
        _ANNOUNCED.add(line)
        print_fn(line)
    return precision


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype for a precision, or None for plain fp32."""
    return None if check_precision(precision) == "fp32" else _DTYPES[precision]


def device_type(device: str) -> str:
    return torch.device(device).type
