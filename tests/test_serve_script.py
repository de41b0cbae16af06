"""scripts/serve.py as a user runs it: a real process on 127.0.0.1, ready after loading, stopped by a signal."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _serve_helpers import bank_checkpoint, png_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "serve.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def _wait_health(url, proc, timeout=90):
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


def test_serve_script_serves_scores_with_a_key_and_stops_on_sigint(tiny_backbone, tmp_path):
    ckpt = bank_checkpoint(tiny_backbone, str(tmp_path / "best.pt"), "cls@-1")
    port = _free_port()
    proc = _start(["--checkpoint", ckpt, "--port", str(port), "--device", "cpu"], {"MIRIP_API_KEY": "Zq9-secret"})
    url = f"http://127.0.0.1:{port}"
    try:
        health = _wait_health(url, proc)
        assert health is not None and health.status_code == 200, proc.stdout.read() if proc.poll() else ""
        refused = httpx.post(url + "/score", files={"image": ("a.png", png_bytes(0))})
        scored = httpx.post(url + "/score", files={"image": ("a.png", png_bytes(0))}, headers={"X-API-Key": "Zq9-secret"})
        assert refused.status_code == 401
        assert scored.status_code == 200 and scored.json()["results"][0]["image"] == "a.png"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "API key required" in out and "1 head(s)" in out and "Zq9-secret" not in out


def test_serve_script_refuses_a_missing_checkpoint_at_once(tmp_path):
    proc = _start(["--checkpoint", str(tmp_path / "nope.pt"), "--port", str(_free_port())])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "error:" in out and "nope.pt" in out


def test_serve_script_exits_2_when_the_model_cannot_be_loaded(tiny_backbone, tmp_path):
    gone = shutil.copytree(tiny_backbone, tmp_path / "backbone")
    ckpt = bank_checkpoint(str(gone), str(tmp_path / "best.pt"), "cls@-1")
    shutil.rmtree(gone)  # the checkpoint reads fine; its backbone no longer exists
    proc = _start(["--checkpoint", ckpt, "--port", str(_free_port()), "--device", "cpu"])
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 2 and "could not be loaded" in out


def test_serve_script_stopped_by_sigterm_shuts_down_cleanly_and_exits_0(tiny_backbone, tmp_path):
    ckpt = bank_checkpoint(tiny_backbone, str(tmp_path / "best.pt"), "cls@-1")
    port = _free_port()
    proc = _start(["--checkpoint", ckpt, "--port", str(port), "--device", "cpu"])
    try:
        health = _wait_health(f"http://127.0.0.1:{port}", proc)
        assert health is not None and health.status_code == 200, proc.stdout.read() if proc.poll() else ""
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)  # what docker stop and systemctl stop send
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out  # not 143, the signal's own exit status
    assert "Application shutdown complete" in out and "Traceback" not in out


@pytest.mark.slow  # a whole process for one message; ServeConfig's own check is tested in test_serve.py
def test_serve_script_refuses_more_images_per_request_than_the_queue_holds(tiny_backbone, tmp_path):
    ckpt = bank_checkpoint(tiny_backbone, str(tmp_path / "best.pt"), "cls@-1")
    proc = _start(["--checkpoint", ckpt, "--port", str(_free_port()), "--max-images", "32", "--max-queue", "16"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "error:" in out and "Traceback" not in out
    assert "--max-images) is 32" in out and "--max-queue) is 16" in out
