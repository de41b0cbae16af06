"""Every choice of an extraction run (``ExtractConfig``), checked when it is made; saved beside the cache."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

from mirip.common.devices import PRECISIONS
from mirip.common.feature_spec import EXTRACT_POOLINGS
from mirip.ml import compiled
from mirip.ml.openvino_engine import ENGINES
from mirip.ml.preprocessing import RESIZE_MODES


FEATURE_DTYPES = ("float32", "float16")
Item = Tuple[str, int, int]  # (relative path, size, mtime_ns)


@dataclass
class ExtractConfig:
    """Every choice of an extraction run; saved as JSON beside the cache (``<cache>.json``)."""

    image_dir: str
    metadata: Optional[str] = None
    output: Optional[str] = None  # default: cache_dir/<backbone>-<size>px-<pooling>-<hash8>.h5
    filename_column: str = "filename"
    backbone: str = "facebook/dinov2-large"
    random_init: bool = False
    image_size: int = 768
    resize_mode: str = "pad"
    pooling: Union[str, List[str]] = "cls"  # a list (cls, mean, std) with ``layers`` makes a feature bank
    layers: Optional[List[int]] = None  # None: the last block only (-1); 1-based, or negative from the last
    precision: Optional[str] = None  # None: bf16 on CUDA, fp32 on CPU
    batch_size: int = 32
    num_workers: Optional[int] = None  # None: from the CPU count
    device: Optional[str] = None
    feature_dtype: str = "float32"
    views: int = 0
    retry_failed: bool = False
    overwrite: bool = False
    strict: bool = False
    cache_dir: str = "cache"
    progress: bool = True
    tier_column: Optional[str] = None  # checked in the metadata when set (scripts/extract.py: "tier")
    encoding: Optional[str] = None  # of the metadata CSV; None: UTF-8, else CP949 with a notice
    allow_outside_links: bool = False  # follow symbolic links resolving outside image_dir
    max_image_pixels: Optional[int] = None  # None: mirip.ml.preprocessing.MAX_IMAGE_PIXELS
    verify: bool = True  # check every cached row's checksum first and re-extract the damaged ones
    # How the backbone runs; none of it changes the numbers beyond the precision's tolerance or the fingerprint.
    compile: str = "auto"  # off / auto (CUDA only, from the break-even image count on) / on
    sdpa_backend: str = "auto"  # auto (torch's own choice; measured when compiling on CUDA), flash, cudnn, ...
    compile_backend: str = "inductor"  # torch.compile backend (tests use "eager": tracing without code generation)
    # torch, or openvino (mirip.ml.openvino_engine: CPU only, IR cached in engine_cache); recorded in the
    # fingerprint's ``engine`` field, and ``precision`` is then the plugin's.
    engine: str = "torch"
    engine_cache: Optional[str] = None

    def __post_init__(self):
        checks = [
            (self.image_size >= 14, f"image_size must be >= 14, got {self.image_size}"),
            (self.resize_mode in RESIZE_MODES, f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}"),
            (all(p in EXTRACT_POOLINGS for p in self.poolings) and len(self.poolings) > 0,
             f"pooling must be one or more of {EXTRACT_POOLINGS}, got {self.pooling!r}"),
            (self.layers is None or (len(self.layers) > 0 and all(int(l) != 0 for l in self.layers)),
             f"layers must be non-zero block indices (1-based, or negative from the last), got {self.layers!r}"),
            (self.precision is None or self.precision in PRECISIONS,
             f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.num_workers is None or self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.feature_dtype in FEATURE_DTYPES, f"feature_dtype must be one of {FEATURE_DTYPES}, got {self.feature_dtype!r}"),
            (self.views >= 0, f"views must be >= 0, got {self.views}"),
            (self.compile in compiled.COMPILE_MODES,
             f"compile must be one of {compiled.COMPILE_MODES}, got {self.compile!r}"),
            (self.sdpa_backend in compiled.SDPA_CHOICES,
             f"sdpa_backend must be one of {compiled.SDPA_CHOICES}, got {self.sdpa_backend!r}"),
            (self.engine in ENGINES, f"engine must be one of {ENGINES}, got {self.engine!r}"),
            (self.engine == "torch" or self.compile != "on",
             "--compile on compiles the torch backbone; --engine openvino replaces it: pass one of them"),
            (self.engine == "torch" or self.precision in (None, "fp32", "bf16"),
             f"--engine openvino runs fp32 or bf16 (--precision), not {self.precision}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def poolings(self) -> List[str]:
        return [self.pooling] if isinstance(self.pooling, str) else list(self.pooling)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def workers(self, device: str) -> int:
        if self.num_workers is not None:
            return self.num_workers
        cpus = os.cpu_count() or 1
        # On CPU the backbone needs the cores itself; on a GPU, decoding is the CPU's only job.
        return min(16, max(1, cpus - 1)) if device.startswith("cuda") else min(2, max(0, cpus // 2))
