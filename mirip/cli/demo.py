"""Write a procedurally drawn demo dataset (images + metadata.csv).

Example, from the repository root:

    python scripts/make_demo_data.py --num-images 200 --output data/demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mirip.cli.options import DefaultsHelpFormatter, positive
from mirip.demo.data import IMAGES_DIR, IMAGE_FORMATS, METADATA_NAME, TIERS, make_demo_dataset


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Generate a demo dataset of procedurally drawn still-life pictures graded "
            "in tiers S > A > B > C. S pictures are clean; A, B and C get increasingly "
            "strong blur, noise, contrast loss and JPEG compression. Writes "
            f"DIR/{IMAGES_DIR}/img_NNNNN.<format> and DIR/{METADATA_NAME} "
            "(columns: filename, tier). Same arguments give byte-identical files; "
            "rerunning into an existing directory rewrites only files that differ (identical ones keep their "
            "mtimes, so the feature cache is reused)."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=Path("data/demo"), metavar="DIR", help="output directory")
    parser.add_argument(
        "--num-images", type=positive(), default=200, metavar="N", help="number of images, balanced across the four tiers"
    )
    parser.add_argument("--image-size", type=positive(), default=256, metavar="PX", help="width and height of each image in pixels")
    parser.add_argument("--seed", type=_non_negative_int, default=0, metavar="N", help="random seed (non-negative)")
    parser.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="jpg", help="image file format")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metadata = make_demo_dataset(
        args.output,
        num_images=args.num_images,
        image_size=args.image_size,
        seed=args.seed,
        image_format=args.image_format,
    )
    counts = metadata["tier"].value_counts()
    per_tier = ", ".join(f"{tier}={int(counts.get(tier, 0))}" for tier in TIERS)
    print(f"Wrote {len(metadata)} images ({per_tier}), {args.image_size}px {args.image_format}")
    print(f"  images:   {args.output / IMAGES_DIR}")
    print(f"  metadata: {args.output / METADATA_NAME}")
    return 0

