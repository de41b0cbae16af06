"""Draw an ``Explanation`` on its drawing: the drawing and the drawing with its map, side by side, and a legend.

Colours are diverging and symmetric about zero (blue: drags the score down, red: lifts it), scaled to the
largest |cell| on the drawing, so the strongest region is always full strength. Transparency follows |value|:
where the map is near zero the drawing shows through untouched, which keeps line work legible. Only the
drawing's cells are drawn (padding is cropped away); the drawing is shown greyed so the colours read on any
palette. Pure numpy + Pillow (matplotlib stays an optional extra).
"""

from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from mirip.ml.preprocessing import load_image
from mirip.scoring.explain import Explanation, scale_box
from mirip.scoring.fonts import default_font, font_for

NEGATIVE = np.array([33, 102, 172], dtype=np.float32)   # drags the score down
POSITIVE = np.array([178, 24, 43], dtype=np.float32)    # lifts it
MAX_ALPHA = 0.7


def map_on_image(exp: Explanation, width: int, height: int) -> np.ndarray:
    """The map resampled onto the displayed picture (height, width), padding cropped away."""
    gh, gw = exp.map.shape
    p = exp.patch_size
    full = Image.fromarray(exp.map.astype(np.float32), mode="F").resize((gw * p, gh * p), Image.BILINEAR)
    return np.asarray(full.crop(exp.content_box).resize((width, height), Image.BILINEAR), dtype=np.float32)


def colour_overlay(picture: Image.Image, values: np.ndarray, vmax: float) -> Image.Image:
    """Blend a signed map (same size as ``picture``) on a greyed copy of it."""
    grey = np.asarray(picture.convert("L"), dtype=np.float32)[..., None]
    base = 255.0 - 0.8 * (255.0 - grey)  # lighten: colours read on top, lines stay visible
    v = np.clip(values / vmax, -1.0, 1.0)[..., None] if vmax > 0 else np.zeros(values.shape + (1,), np.float32)
    colour = np.where(v < 0, NEGATIVE, POSITIVE)
    alpha = MAX_ALPHA * np.abs(v) ** 0.75
    out = base * (1 - alpha) + colour * alpha  # (h, w, 3) by broadcasting
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def render_explanation(exp: Explanation, image: Optional[Image.Image] = None, max_side: int = 384) -> Image.Image:
    """[drawing | drawing + map] with a legend strip naming the score, the blank page's and the scale.

    ``image``: the drawing already decoded, at any size (the service's draft-decoded upload); by default the
    file is reopened, drafted only down to ``max_side``. Either way ``source_box`` (on the file's upright
    ``image_size``) is moved onto the picture at hand."""
    img = image if image is not None else load_image(exp.path, draft_size=max_side)
    img = img.convert("RGB").crop(scale_box(exp.source_box, exp.image_size, img.size))
    # Sized from the file's box, not the picture at hand, so a drafted picture gives the same layout.
    bw, bh = exp.source_box[2] - exp.source_box[0], exp.source_box[3] - exp.source_box[1]
    scale = max_side / max(bw, bh)  # up as well as down: a small drawing's map needs room to be read
    w, h = max(1, round(bw * scale)), max(1, round(bh * scale))
    img = img.resize((w, h), Image.BICUBIC)
    values = map_on_image(exp, w, h)
    on = exp.content
    vmax = float(np.abs(exp.map[on]).max()) if on.any() else float(np.abs(exp.map).max())
    over = colour_overlay(img, values, vmax)
    gap, legend_h = 8, 58
    canvas = Image.new("RGB", (2 * w + gap, h + legend_h), (255, 255, 255))
    canvas.paste(img, (0, 0))
    canvas.paste(over, (w + gap, 0))
    _legend(ImageDraw.Draw(canvas), exp, vmax, (0, h + 4, 2 * w + gap, h + legend_h))
    return canvas


def _legend(draw: ImageDraw.ImageDraw, exp: Explanation, vmax: float, box: Tuple[int, int, int, int]) -> None:
    left, top, right, _ = box
    small = default_font(12)
    bar_w = min(220, (right - left) // 2)
    for x in range(bar_w):
        v = 2 * x / max(bar_w - 1, 1) - 1
        c = NEGATIVE if v < 0 else POSITIVE
        a = MAX_ALPHA * abs(v) ** 0.75
        rgb = tuple(int(255 * (1 - a) + ci * a) for ci in c)
        draw.line([(left + x, top), (left + x, top + 12)], fill=rgb)
    draw.text((left, top + 14), f"-{vmax:.3g} drags down", fill=(33, 102, 172), font=small)
    draw.text((left + bar_w, top + 14), f"+{vmax:.3g} lifts", fill=(178, 24, 43), font=small, anchor="ra")
    kind = "exact per patch" if exp.exact else "first-order per patch"
    draw.text((left + bar_w + 12, top), f"score {exp.score:+.3f}  (blank page {exp.baseline_score:+.3f})",
              fill=(0, 0, 0), font=small)
    draw.text((left + bar_w + 12, top + 16), f"map = score - blank page, {kind}", fill=(80, 80, 80), font=small)
    name_font, name = font_for(os.path.basename(exp.path), 12)
    draw.text((left, top + 32), name, fill=(80, 80, 80), font=name_font)


def overlay_name(path: str, roots=()) -> str:
    """A file name for ``path``'s outputs that stays unique across sub-directories (``sub__a``)."""
    rel = None
    for r in roots:
        if os.path.isdir(r):
            candidate = os.path.relpath(path, r)
            if not candidate.startswith(".."):
                rel = candidate
                break
    stem = os.path.splitext(rel or os.path.basename(path))[0]
    return stem.replace(os.sep, "__").replace("/", "__")


def save_explanations(result, directory: str, roots=(), max_side: int = 384) -> list:
    """Per explanation, ``NAME.png`` (drawing | overlay, legend) and ``NAME.npy`` (the raw (grid_h, grid_w) map,
    float32, score units) in ``directory``, and ``index.json`` listing them with each map's facts (padding
    cells, exactness, unassigned share). Returns the index rows."""
    os.makedirs(directory, exist_ok=True)
    rows, used = [], set()
    for exp in result:
        name = overlay_name(exp.path, roots)
        while name in used:  # same stem from two places given separately
            name += "_"
        used.add(name)
        png, npy = os.path.join(directory, name + ".png"), os.path.join(directory, name + ".npy")
        render_explanation(exp, max_side=max_side).save(png)
        np.save(npy, exp.map)
        facts = exp.to_dict()
        facts.pop("map")  # in the .npy; the content mask (1 = drawing, 0 = padding) stays here
        facts["content"] = exp.content.astype(int).tolist()
        rows.append({**facts, "png": png, "npy": npy})
    with open(os.path.join(directory, "index.json"), "w", encoding="utf-8") as f:
        json.dump({"explanations": rows, "failures": [list(x) for x in result.failures]}, f, indent=1)
    return rows
