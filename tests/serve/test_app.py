"""The scoring service over real HTTP on 127.0.0.1: every endpoint, every refusal, batching, several heads.

Reference numbers come from the library's in-process path (``load_scorer(...).score_paths``), one image
at a time, never from the service's own helpers.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _inference_helpers import torch_threads  # noqa: E402
from _serve_helpers import SIZE, b64, bank_checkpoint, png_bytes, running, write_images  # noqa: E402
from mirip.scoring.scorer import load_scorer
from mirip.serve.app import create_app
from mirip.serve.batcher import DynamicBatcher, Overloaded
from mirip.serve.config import ServeConfig
from mirip.serve.heads import HeadSet
from mirip.store.fingerprint import FingerprintMismatch


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def heads_dir(tiny_backbone, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    with torch_threads(1):
        a = bank_checkpoint(tiny_backbone, str(d / "a.pt"), "cls@-1", seed=0)
        b = bank_checkpoint(tiny_backbone, str(d / "b.pt"), "mean@1+cls@-1", seed=1, scales=[0.5, 2.0])
        images = write_images(d / "images", 6)
    return d, a, b, images


def _one_by_one(checkpoint, paths):
    scorer = load_scorer(checkpoint, device="cpu")
    return [scorer.score_paths([p], progress=False).scores[0] for p in paths], scorer


def _files(paths):
    return [("images", (p.rsplit("/", 1)[-1], open(p, "rb").read(), "image/png")) for p in paths]


def _app(checkpoints, **cfg):
    config = ServeConfig(checkpoints=list(checkpoints), device="cpu", **cfg)
    return create_app(config)


def test_score_gives_each_image_the_in_process_score_tier_and_identity(heads_dir):
    d, a, _, images = heads_dir
    expected, scorer = _one_by_one(a, images[:3])
    with running(_app([a], batch_timeout_ms=50)) as url:
        multipart = httpx.post(url + "/score", files=_files(images[:3])).json()
        as_json = httpx.post(url + "/score", json={"images": [{"name": "x.png", "data": b64(open(images[0], "rb")
                                                                                               .read())}]}).json()
        info = httpx.get(url + "/info").json()
    got = [r["score"] for r in multipart["results"]]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert as_json["results"][0]["score"] == pytest.approx(expected[0], abs=1e-5)
    assert as_json["results"][0]["image"] == "x.png"
    tiers = scorer.tiers_for_scores(images[:3], expected)
    for r, t in zip(multipart["results"], tiers):
        assert r["predicted_tier"] == t.tier
        assert sum(r[f"p_{k}"] for k in "SABC") == pytest.approx(1.0, abs=1e-6)
        assert r["p_S"] == pytest.approx(t.probabilities["S"], abs=1e-4)
        assert r["percentile"] == pytest.approx(t.percentile, abs=1e-3)
    model = multipart["model"]
    assert model["feature_spec"] == "cls@-1" and model["weights"] == "pretrained"
    assert len(model["fingerprint_sha256"]) == 16 and model["checkpoint"] == "a.pt"
    assert [r["image"] for r in multipart["results"]] == ["img_0.png", "img_1.png", "img_2.png"]
    assert info["heads"][0]["head"] == "a.pt" and info["batching"]["max_batch_size"] == 16
    assert info["backbone"] == model["backbone"] and info["weights"] == "pretrained"
    assert info["device"] == "cpu" and "api_key" not in info["config"] and info["config"]["auth"] == "none"


def test_a_score_does_not_depend_on_the_batch_and_concurrent_requests_are_fused(heads_dir):
    d, a, _, images = heads_dir
    expected, _ = _one_by_one(a, images)
    with running(_app([a], batch_timeout_ms=300, max_batch_size=8)) as url:
        alone = httpx.post(url + "/score", files=_files(images[:1])).json()["results"][0]["score"]
        in_batch = httpx.post(url + "/score", files=_files(images)).json()["results"]

        def one(i):
            return i, httpx.post(url + "/score", files=_files([images[i]]), timeout=60).json()["results"][0]["score"]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, [i % len(images) for i in range(12)]))
        stats = httpx.get(url + "/info").json()["batching"]
    assert alone == pytest.approx(in_batch[0]["score"], abs=1e-5)
    np.testing.assert_allclose([r["score"] for r in in_batch], expected, atol=1e-5)
    for i, s in answers:  # every answer is its own image's score, whatever it was batched with
        assert s == pytest.approx(expected[i], abs=1e-5)
    assert stats["images"] == 1 + len(images) + 12
    assert max(int(k) for k in stats["batch_sizes"]) > 1  # concurrent requests shared a backbone batch


def test_compare_says_which_is_better_with_the_calibrated_probability(heads_dir):
    d, a, _, images = heads_dir
    scorer = load_scorer(a, device="cpu")
    ref = scorer.compare(images[0], images[1])
    with running(_app([a])) as url:
        files = [("a", ("first.png", open(images[0], "rb").read())), ("b", ("second.png", open(images[1], "rb").read()))]
        got = httpx.post(url + "/compare", files=files).json()
        swapped = httpx.post(url + "/compare", json={"a": b64(open(images[1], "rb").read()),
                                                     "b": b64(open(images[0], "rb").read())}).json()
        three = httpx.post(url + "/compare", files=_files(images[:3]))
    assert got["a"] == "first.png" and got["b"] == "second.png"
    assert got["score_a"] == pytest.approx(ref.score_a, abs=1e-5)
    assert got["better"] == {1: "a", -1: "b", 0: "tie"}[ref.prediction]
    assert got["prob_a_better"] == pytest.approx(ref.prob_a_better, abs=1e-5)
    assert swapped["prob_a_better"] == pytest.approx(1 - ref.prob_a_better, abs=1e-5)
    assert three.status_code == 400 and "exactly two" in three.json()["error"]


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 255).save(buf, format="PNG")  # 9 MP of white: a few KB on the wire
    return buf.getvalue()


def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_running(heads_dir, tmp_path):
    d, a, _, images = heads_dir
    good = open(images[0], "rb").read()
    app = _app([a], max_image_bytes=20_000, max_images=3, max_image_pixels=1_000_000, max_request_bytes=200_000)
    with running(app) as url:
        post = lambda files=None, **kw: httpx.post(url + "/score", files=files, **kw)  # noqa: E731
        not_image = post([("images", ("notes.txt", b"this is not an image"))])
        truncated = post([("images", ("cut.png", good[: len(good) // 2]))])
        bomb = post([("images", ("bomb.png", _bomb()))])
        oversize = post([("images", ("big.png", png_bytes(1, (200, 200))))])
        too_many = post([("images", (f"{i}.png", good)) for i in range(4)])
        empty = post([("other", (None, "text"))], data={"x": "1"})
        bad_b64 = post(json={"images": ["***not base64***"]})
        a_path = post(json={"images": [images[0]]})  # a path on the server's disk is only a string here
        wrong_type = post(content=b"raw", headers={"content-type": "image/png"})
        body_over = post(content=b"x" * 200_010, headers={"content-type": "application/json"})
        streamed_over = post(content=iter([b"x" * 100_000] * 3), headers={"content-type": "application/json"})
        mixed = post([("images", ("ok.png", good)), ("images", ("bad.png", b"junk"))], params={"strict": "true"})
        still = post(_files(images[:1]))
    assert not_image.status_code == 422 and "notes.txt" in not_image.json()["error"]
    assert "not a recognised image format" in not_image.json()["error"]
    assert truncated.status_code == 422 and truncated.json()["bad_images"][0]["image"] == "cut.png"
    assert bomb.status_code == 422 and "pixel limit" in bomb.json()["error"]
    assert oversize.status_code == 413 and "big.png" in oversize.json()["error"]
    assert too_many.status_code == 413 and too_many.json()["max_images"] == 3
    assert empty.status_code == 400 and "no image" in empty.json()["error"]
    assert bad_b64.status_code == 400 and "base64" in bad_b64.json()["error"]
    assert a_path.status_code == 400
    assert wrong_type.status_code == 415
    assert body_over.status_code == 413 and body_over.json()["max_request_bytes"] == 200_000
    assert "transfer-encoding" not in body_over.request.headers
    assert streamed_over.status_code == 413 and "200000 bytes" in streamed_over.json()["error"]
    assert streamed_over.request.headers["transfer-encoding"] == "chunked"  # no length declared: counted as read
    assert mixed.status_code == 422 and [b["image_index"] for b in mixed.json()["bad_images"]] == [1]
    assert still.status_code == 200 and len(still.json()["results"]) == 1


def test_edge_cases_get_the_services_own_4xx_and_the_service_keeps_running(heads_dir):
    d, a, _, images = heads_dir
    good = open(images[0], "rb").read()
    with running(_app([a])) as url:  # the defaults: --max-images 16
        nested = httpx.post(url + "/score", content=b"[" * 50000, headers={"content-type": "application/json"})
        nested_inside = httpx.post(url + "/score", content=b'{"images": ' + b"[" * 50000,
                                   headers={"content-type": "application/json"})
        # 69: one past the parser's old 4 x 16 + 4 files, whose own refusal named 68 as the limit
        files = httpx.post(url + "/score", files=[("images", (f"{i}.png", good)) for i in range(69)])
        seventeen = httpx.post(url + "/score", files=[("images", (f"{i}.png", good)) for i in range(17)])
        head = httpx.post(url + "/explain?head=abc", files=_files(images[:1]))
        strict = httpx.post(url + "/score?strict=maybe", files=_files(images[:1]))
        health = httpx.get(url + "/health")
        still = httpx.post(url + "/score", files=_files(images[:1]))
    for r in (nested, nested_inside):
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    for r in (files, seventeen):
        assert r.status_code == 413 and r.json()["max_images"] == 16
        assert "at most 16" in r.json()["error"] and "--max-images" in r.json()["error"] and "68" not in r.text
    assert head.status_code == 400 and "detail" not in head.json()
    assert head.json()["field"] == "head" and "'abc'" in head.json()["error"] and "integer" in head.json()["error"]
    assert strict.status_code == 400 and strict.json()["field"] == "strict"
    assert health.status_code == 200 and still.status_code == 200 and len(still.json()["results"]) == 1


def test_a_request_larger_than_the_whole_queue_gets_413_not_503_forever(heads_dir):
    d, a, _, images = heads_dir
    with pytest.raises(ValueError, match=r"--max-images.* 8 .*--max-queue.* 4"):
        ServeConfig(checkpoints=[a], max_images=8, max_queue=4)
    config = ServeConfig(checkpoints=[a], device="cpu", max_images=4, max_queue=4)
    config.max_queue = 2  # set after the check, as a program embedding the app might
    with running(create_app(config)) as url:
        refused = httpx.post(url + "/score", files=_files(images[:3]))
        fits = httpx.post(url + "/score", files=_files(images[:2]))
    assert refused.status_code == 413 and "retry-after" not in refused.headers
    assert refused.json()["max_queue"] == 2 and "--max-queue" in refused.json()["error"]
    assert fits.status_code == 200


def test_an_unreadable_image_gets_an_error_in_its_place_and_the_others_are_scored(heads_dir):
    d, a, _, images = heads_dir
    expected, scorer = _one_by_one(a, [images[0], images[2]])
    files = [_files(images[:1])[0], ("images", ("bad.png", b"junk")), _files(images[2:3])[0]]
    bad_first = {"images": [b64(b"junk"), b64(open(images[2], "rb").read())]}
    with running(_app([a])) as url:
        lenient = httpx.post(url + "/score", files=files)
        as_json = httpx.post(url + "/score", json=bad_first)
        strict = httpx.post(url + "/score?strict=true", files=files)
        strict_json = httpx.post(url + "/score?strict=true", json=bad_first)
        none_readable = httpx.post(url + "/score", files=[("images", ("bad.png", b"junk"))])
    assert lenient.status_code == 200 and lenient.json()["failed"] == 1
    first, bad, third = lenient.json()["results"]
    assert bad["index"] == 1 and bad["image"] == "bad.png" and "score" not in bad
    assert "bad.png" in bad["error"] and "not a recognised image format" in bad["error"]
    assert [first["image"], third["image"]] == ["img_0.png", "img_2.png"]
    np.testing.assert_allclose([first["score"], third["score"]], expected, atol=1e-5)
    tiers = scorer.tiers_for_scores(["", ""], expected)  # each image's tier from its own score
    for row, t in zip((first, third), tiers):  # the probabilities are tiny here: compared relatively
        assert [row[f"p_{k}"] for k in "SAB"] == pytest.approx([t.probabilities[k] for k in "SAB"], rel=1e-3)
    assert [first["heads"][0]["score"], third["heads"][0]["score"]] == [first["score"], third["score"]]
    got = as_json.json()["results"]
    assert as_json.status_code == 200 and "image0" in got[0]["error"] and got[1]["score"] == pytest.approx(
        expected[1], abs=1e-5)
    assert strict.status_code == 422 and [b["image_index"] for b in strict.json()["bad_images"]] == [1]
    assert none_readable.status_code == 422 and "bad.png" in none_readable.json()["error"]
    assert strict_json.status_code == 422 and [b["image_index"] for b in strict_json.json()["bad_images"]] == [0]


def test_a_set_api_key_guards_every_endpoint_but_health(heads_dir):
    d, a, _, images = heads_dir
    with running(_app([a], api_key="s3cret")) as url:
        health = httpx.get(url + "/health")
        none = httpx.post(url + "/score", files=_files(images[:1]))
        wrong = httpx.get(url + "/info", headers={"X-API-Key": "guess"})
        right = httpx.post(url + "/score", files=_files(images[:1]), headers={"X-API-Key": "s3cret"})
        bearer = httpx.get(url + "/info", headers={"Authorization": "Bearer s3cret"})
    assert health.status_code == 200
    assert none.status_code == 401 and "X-API-Key" in none.json()["error"]
    assert wrong.status_code == 401
    assert right.status_code == 200 and bearer.status_code == 200
    assert "s3cret" not in bearer.text and bearer.json()["config"]["auth"] == "api-key"


def test_health_is_not_ready_until_the_model_is_loaded(heads_dir):
    d, a, _, images = heads_dir
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return HeadSet.load([a], device="cpu")

    config = ServeConfig(checkpoints=[a], device="cpu")
    with running(create_app(config, load=slow_load), ready=False) as url:
        loading = httpx.get(url + "/health")
        early = httpx.post(url + "/score", files=_files(images[:1]))
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = httpx.get(url + "/health")
    assert loading.status_code == 503 and loading.json()["status"] == "loading"
    assert early.status_code == 503 and early.headers.get("retry-after") == "1"
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_a_failed_load_is_reported_by_health(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    failures = []
    app = create_app(ServeConfig(checkpoints=[str(bad)], device="cpu"), on_failed=failures.append)
    with running(app, ready=False) as url:
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(url + "/health")
    assert health.status_code == 500 and health.json()["status"] == "failed"
    assert "bad.pt" in health.json()["error"] and failures


def test_several_heads_share_one_backbone_pass_and_keep_their_own_scores(heads_dir):
    d, a, b, images = heads_dir
    exp_a, _ = _one_by_one(a, images[:3])
    exp_b, _ = _one_by_one(b, images[:3])  # b: two entries, in its own order, with per-entry scales
    heads = HeadSet.load([a, b], device="cpu")
    backbones = {id(s.model.feature_extractor.backbone) for s in heads.scorers}
    assert len(backbones) == 1  # one copy of the weights
    calls = []
    blocks = heads.primary.model.feature_extractor.family.blocks(heads.primary.model.feature_extractor.backbone)
    hook = blocks[0].register_forward_hook(lambda *a: calls.append(1))
    with running(create_app(ServeConfig(checkpoints=[a, b], device="cpu"), load=lambda: heads)) as url:
        got = httpx.post(url + "/score", files=_files(images[:3])).json()
        info = httpx.get(url + "/info").json()
    hook.remove()
    assert len(calls) == 1  # one backbone pass for both heads and three images
    np.testing.assert_allclose([r["heads"][0]["score"] for r in got["results"]], exp_a, atol=1e-5)
    np.testing.assert_allclose([r["heads"][1]["score"] for r in got["results"]], exp_b, atol=1e-5)
    assert [r["score"] for r in got["results"]] == [r["heads"][0]["score"] for r in got["results"]]
    assert [h["feature_spec"] for h in info["heads"]] == ["cls@-1", "mean@1+cls@-1"]
    assert info["heads"][0]["fingerprint_sha256"] == info["heads"][1]["fingerprint_sha256"]


def test_a_head_from_other_features_is_refused_naming_the_field(heads_dir, tiny_backbone, tmp_path):
    d, a, _, _ = heads_dir
    other = bank_checkpoint(tiny_backbone, str(tmp_path / "other.pt"), "cls@-1", image_size=2 * SIZE)
    with pytest.raises(FingerprintMismatch) as err:
        HeadSet.load([a, other], device="cpu")
    assert "image_size" in str(err.value) and "own process" in str(err.value)
    assert err.value.fields["image_size"] == (2 * SIZE, SIZE)


def test_explain_returns_the_library_map_and_a_legible_overlay(heads_dir):
    d, a, _, images = heads_dir
    scorer = load_scorer(a, device="cpu")
    ref, = scorer.explain(images[:1], progress=False, steps=8)
    with running(_app([a], explain_steps=8, max_explain_images=2)) as url:
        got = httpx.post(url + "/explain", files=_files(images[:1])).json()["results"][0]
        bare = httpx.post(url + "/explain?overlay=false", files=_files(images[:1])).json()["results"][0]
        too_many = httpx.post(url + "/explain", files=_files(images[:3]))
    np.testing.assert_allclose(np.array(got["map"]), ref.map, atol=1e-5)
    assert got["score"] == pytest.approx(ref.score, abs=1e-5) and got["grid"] == list(ref.grid)
    import base64
    overlay = Image.open(io.BytesIO(base64.b64decode(got["overlay_png_base64"])))
    assert overlay.format == "PNG" and min(overlay.size) > 50
    assert "overlay_png_base64" not in bare and "path" not in got
    assert too_many.status_code == 413 and too_many.json()["max_images"] == 2
    assert "--max-explain-images" in too_many.json()["error"]


def test_explain_of_several_images_explains_the_readable_ones_and_names_the_unreadable(heads_dir):
    d, a, _, images = heads_dir
    ref, = load_scorer(a, device="cpu").explain(images[1:2], progress=False, steps=4)
    files = [("images", ("bad.png", b"junk")), _files(images[1:2])[0]]
    with running(_app([a], explain_steps=4, max_explain_images=2)) as url:
        lenient = httpx.post(url + "/explain?overlay=false", files=files)
        strict = httpx.post(url + "/explain?overlay=false&strict=true", files=files)
    assert lenient.status_code == 200 and lenient.json()["failed"] == 1
    bad, good = lenient.json()["results"]
    assert bad["index"] == 0 and "bad.png" in bad["error"] and "map" not in bad
    assert good["image"] == "img_1.png" and good["index"] == 1
    np.testing.assert_allclose(np.array(good["map"]), ref.map, atol=1e-5)
    assert strict.status_code == 422 and strict.json()["bad_images"][0]["image"] == "bad.png"


def test_the_batcher_bounds_its_queue_admits_all_or_none_and_outlives_a_failed_batch():
    gate = threading.Event()
    seen = []

    def fn(batch):
        gate.wait(10)
        seen.append(len(batch))
        if float(batch[0, 0]) < 0:
            raise ValueError("bad batch")
        return batch[:, 0].tolist()

    b = DynamicBatcher(fn, max_batch_size=4, timeout_s=0.05, max_queue=5)
    first = b.submit([torch.ones(2)])  # taken by the worker, which waits on the gate
    time.sleep(0.2)
    queued = b.submit([torch.full((2,), float(i)) for i in range(2, 6)])
    with pytest.raises(Overloaded):
        b.submit([torch.ones(2), torch.ones(2)])  # 4 waiting + 2 > 5: none admitted
    assert b.waiting == 4
    more = b.submit([torch.full((2,), 9.0)])  # 4 + 1 fits
    gate.set()
    assert first[0].result(10) == 1.0
    assert [f.result(10) for f in queued] == [2.0, 3.0, 4.0, 5.0] and more[0].result(10) == 9.0
    bad = b.submit([torch.full((2,), -1.0)])
    with pytest.raises(ValueError, match="bad batch"):
        bad[0].result(10)
    assert b.submit([torch.full((2,), 7.0)])[0].result(10) == 7.0
    assert seen[:2] == [1, 4] and b.waiting == 0
    b.close()


def test_a_lone_image_does_not_wait_for_a_batch_but_one_on_its_way_is_waited_for():
    on_the_way = [0]
    b = DynamicBatcher(lambda batch: batch[:, 0].tolist(), max_batch_size=4, timeout_s=3.0, max_queue=8,
                       expecting=lambda: on_the_way[0])
    t0 = time.monotonic()
    assert b.submit([torch.ones(2)])[0].result(10) == 1.0
    assert time.monotonic() - t0 < 1.0  # not the 3 s batch wait: nothing else was coming
    on_the_way[0] = 1  # another request is decoding: the batch waits for it
    first = b.submit([torch.full((2,), 2.0)])
    time.sleep(0.3)
    on_the_way[0] = 0
    second = b.submit([torch.full((2,), 3.0)])
    assert first[0].result(10) == 2.0 and second[0].result(10) == 3.0
    assert b.stats.sizes.get(2) == 1  # the two went through the backbone together
    b.close()


def test_a_full_queue_answers_503_at_once_and_recovers(heads_dir):
    d, a, _, images = heads_dir
    heads = HeadSet.load([a], device="cpu")
    gate, score_batch = threading.Event(), heads.score_batch

    def held(batch):  # the backbone is busy until the gate opens
        gate.wait(30)
        return score_batch(batch)

    heads.score_batch = held
    app = create_app(ServeConfig(checkpoints=[a], device="cpu", max_queue=2, max_images=2, batch_timeout_ms=0),
                     load=lambda: heads)
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        busy = pool.submit(httpx.post, url + "/score", files=_files(images[:1]), timeout=60)
        time.sleep(0.5)  # taken by the worker, which now waits on the gate; the queue is empty again
        queued = pool.submit(httpx.post, url + "/score", files=_files(images[1:3]), timeout=60)
        time.sleep(0.5)  # two images wait: the queue is full
        t0 = time.monotonic()
        refused = httpx.post(url + "/score", files=_files(images[3:4]))
        refused_in = time.monotonic() - t0
        gate.set()
        first, second = busy.result(60), queued.result(60)
        after = httpx.post(url + "/score", files=_files(images[3:4]))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["error"] and refused_in < 5
    assert first.status_code == 200 and second.status_code == 200 and len(second.json()["results"]) == 2
    assert after.status_code == 200
