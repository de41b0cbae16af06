"""The scoring service under load: throughput and latency at several concurrencies, beside in-process scoring.

A head (random, with a calibration on made-up scores so the tier fields are computed as in production) is
written as a checkpoint for the benchmark's backbone; the service runs it in a child process on 127.0.0.1
(a free port; nothing leaves the machine), so the client's threads do not share its interpreter. Each level
sends a bounded number of one-image requests (multipart JPEG uploads) from ``concurrency`` threads and
records every request's latency. The baseline, in this same run: ``Scorer.score_paths`` on the same files in
this process (images per second at the service's batch size, and one image at a time for latency).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Sequence

import numpy as np

import httpx  # the serve extra; without it benchmark.py lists this benchmark as skipped

LEVELS = (1, 8, 32)


def add_arguments(parser) -> None:
    g = parser.add_argument_group("serve: the HTTP scoring service under load (127.0.0.1 only)")
    g.add_argument("--serve-concurrency", type=int, nargs="+", default=list(LEVELS), metavar="N",
                   help="client threads sending requests at once, one level each")
    g.add_argument("--serve-requests", type=int, default=None,
                   help="one-image requests per level (default 8 x concurrency, at least 64; --quick 2 x, >= 16)")
    g.add_argument("--serve-level-seconds", type=float, default=120.0,
                   help="a level stops sending after this long (what it sent by then is reported)")
    g.add_argument("--serve-batch", type=int, default=16, help="the service's --max-batch-size (and the baseline's)")
    g.add_argument("--serve-timeout-ms", type=float, default=10.0, help="the service's --batch-timeout-ms")
    g.add_argument("--serve-images", type=int, default=32, help="distinct drawings sent (JPEG, 512 px)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(args, path: str) -> None:
    """A calibrated head on the benchmark's backbone, saved the way stage two saves one."""
    import torch

    from mirip.training.calibration_fit import fit_ordinal
    from mirip.training.calibration_fit import make_score_reference
    from mirip.store.checkpoint import save_checkpoint_file
    from mirip.store.fingerprint import make_fingerprint
    from mirip.ml.feature_extractor import DINOv2FeatureExtractor
    from mirip.ml.ranking_model import RankingHead

    ext = DINOv2FeatureExtractor(args.backbone, device="cpu", random_init=args.random_init, entries="cls@-1")
    fp = make_fingerprint(ext, ext.preprocessor(args.image_size))
    torch.manual_seed(0)
    head = RankingHead(input_dim=ext.output_dim)
    ranks = np.repeat(np.arange(4), 25)
    scores = ranks + np.random.default_rng(0).normal(0, 0.7, ranks.size)
    save_checkpoint_file(path, {
        "format_version": 1, "model_state_dict": head.head_state_dict(), "epoch": 0, "accuracy": None,
        "config": {}, "head": head.head_config(), "fingerprint": fp, "backbone": ext.info.to_dict(),
        "feature_spec": "cls@-1", "calibration": fit_ordinal(scores, ranks).to_dict(),
        "score_reference": make_score_reference(scores, ranks).to_dict()})


def write_drawings(directory: str, n: int, size: int = 512) -> List[str]:
    from mirip.demo.drawing import draw_picture

    paths = []
    for i in range(n):
        p = os.path.join(directory, f"drawing_{i:03d}.jpg")
        draw_picture(np.random.default_rng([11, i]), size).save(p, quality=90)
        paths.append(p)
    return paths


_SERVER = """
import sys, uvicorn
from mirip.serve.app import create_app
from mirip.serve.config import ServeConfig
cfg = ServeConfig(checkpoints=[sys.argv[1]], port=int(sys.argv[2]), device=sys.argv[3] or None,
                  precision=sys.argv[4] or None, max_batch_size=int(sys.argv[5]), batch_timeout_ms=float(sys.argv[6]),
                  max_queue=4096)
uvicorn.run(create_app(cfg), host="127.0.0.1", port=cfg.port, log_level="warning")
"""


