"""The compiled backbone as users reach it: scripts/extract.py --compile / --sdpa-backend, scripts/score.py --compile.

Compiling must never change which rows are written, the cache fingerprint, or the numbers beyond the
precision's tolerance. On the 2-core CPU torch.compile runs with its "eager" backend (dynamo tracing
without code generation); the same static-shape, padded path runs with inductor on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _extract_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from _extract_helpers import SIZE, extract, make_images, reference_features, script_main
from mirip.ml import compiled as C
from mirip.store.cache import open_cache

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


def _argv(image_dir, output, backbone, *extra) -> list:
    return ["--image-dir", str(image_dir), "--output", str(output), "--backbone", backbone, "--image-size", str(SIZE),
            "--batch-size", "3", "--num-workers", "0", "--device", "cpu", "--no-progress",
            "--compile-backend", "eager", *extra]


def _rows(path):
    with open_cache(str(path)) as cache:
        return list(cache.paths), cache.features(), cache.fingerprint


def test_extract_compile_on_equals_eager_same_rows_and_fingerprint(tmp_path, tiny_backbone, capsys):
    d = tmp_path / "images"
    names = make_images(d, 7)  # batches of 3: the last one (1 image) is padded to the compiled shape
    eager = extract(d, tmp_path / "eager.h5", tiny_backbone, batch_size=3, compile="off")
    assert eager.compile["compiled"] is False and eager.compile["reason"].startswith("off")
    capsys.readouterr()
    assert script_main()(_argv(d, tmp_path / "compiled.h5", tiny_backbone, "--compile", "on")) == 0
    printed = capsys.readouterr().out
    assert "compile: yes (on: asked for (--compile on))" in printed and "batch 3 (shorter batches padded)" in printed
    e_paths, e_feats, e_fp = _rows(tmp_path / "eager.h5")
    c_paths, c_feats, c_fp = _rows(tmp_path / "compiled.h5")
    assert c_paths == e_paths == names and c_fp == e_fp
    ref = reference_features(tiny_backbone, [d / n for n in names])  # one image at a time, eager
    np.testing.assert_allclose(c_feats, ref, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(c_feats, e_feats, rtol=TOL, atol=TOL)
    last_run = json.loads((tmp_path / "compiled.h5.json").read_text())["last_run"]["compile"]
    assert last_run["compiled"] is True and last_run["compile_seconds"] > 0 and last_run["backend"] == "eager"
    # The default cache name comes from the fingerprint alone: compiled and eager runs pick the same file.
    a = extract(d, None, tiny_backbone, batch_size=3, compile="off", cache_dir=str(tmp_path / "a"))
    b = extract(d, None, tiny_backbone, batch_size=3, compile="on", compile_backend="eager",
                cache_dir=str(tmp_path / "b"))
    assert b.compile["compiled"] and os.path.basename(a.output) == os.path.basename(b.output)


def test_compiled_and_eager_rows_share_one_cache(tmp_path, tiny_backbone):
    d = tmp_path / "images"
    names = make_images(d, 4)
    out = tmp_path / "mixed.h5"
    first = extract(d, out, tiny_backbone, batch_size=3, compile="off")
    names += make_images(d, 4, start=4)  # batches of 3 and 1 (padded)
    second = extract(d, out, tiny_backbone, batch_size=3, compile="on", compile_backend="eager")
    assert not first.compile["compiled"] and second.compile["compiled"]
    assert (second.extracted, second.skipped_cached, second.rows) == (4, 4, 8)  # appended, no fingerprint refusal
    paths, feats, _ = _rows(out)
    assert paths == names
    np.testing.assert_allclose(feats, reference_features(tiny_backbone, [d / n for n in names]), rtol=TOL, atol=TOL)


def test_auto_does_not_compile_on_cpu_and_says_why(tmp_path, tiny_backbone, capsys):
    d = tmp_path / "images"
    make_images(d, 3)
    assert script_main()(_argv(d, tmp_path / "f.h5", tiny_backbone)) == 0  # --compile auto is the default
    printed = capsys.readouterr().out
    assert "compile: no (auto: not compiled on cpu (compiling a CPU backbone has not been measured to pay" in printed
    saved = json.loads((tmp_path / "f.h5.json").read_text())
    assert saved["config"]["compile"] == "auto" and saved["last_run"]["compile"]["compiled"] is False
    # On CUDA, auto compiles from the break-even image count on (the decision alone: there is no GPU here).
    assert C.compile_decision("auto", 120, "cuda:0") == (False, f"auto: 120 images < break-even {C.DEFAULT_MIN_IMAGES}")
    assert C.compile_decision("auto", 500, "cuda", min_images=500) == (True, "auto: 500 images >= break-even 500")
    assert C.compile_decision("on", 1, "cpu")[0] and not C.compile_decision("off", 10**6, "cuda")[0]
    # Nothing new to extract: nothing is compiled, and the summary says so.
    again = extract(d, tmp_path / "f.h5", tiny_backbone, batch_size=3, compile="on", compile_backend="eager")
    assert again.extracted == 0 and again.compile == {**again.compile, "compiled": False,
                                                      "reason": "nothing to extract in this run"}


def test_intermediate_block_spec_runs_eager_and_says_why(tmp_path, tiny_backbone, capsys):
    d = tmp_path / "images"
    names = make_images(d, 4)
    code = script_main()(_argv(d, tmp_path / "bank.h5", tiny_backbone, "--compile", "on", "--layers", "-2", "-1"))
    assert code == 0
    printed = capsys.readouterr().out
    assert "compile: no (on: asked for (--compile on), but the feature spec reads intermediate blocks" in printed
    assert "runs eager" in printed
    paths, feats, _ = _rows(tmp_path / "bank.h5")
    assert paths == names
    ref = reference_features(tiny_backbone, [d / n for n in names], layers=[-2, -1])
    np.testing.assert_allclose(feats, ref, rtol=TOL, atol=TOL)


def test_sdpa_backend_is_applied_or_refused_before_any_image_is_read(tmp_path, tiny_backbone, capsys):
    d = tmp_path / "images"
    names = make_images(d, 3)
    math = extract(d, tmp_path / "math.h5", tiny_backbone, batch_size=3, compile="on", compile_backend="eager",
                   sdpa_backend="math")
    assert math.compile["sdpa_backend"] == "math" and "SDPA backend math (asked for)" in math.to_text()
    np.testing.assert_allclose(_rows(tmp_path / "math.h5")[1], reference_features(tiny_backbone, [d / n for n in names]),
                               rtol=TOL, atol=TOL)
    # The memory-efficient kernel has no CPU implementation: refused with the reason, no cache left behind.
    assert script_main()(_argv(d, tmp_path / "eff.h5", tiny_backbone, "--sdpa-backend", "efficient")) == 2
    err = capsys.readouterr().err
    assert "SDPA backend 'efficient' cannot run on cpu" in err and "--sdpa-backend auto" in err
    assert not (tmp_path / "eff.h5").exists()
    with pytest.raises(ValueError, match="sdpa_backend must be one of"):
        extract(d, tmp_path / "x.h5", tiny_backbone, sdpa_backend="fastest")


def test_compiled_batches_larger_than_the_compiled_size_run_in_chunks(tiny_backbone):
    from mirip.ml.feature_extractor import DINOv2FeatureExtractor

    ex = DINOv2FeatureExtractor(tiny_backbone, device="cpu", precision="fp32")
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ex.backbone(pixel_values=x).last_hidden_state[:, 0]
    info = C.compile_full_image(ex, batch_size=2, backend="eager", image_size=SIZE)
    assert info.compiled and info.mode is None and info.compile_seconds > 0  # CPU: the default mode
    assert C.full_image_mode("cuda:0") == "reduce-overhead"
    torch.testing.assert_close(ex.extract(x), ref, rtol=TOL, atol=TOL)  # 2 + 2 + 1 (padded)


# --- full-image scoring ------------------------------------------------------------------------------
# scored_folder (conftest): 8 tiered images, their checkpoint, and a broken file (a batch one image short).
from mirip.cli import score  # noqa: E402


def test_score_compile_on_equals_eager(scored_folder, tmp_path, capsys):
    d, _, ckpt, _ = scored_folder
    main = score.main
    common = ["--checkpoint", ckpt, str(d), "--batch-size", "3", "--device", "cpu", "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "eager.csv")]) == 0
    assert "compile:" not in capsys.readouterr().out  # opt-in
    assert main(common + ["--output", str(tmp_path / "compiled.csv"), "--compile", "on",
                          "--compile-backend", "eager"]) == 0
    assert "compile: yes (on: scoring compiled at batch 3)" in capsys.readouterr().out
    eager = pd.read_csv(tmp_path / "eager.csv").dropna(subset=["score"]).set_index("path")  # not broken.jpg
    comp = pd.read_csv(tmp_path / "compiled.csv").dropna(subset=["score"]).set_index("path")
    assert len(eager) == 8 and sorted(comp.index) == sorted(eager.index)
    np.testing.assert_allclose(comp.loc[eager.index, "score"], eager["score"], rtol=0, atol=TOL)
    # --compare compiles at batch 2, one pair.
    a, b = sorted(eager.index)[:2]
    assert main(["--checkpoint", ckpt, "--compare", a, b, "--device", "cpu", "--compile", "on",
                 "--compile-backend", "eager"]) == 0
    printed = capsys.readouterr().out
    assert "scoring compiled at batch 2" in printed
    assert f"score {eager.loc[a, 'score']:+.4f}" in printed and f"score {eager.loc[b, 'score']:+.4f}" in printed


def test_scorer_compile_with_an_intermediate_block_spec_scores_eager(tiny_backbone):
    from mirip.scoring.scorer import Scorer
    from mirip.ml.feature_extractor import DINOv2FeatureExtractor
    from mirip.ml.ranking_model import PairwiseRankingModel
    from mirip.ml.preprocessing import Preprocessor

    ex = DINOv2FeatureExtractor(tiny_backbone, device="cpu", entries="cls@-2,-1")
    scorer = Scorer(PairwiseRankingModel(tiny_backbone, device="cpu", feature_extractor=ex), Preprocessor(SIZE))
    info = scorer.compile(4, backend="eager")
    assert not info.compiled and "intermediate blocks" in info.reason and info.reason.endswith("scores eager")
    assert not C.is_compiled(ex)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        scorer.compile(0)


# ~20 s (one torchrun launch of two ranks)
@pytest.mark.slow
def test_torchrun_ranks_each_compile_their_own_copy(tmp_path, tiny_backbone):
    d = tmp_path / "images"
    names = make_images(d, 8)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "two.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", str(ROOT / "scripts" / "extract.py"),
           *_argv(d, out, tiny_backbone, "--compile", "on")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "each rank decides for its own shard: 2 of 2 compiled" in done.stdout
    per_rank = json.loads((tmp_path / "two.h5.json").read_text())["last_run"]["compile_per_rank"]
    assert [r["compiled"] for r in per_rank] == [True, True] and all(r["extra"]["images"] == 4 for r in per_rank)
    paths, feats, _ = _rows(out)
    assert paths == names
    np.testing.assert_allclose(feats, reference_features(tiny_backbone, [d / n for n in names]), rtol=TOL, atol=TOL)


def _tiny_extractor(tiny_backbone):
    from mirip.ml.feature_extractor import DINOv2FeatureExtractor

    return DINOv2FeatureExtractor(tiny_backbone, device="cpu")


def _faulty_compile(kind):
    """A stand-in for torch.compile: one that fails to compile, or one whose graph computes something else."""
    def fake(fn, **kwargs):
        if kind == "raises":
            def broken(*args, **kw):
                raise RuntimeError("inductor: backend compiler failed\nlong traceback")
            return broken

        def drifting(*args, **kw):
            # Off by a little from the pixels on: features a few percent away, far outside fp32's tolerance.
            if args:
                args = (args[0] * 1.05,) + args[1:]
            else:
                kw["pixel_values"] = kw["pixel_values"] * 1.05
            return fn(*args, **kw)
        return drifting
    return fake


@pytest.mark.parametrize("kind", ["raises", "drifts"])
def test_a_faulty_compiler_falls_back_to_eager_under_auto_and_stops_under_on(tiny_backbone, monkeypatch, kind):
    """The compiled path is checked against eager on a probe batch before any row is written: a compiler that
    fails, or computes other features, leaves auto running eager (with the reason) and stops --compile on."""
    extractor = _tiny_extractor(tiny_backbone)
    probe = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    want = extractor.extract(probe)
    monkeypatch.setattr(torch, "compile", _faulty_compile("raises" if kind == "raises" else "drifts"))
    with pytest.raises(C.CompileFailed, match="--compile off"):
        C.prepare_extractor(extractor, compile="on", num_images=10, batch_size=2, image_size=SIZE)
    assert not C.is_compiled(extractor)
    monkeypatch.setattr(C, "compile_decision", lambda *a, **k: (True, "auto: 10 images >= break-even 1"))
    info = C.prepare_extractor(extractor, compile="auto", num_images=10, batch_size=2, image_size=SIZE)
    assert info.compiled is False and not C.is_compiled(extractor)
    assert info.reason.startswith("auto: 10 images >= break-even 1, but compiling failed (")
    assert ("RuntimeError: inductor: backend compiler failed)" in info.reason if kind == "raises"
            else "differ from eager ones by" in info.reason)
    torch.testing.assert_close(extractor.extract(probe), want, rtol=0, atol=0)  # eager again, untouched


def test_compile_on_with_a_faulty_compiler_exits_2_before_any_row(tmp_path, tiny_backbone, monkeypatch, capsys):
    d = tmp_path / "images"
    make_images(d, 3)
    monkeypatch.setattr(torch, "compile", _faulty_compile("drifts"))
    assert script_main()(_argv(d, tmp_path / "f.h5", tiny_backbone, "--compile", "on")) == 2
    err = capsys.readouterr().err
    assert "error: --compile on: compiled features differ from eager ones by" in err and "--compile off" in err
    if (tmp_path / "f.h5").exists():  # the run stopped before its first batch: the cache holds no row
        with open_cache(str(tmp_path / "f.h5")) as cache:
            assert cache.num_rows == 0


def test_score_compile_on_with_a_faulty_compiler_stops_before_any_score(scored_folder, tmp_path, monkeypatch,
                                                                         capsys):
    d, _, ckpt, _ = scored_folder
    monkeypatch.setattr(torch, "compile", _faulty_compile("drifts"))
    out = tmp_path / "scores.csv"
    assert score.main(["--checkpoint", ckpt, str(d), "--batch-size", "3", "--device", "cpu", "--no-progress",
                       "--output", str(out), "--compile", "on"]) == 2
    err = capsys.readouterr().err
    assert "error: --compile on: compiled features differ from eager ones by" in err
    assert not out.exists()
