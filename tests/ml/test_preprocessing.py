"""The shared preprocessing: modes, EXIF, resize modes, errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mirip.ml.preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, Preprocessor, load_image, resize
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


def _thirds(w: int = 300, h: int = 100) -> Image.Image:
    """Red, green and blue vertical bands, one third of the width each."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    for band in range(3):
        arr[:, band * w // 3:(band + 1) * w // 3, band] = 255
    return Image.fromarray(arr)


def _dominant(region: np.ndarray) -> int:
    return int(np.argmax(region.reshape(-1, 3).astype(int).sum(axis=0)))


def test_stretch_keeps_every_band_and_squashes_the_aspect():
    out = np.asarray(resize(_thirds(), 63, "stretch"))
    assert out.shape == (63, 63, 3)
    # All three bands survive, each a third of the width, over the full height (the aspect is not kept).
    assert [_dominant(out[:, x0:x0 + 17]) for x0 in (2, 23, 44)] == [0, 1, 2]
    assert out[0, 5].tolist() == out[62, 5].tolist() == [255, 0, 0]


def test_center_crop_keeps_only_the_middle_of_the_longer_side():
    out = np.asarray(resize(_thirds(), 63, "center_crop"))
    assert out.shape == (63, 63, 3)
    # 300x100 scaled to 189x63 and the middle 63 columns cut out: exactly the green band, nothing else.
    assert np.all(out[:, 3:60] == [0, 255, 0])
    tall = np.asarray(resize(_thirds().transpose(Image.Transpose.ROTATE_90), 63, "center_crop"))
    assert np.all(tall[3:60, :] == [0, 255, 0])


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
    import mirip.ml.preprocessing as pre

    make_image(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(pre, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ImageReadError, match="pixel limit"):
        load_image(tmp_path / "big.png")


def test_jpeg_draft_decodes_small_and_matches_a_full_decode(tmp_path):
    # A smooth picture: what a reduced-scale JPEG decode changes is fine detail, which a 224 px resize drops anyway.
    yy, xx = np.mgrid[0:900, 0:1200]
    arr = np.stack([xx * 255 // 1199, yy * 255 // 899, (xx + yy) * 255 // 2098], axis=2).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    # Decoded at a quarter of the size (the smallest power-of-two scale still at least 224 px), not in full.
    assert load_image(tmp_path / "big.jpg", draft_size=224).size == (300, 225)
    assert load_image(tmp_path / "big.jpg").size == (1200, 900)
    drafted = Preprocessor(image_size=224)(tmp_path / "big.jpg")
    full = Preprocessor(image_size=224, draft=False)(tmp_path / "big.jpg")
    assert not torch.equal(drafted, full)  # the draft path really ran
    assert float((drafted - full).abs().mean()) < 0.01 and float((drafted - full).abs().max()) < 0.1
    assert torch.equal(drafted, Preprocessor(image_size=224)(tmp_path / "big.jpg"))  # and it is deterministic


def test_preprocessor_config_and_validation():
    cfg = Preprocessor(image_size=224, resize_mode="stretch").config()
    assert cfg["image_size"] == 224 and cfg["resize_mode"] == "stretch" and cfg["mean"] == list(IMAGENET_MEAN)
    with pytest.raises(ValueError, match="resize mode"):
        Preprocessor(resize_mode="zoom")