def start_service(args, checkpoint: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [sys.executable, "-c", _SERVER, checkpoint, str(port), args.device or "", args.precision or "",
           str(args.serve_batch), str(args.serve_timeout_ms)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with status {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return time.perf_counter() - t0
            if r.status_code == 500:
                raise RuntimeError(f"the service could not load its model: {r.json().get('error')}")
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the service was not ready after {timeout:.0f} s")


def percentiles(latencies_s: Sequence[float]) -> Dict[str, float]:
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)} | {"mean_ms": float(ms.mean())}


def load_level(url: str, blobs: Sequence[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    """``requests`` one-image POST /score from ``concurrency`` threads (stopping after ``seconds``)."""
    latencies: List[float] = []
    errors: List[str] = []
    lock, counter = threading.Lock(), iter(range(requests))
    stop_at = time.perf_counter() + seconds

    def worker():
        with httpx.Client(timeout=300) as client:
            while time.perf_counter() < stop_at:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = client.post(url + "/score", files={"image": (f"{i}.jpg", blobs[i % len(blobs)], "image/jpeg")})
                    ok = r.status_code == 200
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if ok else errors.append(str(getattr(r, "status_code", r))))

    before = httpx.get(url + "/info").json()["batching"]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/info").json()["batching"]
    batches, images = after["batches"] - before["batches"], after["images"] - before["images"]
    row = {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
           "requests_per_s": len(latencies) / wall if wall else None,
           "mean_batch_size": images / batches if batches else None}
    if latencies:
        row.update(percentiles(latencies))
    if errors:
        row["first_errors"] = errors[:5]
    return row


def in_process(args, checkpoint: str, paths: Sequence[str], repeats: int = 3) -> dict:
    """The same checkpoint and files through ``Scorer.score_paths`` in this process."""
    from mirip.scoring.scorer import load_scorer

    scorer = load_scorer(checkpoint, device=args.device, precision=args.precision)
    scorer.score_paths(paths[: args.serve_batch], batch_size=args.serve_batch, progress=False)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        scorer.score_paths(paths, batch_size=args.serve_batch, progress=False)
    batched = (time.perf_counter() - t0) / (repeats * len(paths))
    singles = []
    for p in paths[:16]:
        t1 = time.perf_counter()
        scorer.score_paths([p], batch_size=1, progress=False)
        singles.append(time.perf_counter() - t1)
    return {"images_per_s": 1.0 / batched, "batch_size": args.serve_batch,
            "single_image": percentiles(singles), "device": str(scorer.device)}


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    with tempfile.TemporaryDirectory(prefix="mirip-serve-bench-") as tmp:
        ckpt = os.path.join(tmp, "best.pt")
        write_checkpoint(args, ckpt)
        paths = write_drawings(tmp, args.serve_images)
        blobs = [open(p, "rb").read() for p in paths]
        baseline = in_process(args, ckpt, paths, repeats=1 if quick else 3)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_service(args, ckpt, port)
        try:
            load_s = wait_ready(url, proc)
            load_level(url, blobs, 2, 4, 60)  # warm-up: first batches, thread pools, allocator
            levels = []
            for c in args.serve_concurrency:
                n = args.serve_requests or max(2 * c if quick else 8 * c, 16 if quick else 64)
                levels.append(load_level(url, blobs, c, n, args.serve_level_seconds))
            memory = httpx.get(url + "/info").json()["memory"]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    for row in levels:
        row["ratio_to_in_process"] = (row["requests_per_s"] / baseline["images_per_s"]
                                      if row.get("requests_per_s") else None)
    return {"in_process": baseline, "levels": levels, "service_load_s": load_s, "batch_timeout_ms":
            args.serve_timeout_ms, "max_batch_size": args.serve_batch, "upload": "512 px JPEG, one per request",
            "service_memory": memory}


def to_markdown(result: dict) -> str:
    b = result["in_process"]
    lines = ["### serve", "",
             f"One-image `POST /score` requests (multipart {result['upload'].split(',')[0]}) to the service on "
             f"127.0.0.1 (max batch {result['max_batch_size']}, batch wait {result['batch_timeout_ms']:g} ms; "
             f"model ready {result['service_load_s']:.1f} s after start). In-process baseline, same files, same "
             f"run: `Scorer.score_paths` {b['images_per_s']:.1f} images/s at batch {b['batch_size']}; one image "
             f"at a time p50 {b['single_image']['p50_ms']:.1f} ms. The service process's peak memory: "
             + ", ".join(f"{k} {v:.0f}" for k, v in result["service_memory"].items()) + ".", "",
             "| concurrency | requests | errors | requests/s | service / in-process | p50 ms | p95 ms | p99 ms | "
             "mean batch |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["levels"]:
        if not r.get("requests"):
            lines.append(f"| {r['concurrency']} | 0 | {r['errors']} | | | | | | |")
            continue
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.1f} | "
                     f"{r['ratio_to_in_process']:.2f}x | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['mean_batch_size']:.1f} |")
    return "\n".join(lines) + "\n"
