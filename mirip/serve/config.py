"""The service's settings, one typed config (returned by ``GET /info`` and printed at start)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional

MB = 1024 * 1024


@dataclass
class ServeConfig:
    """What ``scripts/serve.py`` turns its flags into.

    ``max_batch_size`` images at most go through the backbone at once; a batch waits at most
    ``batch_timeout_ms`` after its first image for more to arrive. ``max_queue`` images may wait; beyond it
    a request gets 503 at once instead of queueing without bound. ``max_image_bytes`` / ``max_images`` bound
    one upload and one request; ``max_image_pixels`` is the decoder's decompression-bomb limit (None: the
    library's default). An explanation holds the backbone for a backward pass, so ``/explain`` takes at most
    ``max_explain_images`` per request, to keep scoring requests from waiting long behind one. ``api_key`` (never printed or returned) guards every endpoint but ``/health``.
    """

    checkpoints: List[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    device: Optional[str] = None
    backbone: Optional[str] = None
    random_init: Optional[bool] = None
    precision: Optional[str] = None
    engine: str = "torch"  # or "openvino": the heads' shared backbone pass compiled for the CPU
    engine_cache: Optional[str] = None  # where openvino keeps converted models (None: its default)
    max_batch_size: int = 16
    batch_timeout_ms: float = 10.0
    max_queue: int = 256
    max_images: int = 16
    max_image_bytes: int = 20 * MB
    max_request_bytes: int = 64 * MB
    max_image_pixels: Optional[int] = None
    explain_steps: int = 32
    max_explain_images: int = 4
    api_key: Optional[str] = field(default=None, repr=False)

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "max_images", "max_image_bytes", "max_request_bytes",
                     "explain_steps", "max_explain_images"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_images > self.max_queue:  # such a request would be told to retry (503) forever
            raise ValueError(f"max_images (--max-images) is {self.max_images} but max_queue (--max-queue) is "
                             f"{self.max_queue}: a request of more images than the queue holds could never be "
                             "admitted; lower --max-images or raise --max-queue")
        if self.engine not in ("torch", "openvino"):
            raise ValueError(f"engine must be torch or openvino, got {self.engine!r}")
        if self.engine == "openvino" and self.precision == "fp16":
            raise ValueError("--engine openvino runs fp32 or bf16 (--precision), not fp16")
        if self.batch_timeout_ms < 0:
            raise ValueError(f"batch_timeout_ms must be >= 0, got {self.batch_timeout_ms}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; set a non-empty key or none")

    def public(self) -> dict:
        """The settings a client may see (no key; only whether one is required)."""
        d = asdict(self)
        d.pop("api_key")
        d["auth"] = "api-key" if self.api_key else "none"
        return d
