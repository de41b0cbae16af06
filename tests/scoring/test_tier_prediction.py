"""Tier predictions end to end: training stores a calibration, the scorer predicts tiers, score.py and the report show them."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _inference_helpers import make_cache_and_checkpoint, make_tiered_images, torch_threads
from _stage2_helpers import write_dataset
from mirip.common.tiers import TIER_RANK
from mirip.scoring.report_html import disagreements, render_html
from mirip.scoring.scorer import load_scorer
from mirip.scoring.scorer import CalibrationUnavailable
from mirip.store.checkpoint import load_checkpoint_file, save_checkpoint_file
from mirip.training.calibration_fit import fit_ordinal
from mirip.training.calibration_fit import make_score_reference

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    module = importlib.import_module(f"mirip.cli.{name}")
    return module


score_script, train_script, evaluate_script = _script("score"), _script("train"), _script("evaluate")


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def calibrated(tiny_backbone, tmp_path_factory):
    """An old-style checkpoint, and a copy with a calibration fitted on its own images' scores."""
    tmp = tmp_path_factory.mktemp("calibrated")
    d = tmp / "images"
    meta = make_tiered_images(d)
    with torch_threads(1):
        _, old, _, _ = make_cache_and_checkpoint(tiny_backbone, str(d), list(meta["filename"]), str(tmp))
        scorer = load_scorer(old, device="cpu")
        paths = [str(d / f) for f in meta["filename"]]
        scores = scorer.score_paths(paths, progress=False).scores
    ranks = np.array([TIER_RANK[t] for t in meta["tier"]])
    ckpt = load_checkpoint_file(old)
    ckpt["calibration"] = fit_ordinal(scores, ranks).to_dict()
    ckpt["score_reference"] = make_score_reference(scores, ranks).to_dict()
    new = str(tmp / "calibrated.pt")
    save_checkpoint_file(new, ckpt)
    meta_path = tmp / "metadata.csv"
    meta.to_csv(meta_path, index=False)
    return d, paths, old, new, meta_path


def test_predict_tier_gives_probabilities_tiers_and_percentiles(calibrated):
    d, paths, _, new, _ = calibrated
    scorer = load_scorer(new, device="cpu")
    assert scorer.has_tiers and scorer.calibration_note is None
    result = scorer.predict_tier(paths + [str(d / "missing.png")], progress=False)
    assert len(result) == 8 and result.failures[0][0].endswith("missing.png")
    scores = np.array([p.score for p in result])
    probs = np.array([[p.probabilities[t] for t in "SABC"] for p in result])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probs, scorer.calibration.probabilities(scores))
    assert [p.tier for p in result] == ["SABC"[int(np.argmax(row))] for row in probs]
    np.testing.assert_allclose([p.percentile for p in result], scorer.score_reference.percentile(scores))
    # The training images themselves: percentiles spread over 0..100 in score order.
    order = np.argsort(scores)
    assert np.all(np.diff(np.array([p.percentile for p in result])[order]) >= 0)
    cmp = scorer.compare(paths[0], paths[7])
    assert cmp.prob_a_better == pytest.approx(scorer.calibration.prob_first_better(cmp.score_a, cmp.score_b))
    assert (cmp.prob_a_better > 0.5) == (cmp.score_a > cmp.score_b) or cmp.score_a == cmp.score_b


def test_old_checkpoint_still_scores_and_says_why_it_has_no_tiers(calibrated):
    _, paths, old, _, _ = calibrated
    scorer = load_scorer(old, device="cpu")
    assert not scorer.has_tiers and len(scorer.score_paths(paths, progress=False)) == 8
    assert old in scorer.calibration_note and "no score-to-tier calibration" in scorer.calibration_note
    with pytest.raises(CalibrationUnavailable, match="no score-to-tier calibration"):
        scorer.predict_tier(paths)


