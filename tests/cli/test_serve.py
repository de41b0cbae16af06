"""scripts/serve.py as a user runs it: a real process on 127.0.0.1, ready after loading, stopped by a signal."""

from __future__ import annotations

import shutil
import signal

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _serve_helpers import bank_checkpoint, free_port, png_bytes, start_serve_script, wait_health  # noqa: E402


def test_serve_script_serves_scores_with_a_key_and_stops_on_sigint(tiny_backbone, tmp_path):
    ckpt = bank_checkpoint(tiny_backbone, str(tmp_path / "best.pt"), "cls@-1")
    port = free_port()
    proc = start_serve_script(["--checkpoint", ckpt, "--port", str(port), "--device", "cpu"], {"MIRIP_API_KEY": "Zq9-secret"})
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_health(url, proc)
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
    proc = start_serve_script(["--checkpoint", str(tmp_path / "nope.pt"), "--port", str(free_port())])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "error:" in out and "nope.pt" in out


def test_serve_script_exits_2_when_the_model_cannot_be_loaded(tiny_backbone, tmp_path):
    gone = shutil.copytree(tiny_backbone, tmp_path / "backbone")
    ckpt = bank_checkpoint(str(gone), str(tmp_path / "best.pt"), "cls@-1")
    shutil.rmtree(gone)  # the checkpoint reads fine; its backbone no longer exists
    proc = start_serve_script(["--checkpoint", ckpt, "--port", str(free_port()), "--device", "cpu"])
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 2 and "could not be loaded" in out


def test_serve_script_stopped_by_sigterm_shuts_down_cleanly_and_exits_0(tiny_backbone, tmp_path):
    ckpt = bank_checkpoint(tiny_backbone, str(tmp_path / "best.pt"), "cls@-1")
    port = free_port()
    proc = start_serve_script(["--checkpoint", ckpt, "--port", str(port), "--device", "cpu"])
    try:
        health = wait_health(f"http://127.0.0.1:{port}", proc)
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
    proc = start_serve_script(["--checkpoint", ckpt, "--port", str(free_port()), "--max-images", "32", "--max-queue", "16"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "error:" in out and "Traceback" not in out
    assert "--max-images) is 32" in out and "--max-queue) is 16" in out
