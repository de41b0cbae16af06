"""``scripts/serve.py --judge`` as a user starts it: a real process on 127.0.0.1 serving the judging page beside
the scoring endpoints, pairs from the suggestion engine over the checkpoint's scores of the feature cache, and
stopped by SIGTERM with exit 0. The flags' refusals run in-process (the same ``main``, no server starts)."""

from __future__ import annotations

import csv
import io
import itertools
import os
import signal

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _inference_helpers import IMAGE_SIZE, cached_features, make_cache_and_checkpoint  # noqa: E402
from _judge_helpers import TOKENS, drawings, judges_file  # noqa: E402
from _serve_helpers import free_port, png_bytes, start_serve_script, wait_health  # noqa: E402


@pytest.fixture(scope="module")
def judging_files(tiny_backbone, tmp_path_factory):
    """Twelve drawings, their metadata, a judges file, a feature cache and a checkpoint trained on it."""
    root = tmp_path_factory.mktemp("judge-script")
    names = drawings(root / "images", 12)
    with open(root / "meta.csv", "w", encoding="utf-8") as fh:
        fh.write("filename,tier\n" + "".join(f"{n},{'SABC'[i % 4]}\n" for i, n in enumerate(names)))
    cache, ckpt, head, paths = make_cache_and_checkpoint(tiny_backbone, str(root / "images"), names, str(root))
    return {"root": root, "names": names, "meta": str(root / "meta.csv"), "cache": cache, "ckpt": ckpt,
            "judges": judges_file(root / "judges.csv"), "head": head, "paths": paths}


def _args(f, **change):
    flags = {"--checkpoint": f["ckpt"], "--metadata": f["meta"], "--image-dir": str(f["root"] / "images"),
             "--features": f["cache"], "--judges": f["judges"], "--judgments-db": str(f["root"] / "j.sqlite"),
             "--device": "cpu", **change}
    return ["--judge", *itertools.chain.from_iterable((k, v) for k, v in flags.items() if v is not None)]


def _least_certain_pair(f, tiny_backbone):
    """The pair with the closest scores, from features computed afresh (not read back from the cache)."""
    from mirip.ml.feature_extractor import DINOv2FeatureExtractor
    from mirip.ml.preprocessing import Preprocessor

    feats = cached_features(DINOv2FeatureExtractor(tiny_backbone, device="cpu", pooling="cls"),
                            Preprocessor(image_size=IMAGE_SIZE), f["paths"])
    with torch.no_grad():
        scores = f["head"].get_score(torch.from_numpy(feats).float()).reshape(-1).tolist()
    pair = min(itertools.combinations(range(len(scores)), 2), key=lambda p: abs(scores[p[0]] - scores[p[1]]))
    return {f["names"][pair[0]], f["names"][pair[1]]}


def test_serve_judge_serves_the_page_beside_scoring_and_stops_on_sigterm(judging_files, tiny_backbone):
    f = judging_files
    port = free_port()
    proc = start_serve_script([*_args(f), "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_health(url, proc)
        assert health is not None and health.status_code == 200, proc.stdout.read() if proc.poll() else ""
        assert httpx.get(url + "/judge").status_code == 401
        client = httpx.Client(base_url=url, timeout=10, follow_redirects=True)
        opened = client.get("/judge", params={"token": TOKENS["ana"]})  # follows the redirect, with the cookie
        assert opened.status_code == 200 and "ana" in opened.text and "which drawing is better" in opened.text
        state = client.get("/judge/next").json()
        first = {state["pair"]["a"]["name"], state["pair"]["b"]["name"]}
        assert first == _least_certain_pair(f, tiny_backbone)  # no judgments yet: the least certain pair
        assert client.get(f"/judge/image/{state['pair']['a']['id']}").content[:4] == b"\x89PNG"
        after = client.post("/judge/answer", json={"offer": state["pair"]["offer"], "choice": "b"}).json()
        assert {after["pair"]["a"]["name"], after["pair"]["b"]["name"]} != first
        rows = list(csv.DictReader(io.StringIO(client.get("/judgments.csv").text)))
        assert [(r["a"], r["b"], r["winner"], r["judge"]) for r in rows] == \
            [(state["pair"]["a"]["name"], state["pair"]["b"]["name"], "b", "ana")]
        scored = httpx.post(url + "/score", files={"image": ("x.png", png_bytes(3))})
        assert scored.status_code == 200 and scored.json()["results"][0]["image"] == "x.png"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "judging: 12 drawings, 3 judges, 0 judgments" in out and "suggested from the first head's scores" in out
    assert "has no calibration" in out and "Traceback" not in out and TOKENS["ana"] not in out


@pytest.mark.parametrize("change, message", [
    ({"--judges": None}, "--judge needs --judges"),
    ({"--features": "nope.h5"}, "--features file not found: nope.h5"),
    ({"--metadata": "gone.csv"}, "--metadata file not found: gone.csv"),
    ({"--judges": "no-judges.csv"}, "--judges file not found: no-judges.csv"),
    ({"--image-dir": "no-such-folder"}, "image folder not found: no-such-folder"),
])
def test_serve_judge_refuses_bad_flags_before_the_model_loads(judging_files, change, message, capsys):
    from mirip.cli.serve import main

    assert main(_args(judging_files, **change)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_judging_flags_without_judge_are_refused(judging_files, capsys):
    from mirip.cli.serve import main

    assert main(["--checkpoint", judging_files["ckpt"], "--features", judging_files["cache"]]) == 2
    assert "--features only mean something with --judge" in capsys.readouterr().err


def test_a_drawing_missing_from_the_cache_is_named(judging_files, tmp_path, capsys):
    from mirip.cli.serve import main

    f = judging_files
    extra = f["root"] / "images" / "not-cached.png"
    extra.write_bytes(png_bytes(9))
    meta = tmp_path / "meta.csv"
    meta.write_text(open(f["meta"], encoding="utf-8").read() + "not-cached.png,C\n", encoding="utf-8")
    try:
        assert main(_args(f, **{"--metadata": str(meta)})) == 2
    finally:
        os.remove(extra)
    err = capsys.readouterr().err
    assert "not-cached.png" in err and "Traceback" not in err
