"""Procedurally drawn demo dataset with tiers S > A > B > C.

Every picture (``mirip.demo.drawing``) is a small still life (table edge, fruit, vases, boxes, cast
shadows, hatching and loose construction strokes) drawn with PIL on a
paper-coloured background. The tier is not a property of the composition:
it comes only from controlled quality degradations (blur, additive noise,
lower contrast, heavier JPEG compression) whose strength grows with the
tier. That gives the ranking model a known ground truth to learn without
any real artwork.

Everything is deterministic: image ``i`` is drawn and degraded from its own
``np.random.default_rng([seed, i])``, so the same arguments always produce
byte-identical files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageFilter

# The pictures themselves are drawn in mirip.demo.drawing.
from mirip.demo.drawing import draw_picture

TIERS: tuple[str, ...] = ("S", "A", "B", "C")
IMAGE_FORMATS: tuple[str, ...] = ("jpg", "png")
METADATA_NAME = "metadata.csv"
IMAGES_DIR = "images"

# Quality of the final JPEG write; the tier's own compression is applied
# earlier in ``degrade`` so PNG output carries the same artefacts.
_SAVE_JPEG_QUALITY = 95


# --------------------------------------------------------------------------
# Degradation
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Degradation:
    """Concrete degradation parameters for one image."""

    blur_radius: float  # GaussianBlur radius in pixels at the output size
    noise_sigma: float  # std of additive Gaussian noise, in 0..255 units
    contrast: float  # ImageEnhance.Contrast factor (1 = unchanged)
    jpeg_quality: int  # quality of the in-memory JPEG round trip


def _severity(tier: str, rng: np.random.Generator) -> float:
    # Tier level plus jitter: each tier covers a band, bands never overlap,
    # so every parameter is monotone in tier but varies within it.
    level = TIERS.index(tier)
    if level == 0:
        return float(rng.uniform(0.0, 0.2))
    return float(level + rng.uniform(-0.35, 0.35))


def sample_degradation(tier: str, rng: np.random.Generator, image_size: int = 256) -> Degradation:
    """Draw degradation parameters for ``tier``; strength grows S < A < B < C.

    Each parameter gets its own jitter so no single constant separates the
    tiers. Blur scales with ``image_size`` so tiers look alike at any size.
    """
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    blur = 0.8 * _severity(tier, rng) * image_size / 256
    noise = 3.0 * _severity(tier, rng)
    contrast = 1.0 - 0.16 * _severity(tier, rng)
    quality = int(round(95 - 26 * _severity(tier, rng)))
    return Degradation(blur, noise, contrast, int(np.clip(quality, 5, 95)))


def _add_noise(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    if sigma <= 0:
        return img
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(sigma)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _jpeg_round_trip(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def apply_degradation(img: Image.Image, params: Degradation, rng: np.random.Generator) -> Image.Image:
    """Apply ``params`` to ``img``: noise, blur, contrast, then JPEG."""
    # Noise goes in before the blur, like grain in a poor scan or photo of
    # the page; noise added after would raise high-frequency energy and make
    # worse tiers look sharper than better ones.
    out = _add_noise(img.convert("RGB"), params.noise_sigma, rng)
    if params.blur_radius > 0:
        out = out.filter(ImageFilter.GaussianBlur(params.blur_radius))
    out = ImageEnhance.Contrast(out).enhance(params.contrast)
    return _jpeg_round_trip(out, params.jpeg_quality)


def latent_quality(params: Degradation, image_size: int = 256) -> float:
    """The drawing's true quality, higher better: minus the mean severity its degradation was drawn with (each
    parameter's severity recovered exactly from its value; JPEG quality to its rounding). The order tiers only
    coarsen, for measuring a model or a teacher within a tier."""
    severities = (params.blur_radius / (0.8 * image_size / 256), params.noise_sigma / 3.0,
                  (1.0 - params.contrast) / 0.16, (95 - params.jpeg_quality) / 26)
    return -float(np.mean(severities))


def degrade(img: Image.Image, tier: str, rng: np.random.Generator) -> Image.Image:
    """Return ``img`` degraded to the quality of ``tier`` (S barely touched)."""
    params = sample_degradation(tier, rng, image_size=max(img.size))
    return apply_degradation(img, params, rng)


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------


def tier_counts(num_images: int) -> dict[str, int]:
    """Balanced counts per tier; leftovers go to the better tiers first."""
    base, extra = divmod(num_images, len(TIERS))
    return {tier: base + (1 if k < extra else 0) for k, tier in enumerate(TIERS)}


def assign_tiers(num_images: int, seed: int) -> list[str]:
    """Tier of each image index, balanced and shuffled within blocks of four.

    Shuffling per block (not globally) keeps the tiers of the first N images
    unchanged when more images are requested, while hiding the tier from a
    plain ``index % 4``. The trailing 3-element key keeps these streams apart
    from the per-image ``[seed, i]`` streams.
    """
    tiers: list[str] = []
    for block_start in range(0, num_images, len(TIERS)):
        block = min(len(TIERS), num_images - block_start)
        order = np.random.default_rng([seed, block_start // len(TIERS), 1]).permutation(block)
        tiers.extend(TIERS[int(k)] for k in order)
    return tiers


def image_filename(index: int, num_images: int, image_format: str) -> str:
    digits = max(5, len(str(max(num_images - 1, 0))))
    return f"img_{index:0{digits}d}.{image_format}"


def _save(img: Image.Image, path: Path, image_format: str) -> bool:
    """Write the image unless the file already holds exactly these bytes; returns whether it wrote.

    An identical file is left untouched so its mtime stays, and a rerun of the demo reuses the feature
    cache instead of re-extracting every image (the cache detects changes by size and mtime).
    """
    buffer = io.BytesIO()
    if image_format == "jpg":
        img.save(buffer, format="JPEG", quality=_SAVE_JPEG_QUALITY)
    else:
        img.save(buffer, format="PNG")
    return _write_if_changed(path, buffer.getvalue())


def _write_if_changed(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except OSError:
        pass  # absent or unreadable: write it
    path.write_bytes(data)
    return True


def _remove_stale(images_dir: Path, keep: set[str]) -> None:
    # A rerun with fewer images or another format must not leave earlier
    # files behind; only files matching our own naming scheme are touched.
    for path in images_dir.glob("img_*"):
        if path.suffix.lstrip(".") in IMAGE_FORMATS and path.name not in keep:
            path.unlink()


def _check_args(num_images: int, image_size: int, seed: int, image_format: str) -> None:
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")


def make_demo_dataset(
    output_dir: str | Path,
    num_images: int = 200,
    image_size: int = 256,
    seed: int = 0,
    image_format: str = "jpg",
) -> pd.DataFrame:
    """Write ``output_dir/images/*`` and ``output_dir/metadata.csv``.

    Returns the metadata (columns ``filename``, relative to ``images/``,
    ``tier`` and ``latent_quality``: the true order within and across tiers, higher better). Rerunning into the same directory rewrites only files whose content differs, so
    identical files keep their mtimes.
    """
    _check_args(num_images, image_size, seed, image_format)
    output_dir = Path(output_dir)
    images_dir = output_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)

    tiers = assign_tiers(num_images, seed)
    names = [image_filename(i, num_images, image_format) for i in range(num_images)]
    quality = []
    for i, (name, tier) in enumerate(zip(names, tiers)):
        rng = np.random.default_rng([seed, i])
        img = draw_picture(rng, image_size)
        params = sample_degradation(tier, rng, image_size=max(img.size))  # the draws degrade() makes, in order
        quality.append(round(latent_quality(params, max(img.size)), 6))
        _save(apply_degradation(img, params, rng), images_dir / name, image_format)
    _remove_stale(images_dir, set(names))

    metadata = pd.DataFrame({"filename": names, "tier": tiers, "latent_quality": quality})
    _write_if_changed(output_dir / METADATA_NAME, metadata.to_csv(index=False, lineterminator="\n").encode())
    return metadata
