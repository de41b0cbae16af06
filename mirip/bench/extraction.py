"""Benchmark of stage one: the extraction pipeline's images/s against the bare backbone's, in one run.

    bare backbone   the same preprocessed batches already in memory (on the device), extract() only
    pipeline        JPEG files -> DataLoader workers -> backbone -> background HDF5 writer

The ratio pipeline / bare says how close extraction is to being backbone-bound
(goal >= 0.85). In the same rounds a feature bank (default 4 layers x cls, mean,
std) runs through the same pipeline: its time over the single vector's says what
the bank costs (goal <= 1.10), and both caches' bytes per image what it stores. The pipeline runs twice, on N/4 and N images, with the peak RSS
of the process and its workers sampled during each: peak memory must not grow
with N. Standalone (no scripts/benchmark.py needed)::

    python -m mirip.bench.extraction --device cuda --backbone facebook/dinov2-large --random-init \\
        --image-size 768 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from mirip.bench.memory import PeakRSS
from mirip.common.devices import default_precision, resolve_device
from mirip.common.machine import device_name, sync
from mirip.extract.config import ExtractConfig
from mirip.extract.pipeline import run_pipeline
from mirip.extract.reader import source_facts
from mirip.extract.run import build_models
from mirip.ml.backbones import RandomWeightsWarning
from mirip.store.cache import FeatureCache
from mirip.store.fingerprint import make_fingerprint

GOAL_RATIO = 0.85
GOAL_BANK_TIME_RATIO = 1.10
GOAL_GPU_IMAGES_PER_S = 150.0
# (full default, --quick default)
# --quick is sized for the 2-core CPU (DINOv2-small at 224 px): about 220 image forwards in all.
DEFAULTS = {"images": (2000, 48), "source_size": (1024, 320), "batch_size": (32, 8), "bare_batches": (8, 4),
            "rounds": (1, 2)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("extraction: stage-one pipeline vs bare backbone")
    g.add_argument("--extract-images", type=int, default=None,
                   help="synthetic JPEGs in the big pipeline run (2000; --quick 48); the small run uses a quarter")
    g.add_argument("--extract-source-size", type=int, default=None,
                   help="longer side of the synthetic JPEGs in pixels (1024; --quick 320)")
    g.add_argument("--extract-batch-size", type=int, default=None, help="images per batch (32; --quick 16)")
    g.add_argument("--extract-num-workers", type=int, default=None,
                   help="DataLoader workers (default: CPU count - 1 on CUDA, 1 on CPU)")
    g.add_argument("--extract-bare-batches", type=int, default=None,
                   help="distinct in-memory batches the bare backbone cycles through (8; --quick 3)")
    g.add_argument("--extract-rounds", type=int, default=None,
                   help="alternating bare / pipeline rounds; medians are reported (1; --quick 2)")
    g.add_argument("--extract-bank-layers", type=int, nargs="+", default=None, metavar="L",
                   help="layers of the feature bank compared with the single vector (default: the last four "
                        "blocks, -4 -3 -2 -1, or every block of a backbone with fewer)")
    g.add_argument("--extract-bank-pooling", nargs="+", default=["cls", "mean", "std"], metavar="POOLING",
                   help="poolings of the feature bank compared with the single vector")
    g.add_argument("--no-extract-bank", dest="extract_bank", action="store_false",
                   help="skip the feature-bank comparison")
    g.add_argument("--extract-compile", choices=("off", "auto", "on"), default="off",
                   help="torch.compile the backbone (static shapes) for both figures; auto: on CUDA only, from the "
                        "break-even image count on (mirip.ml.compiled.DEFAULT_MIN_IMAGES), as scripts/extract.py")
    g.add_argument("--extract-compile-backend", default="inductor", help="torch.compile backend")
    g.add_argument("--extract-sdpa-backend", default=None, choices=("flash", "cudnn", "efficient", "math"),
                   help="restrict attention to this SDPA kernel (default: torch's choice)")
    g.add_argument("--extract-image-dir", default=None,
                   help="use the images in this directory instead of synthetic ones (first N, walked recursively)")


def _opt(args: argparse.Namespace, name: str) -> int:
    value = getattr(args, f"extract_{name}", None)
    return int(value) if value is not None else DEFAULTS[name][1 if getattr(args, "quick", False) else 0]


# --- synthetic input -----------------------------------------------------------------------------
def _write_jpeg(job) -> None:
    path, index, size = job
    rng = np.random.default_rng(index)
    # Smooth colour fields plus mild grain: compresses like a scanned drawing, not like white noise.
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((size, size * 3 // 4), Image.BICUBIC)
    grain = rng.integers(-12, 13, size=(size * 3 // 4, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def write_synthetic_images(directory: str, n: int, size: int) -> List[str]:
    names = [f"bench_{i:06d}.jpg" for i in range(n)]
    jobs = [(os.path.join(directory, name), i, size) for i, name in enumerate(names)]
    workers = max(1, min(16, (os.cpu_count() or 1)))
    if workers > 1 and n > 64:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_jpeg, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_jpeg(job)
    return names


# --- the two measurements ------------------------------------------------------------------------

def bare_backbone(extractor, batches: List[torch.Tensor], repeats: int) -> float:
    """images/s of ``extract`` alone on batches already on the device."""
    extractor.extract(batches[0])  # warm-up: kernels, autocast caches
    sync(extractor.device)
    n, start = 0, time.perf_counter()
    for _ in range(repeats):
        for b in batches:
            extractor.extract(b)
            n += b.shape[0]
    sync(extractor.device)
    return n / (time.perf_counter() - start)


def pipeline(config: ExtractConfig, names: List[str], extractor, preprocessor, fingerprint, out: str) -> Dict:
    items = [(name, *source_facts(config.image_dir, name)) for name in names]
    with PeakRSS() as rss, FeatureCache.create(out, fingerprint, overwrite=True) as cache:
        stats = run_pipeline(items, cache, extractor, preprocessor, config, progress=False)
        rows = cache.num_rows
    size = os.path.getsize(out)
    if rows != len(names) or stats.failed:
        raise RuntimeError(f"pipeline wrote {rows} rows for {len(names)} images (failed: {stats.failed})")
    steady = len(names) / max(1e-9, stats.seconds - stats.startup_s)
    return {"images": len(names), "seconds": stats.seconds, "startup_s": stats.startup_s,
            "images_per_s": len(names) / stats.seconds, "steady_images_per_s": steady,
            "read_wait_s": stats.read_s, "infer_s": stats.infer_s, "write_s": stats.write_s,
            "peak_rss_main_mb": rss.peak_main / 2**20, "peak_rss_total_mb": rss.peak_total / 2**20,
            "peak_pss_total_mb": rss.peak_pss_total / 2**20, "processes": 1 + rss.peak_workers,
            "cache_bytes": size, "cache_bytes_per_image": size / max(1, rows)}


def bank_layers(args, num_layers: int) -> list:
    """The bank's layers: as asked (a block the backbone lacks is then refused by extraction), else the last
    four blocks, or all of a shallower backbone's."""
    asked = getattr(args, "extract_bank_layers", None)
    return list(asked) if asked else list(range(-min(4, int(num_layers)), 0))


