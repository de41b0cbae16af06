"""What every benchmark records about where it ran, and the one CPU-GPU sync its timers use."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from typing import Any, Dict

import torch

import mirip
from mirip.common.devices import device_type


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()  # CPU-GPU sync point: time the work, not its queueing


def device_name(device: str) -> str:
    """A human name for the device: the GPU's product name, or the CPU model and core count."""
    if device_type(device) == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def machine_info(device: str) -> Dict[str, Any]:
    """Date, machine, load and software of a benchmark run; CPU figures mean little without the load."""
    import transformers

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "time_utc": datetime.now(timezone.utc).strftime("%H:%M:%S"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        # Other work on the machine slows CPU figures down; the load at the start says how busy it was.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mirip": mirip.__version__,
    }


__all__ = ["sync", "device_name", "machine_info"]
