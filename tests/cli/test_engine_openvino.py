"""--engine openvino end to end: score.py's scores, the service's /score and extract's cache agree with torch;
the engine is recorded in the cache's fingerprint; missing openvino and bad combinations are refused clearly."""

from __future__ import annotations

import importlib
import os
import sys

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("openvino")

from _extract_helpers import config as extract_config, make_images  # noqa: E402
from _inference_helpers import torch_threads  # noqa: E402
from _serve_helpers import bank_checkpoint, free_port, start_serve_script, wait_health, write_images  # noqa: E402
from mirip.extract.run import extract_features  # noqa: E402
from mirip.store.cache import FeatureCache  # noqa: E402

# OpenVINO runs in this test process: scripts/test.sh gives these tests a pytest process of their own
# (pyproject.toml's openvino marker).
pytestmark = pytest.mark.openvino

score = importlib.import_module("mirip.cli.score")


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def setup(tiny_backbone, tmp_path_factory):
    d = tmp_path_factory.mktemp("ov-cli")
    with torch_threads(1):
        a = bank_checkpoint(tiny_backbone, str(d / "a.pt"), "cls@-1", seed=0)
        b = bank_checkpoint(tiny_backbone, str(d / "b.pt"), "mean@1+cls@-1", seed=1, scales=[0.5, 2.0])
        images = write_images(d / "images", 5)
    return d, a, b, images, str(d / "ov-cache")


def _scores(checkpoint, images, out, *extra):
    rc = score.main(["--checkpoint", checkpoint, *images, "--output", str(out), "--device", "cpu", "--no-progress",
                     "--batch-size", "2", *extra])
    assert rc == 0
    return pd.read_csv(out).set_index("path")["score"]


def test_score_with_openvino_matches_torch(setup, tmp_path, capsys):
    d, _, b, images, cache = setup
    ref = _scores(b, images, tmp_path / "torch.csv")
    got = _scores(b, images, tmp_path / "ov.csv", "--engine", "openvino", "--engine-cache", cache)
    printed = capsys.readouterr().out
    assert "engine: openvino (" in printed and "(openvino)" in printed
    assert list(got.sort_values().index) == list(ref.sort_values().index)
    assert float(np.abs(got[ref.index].to_numpy() - ref.to_numpy()).max()) < 1e-3
    assert ref.std() > 1e-3  # the images do not all score alike: the order compared means something


def test_service_scores_with_openvino_as_with_torch(setup):
    """Through scripts/serve.py in a child process each: a service holding an OpenVINO model left later HDF5
    opens in the test process refused as locked (cause not found), so the service never runs in-process here."""
    d, a, b, images, cache = setup
    files = [("images", (os.path.basename(p), open(p, "rb").read(), "image/png")) for p in images]
    answers = {}
    for engine in ("torch", "openvino"):
        port = free_port()
        proc = start_serve_script(["--checkpoint", a, "--checkpoint", b, "--port", str(port), "--device", "cpu",
                                   "--engine", engine, "--engine-cache", cache])
        url = f"http://127.0.0.1:{port}"
        try:
            health = wait_health(url, proc)
            assert health is not None and health.status_code == 200, proc.stdout.read() if proc.poll() else ""
            body = httpx.post(url + "/score", files=files, timeout=60).json()
            info = httpx.get(url + "/info").json()
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
        assert info["engine"] == engine
        answers[engine] = [[h["score"] for h in r["heads"]] for r in body["results"]]
    np.testing.assert_allclose(answers["openvino"], answers["torch"], atol=1e-3)
    assert np.ptp(np.asarray(answers["torch"])[:, 0]) > 1e-3


def test_extract_with_openvino_writes_torch_close_features_and_names_the_engine(setup, tiny_backbone, tmp_path):
    d, _, _, _, cache = setup
    folder = tmp_path / "imgs"
    folder.mkdir()
    make_images(folder, 5)
    rows = {}
    for engine in ("torch", "openvino"):
        out = tmp_path / f"{engine}.h5"
        extract_features(extract_config(folder, out, tiny_backbone, engine=engine, engine_cache=cache,
                                        pooling=["cls", "mean"], layers=[1, -1]))
        with FeatureCache.open(str(out), "r") as c:
            fp = c.fingerprint
            rows[engine] = dict(zip(c.paths, c.features()))
        assert fp["engine"] == engine
    names = sorted(rows["torch"])
    ref = torch.tensor(np.stack([rows["torch"][n] for n in names]))
    got = torch.tensor(np.stack([rows["openvino"][n] for n in names]))
    assert float(torch.nn.functional.cosine_similarity(ref, got, dim=1).min()) >= 0.9999


def test_a_torch_cache_takes_no_openvino_rows(setup, tiny_backbone, tmp_path):
    d, _, _, _, cache = setup
    folder = tmp_path / "imgs"
    folder.mkdir()
    make_images(folder, 2)
    out = tmp_path / "c.h5"
    extract_features(extract_config(folder, out, tiny_backbone))
    make_images(folder, 1, start=2)
    with pytest.raises(ValueError, match="engine: the cache has 'torch'"):
        extract_features(extract_config(folder, out, tiny_backbone, engine="openvino", engine_cache=cache))


def test_a_checkpoint_from_torch_features_notes_the_engine_it_scores_with(setup, tmp_path, capsys):
    d, a, _, images, cache = setup
    _scores(a, images[:1], tmp_path / "ov.csv", "--engine", "openvino", "--engine-cache", cache)
    assert "features were made with the torch engine, scoring runs on openvino" in capsys.readouterr().out


def test_missing_openvino_is_refused_with_the_install_command(setup, tmp_path, monkeypatch, capsys):
    d, a, _, images, _ = setup
    monkeypatch.setitem(sys.modules, "openvino", None)
    rc = score.main(["--checkpoint", a, images[0], "--output", str(tmp_path / "x.csv"), "--device", "cpu",
                     "--engine", "openvino", "--engine-cache", str(tmp_path / "c")])
    assert rc == 2 and 'pip install "mirip[openvino]"' in capsys.readouterr().err


def test_openvino_with_compile_or_fp16_is_refused_naming_the_flags(setup, capsys):
    d, a, _, images, _ = setup
    for extra, words in ((["--compile", "on"], "--compile on"), (["--precision", "fp16"], "not fp16")):
        with pytest.raises(SystemExit):
            score.main(["--checkpoint", a, images[0], "--engine", "openvino", *extra])
        assert words in capsys.readouterr().err
    with pytest.raises(ValueError, match="--compile on"):
        extract_config("x", None, "y", engine="openvino", compile="on")
