"""train.py --ensemble K (one checkpoint of K heads) and evaluate.py's report of whether uncertainty means something.

References are computed here with plain loops over members and pairs, never with ``mirip.training.ensemble``.
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

from mirip.cli import evaluate as evaluate_cli
from mirip.cli import train as train_cli
from mirip.ml.ranking_model import RankingHead
from mirip.training.calibration_fit import fit_ordinal
from mirip.training.config import TrainingConfig
from mirip.training.run_config import RunConfig
from mirip.training.run_data import load_run_data, split_dataset

from _stage2_helpers import single_thread, write_dataset

_one_thread = pytest.fixture(autouse=True)(single_thread)
FAST = ["--max-epochs", "3", "--pairs-per-epoch", "300", "--eval-pairs", "400", "--hidden-dim", "16",
        "--projector-dim", "8", "--learning-rate", "1e-3", "--device", "cpu", "--no-progress", "--seed", "7",
        "--val-ratio", "0.2", "--test-ratio", "0.2", "--train-ratio", "0.6"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-member ensemble run and the single run of the same seed, on one synthetic cache."""
    d = tmp_path_factory.mktemp("ensemble_runs")
    torch.set_num_threads(1)
    cache, meta = write_dataset(str(d), per_tier=20, dim=8)
    for name, extra in (("ens", ["--ensemble", "3"]), ("one", [])):
        assert train_cli.main(["--features", cache, "--metadata", meta, "--output-dir", str(d / name),
                               *FAST, *extra]) == 0
    return d, cache, meta


def members_of(ckpt):
    heads = []
    for state in ckpt["ensemble"]["member_states"]:
        h = RankingHead(**ckpt["head"]).eval()
        h.load_head_state_dict(state)
        heads.append(h)
    return heads


def split_of(ckpt, cache, meta, split):
    cfg = RunConfig.from_dict({**ckpt["run_config"], "features": cache, "metadata": meta})
    data = load_run_data(cfg)
    return split_dataset(data, split, data.features, TrainingConfig.from_dict(ckpt["config"]), train=False)


def test_an_ensemble_run_is_one_checkpoint_of_distinct_members_whose_first_is_the_single_run(runs):
    d, cache, meta = runs
    ens = torch.load(d / "ens" / "best.pt", weights_only=False)
    one = torch.load(d / "one" / "best.pt", weights_only=False)
    states = ens["ensemble"]["member_states"]
    assert ens["ensemble"]["seeds"] == [7, 8, 9] and len(states) == 3
    assert not (d / "ens" / "last.pt").exists() and (d / "ens" / "test_metrics.json").is_file()
    for k, v in ens["model_state_dict"].items():
        assert torch.equal(v, states[0][k])
        torch.testing.assert_close(v, one["model_state_dict"][k], atol=1e-5, rtol=1e-4)  # the same seed's head
    for a in range(3):
        for b in range(a + 1, 3):
            assert any(not torch.allclose(states[a][k], states[b][k]) for k in states[a]), (a, b)
    # The calibration is the ensemble's: fitted on the members' mean score of the val images.
    val = split_of(ens, cache, meta, "val")
    feats = torch.stack([val.features[int(i)] for i in val.rows]).float()
    with torch.no_grad():
        per = [[h.get_score(feats[i:i + 1]).item() for i in range(len(feats))] for h in members_of(ens)]
    mean = [sum(col) / len(col) for col in zip(*per)]
    expected = fit_ordinal(np.array(mean), val.ranks, fitted_on="val").to_dict()
    np.testing.assert_allclose(ens["calibration"]["thresholds"], expected["thresholds"], atol=1e-6)
    assert ens["typicality"] is not None


def naive_uncertainty(per, first, second, labels):
    """Mean / sample std per image, certainty = gap / combined spread, halves by a stable sort."""
    n = len(per[0])
    mean = [sum(p[i] for p in per) / len(per) for i in range(n)]
    std = [statistics.stdev([p[i] for p in per]) for i in range(n)]
    cert = [abs(mean[a] - mean[b]) / (std[a] ** 2 + std[b] ** 2) ** 0.5 for a, b in zip(first, second)]
    order = sorted(range(len(cert)), key=lambda j: -cert[j])
    half = len(order) // 2

    def acc(idx, scores):
        return sum(1 for j in idx if np.sign(scores[first[j]] - scores[second[j]]) == labels[j]) / len(idx)
    return {"most": acc(order[:half], mean), "least": acc(order[len(order) - half:], mean),
            "all": acc(range(len(labels)), mean), "members": [acc(range(len(labels)), p) for p in per],
            "std_mean": sum(std) / n}


