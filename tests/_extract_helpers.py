"""Helpers for the stage-one tests: image sets, every kind of bad file, and a one-call extraction."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mirip.extract.config import ExtractConfig
from mirip.extract.run import extract_features
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.preprocessing import Preprocessor

SIZE = 28  # 2 x 2 patches of the tiny backbone: fast, and still a real forward pass


def noise_image(size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def make_images(directory, n: int, start: int = 0, ext: str = "png") -> list:
    """``n`` noise images img_<i>.<ext> of varying shape; returns their names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + n):
        name = f"img_{i:03d}.{ext}"
        noise_image((30 + 3 * i, 20 + 2 * i), seed=i).save(directory / name)
        names.append(name)
    return names


def write_metadata(path, names, column: str = "filename") -> str:
    import pandas as pd

    pd.DataFrame({column: names, "tier": ["S"] * len(names)}).to_csv(path, index=False)
    return str(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_bomb(path, width: int = 30000, height: int = 30000) -> str:
    """A tiny file whose header claims 900 megapixels (nothing is ever decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 64)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    Path(path).write_bytes(data)
    return str(path)


def write_bad_files(directory) -> dict:
    """Every kind of unreadable file, as {name: words expected in its failure reason}."""
    d = Path(directory)
    (d / "corrupt.jpg").write_bytes(bytes(range(256)) * 4)
    buf = d / "whole.jpg"
    noise_image((200, 160), seed=99).save(buf, quality=95)
    data = buf.read_bytes()
    buf.unlink()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("these are notes, not a picture\n")
    write_png_bomb(d / "bomb.png")
    return {
        "corrupt.jpg": "not a recognised image format",
        "truncated.jpg": "truncated",
        "empty.png": "empty",
        "notes.png": "not a recognised image format",
        "bomb.png": "pixel",
        "missing.png": "not found",
    }


def write_mode_images(directory) -> list:
    """Unusual PIL modes that must extract: L, LA, P, P with transparency, RGBA, CMYK, 16-bit."""
    d = Path(directory)
    base = noise_image((36, 28), seed=7)
    base.convert("L").save(d / "mode_l.png")
    base.convert("LA").save(d / "mode_la.png")
    base.convert("P").save(d / "mode_p.png")
    p = base.convert("P")
    p.info["transparency"] = 0
    p.save(d / "mode_p_transparent.png", transparency=0)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(36, dtype=np.uint8) * 7, (28, 1))))
    rgba.save(d / "mode_rgba.png")
    base.convert("CMYK").save(d / "mode_cmyk.jpg")
    arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(arr).save(d / "mode_i16.png")  # uint16 -> mode I;16
    return ["mode_l.png", "mode_la.png", "mode_p.png", "mode_p_transparent.png", "mode_rgba.png",
            "mode_cmyk.jpg", "mode_i16.png"]


def config(image_dir, output, backbone, **overrides) -> ExtractConfig:
    kw = dict(image_dir=str(image_dir), output=None if output is None else str(output), backbone=backbone, image_size=SIZE, batch_size=4,
              num_workers=0, device="cpu", progress=False)
    kw.update(overrides)
    return ExtractConfig(**kw)


def extract(image_dir, output, backbone, **overrides):
    return extract_features(config(image_dir, output, backbone, **overrides))


def reference_features(backbone, files, image_size: int = SIZE, **kw) -> np.ndarray:
    """Features through the public API, one file at a time: what every cached row must equal."""
    extractor = DINOv2FeatureExtractor(backbone, device="cpu", **kw)
    pre = Preprocessor(image_size=image_size, mean=extractor.mean, std=extractor.std, patch_size=extractor.patch_size)
    with torch.no_grad():
        return np.concatenate([extractor.extract(pre(str(f))[None]).numpy() for f in files])


def touch_later(path, seconds: float = 10.0) -> None:
    """Move a file's mtime forward, as an edit would."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


def script_main():
    """``main`` of ``mirip extract`` (scripts/extract.py)."""
    from mirip.cli.extract import main

    return main


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