def _maybe_compile(args: argparse.Namespace, extractor, n: int, batch: int) -> dict:
    from mirip.ml import compiled

    # The same decision and compilation as scripts/extract.py; the warm-up pass below pays the compilation.
    return compiled.prepare_extractor(
        extractor, compile=getattr(args, "extract_compile", "off") or "off", num_images=n, batch_size=batch,
        image_size=int(getattr(args, "image_size", 768) or 768),
        sdpa_backend=getattr(args, "extract_sdpa_backend", None) or "auto",
        backend=getattr(args, "extract_compile_backend", "inductor"), warmup=False).to_dict()


def _workers(args: argparse.Namespace, cuda: bool) -> int:
    workers = getattr(args, "extract_num_workers", None)
    if workers is None:
        workers = max(1, min(16, (os.cpu_count() or 2) - 1)) if cuda else 1
    return workers


def _bench_images(args: argparse.Namespace, tmp: str, n: int) -> tuple:
    """(image directory, the N image names): the first N of ``--extract-image-dir``, else N synthetic JPEGs."""
    image_dir = getattr(args, "extract_image_dir", None)
    if image_dir:
        from mirip.extract.reader import walk_image_dir

        return image_dir, walk_image_dir(image_dir)[:n]
    image_dir = os.path.join(tmp, "images")
    os.makedirs(image_dir)
    t0 = time.perf_counter()
    names = write_synthetic_images(image_dir, n, _opt(args, "source_size"))
    print(f"extraction bench: wrote {n} synthetic JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
    return image_dir, names


def _quiet_build_models(config: ExtractConfig, device: str) -> tuple:
    """``build_models`` without the random-weights warning (a benchmark may well run random weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return build_models(config, device)


def _warm_bank(args: argparse.Namespace, config: ExtractConfig, extractor, pre, device: str, names: List[str],
               batch: int, tmp: str) -> Optional[tuple]:
    """(config, extractor, fingerprint) of the feature bank, after its warm-up pass; None with --no-extract-bank."""
    if not getattr(args, "extract_bank", True):
        return None
    bank_config = ExtractConfig(**{**config.to_dict(), "layers": bank_layers(args, extractor.num_layers),
                                   "pooling": list(args.extract_bank_pooling)})
    bank_extractor, _ = _quiet_build_models(bank_config, device)
    bank_fp = make_fingerprint(bank_extractor, pre)
    pipeline(bank_config, names[: 2 * batch], bank_extractor, pre, bank_fp, os.path.join(tmp, "warm-bank.h5"))
    return bank_config, bank_extractor, bank_fp


def _rounds(args: argparse.Namespace, config: ExtractConfig, names: List[str], extractor, pre, fingerprint,
            bank: Optional[tuple], tmp: str, device: str) -> tuple:
    """(bare runs, big pipeline runs, bank runs, the small pipeline run): the measurements themselves."""
    n, batch, bare_batches = _opt(args, "images"), _opt(args, "batch_size"), _opt(args, "bare_batches")
    in_memory = [torch.stack([pre(os.path.join(config.image_dir, names[(i * batch + j) % len(names)]))
                              for j in range(batch)]).to(device) for i in range(bare_batches)]
    repeats = max(1, min(4, n // (batch * bare_batches)))
    small = pipeline(config, names[: max(batch, n // 4)], extractor, pre, fingerprint, os.path.join(tmp, "s.h5"))
    # Alternating rounds, medians: other load on the machine hits both figures alike.
    bare_runs, big_runs, bank_runs = [], [], []
    for _ in range(_opt(args, "rounds")):
        bare_runs.append(bare_backbone(extractor, in_memory, repeats))
        big_runs.append(pipeline(config, names, extractor, pre, fingerprint, os.path.join(tmp, "b.h5")))
        if bank is not None:
            bank_runs.append(pipeline(bank[0], names, bank[1], pre, bank[2], os.path.join(tmp, "bank.h5")))
    bare_runs.append(bare_backbone(extractor, in_memory, repeats))
    return bare_runs, big_runs, bank_runs, small


def _bank_result(bank: tuple, bank_runs: List[Dict], big_runs: List[Dict], extractor, big: Dict) -> Dict:
    # Paired by round (same machine state), then the median of the per-round ratios.
    ratios = [b["seconds"] / s["seconds"] for b, s in zip(bank_runs, big_runs)]
    mid = sorted(bank_runs, key=lambda r: r["images_per_s"])[len(bank_runs) // 2]
    out = {
        "entries": list(bank[1].entry_names), "feature_dim": int(bank[1].output_dim),
        "single_feature_dim": int(extractor.output_dim), "pipeline": mid,
        "runs_images_per_s": [r["images_per_s"] for r in bank_runs], "time_ratio_runs": ratios,
        "time_ratio": float(np.median(ratios)), "goal_time_ratio": GOAL_BANK_TIME_RATIO,
        "bytes_per_image": mid["cache_bytes_per_image"], "single_bytes_per_image": big["cache_bytes_per_image"],
    }
    out["meets_time_goal"] = out["time_ratio"] <= GOAL_BANK_TIME_RATIO
    return out


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(getattr(args, "device", None))
    precision = getattr(args, "precision", None) or default_precision(device)
    n, batch = _opt(args, "images"), _opt(args, "batch_size")
    cuda = device.startswith("cuda")
    workers = _workers(args, cuda)
    with tempfile.TemporaryDirectory(prefix="mirip-bench-extract-") as tmp:
        image_dir, names = _bench_images(args, tmp, n)
        config = ExtractConfig(image_dir=image_dir, backbone=getattr(args, "backbone", "facebook/dinov2-large"),
                               random_init=bool(getattr(args, "random_init", False)),
                               image_size=int(getattr(args, "image_size", 768) or 768), precision=precision,
                               batch_size=batch, num_workers=workers, device=device, progress=False)
        extractor, pre = _quiet_build_models(config, device)
        fingerprint = make_fingerprint(extractor, pre)
        compile_info = _maybe_compile(args, extractor, n, batch)
        # Warm-up pass (kernels, allocator, page cache; compilation) that neither figure counts.
        t_warm = time.perf_counter()
        pipeline(config, names[: 2 * batch], extractor, pre, fingerprint, os.path.join(tmp, "warm.h5"))
        if compile_info.get("compiled"):
            compile_info["warmup_pass_seconds"] = time.perf_counter() - t_warm  # includes the compilation
        bank = _warm_bank(args, config, extractor, pre, device, names, batch, tmp)
        bare_runs, big_runs, bank_runs, small = _rounds(args, config, names, extractor, pre, fingerprint, bank,
                                                        tmp, device)
    bare = float(np.median(bare_runs))
    big = sorted(big_runs, key=lambda r: r["images_per_s"])[len(big_runs) // 2]
    result = {
        "device": device, "device_name": device_name(device),
        "cpu_cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(), "backbone": config.backbone, "family": extractor.info.family,
        "random_init": config.random_init,
        "image_size": config.image_size, "precision": precision, "batch_size": batch, "num_workers": workers,
        "source_size": None if getattr(args, "extract_image_dir", None) else _opt(args, "source_size"),
        "bare_images_per_s": bare, "bare_runs_images_per_s": bare_runs,
        "pipeline_runs_images_per_s": [r["images_per_s"] for r in big_runs],
        "pipeline_small": small, "pipeline": big,
        "ratio": big["images_per_s"] / bare, "steady_ratio": big["steady_images_per_s"] / bare,
        "rss_growth_mb": big["peak_rss_total_mb"] - small["peak_rss_total_mb"],
        "pss_growth_mb": big["peak_pss_total_mb"] - small["peak_pss_total_mb"],
        "goal_ratio": GOAL_RATIO, "compile": compile_info,
    }
    result["meets_ratio_goal"] = result["ratio"] >= GOAL_RATIO
    if bank_runs:
        result["bank"] = _bank_result(bank, bank_runs, big_runs, extractor, big)
    if cuda:
        result["goal_images_per_s"] = GOAL_GPU_IMAGES_PER_S
        result["meets_images_per_s_goal"] = big["images_per_s"] >= GOAL_GPU_IMAGES_PER_S
    return result


def to_markdown(r: dict) -> str:
    p, s = r["pipeline"], r["pipeline_small"]
    lines = [
        f"**Stage-one extraction** — {r['backbone']} ({r.get('family', 'dinov2')}, "
        f"{'random' if r['random_init'] else 'pretrained'} weights), "
        f"{r['image_size']} px, {r['precision']}, batch {r['batch_size']}, {r['num_workers']} workers, "
        f"on {r['device_name']} ({r['cpu_cores']} CPU cores, load {r['load_average_1min']:.1f}).",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| bare backbone, batches in memory | {r['bare_images_per_s']:.1f} images/s "
        f"(median of {', '.join(f'{x:.1f}' for x in r['bare_runs_images_per_s'])}) |",
        f"| pipeline, {p['images']} JPEGs, end to end | {p['images_per_s']:.1f} images/s ({p['seconds']:.1f} s, "
        f"worker start-up {p['startup_s']:.1f} s) |",
        f"| pipeline runs (median reported) | {', '.join(f'{x:.1f}' for x in r['pipeline_runs_images_per_s'])} "
        "images/s |",
        f"| pipeline after the first batch | {p['steady_images_per_s']:.1f} images/s |",
        f"| **ratio pipeline / bare** | **{r['ratio']:.2f}** (after first batch {r['steady_ratio']:.2f}; "
        f"goal >= {r['goal_ratio']}) |",
        f"| time in the loop: read wait / infer / write (thread) | {p['read_wait_s']:.1f} / {p['infer_s']:.1f} / "
        f"{p['write_s']:.1f} s |",
        f"| peak RSS, {s['images']} vs {p['images']} images (process + workers) | {s['peak_rss_total_mb']:.0f} vs "
        f"{p['peak_rss_total_mb']:.0f} MB (growth {r['rss_growth_mb']:+.0f} MB) |",
        f"| peak PSS (shared pages split among the {p['processes']} processes) | {s['peak_pss_total_mb']:.0f} vs "
        f"{p['peak_pss_total_mb']:.0f} MB (growth {r['pss_growth_mb']:+.0f} MB) |",
    ]
    if "goal_images_per_s" in r:
        lines.append(f"| goal >= {r['goal_images_per_s']:.0f} images/s | "
                     f"{'met' if r['meets_images_per_s_goal'] else 'NOT met'} |")
    b = r.get("bank")
    if b:
        lines += [
            f"| feature bank: {len(b['entries'])} entries ({b['feature_dim']}-d: {', '.join(b['entries'])}) | "
            f"{b['pipeline']['images_per_s']:.1f} images/s (runs {', '.join(f'{x:.1f}' for x in b['runs_images_per_s'])}) |",
            f"| **time bank / single vector, same rounds** | **{b['time_ratio']:.3f}** (per round "
            f"{', '.join(f'{x:.3f}' for x in b['time_ratio_runs'])}; goal <= {b['goal_time_ratio']:.2f}: "
            f"{'met' if b['meets_time_goal'] else 'NOT met'}) |",
            f"| cache bytes per image, single vector ({b['single_feature_dim']}-d) vs bank | "
            f"{b['single_bytes_per_image']:.0f} vs {b['bytes_per_image']:.0f} B |",
        ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark stage-one extraction: pipeline vs bare backbone.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", default="facebook/dinov2-large", help="hub id or local backbone directory")
    parser.add_argument("--random-init", action="store_true", help="random weights of the same architecture")
    parser.add_argument("--image-size", type=int, default=768, help="input size in pixels (square)")
    parser.add_argument("--precision", default=None, help="fp32, bf16, fp16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    parser.add_argument("--output-dir", default=None, help="also write extraction.json and extraction.md here")
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run(args)
    text = to_markdown(result)
    print(text)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "extraction.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(args.output_dir, "extraction.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