def test_evaluate_reports_accuracy_on_the_more_and_less_certain_halves(runs, tmp_path, capsys):
    d, cache, meta = runs
    report_path = tmp_path / "eval.json"
    assert evaluate_cli.main(["--checkpoint", str(d / "ens" / "best.pt"), "--features", cache, "--metadata", meta,
                              "--split", "test", "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "most certain half accuracy" in printed and "vs its members' mean" in printed
    report = json.loads(report_path.read_text())["uncertainty"]
    ens = torch.load(d / "ens" / "best.pt", weights_only=False)
    test = split_of(ens, cache, meta, "test")
    feats = torch.stack([test.features[int(i)] for i in test.rows]).float()
    with torch.no_grad():
        per = [[h.get_score(feats[i:i + 1]).item() for i in range(len(feats))] for h in members_of(ens)]
    first, second, labels = test.pair_arrays()
    ref = naive_uncertainty(per, list(first), list(second), list(labels))
    assert report["members"] == 3 and report["pairs"] == len(labels)
    assert report["most_certain_half_accuracy"] == pytest.approx(ref["most"])
    assert report["least_certain_half_accuracy"] == pytest.approx(ref["least"])
    assert report["accuracy"] == pytest.approx(ref["all"])
    assert report["member_accuracy"] == pytest.approx(ref["members"])
    assert report["score_std_mean"] == pytest.approx(ref["std_mean"], rel=1e-4) and report["score_std_mean"] > 0
    assert report["typicality"]["images"] == len(feats) and 0 <= report["typicality"]["median"] <= 1
    # A single head: evaluated as before, plus its score-gap halves and no spread.
    assert evaluate_cli.main(["--checkpoint", str(d / "one" / "best.pt"), "--features", cache, "--metadata", meta,
                              "--split", "test", "--json", str(report_path)]) == 0
    single = json.loads(report_path.read_text())["uncertainty"]
    assert single["members"] == 1 and "score_std_mean" not in single


def test_an_ensemble_run_refuses_resume_and_judgments_with_a_reason(runs, tmp_path, capsys):
    d, cache, meta = runs
    base = ["--features", cache, "--metadata", meta, *FAST, "--ensemble", "2"]
    assert train_cli.main([*base, "--output-dir", str(d / "ens"), "--resume"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert train_cli.main([*base, "--output-dir", str(d / "ens")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train_cli.main([*base, "--output-dir", str(tmp_path / "j"), "--judgments", meta]) == 2
    assert "--judgments" in capsys.readouterr().err and not (tmp_path / "j").exists()


@pytest.mark.slow
def test_on_demo_drawings_members_differ_and_certainty_tracks_accuracy(tiny_backbone, tmp_path, capsys):
    """The figures of docs/benchmarks.md (run with -s): demo drawings through the tiny random-weight backbone,
    a 5-member ensemble, its test split."""
    from mirip.demo.data import make_demo_dataset

    from _inference_helpers import make_cache_and_checkpoint, torch_threads

    meta = make_demo_dataset(tmp_path, num_images=240, image_size=64, image_format="png")
    with torch_threads(2):
        cache, _, _, _ = make_cache_and_checkpoint(tiny_backbone, str(tmp_path / "images"), list(meta.filename),
                                                   str(tmp_path))
    out, report = tmp_path / "run", tmp_path / "eval.json"
    assert train_cli.main(["--features", cache, "--metadata", str(tmp_path / "metadata.csv"), "--output-dir",
                           str(out), "--ensemble", "5", "--max-epochs", "30", "--pairs-per-epoch", "2000",
                           "--hidden-dim", "64", "--projector-dim", "32", "--learning-rate", "1e-3",
                           "--device", "cpu", "--no-progress", "--early-stopping-patience", "5"]) == 0
    assert evaluate_cli.main(["--checkpoint", str(out / "best.pt"), "--features", cache, "--metadata",
                              str(tmp_path / "metadata.csv"), "--split", "test", "--json", str(report)]) == 0
    u = json.loads(report.read_text())["uncertainty"]
    with capsys.disabled():
        print("\nensemble figures:", json.dumps(u, indent=1))
    assert u["score_std_mean"] > 0
    assert u["accuracy"] >= u["mean_member_accuracy"]
    assert u["most_certain_half_accuracy"] >= u["least_certain_half_accuracy"]
