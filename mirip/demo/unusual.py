"""Images unlike the demo's drawings, for checking that typicality flags what a model never saw.

Each kind stands for something a drawing app will receive: ``photo`` a phone photograph of a drawing (the
page small, tilted and dimmed on a dark table, with a glare spot), ``noise`` sensor noise, ``text`` a
screenshot of text, ``flat`` a flat colour, ``shapes`` another generator (saturated random rectangles and
discs on a coloured ground).
"""

from __future__ import annotations

from typing import Callable, Dict

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mirip.demo.data import degrade
from mirip.demo.drawing import draw_picture


def photo_of_drawing(rng: np.random.Generator, size: int) -> Image.Image:
    page = degrade(draw_picture(rng, size), "B", rng).resize((int(size * 0.6),) * 2)
    page = page.rotate(float(rng.uniform(-25, 25)), expand=True, fillcolor=(40, 32, 28))
    ground = tuple(int(v) for v in rng.integers(20, 90, 3))
    img = Image.new("RGB", (size, size), ground)
    img.paste(page, (int(rng.integers(0, size - page.width + 1)), int(rng.integers(0, size - page.height + 1))))
    arr = np.asarray(img, dtype=np.float64) * rng.uniform(0.5, 0.8)
    yy, xx = np.mgrid[:size, :size]
    cx, cy, r = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size, rng.uniform(0.1, 0.3) * size
    arr += 200 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))


def noise(rng: np.random.Generator, size: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def text(rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    for y in range(2, size - 8, 10):
        draw.text((2, y), "".join(rng.choice(list(letters), 40)), fill=(0, 0, 0))
    return img


def flat(rng: np.random.Generator, size: int) -> Image.Image:
    return Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))


def shapes(rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.rectangle if rng.integers(2) else draw.ellipse)(box, fill=colour)
    return img


KINDS: Dict[str, Callable[[np.random.Generator, int], Image.Image]] = {
    "photo": photo_of_drawing, "noise": noise, "text": text, "flat": flat, "shapes": shapes}


def unusual_image(kind: str, seed: int, size: int = 64) -> Image.Image:
    """One image of ``kind`` (a key of ``KINDS``), the same for the same seed."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind](np.random.default_rng([seed, len(kind)]), size)
