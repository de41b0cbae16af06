"""Tests for the procedural demo dataset and its command-line wrapper."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mirip.demo.data import TIERS, assign_tiers, degrade, make_demo_dataset, sample_degradation, tier_counts
from mirip.demo.drawing import draw_picture

def _load_script() -> ModuleType:
    return importlib.import_module("mirip.cli.demo")


def _sharpness(path: Path) -> float:
    """Mean absolute 4-neighbour Laplacian of the grey image."""
    a = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    lap = a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4 * a[1:-1, 1:-1]
    return float(np.abs(lap).mean())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo_dataset(out, num_images=40, image_size=96, seed=7)


@pytest.mark.parametrize("num_images", [1, 4, 10, 41])
def test_tier_counts_exact(tmp_path: Path, num_images: int) -> None:
    df = make_demo_dataset(tmp_path, num_images=num_images, image_size=16)
    expected = tier_counts(num_images)
    assert df["tier"].value_counts().to_dict() == {t: n for t, n in expected.items() if n}
    assert sum(expected.values()) == num_images
    assert max(expected.values()) - min(expected.values()) <= 1


def test_default_counts_are_fifty_each() -> None:
    assert tier_counts(200) == {"S": 50, "A": 50, "B": 50, "C": 50}


def test_tiers_are_shuffled_but_prefix_stable() -> None:
    tiers = assign_tiers(40, seed=0)
    assert tiers != [TIERS[i % 4] for i in range(40)]
    assert assign_tiers(41, seed=0)[:40] == tiers


def test_metadata_columns_and_files(dataset: tuple[Path, pd.DataFrame]) -> None:
    out, df = dataset
    assert list(df.columns) == ["filename", "tier", "latent_quality"]
    on_disk = pd.read_csv(out / "metadata.csv")
    pd.testing.assert_frame_equal(on_disk, df)
    assert set(df["tier"]) <= set(TIERS)
    assert df["filename"].iloc[0] == "img_00000.jpg"
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(df["filename"])


def test_latent_quality_orders_the_tiers_and_varies_within(dataset: tuple[Path, pd.DataFrame]) -> None:
    out, df = dataset
    # Independent recomputation: the same per-image stream, the severity of each drawn parameter.
    for i, (tier, q) in enumerate(zip(df["tier"], df["latent_quality"])):
        rng = np.random.default_rng([7, i])
        p = sample_degradation(tier, rng, image_size=max(draw_picture(rng, 96).size))
        sev = [p.blur_radius / (0.8 * 96 / 256), p.noise_sigma / 3, (1 - p.contrast) / 0.16, (95 - p.jpeg_quality) / 26]
        assert q == pytest.approx(-sum(sev) / 4, abs=1e-6)
    bands = [df.loc[df["tier"] == t, "latent_quality"] for t in TIERS]
    for better, worse in zip(bands, bands[1:]):
        assert better.min() > worse.max()  # tiers coarsen the latent order, never contradict it
    assert all(b.std() > 0 for b in bands)


def test_image_size_and_mode(dataset: tuple[Path, pd.DataFrame]) -> None:
    out, df = dataset
    for name in df["filename"]:
        with Image.open(out / "images" / name) as img:
            assert img.size == (96, 96)
            assert img.mode == "RGB"
            assert img.format == "JPEG"


def test_deterministic_bytes(tmp_path: Path) -> None:
    for run in ("a", "b"):
        make_demo_dataset(tmp_path / run, num_images=8, image_size=48, seed=3, image_format="png")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_seed_changes_pictures(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "a", num_images=4, image_size=32, seed=0)
    make_demo_dataset(tmp_path / "b", num_images=4, image_size=32, seed=1)
    assert _files(tmp_path / "a") != _files(tmp_path / "b")


def test_rerun_overwrites_and_removes_stale_files(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, num_images=6, image_size=16, image_format="jpg")
    df = make_demo_dataset(tmp_path, num_images=3, image_size=16, image_format="png")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == list(df["filename"])


def test_sharpness_ordered_by_tier(dataset: tuple[Path, pd.DataFrame]) -> None:
    out, df = dataset
    scores = df.assign(sharp=[_sharpness(out / "images" / f) for f in df["filename"]])
    means = scores.groupby("tier")["sharp"].mean()
    assert means["S"] > means["A"] > means["B"] > means["C"]


def test_degradation_monotone_with_jitter() -> None:
    rng = np.random.default_rng(0)
    params = {t: [sample_degradation(t, rng) for _ in range(30)] for t in TIERS}
    for worse, better in zip(TIERS[1:], TIERS[:-1]):
        assert min(p.blur_radius for p in params[worse]) > max(p.blur_radius for p in params[better])
        assert min(p.noise_sigma for p in params[worse]) > max(p.noise_sigma for p in params[better])
        assert max(p.contrast for p in params[worse]) < min(p.contrast for p in params[better])
        assert max(p.jpeg_quality for p in params[worse]) < min(p.jpeg_quality for p in params[better])
    # Within a tier the strength varies, so no single constant identifies it.
    assert len({p.blur_radius for p in params["B"]}) > 1


def test_helpers_keep_size() -> None:
    rng = np.random.default_rng([0, 0])
    img = draw_picture(rng, 40)
    assert img.size == (40, 40)
    assert degrade(img, "C", rng).size == (40, 40)
    with pytest.raises(ValueError):
        degrade(img, "D", rng)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_images": 0}, {"image_size": -1}, {"seed": -1}, {"image_format": "gif"}],
)
def test_library_rejects_bad_args(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, **kwargs)


def test_main_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--output", str(out), "--num-images", "5", "--image-size", "24", "--format", "png", "--seed", "2"]
    assert _load_script().main(argv) == 0
    df = pd.read_csv(out / "metadata.csv")
    assert len(df) == 5 and df["filename"].str.endswith(".png").all()
    summary = capsys.readouterr().out
    assert "S=2, A=1, B=1, C=1" in summary and str(out) in summary


@pytest.mark.parametrize(
    "argv",
    [
        ["--num-images", "0"],
        ["--num-images", "-3"],
        ["--image-size", "0"],
        ["--image-size", "abc"],
        ["--seed", "-1"],
        ["--format", "gif"],
    ],
)
def test_main_rejects_bad_args(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        _load_script().main(["--output", str(tmp_path / "never"), *argv])
    assert excinfo.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_rerun_leaves_identical_files_untouched_so_the_cache_is_reused(tmp_path: Path, tiny_backbone: str) -> None:
    """Issue 12 item 11: the second demo run must not change mtimes, or extraction redoes every image."""
    import os

    from _extract_helpers import config
    from mirip.demo.data import IMAGES_DIR, METADATA_NAME
    from mirip.extract.run import extract_features

    meta = make_demo_dataset(tmp_path, num_images=8, image_size=32, seed=1)
    files = [tmp_path / IMAGES_DIR / name for name in meta["filename"]] + [tmp_path / METADATA_NAME]
    for path in files:
        os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))  # an mtime no write would give
    cfg = config(tmp_path / IMAGES_DIR, tmp_path / "f.h5", tiny_backbone, metadata=str(tmp_path / METADATA_NAME))
    assert extract_features(cfg).extracted == 8
    make_demo_dataset(tmp_path, num_images=8, image_size=32, seed=1)
    assert all(path.stat().st_mtime_ns == 1_000_000_000_000_000_000 for path in files)
    summary = extract_features(cfg)
    assert summary.extracted == 0 and summary.skipped_cached == 8
    # A file whose content differs is still rewritten.
    files[0].write_bytes(b"damaged")
    make_demo_dataset(tmp_path, num_images=8, image_size=32, seed=1)
    assert files[0].stat().st_mtime_ns != 1_000_000_000_000_000_000 and files[0].read_bytes() != b"damaged"
