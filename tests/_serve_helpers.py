"""Helpers for the service tests: checkpoints on one feature bank, a real server on 127.0.0.1, image bytes."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from mirip.common.feature_spec import FeatureSpec
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.preprocessing import Preprocessor
from mirip.ml.ranking_model import RankingHead
from mirip.store.checkpoint import save_checkpoint_file
from mirip.store.fingerprint import make_fingerprint
from mirip.training.calibration_fit import fit_ordinal
from mirip.training.calibration_fit import make_score_reference

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "serve.py")

SIZE = 56
BANK = "cls@-1+mean@-1+mean@1"


def bank_checkpoint(backbone: str, path: str, spec: str, *, bank: str = BANK, image_size: int = SIZE, seed: int = 0,
                    scales: Optional[Sequence[float]] = None, calibrated: bool = True) -> str:
    """A checkpoint of a head on ``spec`` (entries of the cache bank ``bank``), as stage two writes it; with a
    calibration fitted on made-up validation scores so that the tier fields have something to say."""
    bank_ext = DINOv2FeatureExtractor(backbone, device="cpu", entries=bank)
    fp = make_fingerprint(bank_ext, Preprocessor(image_size=image_size))
    dim = DINOv2FeatureExtractor(backbone, device="cpu", entries=spec).output_dim
    torch.manual_seed(seed)
    head = RankingHead(input_dim=dim, projector_output_dim=8, hidden_dim=16, dropout=0.0)
    with torch.no_grad():
        head.score_head[0].weight.normal_()
    payload = {"format_version": 1, "model_state_dict": head.head_state_dict(), "epoch": 1, "accuracy": 0.8,
               "config": {}, "head": head.head_config(), "fingerprint": fp, "backbone": bank_ext.info.to_dict(),
               "feature_spec": str(FeatureSpec.parse(spec))}
    if scales is not None:
        payload["feature_scales"] = list(scales)
    if calibrated:
        rng = np.random.default_rng(seed)
        ranks = np.repeat(np.arange(4), 5)
        scores = ranks * 0.5 + rng.normal(0, 0.3, ranks.size)
        payload["calibration"] = fit_ordinal(scores, ranks).to_dict()
        payload["score_reference"] = make_score_reference(scores, ranks).to_dict()
    save_checkpoint_file(path, payload)
    return path


def png_bytes(seed: int = 0, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_images(directory, n: int, start: int = 0):
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = os.path.join(directory, f"img_{i}.png")
        with open(p, "wb") as fh:
            fh.write(png_bytes(i, (30 + 3 * i, 40)))
        paths.append(p)
    return paths


@contextlib.contextmanager
def running(app, ready: bool = True, timeout: float = 60.0):
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import httpx
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    if ready:
        while httpx.get(url + "/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server's model did not load")
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve_script(args, env_extra=None):
    """scripts/serve.py ARGS as a user starts it: a child process on this checkout, output piped."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def wait_health(url, proc, timeout=90):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code != 503:
                return r
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return None
