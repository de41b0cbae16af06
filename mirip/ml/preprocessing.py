"""The one path from an image file to the backbone's input tensor.

Extraction (stage one) and full-image inference both call ``Preprocessor``, so
a cached feature and a freshly scored image see identical pixels. No torchvision:
PIL + numpy only. Any callable transform (a torchvision ``Compose`` included)
can still be passed wherever a transform is accepted.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field
from typing import Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("pad", "stretch", "center_crop")
PAPER_WHITE = (255, 255, 255)
# The documented size limit: images above it are refused as possible decompression bombs. It is 2x Pillow's
# warning threshold (89.5 MP), so a 12000 x 9000 scan (108 MP) loads. Raise it with --max-image-pixels or the
# MIRIP_MAX_IMAGE_PIXELS environment variable (read at import, so DataLoader workers see it too).
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
MAX_IMAGE_PIXELS = int(os.environ.get("MIRIP_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))
# How colour is interpreted, recorded in every fingerprint. "icc-to-srgb": embedded ICC profiles converted to
# sRGB (the default); "none": profiles ignored, pixel values read as sRGB (what caches made before it did).
COLOR_MANAGEMENT = "icc-to-srgb"
COLOR_MANAGEMENTS = ("icc-to-srgb", "none")
_SRGB = ImageCms.createProfile("sRGB")
# Where a decoded image keeps its file's upright size: a JPEG draft decode is smaller than the file, and whatever
# maps a result back onto the file (heatmaps, image_size in outputs) needs the file's own size.
SOURCE_SIZE = "mirip_source_size"
_ORIENTATION = 0x0112
_PIL_LIMIT_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = str(path), reason


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale to 8-bit by bit depth, never stretched to the image's own range.

    A faint 16-bit pencil scan must stay faint: 16-bit values are divided by 257 (65535 -> 255), exactly
    what an 8-bit export of the same file holds. Mode ``I`` is how Pillow holds 16-bit PNGs, so it is read on
    the 16-bit scale too; ``F`` (float) images are read on the 0..1 scale. Values outside the scale are clipped.
    """
    arr = np.asarray(img, dtype=np.float64)
    arr = arr * 255.0 if img.mode == "F" else arr / 257.0
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")


def to_srgb(img: Image.Image) -> Image.Image:
    """Convert an RGB or CMYK image with an embedded ICC profile to sRGB (an Adobe RGB scan is not sRGB).

    Images without a profile are assumed to be sRGB already, as browsers do. A profile that cannot be read or
    does not fit the image's mode is ignored with a warning rather than failing the image.
    """
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(img, source, _SRGB, renderingIntent=ImageCms.Intent.PERCEPTUAL,
                                              outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        warnings.warn(f"ignoring an unusable embedded ICC profile ({exc}); colours read as sRGB")
        return img
    converted.info = {k: v for k, v in img.info.items() if k != "icc_profile"}
    return converted


def _to_rgb(img: Image.Image, icc: bool = True) -> Image.Image:
    """Every PIL mode to 8-bit sRGB; ICC profiles applied (``icc``), transparency composited on white paper."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _grey_to_8bit(img)
    if icc:
        img = to_srgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, PAPER_WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: Union[str, os.PathLike], draft_size: int | None = None,
               max_pixels: int | None = None, icc: bool = True) -> Image.Image:
    """Open a file as an upright sRGB image, or raise FileNotFoundError / ImageReadError naming it.

    ``draft_size`` lets JPEG decoding downscale by a power of two while staying >= that size: a 12000 x 9000
    scan decodes at 1500 x 1125 for a 768 px input, so peak memory stays low. Images over ``max_pixels``
    (default ``MAX_IMAGE_PIXELS``) are refused; below it Pillow's own bomb warning is not an error.
    ``icc=False`` ignores embedded colour profiles (color management "none").
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image not found: {path}")
    if os.path.getsize(path) == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    return _decode(path, path, draft_size, max_pixels, icc)


def load_image_bytes(data: bytes, name: str = "upload", draft_size: int | None = None,
                     max_pixels: int | None = None, icc: bool = True) -> Image.Image:
    """``load_image`` for an image held in memory (an upload): the same decoding, limits and colour handling,
    and errors that name it by ``name``. Nothing on disk is read."""
    if not data:
        raise ImageReadError(name, "file is empty (0 bytes)")
    return _decode(io.BytesIO(bytes(data)), name, draft_size, max_pixels, icc)


def _decode(source, name: str, draft_size: int | None, max_pixels: int | None, icc: bool) -> Image.Image:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_with_limit(source, limit) as img:
                w, h = img.size
                if w * h > limit:
                    raise ImageReadError(name, f"{w}x{h} pixels exceeds the {limit} pixel limit (a possible "
                                               "decompression bomb); raise it with --max-image-pixels or "
                                               "MIRIP_MAX_IMAGE_PIXELS if the file is a genuine scan")
                upright = (h, w) if img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)
                if draft_size and img.format == "JPEG" and min(w, h) > draft_size:
                    img.draft(img.mode, (draft_size, draft_size))
                img.load()
                if icc:
                    img = to_srgb(img)  # before any transpose, while the profile is still attached
                img = _to_rgb(ImageOps.exif_transpose(img), icc)
                img.info[SOURCE_SIZE] = upright
                return img
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(name, f"decompression bomb refused ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageReadError(name, "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(name, f"{exc.__class__.__name__}: {exc}") from exc


def source_size(img: Image.Image) -> Tuple[int, int]:
    """The upright (width, height) of the file ``img`` was decoded from (``load_image``), larger than
    ``img.size`` after a draft decode; an image that came from no file is its own source."""
    return tuple(img.info.get(SOURCE_SIZE, img.size))


def _open_with_limit(source, limit: int) -> Image.Image:
    # Pillow refuses images over 2x its global MAX_IMAGE_PIXELS inside open(); mirip's own limit (checked
    # right after, on the header's size) must be the one that counts, so lift Pillow's for the open only.
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None if saved is None else max(saved, limit // 2 + 1)
        try:
            return Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


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
    max_pixels: int | None = field(default=None, compare=False)  # None: MAX_IMAGE_PIXELS
    color_management: str = COLOR_MANAGEMENT

    def __post_init__(self):
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size must be at least the patch size {self.patch_size}, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.color_management not in COLOR_MANAGEMENTS:
            raise ValueError(f"unknown color management {self.color_management!r}; use one of "
                             f"{', '.join(COLOR_MANAGEMENTS)}")

    def load(self, path: Union[str, os.PathLike]) -> Image.Image:
        return load_image(path, draft_size=self.image_size if self.draft else None, max_pixels=self.max_pixels,
                          icc=self.color_management != "none")

    def load_bytes(self, data: bytes, name: str = "upload") -> Image.Image:
        """An uploaded image, decoded exactly as ``load`` decodes a file."""
        return load_image_bytes(data, name, draft_size=self.image_size if self.draft else None,
                                max_pixels=self.max_pixels, icc=self.color_management != "none")

    def __call__(self, image: Union[str, os.PathLike, Image.Image]) -> torch.Tensor:
        icc = self.color_management != "none"
        img = _to_rgb(image, icc) if isinstance(image, Image.Image) else self.load(image)
        return to_tensor(resize(img, self.image_size, self.resize_mode, self.patch_size), self.mean, self.std)

    def config(self) -> dict:
        d = asdict(self)
        d.pop("draft")
        d.pop("max_pixels")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d
