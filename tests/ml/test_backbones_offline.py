"""Offline start: a hub id that cannot be had fails at once with the download / --random-init advice, instead
of waiting through the hub client's retries; a model already in the hub cache still loads offline.

No test here may reach the network: name lookups and connections raise ``NetworkTouched`` (a BaseException, so
no library's ``except Exception`` retry loop can swallow it), and the hub client is told it is online, so only
mirip's own offline decision keeps it from asking.
"""

from __future__ import annotations

import socket
import time

import pytest

from conftest import save_tiny_backbone
from mirip.ml import backbones
from mirip.ml.backbones import hub_reachable, load_backbone
from mirip.ml.feature_extractor import DINOv2FeatureExtractor
from mirip.ml.ranking_model import PairwiseRankingModel

MISSING = "mirip-tests/no-such-model"


class NetworkTouched(BaseException):
    pass


def _no_network(*args, **kwargs):
    raise NetworkTouched(f"network used: {args[:1]}")


@pytest.fixture
def online_client_no_network(monkeypatch):
    """The hub client believes it is online (as on a user's machine); the network itself is off-limits."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(backbones, "hub_reachable", lambda *a, **k: False)


def _assert_advice(message: str) -> None:
    assert MISSING in message
    assert "cannot be reached" in message
    assert f"hf download {MISSING}" in message and "--random-init" in message


@pytest.mark.parametrize("build", [
    lambda: load_backbone(MISSING),
    lambda: DINOv2FeatureExtractor(MISSING, device="cpu"),
    lambda: PairwiseRankingModel(MISSING, device="cpu"),  # the seed's entry point
], ids=["load_backbone", "feature_extractor", "seed_model"])
def test_an_unreachable_hub_fails_at_once_without_asking_it(online_client_no_network, build):
    start = time.perf_counter()
    with pytest.raises(OSError) as info:
        build()
    _assert_advice(str(info.value))
    assert time.perf_counter() - start < 10  # the retries alone took 15-30 s


def test_extract_script_says_what_to_do_offline(online_client_no_network, tmp_path, capsys):
    from _extract_helpers import make_images, script_main

    make_images(tmp_path / "images", 2)
    rc = script_main()(["--image-dir", str(tmp_path / "images"), "--output", str(tmp_path / "c.h5"),
                        "--backbone", MISSING, "--image-size", "28", "--device", "cpu", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not load backbone") and "Traceback" not in err
    _assert_advice(err)


def test_a_model_in_the_hub_cache_still_loads_offline(online_client_no_network, monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    # The hub cache's layout: models--org--name/{refs/main, snapshots/<commit>/<files>}.
    repo = tmp_path / "hub" / "models--mirip-tests--cached-model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_tiny_backbone(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, info = load_backbone("mirip-tests/cached-model")
    assert info.pretrained and info.hidden_size == 32
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_hub_probe_is_bounded_and_asked_once(monkeypatch):
    calls = []

    def hanging_lookup(*args, **kwargs):  # a network that drops packets: name lookup never answers
        calls.append(args)
        time.sleep(5)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    monkeypatch.setattr(backbones, "_HUB_REACHABLE", None)
    start = time.perf_counter()
    assert hub_reachable(timeout=0.3) is False
    assert hub_reachable(timeout=0.3) is False
    assert time.perf_counter() - start < 2
    assert len(calls) == 1
