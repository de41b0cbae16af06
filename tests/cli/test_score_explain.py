"""scripts/score.py --explain DIR: a PNG overlay and the raw map per image, an index, and the report's viewer."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from _inference_helpers import make_cache_and_checkpoint, make_tiered_images, torch_threads
from mirip.scoring.scorer import load_scorer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_script():
    module = importlib.import_module("mirip.cli.score")
    return module


score = _load_script()


@pytest.fixture(scope="module")
def explained(tiny_backbone, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explained")
    d = tmp / "images"
    meta = make_tiered_images(d)
    with torch_threads(1):
        _, ckpt, _, _ = make_cache_and_checkpoint(tiny_backbone, str(d), list(meta["filename"]), str(tmp),
                                                  pooling="mean")
    # The same stem in two sub-folders must not overwrite one another's outputs.
    for sub in ("left", "right"):
        os.makedirs(d / sub)
        Image.open(d / "img_0.png").rotate(90 if sub == "left" else 270, expand=True).save(d / sub / "same.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp / "heat"
    with torch_threads(1):
        rc = score.main(["--checkpoint", ckpt, str(d), "--output", str(tmp / "s.csv"), "--html", str(tmp / "r.html"),
                         "--explain", str(out), "--device", "cpu", "--no-progress"])
    return rc, d, ckpt, out, tmp / "r.html"


def test_explain_writes_overlay_map_and_index_per_image(explained):
    rc, d, ckpt, out, _ = explained
    assert rc == 0
    names = sorted(os.listdir(out))
    stems = [f"img_{i}" for i in range(8)] + ["left__same", "right__same"]
    assert names == sorted([s + ext for s in stems for ext in (".npy", ".png")] + ["index.json"])
    index = json.loads((out / "index.json").read_text())
    assert len(index["explanations"]) == 10
    assert index["failures"] == []  # broken.jpg was never scored (listed by scoring), so it is not explained
    with torch_threads(1):
        scorer = load_scorer(ckpt, device="cpu")
        ref, = scorer.explain([str(d / "img_3.png")], progress=False)
    row = next(r for r in index["explanations"] if r["path"].endswith("img_3.png"))
    raw = np.load(row["npy"])
    assert raw.shape == (4, 4) == tuple(row["grid"]) and raw.dtype == np.float32
    np.testing.assert_allclose(raw, ref.map, atol=1e-6)
    assert row["exact"] is True and np.array(row["content"]).shape == (4, 4)
    with Image.open(row["png"]) as png:
        assert png.mode == "RGB" and png.width > 2 * png.height * 0.9  # drawing | overlay, legend below


def test_report_opens_the_overlay_of_a_clicked_thumbnail(explained):
    _, d, _, out, page = explained
    text = page.read_text(encoding="utf-8")
    assert "id='ov'" in text
    data = json.loads(re.search(r"var O=(\{.*?\}),ov=", text).group(1).replace("<\\/", "</"))
    index = json.loads((out / "index.json").read_text())
    assert sorted(data) == sorted(r["path"] for r in index["explanations"])
    for uri in data.values():
        assert uri.startswith("data:image/jpeg;base64,") and base64.b64decode(uri.split(",", 1)[1])[:2] == b"\xff\xd8"
    # Every overlay key is the data-path of a card, or a click would find nothing.
    cards = set(re.findall(r'class="card[^"]*" data-path="([^"]+)"', text))
    assert set(data) <= cards


def test_explain_is_refused_with_compare(explained):
    _, d, ckpt, out, _ = explained
    with pytest.raises(SystemExit):
        score.main(["--checkpoint", ckpt, "--compare", str(d / "img_0.png"), str(d / "img_1.png"),
                    "--explain", str(out)])


def test_benchmark_explain_section_runs_and_reports_its_figures(tiny_backbone, tmp_path):
    bench = importlib.import_module("mirip.cli.benchmark")
    with torch_threads(1):
        rc = bench.main(["--only", "explain", "--backbone", tiny_backbone, "--image-size", "56", "--quick",
                         "--device", "cpu", "--explain-train-images", "8", "--explain-test-images", "4",
                         "--explain-batch", "2", "--explain-feature", "mean@-1", "cls@-1",
                         "--output-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())["results"]["explain"]
    assert list(result["specs"]) == ["mean@-1", "cls@-1"]
    for r in result["specs"].values():
        assert r["score_ms_per_image"] > 0 and r["explain_ms_per_image"] > 0 and r["batch"] == 2
    first = result["specs"]["mean@-1"]
    assert first["exact"] is True and first["quadrant"]["images"] == 4
    assert [d["fraction"] for d in first["deletion"]] == [0.05, 0.1, 0.25, 0.5]
    assert "explain / score" in (tmp_path / "benchmark.md").read_text()


def test_explain_dir_given_with_a_trailing_slash_is_printed_once_slashed(explained, tmp_path, capsys):
    _, d, ckpt, _, _ = explained
    out = str(tmp_path / "heatmaps") + "/"  # as the README writes it: --explain heatmaps/
    with torch_threads(1):
        rc = score.main(["--checkpoint", ckpt, str(d / "img_0.png"), "--output", str(tmp_path / "s.csv"),
                         "--explain", out, "--device", "cpu", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'heatmaps'}/*.png" in printed and "//" not in printed
