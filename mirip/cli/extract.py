"""Stage one: cache frozen DINOv2 features of every image in an HDF5 file.

Examples, from the repository root:

    python scripts/extract.py --metadata data/demo/metadata.csv --image-dir data/demo/images
    python scripts/extract.py --image-dir data/images --output cache/features.h5 --batch-size 64
    torchrun --nproc_per_node=4 scripts/extract.py --metadata data/metadata.csv --image-dir data/images
    python scripts/extract.py --image-dir data/images --layers -4 -3 -2 -1 --pooling cls mean std  # a feature bank

Rerunning the same command extracts only new, changed, or (with --retry-failed) failed images.
"""

from __future__ import annotations

import argparse
import os
import sys

from mirip.cli.options import DefaultsHelpFormatter, add_encoding_option, plain_warnings, positive
from mirip.common.devices import PRECISIONS, device_defaults
from mirip.common.feature_spec import BANK_POOLINGS, POOLINGS
from mirip.extract.config import ExtractConfig, FEATURE_DTYPES
from mirip.extract.run import choose_precision, extract_features
from mirip.ml import compiled
from mirip.ml.openvino_engine import CACHE_ENV, ENGINES, INSTALL_HINT
from mirip.ml.preprocessing import MAX_IMAGE_PIXELS, RESIZE_MODES


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _layer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value == 0:
        raise argparse.ArgumentTypeError("layers are 1-based (1 is the first block) or negative (-1 is the last); "
                                         "0 is neither")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Extract frozen-backbone features of images into an HDF5 feature cache (stage one). "
                    "Resumable: rerun the same command after an interruption.",
        formatter_class=DefaultsHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--image-dir", required=True, metavar="DIR", help="directory holding the images; cached paths are relative to it")
    io.add_argument("--metadata", default=None, metavar="CSV",
                    help="CSV listing the images (column --filename-column); without it --image-dir is walked recursively")
    io.add_argument("--filename-column", default="filename", help="metadata column holding image paths")
    io.add_argument("--tier-column", default="tier",
                    help="metadata column with the tiers (S/A/B/C), checked now so a misspelling does not wait for "
                         "training; '' for metadata without tiers")
    add_encoding_option(io)
    io.add_argument("--allow-outside-links", action="store_true",
                    help="follow symbolic links that resolve outside --image-dir (refused by default; the walk "
                         "skips them and the summary lists them)")
    io.add_argument("--output", default=None, metavar="FILE",
                    help="cache file to create or extend; unset: <cache-dir>/<backbone>-<size>px-<pooling>-<hash>.h5")
    io.add_argument("--cache-dir", default="cache", help="where the default-named cache goes")
    model = p.add_argument_group("backbone and preprocessing (all part of the cache fingerprint)")
    model.add_argument("--backbone", default=None,
                       help="(default: facebook/dinov2-large on a GPU, facebook/dinov2-small on a CPU, as "
                            "scripts/benchmark.py and scripts/demo.sh) "
                            "hub id or local directory of a vision backbone; its config's model_type picks the "
                            "family: dinov2, dinov2_with_registers, dinov3_vit, siglip (also fixed-resolution "
                            "SigLIP2) or clip (a full CLIP/SigLIP checkpoint gives its vision tower). Normalisation "
                            "comes from the family, or from the directory's preprocessor_config.json")
    model.add_argument("--random-init", action="store_true",
                       help="random weights from the built-in architecture (benchmarks and tests only)")
    model.add_argument("--image-size", type=positive(), default=None, metavar="PX",
                       help="(default: 768 on a GPU, 224 on a CPU) square input size in pixels; DINOv2/DINOv3 take any size, CLIP/SigLIP interpolate "
                            "their position embeddings (their native size, e.g. 224 or 384, is what they were "
                            "trained at)")
    model.add_argument("--resize-mode", choices=RESIZE_MODES, default="pad", help="how images are fitted to the square")
    model.add_argument("--pooling", nargs="+", choices=tuple(dict.fromkeys(POOLINGS + BANK_POOLINGS)), default=["cls"],
                       metavar="POOLING",
                       help="which tokens make each feature: cls (the CLS token; CLIP: the CLS token after "
                            "post_layernorm; SigLIP, which has no CLS token: its attention-pooling head's output, "
                            "the image embedding it was trained with), mean (mean of the patch tokens), "
                            "std (their per-channel standard deviation), cls_mean (cls and mean concatenated, one "
                            "layer only); several make a feature bank with --layers")
    model.add_argument("--layers", nargs="+", type=_layer, default=None, metavar="L",
                       help="transformer blocks to pool, 1-based or negative from the last (-1: the last block). "
                            "The cache stores one entry POOLING@L per pooling and layer, e.g. --layers -4 -3 -2 -1 "
                            "--pooling cls mean std stores 12 entries (cls@-4 ... std@-1); unset: the last block only")
    model.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="(default: bf16 on CUDA and on a CPU with AMX or AVX512-BF16, fp32 on other CPUs; "
                            "an existing --output cache keeps its own)")
    model.add_argument("--feature-dtype", choices=FEATURE_DTYPES, default="float32", help="dtype stored in the cache")
    model.add_argument("--views", type=_non_negative, default=0, metavar="K",
                       help="also cache K deterministic augmented views per image (flip, crops)")
    model.add_argument("--max-image-pixels", type=positive(), default=None, metavar="N",
                       help=f"refuse images larger than this many pixels as possible decompression bombs (default: "
                            f"{MAX_IMAGE_PIXELS:,}, twice Pillow's warning threshold; a 12000 x 9000 scan is 108M)")
    run = p.add_argument_group("run")
    run.add_argument("--batch-size", type=positive(), default=32, metavar="N", help="images per backbone batch")
    run.add_argument("--num-workers", type=_non_negative, default=None, metavar="N",
                     help="DataLoader decoding processes (default: from the CPU count)")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    speed = p.add_argument_group("speed (none of these changes the features beyond the precision's tolerance, nor "
                                 "the cache fingerprint: compiled and eager rows share one cache)")
    speed.add_argument("--compile", choices=compiled.COMPILE_MODES, default="auto",
                       help="torch.compile the backbone with static shapes (the last short batch is padded to "
                            "--batch-size); compiling is paid once per process (per rank under torchrun). auto: "
                            "only on CUDA and only from the break-even of "
                            f"{compiled.DEFAULT_MIN_IMAGES} images to extract on (a placeholder until "
                            "scripts/gpu_check.py measures it); on a CPU auto means off, since compiling a CPU "
                            "backbone has not been measured to pay. Feature specs reading intermediate blocks "
                            "(--layers naming a block before the last) run eager, and the summary says so")
    speed.add_argument("--sdpa-backend", choices=compiled.SDPA_CHOICES, default="auto",
                       help="scaled-dot-product-attention kernel: auto is torch's own choice, measured per backend "
                            "when compiling on CUDA; a named one is checked before any image is read and refused "
                            "with the reason if this device cannot run it")
    speed.add_argument("--compile-backend", default="inductor", metavar="NAME",
                       help="torch.compile backend (inductor generates kernels; eager only traces, for testing)")
    speed.add_argument("--engine", choices=ENGINES, default="torch",
                       help="what runs the backbone + feature bank: torch, or openvino (CPU only; "
                            f'{INSTALL_HINT}; converted once, IR cached under ${CACHE_ENV} or --engine-cache; '
                            "measured 1.6-3.7x torch fp32 on an AVX2 CPU, features at cos >= 0.9999). The cache's "
                            "fingerprint records the engine (one cache, one engine); a head trained on it may score "
                            "with either engine")
    speed.add_argument("--engine-cache", metavar="DIR", default=None,
                       help="where --engine openvino keeps converted models (default: ~/.cache/mirip/openvino)")
    run.add_argument("--retry-failed", action="store_true", help="try again the images that failed before")
    run.add_argument("--overwrite", action="store_true", help="delete the existing cache and start over")
    run.add_argument("--no-verify", action="store_true",
                     help="skip checking the cached rows' checksums before extracting (by default the whole cache "
                          "is read once and damaged rows are re-extracted)")
    run.add_argument("--strict", action="store_true", help="exit with status 1 if any image could not be read")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plain_warnings()
    _device_defaults(args)
    config = ExtractConfig(
        image_dir=args.image_dir, metadata=args.metadata, output=args.output, filename_column=args.filename_column,
        backbone=args.backbone, random_init=args.random_init, image_size=args.image_size, resize_mode=args.resize_mode,
        pooling=args.pooling[0] if len(args.pooling) == 1 else list(args.pooling), layers=args.layers,
        precision=args.precision, batch_size=args.batch_size, num_workers=args.num_workers,
        device=args.device, feature_dtype=args.feature_dtype, views=args.views, retry_failed=args.retry_failed,
        overwrite=args.overwrite, strict=args.strict, cache_dir=args.cache_dir, progress=not args.no_progress,
        tier_column=args.tier_column or None, encoding=args.encoding, allow_outside_links=args.allow_outside_links,
        max_image_pixels=args.max_image_pixels, verify=not args.no_verify,
        compile=args.compile, sdpa_backend=args.sdpa_backend, compile_backend=args.compile_backend,
        engine=args.engine, engine_cache=args.engine_cache,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        resolved, why = choose_precision(config)
        print(f"precision: {resolved.precision} ({why})")
    try:
        summary = extract_features(config)
    except KeyboardInterrupt:
        # Rows are committed batch by batch: everything written before Ctrl-C is kept.
        print("\ninterrupted: the images extracted so far are saved in the cache; run the same command again "
              "to continue", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError, compiled.CompileFailed, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.to_text())
    if args.strict and summary.all_failed:
        print(f"error: {len(summary.all_failed)} image(s) could not be read (--strict)", file=sys.stderr)
        return 1
    return 0


def _device_defaults(args: argparse.Namespace) -> None:
    """Fill --backbone / --image-size by the device, and say so: a cache's backbone is worth choosing on purpose."""
    if args.backbone is not None and args.image_size is not None:
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone, size = device_defaults(device)
    given = []
    if args.backbone is None:
        args.backbone, given = backbone, given + [f"--backbone {backbone}"]
    if args.image_size is None:
        args.image_size, given = size, given + [f"--image-size {size}"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"defaults on {'a GPU' if device.startswith('cuda') else 'a CPU'}: {' '.join(given)} "
              "(pass them to choose; they are part of the cache's fingerprint)")