def test_score_script_writes_tier_columns_and_compare_gives_a_probability(calibrated, tmp_path, capsys):
    d, paths, _, new, meta_path = calibrated
    out, page = tmp_path / "scores.csv", tmp_path / "report.html"
    assert score_script.main(["--checkpoint", new, str(d), "--output", str(out), "--html", str(page),
                              "--metadata", str(meta_path), "--device", "cpu", "--no-progress"]) == 0
    frame = pd.read_csv(out)
    for col in ("path", "score", "rank", "weights", "tier", "predicted_tier", "p_S", "p_A", "p_B", "p_C",
                "percentile"):
        assert col in frame.columns, col
    np.testing.assert_allclose(frame[["p_S", "p_A", "p_B", "p_C"]].sum(axis=1), 1.0, atol=1e-5)
    text = page.read_text()
    assert "id='confusion'" in text and "id='disagreements'" in text and "ordinal logistic calibration" in text
    capsys.readouterr()
    assert score_script.main(["--checkpoint", new, "--compare", paths[0], paths[7], "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    p = float(re.search(r"is better than .*\) = ([0-9.]+)", printed).group(1))
    assert 0.0 <= p <= 1.0 and paths[0] in printed and paths[7] in printed


def _entries(tiers, scores, predicted=None):
    rows = []
    for i, (t, s) in enumerate(zip(tiers, scores)):
        e = {"path": f"d/{i}.png", "score": s, "rank": i + 1, "tier": t}
        if predicted is not None:
            e.update(predicted_tier=predicted[i], percentile=50.0,
                     **{f"p_{k}": (0.7 if k == predicted[i] else 0.1) for k in "SABC"})
        rows.append(e)
    return rows


def test_disagreements_are_empty_without_errors_and_list_the_worst_first():
    tiers = list("SSAABBCC")
    scores = [8, 7, 6, 5, 4, 3, 2, 1]
    assert disagreements(_entries(tiers, scores)) == []
    assert disagreements(_entries(tiers, scores, predicted=tiers)) == []
    # An S scored among the Cs: the worst disagreement, with both numbers in its sentence.
    flipped = [0.5] + scores[1:]
    found = disagreements(_entries(tiers, flipped))
    assert found and found[0][0]["path"] == "d/0.png" and "tier S" in found[0][1] and "0.500" in found[0][1]
    predicted = ["C"] + tiers[1:6] + ["B", "C"]
    found = disagreements(_entries(tiers, scores, predicted=predicted))
    assert [e["path"] for e, _ in found] == ["d/0.png", "d/6.png"]
    assert "tier S, scored like C" in found[0][1]
    page = render_html(_entries(tiers, scores, predicted=predicted), {}, splits_known=False)
    assert "Disagreements &middot; 2" in page and "MAY INCLUDE training drawings" in page


def test_report_uses_held_out_drawings_when_the_split_is_known():
    entries = _entries(list("SSAABBCC"), [8, 7, 6, 5, 4, 3, 2, 1], predicted=list("SSAABBCC"))
    for e, sp in zip(entries, ["train", "test", "train", "test", "val", "test", "train", "test"]):
        e["split"] = sp
    page = render_html(entries, {}, splits_known=True)
    assert "computed on the 4 held-out drawings" in page and "3 training and 1 validation drawings are left out" in page
    assert "Disagreements &middot; 0" in page


def test_training_stores_a_calibration_and_evaluate_reports_the_tier_figures(tmp_path, capsys):
    cache, meta = write_dataset(str(tmp_path), per_tier=20, dim=8, separation=2.0)
    out = tmp_path / "run"
    assert train_script.main(["--features", cache, "--metadata", meta, "--output-dir", str(out), "--max-epochs", "3",
                              "--pairs-per-epoch", "300", "--eval-pairs", "400", "--hidden-dim", "16",
                              "--projector-dim", "8", "--learning-rate", "1e-2", "--device", "cpu",
                              "--no-progress"]) == 0
    assert "test tier accuracy" in capsys.readouterr().out
    assert (out / "calibration.png").is_file()
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert ckpt["calibration"]["fitted_on"] == "val" and ckpt["calibration"]["num_images"] == 8
        assert ckpt["score_reference"]["split"] == "train" and ckpt["score_reference"]["counts"]["all"] == 64
    metrics = json.loads((out / "test_metrics.json").read_text())["model"]
    assert len(metrics["confusion_matrix"]["counts"]) == 4 and metrics["calibration_fitted_on"] == "val"
    assert sum(map(sum, metrics["confusion_matrix"]["counts"])) == 8
    assert "expected calibration error" in metrics["calibration_error"]["name"]
    report = tmp_path / "eval.json"
    assert evaluate_script.main(["--checkpoint", str(out / "best.pt"), "--features", cache, "--metadata", meta,
                                 "--split", "val", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "confusion matrix" in printed and "in-sample" in printed
    evaluated = json.loads(report.read_text())
    assert evaluated["model"]["tier_accuracy"] is not None and "tier_figures_note" in evaluated


def test_the_sweep_winner_carries_a_calibration(tmp_path):
    from _sweep_helpers import write_synthetic
    from mirip.sweep.grid import SweepGrid
    from mirip.sweep.settings import SweepSettings
    from mirip.sweep.runner import run_sweep
    from mirip.training.config import TrainingConfig
    from mirip.training.run import evaluate_checkpoint

    features, metadata = write_synthetic(tmp_path, n=80, dim=12, separation=2.0)
    tc = TrainingConfig(max_epochs=3, pairs_per_epoch=64, eval_pairs=120, batch_size=16, device="cpu")
    settings = SweepSettings(features=features, metadata=metadata, output_dir=str(tmp_path / "sweep"), training=tc)
    result = run_sweep(SweepGrid(margin=(0.5, 1.0), hidden_dim=(8,), projector_dim=(4,)), settings, progress=False,
                       log=lambda m: None)
    winner = result["best"]["checkpoint"]
    ckpt = torch.load(winner, weights_only=True)
    assert ckpt["calibration"]["fitted_on"] == "val" and ckpt["calibration"]["num_images"] == 8
    assert ckpt["score_reference"]["counts"]["all"] == 64
    evaluated = evaluate_checkpoint(winner, features, metadata, split="test", device="cpu")
    assert evaluated["model"]["tier_accuracy"] == pytest.approx(ckpt["sweep"]["test_metrics"]["tier_accuracy"])
