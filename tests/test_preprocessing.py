"""The shared preprocessing: modes, EXIF, resize modes, errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mirip.preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, Preprocessor, load_image, resize
from conftest import make_image


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "PA"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    arr = (np.arange(40 * 30) % 251).reshape(30, 40).astype(np.uint8)
    img = Image.fromarray(arr, "L").convert("RGB").convert("P") if mode == "PA" else Image.fromarray(arr, "L")
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray(arr.astype(np.uint16) * 200) if mode == "I;16" else img.convert(mode)
    elif mode == "PA":
        img = img.convert("PA")
    else:
        img = img.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I", "F", "PA") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    tensor = Preprocessor(image_size=28)(path)
    assert tensor.shape == (3, 28, 28) and tensor.dtype == torch.float32 and torch.isfinite(tensor).all()


def test_sixteen_bit_range_is_rescaled(tmp_path):
    arr = np.array([[0, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert out.min() == 0 and out.max() == 255


def test_transparency_composited_on_white(tmp_path):
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.all(np.asarray(load_image(tmp_path / "clear.png")) == 255)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_pad_keeps_the_whole_drawing_inside_the_seen_area():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    out = np.asarray(resize(img, 768, "pad", patch_size=14))
    assert out.shape == (768, 768, 3)
    dark = np.argwhere(out.sum(axis=2) < 50)
    # Width fits 756 px (54 patches); nothing lies in the last 12 px the backbone drops.
    assert dark[:, 1].min() == 0 and dark[:, 1].max() == 755 and out[:, 756:].min() == 255


@pytest.mark.parametrize("mode", ["stretch", "center_crop"])
def test_other_resize_modes(mode):
    out = resize(Image.new("RGB", (300, 100)), 64, mode)
    assert out.size == (64, 64)


def test_normalisation_uses_imagenet_stats(tmp_path):
    Image.new("RGB", (14, 14), (255, 255, 255)).save(tmp_path / "w.png")
    t = Preprocessor(image_size=14, resize_mode="stretch")(tmp_path / "w.png")
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(t[:, 0, 0], expected, atol=1e-6)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="Image not found: .*nope.png"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize(
    "content,reason", [(b"", "empty"), (b"not an image at all", "not a recognised image"), (None, "truncated|OSError")]
)
def test_unreadable_files_are_named(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is None:
        make_image(path, size=(64, 64))
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.png") as info:
        load_image(path)
    assert info.match(reason)


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    import mirip.preprocessing as pre

    make_image(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(pre, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ImageReadError, match="pixel limit"):
        load_image(tmp_path / "big.png")


def test_jpeg_draft_is_deterministic(tmp_path):
    make_image(tmp_path / "big.jpg", size=(1200, 900))
    pre = Preprocessor(image_size=224)
    assert torch.equal(pre(tmp_path / "big.jpg"), pre(tmp_path / "big.jpg"))


def test_preprocessor_config_and_validation():
    cfg = Preprocessor(image_size=224, resize_mode="stretch").config()
    assert cfg["image_size"] == 224 and cfg["resize_mode"] == "stretch" and cfg["mean"] == list(IMAGENET_MEAN)
    with pytest.raises(ValueError, match="resize mode"):
        Preprocessor(resize_mode="zoom")
