"""What decides the last bits of a CPU float computation here: the torch build, the kernels it picks for this CPU
(ATen's capability, oneDNN's ISA) and the CPU's vector extensions, with any environment overrides of them.

Two machines with equal fingerprints run the same kernels, so a fixed-seed run gives bit-identical numbers on
both; anything else may round differently in the last bits.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import sys
import tempfile
from typing import Dict, List, Optional

import torch

# Environment variables that change which kernels ATen, oneDNN or MKL choose.
KERNEL_OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                    "MKL_CBWR", "MKL_DEBUG_CPU_TYPE")
ISA_FLAG = re.compile(r"^(sse\d.*|ssse3|avx.*|amx.*|fma.*|f16c)$")


def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields from /proc/cpuinfo ({} where there is none)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_isa_flags() -> List[str]:
    return sorted(flag for flag in _cpuinfo().get("flags", "").split() if ISA_FLAG.match(flag))


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (AttributeError, OSError):  # no C library to call (not a POSIX system)
        pass


def _captured_stdout(action) -> str:
    """What ``action()`` writes to file descriptor 1: oneDNN's verbose lines come from C, past ``sys.stdout``
    (which under pytest is not a file at all)."""
    fd = 1
    sys.stdout.flush()
    _flush_c_stdio()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            action()
        finally:
            _flush_c_stdio()
            os.dup2(saved, fd)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode(errors="replace")


@functools.lru_cache(maxsize=1)
def onednn_isa() -> Optional[str]:
    """oneDNN's ISA as its verbose mode reports it ("Intel AVX2", ...), or None where it cannot be read
    (no oneDNN, or its one-time info lines were already printed in this process)."""
    if not torch.backends.mkldnn.is_available():
        return None

    def convolve():  # called directly: F.conv2d may take another path for so small a problem
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            torch.mkldnn_convolution(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3), None, [0, 0], [1, 1], [1, 1], 1)

    try:
        text = _captured_stdout(convolve)
    except (AttributeError, OSError, ValueError, RuntimeError):  # no fd 1, or no such op or verbose mode here
        return None
    found = re.search(r"onednn_verbose,(?:v\d+,)?info,cpu,isa:([^\n]+)", text)
    return found.group(1).strip() if found else None


def kernel_fingerprint() -> Dict[str, object]:
    build = hashlib.sha256(torch.__config__.show().encode()).hexdigest()[:16]
    return {"torch": torch.__version__, "torch_build_sha256": build,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "onednn_isa": onednn_isa(),
            "cpu_vendor": _cpuinfo().get("vendor_id"), "cpu_isa_flags": cpu_isa_flags(),
            "kernel_overrides": {k: os.environ[k] for k in KERNEL_OVERRIDES if k in os.environ}}
