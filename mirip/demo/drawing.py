"""The demo dataset's pictures: a small still life (table edge, fruit, vases, boxes, cast shadows, hatching
and loose construction strokes) drawn with PIL on a paper-coloured background, every choice from the
generator given (``draw_picture``). ``mirip.demo.data`` degrades them by tier and writes the dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw

# Drawing at twice the output size and downsampling gives antialiased lines,
# so tier S looks like a clean drawing rather than jagged pixel art.
_SUPERSAMPLE = 2

Color = tuple[int, int, int]
Point = tuple[float, float]


def _paper_color(rng: np.random.Generator) -> Color:
    base = rng.uniform(226.0, 248.0)
    warmth = rng.uniform(2.0, 16.0)
    return (int(base), int(base - 0.45 * warmth), int(base - warmth))


def _ink_color(rng: np.random.Generator) -> Color:
    # Mostly graphite, sometimes sepia or blue-black, as in real sketchbooks.
    value = rng.uniform(25.0, 75.0)
    tint = rng.normal(0.0, 10.0, size=3)
    return tuple(int(np.clip(value + t, 0, 255)) for t in tint)  # type: ignore[return-value]


def _tint_color(rng: np.random.Generator, paper: Color) -> Color:
    # Light watercolour-like wash: a random hue mixed mostly with the paper.
    hue = rng.uniform(60.0, 230.0, size=3)
    mix = rng.uniform(0.15, 0.45)
    return tuple(int((1 - mix) * p + mix * h) for p, h in zip(paper, hue))  # type: ignore[return-value]


def _darken(color: Color, factor: float) -> Color:
    return tuple(int(c * factor) for c in color)  # type: ignore[return-value]


def _width(size: int, fraction: float) -> int:
    return max(1, int(round(size * fraction)))


def _hatch(
    img: Image.Image,
    mask: Image.Image,
    color: Color,
    spacing: float,
    angle: float,
    width: int,
) -> None:
    """Fill the non-zero area of ``mask`` with parallel shading lines."""
    bbox = mask.getbbox()
    if bbox is None:
        return
    # Work inside the mask's bounding box only: full-canvas masks made the
    # paste the slowest step of the whole generator.
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    radius = math.hypot(w, h) / 2 + 1
    dx, dy = math.cos(angle), math.sin(angle)
    offset = -radius
    while offset <= radius:
        # Line through the centre shifted by ``offset`` along the normal.
        px, py = w / 2 - dy * offset, h / 2 + dx * offset
        draw.line(
            [(px - dx * radius, py - dy * radius), (px + dx * radius, py + dy * radius)],
            fill=255,
            width=width,
        )
        offset += max(spacing, 1.0)
    img.paste(color, bbox, ImageChops.multiply(layer, mask.crop(bbox)))


def _shape_mask(size: tuple[int, int], kind: str, geometry: list[Point] | tuple) -> Image.Image:
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    if kind == "ellipse":
        draw.ellipse(geometry, fill=255)
    else:
        draw.polygon(geometry, fill=255)
    return mask


def _shadow_side(mask: Image.Image, light_from_left: bool) -> Image.Image:
    """Keep only the half of a shape that faces away from the light (in place)."""
    bbox = mask.getbbox()
    if bbox is None:
        return mask
    mid = (bbox[0] + bbox[2]) / 2
    lit = (bbox[0], bbox[1], mid, bbox[3]) if light_from_left else (mid, bbox[1], bbox[2], bbox[3])
    ImageDraw.Draw(mask).rectangle(lit, fill=0)
    return mask


@dataclass
class _Scene:
    """Shared state for one picture, so helpers need few arguments."""

    img: Image.Image
    draw: ImageDraw.ImageDraw
    rng: np.random.Generator
    size: int
    paper: Color
    ink: Color
    table_y: float
    light_from_left: bool


def _ellipse_box(cx: float, cy: float, rx: float, ry: float) -> tuple[float, float, float, float]:
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    return (cx - rx, cy - ry, cx + rx, cy + ry)


def _shade(scene: _Scene, kind: str, geometry, fill: Color) -> None:
    """Tinted fill, hatched shadow side and ink outline for one object."""
    s, rng = scene.size, scene.rng
    if kind == "ellipse":
        scene.draw.ellipse(geometry, fill=fill)
    else:
        scene.draw.polygon(geometry, fill=fill)
    mask = _shadow_side(_shape_mask(scene.img.size, kind, geometry), scene.light_from_left)
    angle = rng.uniform(0.6, 1.1) * (1 if scene.light_from_left else -1)
    _hatch(scene.img, mask, _darken(scene.ink, 1.3), s * rng.uniform(0.018, 0.03), angle, _width(s, 0.003))
    outline_w = _width(s, rng.uniform(0.003, 0.007))
    if kind == "ellipse":
        scene.draw.ellipse(geometry, outline=scene.ink, width=outline_w)
    else:
        scene.draw.line([*geometry, geometry[0]], fill=scene.ink, width=outline_w, joint="curve")


def _cast_shadow(scene: _Scene, cx: float, half_width: float) -> None:
    shift = half_width * 0.6 * (1 if scene.light_from_left else -1)
    box = _ellipse_box(cx + shift, scene.table_y + half_width * 0.08, half_width * 1.2, half_width * 0.22)
    scene.draw.ellipse(box, fill=_darken(scene.paper, 0.82))


def _draw_fruit(scene: _Scene, cx: float, scale: float) -> None:
    r = scale * scene.rng.uniform(0.5, 0.8)
    cy = scene.table_y - r * 0.9
    box = _ellipse_box(cx, cy, r * scene.rng.uniform(0.9, 1.15), r)
    _cast_shadow(scene, cx, r)
    _shade(scene, "ellipse", box, _tint_color(scene.rng, scene.paper))
    stem = [(cx, cy - r * 0.9), (cx + r * 0.15, cy - r * 1.25)]
    scene.draw.line(stem, fill=scene.ink, width=_width(scene.size, 0.006))


def _vase_outline(cx: float, bottom: float, height: float, belly: float, neck: float, belly_at: float) -> list[Point]:
    """Symmetric vase silhouette: narrow neck, widest at ``belly_at`` (0 = top)."""
    # Warp t so the sine bulge peaks at ``belly_at``; stopping the sine short
    # of pi leaves a foot wider than the neck.
    warp = math.log(0.5) / math.log(belly_at)
    right: list[Point] = []
    for t in np.linspace(0.0, 1.0, 16):
        radius = neck + (belly - neck) * math.sin(0.85 * math.pi * t**warp)
        right.append((cx + radius, bottom - height * (1 - t)))
    left = [(2 * cx - x, y) for x, y in reversed(right)]
    return right + left


def _draw_vase(scene: _Scene, cx: float, scale: float) -> None:
    rng = scene.rng
    height = scale * rng.uniform(1.6, 2.6)
    belly = scale * rng.uniform(0.45, 0.75)
    outline = _vase_outline(cx, scene.table_y, height, belly, belly * rng.uniform(0.25, 0.5), rng.uniform(0.3, 0.45))
    _cast_shadow(scene, cx, belly)
    _shade(scene, "polygon", outline, _tint_color(rng, scene.paper))
    # Ellipse at the mouth sells the 3-D form.
    top = scene.table_y - height
    mouth = belly * 0.35
    scene.draw.ellipse(_ellipse_box(cx, top, mouth, mouth * 0.3), outline=scene.ink, width=_width(scene.size, 0.004))


def _draw_box(scene: _Scene, cx: float, scale: float) -> None:
    rng = scene.rng
    w, h = scale * rng.uniform(1.0, 1.6), scale * rng.uniform(0.7, 1.4)
    depth = scale * rng.uniform(0.25, 0.45)
    side = 1 if scene.light_from_left else -1
    x0, x1, y1 = cx - w / 2, cx + w / 2, scene.table_y
    y0 = y1 - h
    front = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    edge = x1 if side > 0 else x0
    side_face = [(edge, y0), (edge + side * depth, y0 - depth * 0.6), (edge + side * depth, y1 - depth * 0.6), (edge, y1)]
    top = [(x0, y0), (x1, y0), (x1 + side * depth, y0 - depth * 0.6), (x0 + side * depth, y0 - depth * 0.6)]
    _cast_shadow(scene, cx, w / 2)
    fill = _tint_color(rng, scene.paper)
    _shade(scene, "polygon", side_face, _darken(fill, 0.8))
    _shade(scene, "polygon", top, fill)
    scene.draw.polygon(front, fill=fill, outline=scene.ink, width=_width(scene.size, 0.005))


def _draw_table(scene: _Scene) -> None:
    s, rng = scene.size, scene.rng
    y = scene.table_y
    tilt = rng.uniform(-0.02, 0.02) * s
    scene.draw.line([(0, y - tilt), (s, y + tilt)], fill=scene.ink, width=_width(s, 0.004))
    # Sparse horizontal hatching on the table top gives the ground plane.
    ground = Image.new("L", scene.img.size, 0)
    ImageDraw.Draw(ground).rectangle((0, min(y + 2, s), s, s), fill=255)
    _hatch(scene.img, ground, _darken(scene.paper, 0.85), s * rng.uniform(0.03, 0.06), rng.uniform(-0.05, 0.05), 1)


def _draw_strokes(scene: _Scene) -> None:
    """Loose construction lines, lighter than the ink, as in a real sketch."""
    s, rng = scene.size, scene.rng
    color = tuple(int(0.5 * i + 0.5 * p) for i, p in zip(scene.ink, scene.paper))
    for _ in range(int(rng.integers(3, 8))):
        start = rng.uniform(0.05, 0.95, size=2) * s
        heading = rng.uniform(0, 2 * math.pi)
        points = [tuple(start)]
        for _ in range(int(rng.integers(2, 6))):
            heading += rng.normal(0.0, 0.35)
            step = rng.uniform(0.04, 0.15) * s
            x, y = points[-1]
            points.append((x + step * math.cos(heading), y + step * math.sin(heading)))
        scene.draw.line(points, fill=color, width=_width(s, 0.0025), joint="curve")


_OBJECTS = (_draw_fruit, _draw_vase, _draw_box)


def _draw_objects(scene: _Scene) -> None:
    s, rng = scene.size, scene.rng
    count = int(rng.integers(2, 5))
    # Spread objects across the table, jittered, and draw larger ones first
    # so small ones overlap them the way a still life is usually arranged.
    centres = (np.arange(count) + 0.5 + rng.uniform(-0.3, 0.3, size=count)) / count
    scales = rng.uniform(0.1, 0.18, size=count) * s
    for idx in np.argsort(-scales):
        _OBJECTS[int(rng.integers(len(_OBJECTS)))](scene, float(centres[idx] * s), float(scales[idx]))


def draw_picture(rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw one clean still-life picture of ``image_size`` x ``image_size`` pixels."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    size = image_size * _SUPERSAMPLE
    paper = _paper_color(rng)
    img = Image.new("RGB", (size, size), paper)
    scene = _Scene(
        img=img,
        draw=ImageDraw.Draw(img),
        rng=rng,
        size=size,
        paper=paper,
        ink=_ink_color(rng),
        table_y=rng.uniform(0.58, 0.78) * size,
        light_from_left=bool(rng.integers(2)),
    )
    _draw_table(scene)
    _draw_strokes(scene)
    _draw_objects(scene)
    # Box-filter reduction is several times faster than LANCZOS and is all
    # the antialiasing flat-coloured line art needs.
    return img.reduce(_SUPERSAMPLE)
