"""The one path from an image file to the backbone's input tensor.

Extraction (stage one) and full-image inference both call ``Preprocessor``, so
a cached feature and a freshly scored image see identical pixels. No torchvision:
PIL + numpy only. Any callable transform (a torchvision ``Compose`` included)
can still be passed wherever a transform is accepted.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("pad", "stretch", "center_crop")
PAPER_WHITE = (255, 255, 255)
# Refuse images whose pixel count could exhaust memory (PIL's own bomb limit is 89 MP, warn-only below 2x).
MAX_IMAGE_PIXELS = 178_956_970


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = str(path), reason


def _to_rgb(img: Image.Image) -> Image.Image:
    """Every PIL mode to 8-bit RGB; transparency is composited on white paper."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: rescale the actual range to 0..255 instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, PAPER_WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: Union[str, os.PathLike], draft_size: int | None = None) -> Image.Image:
    """Open a file as an upright RGB image, or raise FileNotFoundError / ImageReadError naming it.

    ``draft_size`` lets JPEG decoding downscale by a power of two while staying >= that size (much faster).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image not found: {path}")
    if os.path.getsize(path) == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageReadError(path, f"{w}x{h} pixels exceeds the {MAX_IMAGE_PIXELS} pixel limit")
                if draft_size and img.format == "JPEG" and min(w, h) > draft_size:
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(path, f"decompression bomb refused ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageReadError(path, "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"{exc.__class__.__name__}: {exc}") from exc


def resize(img: Image.Image, size: int, mode: str = "pad", patch_size: int = 14) -> Image.Image:
    """Resize to a ``size`` x ``size`` canvas.

    ``pad`` (default) keeps the whole drawing: the longer side fits the part of the
    canvas the backbone actually sees (a multiple of ``patch_size``; DINOv2's stride-14
    conv drops the remainder, e.g. the last 12 px of 768) and the rest is white paper.
    ``stretch`` fills the square, distorting the aspect; ``center_crop`` fills it by
    cutting the longer side (parts of the composition are lost).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}")
    if mode == "stretch":
        return img.resize((size, size), Image.BICUBIC)
    w, h = img.size
    if mode == "center_crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    seen = max(patch_size, (size // patch_size) * patch_size) if patch_size else size
    scale = seen / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), PAPER_WHITE)
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((seen - nw) // 2, (seen - nh) // 2))
    return canvas


def to_tensor(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image -> normalised float32 tensor (3, H, W)."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


@dataclass(frozen=True)
class Preprocessor:
    """Callable: path or PIL image -> (3, size, size) tensor. Its ``config()`` goes into cache fingerprints."""

    image_size: int = 768
    resize_mode: str = "pad"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    patch_size: int = 14
    draft: bool = field(default=True, compare=False)

    def __post_init__(self):
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size must be at least the patch size {self.patch_size}, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")

    def load(self, path: Union[str, os.PathLike]) -> Image.Image:
        return load_image(path, draft_size=self.image_size if self.draft else None)

    def __call__(self, image: Union[str, os.PathLike, Image.Image]) -> torch.Tensor:
        img = _to_rgb(image) if isinstance(image, Image.Image) else self.load(image)
        return to_tensor(resize(img, self.image_size, self.resize_mode, self.patch_size), self.mean, self.std)

    def config(self) -> dict:
        d = asdict(self)
        d.pop("draft")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def preprocess_file(path: Union[str, os.PathLike], image_size: int = 768, resize_mode: str = "pad") -> torch.Tensor:
    """Shortcut: one file -> normalised (3, image_size, image_size) tensor."""
    return Preprocessor(image_size=image_size, resize_mode=resize_mode)(path)
